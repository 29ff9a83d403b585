"""Every TensorBoard tag a cnnfeat run writes: its name (or family), kind, step axis and writer, in one place.

The writers (the picture callbacks) and the readers (the report, ``cnnfeat.report.figures``) name tags through this
module; the LightningModule's ``{stage}/acc`` and ``{stage}/loss`` follow Lightning's own naming, and
``tests/test_tags_events.py`` holds every writer to it: it fails when a run with every callback logs a tag that no
entry names, or misses an entry. A family has placeholders:
``DEAD_FRACTION.format(node="conv1")`` is ``relu/dead_fraction/conv1``, and ``parse`` takes a logged tag back to its
family and fields. Placeholders stand for one path segment (no ``/``; node names use ``.`` and ``:``), except those a
``Tag`` lists in ``spans`` (``hp/{metric}``: the metric's own tag).

Two step axes (``Axis``):

- ``EPOCHS``, epochs trained: 0 = the untrained network, N = after N epochs. Everything a picture callback writes
  (images, scalars, histograms, text) during training, at the end of fit and in ``cnnfeat-explore``.
- ``GLOBAL_STEP``, Lightning's global step (optimizer steps so far): the LightningModule's metrics and Lightning's
  ``epoch`` are written at the epoch's last training batch (``steps so far - 1``; the ``epoch`` scalar there, 0-based,
  maps the step to an epoch), the learning rate at the epoch's start (``steps so far``), ``test/*`` after the fit.

and ``ZERO`` for what is written once, at step 0, with the final metrics (TensorBoard's HParams tab).

A text tag is stored in the event file with ``/text_summary`` appended (``SummaryWriter.add_text``);
``Tag.logged`` spells it that way and ``parse`` accepts both. The UMAP callback's Projector data
(``add_embedding(tag="umap/features")``) is written to ``projector_config.pbtxt`` and a step folder, not to the
event file, and is not listed here. This module imports no Lightning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

__all__ = ["ALL", "Axis", "Kind", "Tag", "family", "parse"]


class Kind(str, Enum):
    """How a tag is stored in the event file (what ``cnnfeat.report.events`` files it under)."""

    SCALAR = "scalar"
    IMAGE = "image"
    HISTOGRAM = "histogram"
    TEXT = "text"
    HPARAMS = "hparams"  #: the HParams plugin's records (no value of their own)


class Axis(Enum):
    """What the step of a tag counts (see the module docstring)."""

    EPOCHS = "epochs trained (0 = the untrained network)"
    GLOBAL_STEP = "Lightning's global step (optimizer steps)"
    ZERO = "always 0 (written once, at the end of the run)"


#: what ``SummaryWriter.add_text`` appends to a text tag in the event file
TEXT_SUFFIX = "/text_summary"
_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Tag:
    """One tag, or a family of tags with ``{placeholders}``, as its writer spells it.

    ``choices`` restricts a placeholder to given values; ``condition`` says when a writer that is on still does not
    log it (empty: always, at the steps its axis names).
    """

    pattern: str
    kind: Kind
    axis: Axis
    writer: str
    description: str
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    spans: tuple[str, ...] = ()
    condition: str = ""

    def __repr__(self) -> str:
        return f"Tag({self.pattern!r}, {self.kind.value}, {self.axis.name})"

    def __post_init__(self) -> None:
        unknown = set(self.choices) | set(self.spans)
        if not unknown <= set(self.fields):
            raise ValueError(f"{self.pattern}: no placeholder {sorted(unknown - set(self.fields))}")

    @property
    def fields(self) -> tuple[str, ...]:
        """The placeholders, in order (empty for a single tag)."""
        return tuple(_FIELD.findall(self.pattern))

    @property
    def name(self) -> str:
        """The tag of an entry without placeholders (``TRAIN_ACC.name == "train/acc"``)."""
        if self.fields:
            raise ValueError(f"{self.pattern} is a family: use format({', '.join(f'{f}=...' for f in self.fields)})")
        return self.pattern

    @property
    def prefix(self) -> str:
        """The text before the first placeholder (``relu/dead_fraction/``): what every tag of the family starts with."""
        return self.pattern.split("{", 1)[0]

    def format(self, **values: object) -> str:
        """The tag of this family for ``values`` (every placeholder, nothing else)."""
        if set(values) != set(self.fields):
            raise ValueError(f"{self.pattern} needs {list(self.fields)}, got {sorted(values)}")
        for key, value in values.items():
            value = str(value)
            if not value or ("/" in value and key not in self.spans):
                raise ValueError(f"{self.pattern}: {key}={value!r} must be a non-empty name without '/'")
            if key in self.choices and value not in self.choices[key]:
                raise ValueError(f"{self.pattern}: {key} must be one of {list(self.choices[key])}, got {value!r}")
        return _FIELD.sub(lambda m: str(values[m.group(1)]), self.pattern)

    def logged(self, **values: object) -> str:
        """The tag as the event file stores it (a text tag with ``/text_summary`` appended)."""
        tag = self.format(**values)
        return tag + TEXT_SUFFIX if self.kind is Kind.TEXT else tag

    def match(self, tag: str) -> dict[str, str] | None:
        """The placeholder values if ``tag`` (as written, or as stored for text) belongs to this family, else None."""
        if self.kind is Kind.TEXT:
            tag = tag.removesuffix(TEXT_SUFFIX)
        m = self._regex.fullmatch(tag)
        return m.groupdict() if m else None

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        parts, last = [], 0
        for m in _FIELD.finditer(self.pattern):
            name = m.group(1)
            if name in self.choices:
                value = "|".join(re.escape(c) for c in self.choices[name])
            else:
                value = ".+" if name in self.spans else "[^/]+"
            parts += [re.escape(self.pattern[last : m.start()]), f"(?P<{name}>{value})"]
            last = m.end()
        return re.compile("".join([*parts, re.escape(self.pattern[last:])]))

    @property
    def specificity(self) -> int:
        """Characters fixed by the pattern: of two entries a tag matches, the more specific one names it
        (``relu/dead_fraction/all`` over ``relu/dead_fraction/{node}``)."""
        return len(_FIELD.sub("", self.pattern))


_S, _I, _H, _T = Kind.SCALAR, Kind.IMAGE, Kind.HISTOGRAM, Kind.TEXT
_EPOCHS, _STEP = Axis.EPOCHS, Axis.GLOBAL_STEP
_MODULE = "ClassifierModule (LightningModule.log, on_epoch)"

# -- training: the LightningModule, Lightning and the entry point -------------------------------------------
TRAIN_ACC = Tag("train/acc", _S, _STEP, _MODULE, "training accuracy of the epoch, at its last training batch")
TRAIN_LOSS = Tag("train/loss", _S, _STEP, _MODULE, "mean training cross-entropy of the epoch, at its last batch")
VAL_ACC = Tag("val/acc", _S, _STEP, _MODULE, "validation accuracy, at the step of the epoch's last training batch")
VAL_LOSS = Tag("val/loss", _S, _STEP, _MODULE, "mean validation cross-entropy, at the epoch's last training batch")
TEST_ACC = Tag("test/acc", _S, _STEP, _MODULE, "test accuracy of the final weights, at the global step after the fit")
TEST_LOSS = Tag("test/loss", _S, _STEP, _MODULE, "mean test cross-entropy of the final weights, after the fit")
EPOCH = Tag(
    "epoch",
    _S,
    _STEP,
    "Lightning (with every LightningModule.log)",
    "the epoch (0-based) at the step of the module's metrics: maps their global steps to epochs",
)
LR = Tag(
    "lr",
    _S,
    _STEP,
    "LearningRateMonitor (logging_interval=epoch; the scheduler is named 'lr')",
    "the learning rate at the epoch's start (global step = optimizer steps before it)",
)
HP_METRIC = Tag(
    "hp/{metric}",
    _S,
    Axis.ZERO,
    "cnnfeat.run.train.log_hparams (TensorBoardLogger.log_hyperparams)",
    "a final metric of the run for the HParams tab (metric: train.HPARAM_METRICS, e.g. val/acc)",
    spans=("metric",),
)
HPARAMS = Tag(
    "_hparams_/{record}",
    Kind.HPARAMS,
    Axis.ZERO,
    "cnnfeat.run.train.log_hparams (TensorBoardLogger.log_hyperparams)",
    "the HParams plugin's records of the run's config (experiment, session_start_info, session_end_info)",
    choices={"record": ("experiment", "session_start_info", "session_end_info")},
)

# -- DeadReluCallback -----------------------------------------------------------------------------------------
_DEAD = "DeadReluCallback"
DEAD_FRACTION = Tag(
    "relu/dead_fraction/{node}", _S, _EPOCHS, _DEAD, "share of a ReLU application's units that never fire on the probe"
)
DEAD_FRACTION_ALL = Tag(
    "relu/dead_fraction/all", _S, _EPOCHS, _DEAD, "share of all ReLU units (every application once) that never fire"
)
ZERO_FRACTION = Tag("relu/zero_fraction/{node}", _S, _EPOCHS, _DEAD, "share of a ReLU application's outputs that are 0")
NONFINITE_FRACTION = Tag(
    "relu/nonfinite_fraction/{node}",
    _S,
    _EPOCHS,
    _DEAD,
    "share of a ReLU application's inputs that are NaN or infinite",
    condition="only when some input is not finite (a diverged network)",
)
PREACT = Tag("relu/preact/{node}", _H, _EPOCHS, _DEAD, "a fixed sample of a ReLU application's (finite) inputs")

# -- FilterCallback, FeatureMapCallback, TopPatchesCallback ------------------------------------------------------
FILTERS = Tag("filters/{layer}", _I, _EPOCHS, "FilterCallback", "a conv layer's weights as an out x in grid")
FILTERS_OF_OUTPUT = Tag(
    "filters/{layer}/out{k}",
    _I,
    _EPOCHS,
    "FilterCallback",
    "output filter k's input-channel kernels as a grid",
    condition="only with per_filter_grids > 0 (callbacks=transfer)",
)
FEATURE_MAP_INPUT = Tag(
    "feature_maps/input/img{image}", _I, _EPOCHS, "FeatureMapCallback", "the input image (probe ID) the maps are of"
)
FEATURE_MAP_CONV = Tag(
    "feature_maps/{conv}/conv/img{image}", _I, _EPOCHS, "FeatureMapCallback", "a conv's output maps for one image"
)
FEATURE_MAP_ACTIVATION = Tag(
    "feature_maps/{conv}/{activation}/img{image}",
    _I,
    _EPOCHS,
    "FeatureMapCallback",
    "the maps after the activation applied to the conv's output (activation: relu, gelu, leaky_relu, ...)",
    condition="only for a conv followed by an activation",
)
TOP_PATCHES = Tag(
    "top_patches/{node}",
    _I,
    _EPOCHS,
    "TopPatchesCallback",
    "each channel's top-k receptive-field patches over the probe",
)

# -- EmbeddingCallback (UMAP) ----------------------------------------------------------------------------------
_UMAP = "EmbeddingCallback"
#: the quality numbers of a map (``cnnfeat.embedding.ClusterQuality``), in the order the report shows them
UMAP_METRICS = ("knn_acc", "knn_acc_2d", "trustworthiness", "silhouette")
UMAP_FEATURES = Tag("umap/features", _I, _EPOCHS, _UMAP, "UMAP of the last-layer features (or of the node `layer`)")
UMAP_QUALITY = Tag(
    "umap/{metric}",
    _S,
    _EPOCHS,
    _UMAP,
    "how well the classes separate in the features and their map (k-NN accuracies, trustworthiness, silhouette)",
    choices={"metric": UMAP_METRICS},
)
UMAP_FRAME_SHIFT = Tag(
    "umap/frame_shift",
    _S,
    _EPOCHS,
    _UMAP,
    "mean distance a point moves from the previous epoch's map (RMS radii)",
    condition="only when the previous epoch's map was drawn",
)
UMAP_PIXELS = Tag(
    "umap/pixels",
    _I,
    _EPOCHS,
    _UMAP,
    "UMAP of the raw pixels (the baseline), once",
    condition="only at the first render",
)
UMAP_PIXEL_QUALITY = Tag(
    "umap/pixels/{metric}",
    _S,
    _EPOCHS,
    _UMAP,
    "the quality numbers of the raw-pixel map, once",
    choices={"metric": UMAP_METRICS},
    condition="only at the first render",
)

# -- RepresentationCallback and CrossModelCKACallback ------------------------------------------------------------
_REP = "RepresentationCallback"
_CROSS = "CrossModelCKACallback"
CKA_TO_PREVIOUS = Tag(
    "cka/to_previous/{layer}",
    _S,
    _EPOCHS,
    _REP,
    "CKA of a layer with itself one epoch earlier",
    condition="only when the previous epoch was recorded",
)
CKA_TO_UNTRAINED = Tag(
    "cka/to_untrained/{layer}",
    _S,
    _EPOCHS,
    _REP,
    "CKA of a layer with the untrained network's",
    condition="from the second recorded step, when step 0 was recorded",
)
CKA_TO_FINAL = Tag(
    "cka/to_final/{layer}",
    _S,
    _EPOCHS,
    _REP,
    "CKA of each recorded epoch with the last one (written at the end of fit)",
)
CKA_TO_FINAL_CHART = Tag("cka/to_final", _I, _EPOCHS, _REP, "the cka/to_final curves of every layer, at the last step")
CKA_LAYERS = Tag(
    "cka/layers/{a}/{b}", _S, _EPOCHS, _REP, "CKA between two layers, untrained (step 0) and at the last step"
)
CKA_LAYERS_HEATMAP = Tag("cka/layers", _I, _EPOCHS, _REP, "layer x layer CKA, untrained (step 0) and at the last step")
CKA_EPOCHS = Tag("cka/epochs/{layer}", _I, _EPOCHS, _REP, "epoch x epoch CKA of one layer (end of fit)")
PROBE_ACC = Tag("probe/acc/{layer}", _S, _EPOCHS, _REP, "linear probe test accuracy on a layer's activations")
PROBE_ACC_VS_DEPTH = Tag(
    "probe/acc_vs_depth", _I, _EPOCHS, _REP, "linear probe accuracy by layer and epoch (end of fit)"
)
UNITS_DEAD = Tag("units/dead/{layer}", _S, _EPOCHS, _REP, "number of a layer's units that never fire on the probe")
UNITS_DIED = Tag(
    "units/died/{layer}",
    _S,
    _EPOCHS,
    _REP,
    "units dead now that were alive at the previous step",
    condition="at step 0 and when the previous epoch was recorded",
)
UNITS_REVIVED = Tag(
    "units/revived/{layer}",
    _S,
    _EPOCHS,
    _REP,
    "units alive now that were dead at the previous step",
    condition="at step 0 and when the previous epoch was recorded",
)
UNITS_RASTER = Tag("units/raster/{layer}", _I, _EPOCHS, _REP, "alive/dead of every unit by epoch (end of fit)")
UNITS_DEATHS = Tag("units/deaths", _T, _EPOCHS, _REP, "when each unit died (and revived), as a table (end of fit)")
CKA_CROSS = Tag(
    "cka/cross/{a}/{b}",
    _S,
    _EPOCHS,
    _CROSS,
    "CKA between the reference's layer a and the model's layer b",
    condition="only with a reference_ckpt",
)
CKA_CROSS_HEATMAP = Tag(
    "cka/cross/{reference}",
    _I,
    _EPOCHS,
    _CROSS,
    "reference layers x model layers CKA (reference: the reference model's class name)",
    condition="only with a reference_ckpt",
)

# -- FeatureVisCallback, AtlasCallback, ShapeTableCallback ------------------------------------------------------
_FV = "FeatureVisCallback"
FEATVIZ = Tag("featviz/{layer}", _I, _EPOCHS, _FV, "each unit's optimised input, captioned with its fidelity")
FEATVIZ_FIDELITY_SHARE = Tag(
    "featviz/fidelity_share/{layer}",
    _S,
    _EPOCHS,
    _FV,
    "share of units whose optimised input reaches their best real one",
)
FEATVIZ_FIDELITY_MEDIAN = Tag("featviz/fidelity_median/{layer}", _S, _EPOCHS, _FV, "median fidelity of the units")
FEATVIZ_SECONDS_PER_UNIT = Tag(
    "featviz/seconds_per_unit/{layer}", _S, _EPOCHS, _FV, "optimisation time per unit (seconds)"
)
FEATVIZ_TABLE = Tag("featviz/{layer}/table", _T, _EPOCHS, _FV, "each unit's activation, reference and fidelity")
ATLAS_FIDELITY_SHARE = Tag(
    "atlas/fidelity_share/{layer}",
    _S,
    _EPOCHS,
    "AtlasCallback",
    "share of recorded units whose optimised input reaches fidelity 1 (end of fit, at the last step)",
    condition="only with featviz=true",
)
# -- AttributionCallback and ImportanceCallback (issue 24) ------------------------------------------------------
ATTRIBUTION = Tag(
    "attribution/img{image}",
    _I,
    _EPOCHS,
    "AttributionCallback",
    "an image with Grad-CAM and a pixel-level map (Integrated Gradients or LRP) for its predicted and its true class",
)
ATTRIBUTION_IG_GAP = Tag(
    "attribution/ig_gap/img{image}",
    _S,
    _EPOCHS,
    "AttributionCallback",
    "Integrated Gradients' completeness gap relative to the logit difference (the larger of the two classes)",
    condition="with pixel_method=integrated_gradients",
)
ATTRIBUTION_LRP_CONSERVED = Tag(
    "attribution/lrp_conserved/img{image}",
    _S,
    _EPOCHS,
    "AttributionCallback",
    "LRP: the input relevance's sum over the class logit (1 = all of it reached the pixels; biases absorb the rest), "
    "of the class farther from 1",
    condition="with pixel_method=lrp",
)
_IMP = "ImportanceCallback"
IMPORTANCE_ACC_DROP_MAX = Tag(
    "importance/acc_drop_max/{layer}", _S, _EPOCHS, _IMP, "the largest probe accuracy drop from removing one unit"
)
IMPORTANCE_BUSY_IDLE = Tag(
    "importance/busy_idle/{layer}", _S, _EPOCHS, _IMP, "number of a layer's units that fire a lot but do not matter"
)
IMPORTANCE_RARE_VITAL = Tag(
    "importance/rare_vital/{layer}", _S, _EPOCHS, _IMP, "number of a layer's units that rarely fire but matter"
)
IMPORTANCE_UNIT_ACC_DROP = Tag(
    "importance/{layer}/unit{unit}/acc_drop", _S, _EPOCHS, _IMP, "probe accuracy lost when this one unit is removed"
)
IMPORTANCE_UNIT_LOGIT_DROP = Tag(
    "importance/{layer}/unit{unit}/logit_drop",
    _S,
    _EPOCHS,
    _IMP,
    "mean true-class logit lost when this one unit is removed",
)
IMPORTANCE_TABLE = Tag(
    "importance/{layer}/table", _T, _EPOCHS, _IMP, "each removed unit's accuracy and logit drop, firing rate and role"
)
#: ``IMPORTANCE_TABLE``'s markdown columns (one row per unit, most important first) and the words of its role column:
#: the callback writes them, the report reads them back
IMPORTANCE_TABLE_COLUMNS = ("rank", "unit", "accuracy drop", "logit drop", "firing rate", "role")
ROLE_BUSY_IDLE, ROLE_RARE_VITAL = "fires a lot, does not matter", "rarely fires, matters"
_REL = "RelevanceCallback"
_PATH = "only with path_check=true, at the last epoch of the fit"
RELEVANCE_REFS = Tag(
    "relevance/refs/{layer}",
    _I,
    _EPOCHS,
    _REL,
    "per unit, its top-k probe patches by activation above its top-k by relevance for the predicted class",
)
RELEVANCE_HEATMAPS = Tag(
    "relevance/heatmaps/{layer}",
    _I,
    _EPOCHS,
    _REL,
    "per unit, its relevance references above their conditional heatmaps (where the unit's relevance comes from)",
    condition="only with heatmaps=true",
)
RELEVANCE_OVERLAP = Tag(
    "relevance/overlap/{layer}",
    _S,
    _EPOCHS,
    _REL,
    "share of relevance references that are activation references too, mean over the layer's units that fire and "
    "are relevant somewhere (others have no references)",
)
RELEVANCE_TABLE = Tag(
    "relevance/{layer}/table", _T, _EPOCHS, _REL, "each unit's overlap, best relevance and best activation"
)
RELEVANCE_PATH_FLAGGED = Tag(
    "relevance/path_flagged/{layer}",
    _S,
    _EPOCHS,
    _REL,
    "units whose optimised input's activation path is no closer to their top real images' than arbitrary images'",
    condition=_PATH,
)
RELEVANCE_PATH_TABLE = Tag(
    "relevance/{layer}/path_table",
    _T,
    _EPOCHS,
    _REL,
    "each checked unit's path similarities (optimised, real, arbitrary vs its top real images) and flag",
    condition=_PATH,
)
MODEL_SHAPES = Tag("model/shapes", _T, _EPOCHS, "ShapeTableCallback", "every layer's output shape, as a table (step 0)")

_KINDS = frozenset(k.value for k in Kind)

#: every entry, in the order above
ALL: tuple[Tag, ...] = tuple(v for v in dict(globals()).values() if isinstance(v, Tag))

# -- namespaces that the report shows by prefix ------------------------------------------------------------------
#: representation pictures (``cka/...``; a user's own ``cka/...`` images are shown as well)
CKA_NAMESPACE = "cka/"
#: linear probe pictures and scalars
PROBE_NAMESPACE = "probe/"
#: the UMAP callback's scalars
UMAP_NAMESPACE = "umap/"


def parse(tag: str, kind: Kind | str | None = None) -> tuple[Tag, dict[str, str]] | None:
    """The most specific entry that ``tag`` (as logged) belongs to, with its placeholder values; None if none does.

    ``kind`` (a ``Kind`` or its value) narrows the search: ``cka/layers`` is an image, ``cka/layers/a/b`` a scalar."""
    if kind is not None and kind not in _KINDS:
        return None  # a tensor or audio summary: no entry is one
    kind = Kind(kind) if kind is not None else None
    found = [(t, m) for t in ALL if (kind is None or t.kind is kind) and (m := t.match(tag)) is not None]
    if not found:
        return None
    return max(found, key=lambda tm: tm[0].specificity)


def family(tag: str, kind: Kind | str | None = None) -> Tag | None:
    """The entry that ``tag`` belongs to (see ``parse``), or None."""
    found = parse(tag, kind)
    return found[0] if found else None
