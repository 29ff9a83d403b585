"""What every cnnfeat picture callback shares: when to run, which images, where pictures go, module hygiene.

A subclass implements ``check`` (validate its arguments against the model and the probe before training) and
``render`` (compute pictures and numbers from a module and the probe), and hands the arguments every picture
callback shares to the base class as one ``CallbackOptions`` (validated once, kept as ``options``). In ``setup``
the callback gets the run's probe (``cnnfeat.probe.ProbeSet``: built once per DataModule and split, shared by all
callbacks). The base class runs ``render`` on the untrained network and every ``every_n_epochs`` epochs, on rank 0
only, under ``torch.no_grad()`` with every submodule's train/eval mode restored afterwards, never during the sanity
check.

**One step axis.** Everything a callback writes carries ``step`` = epochs trained (0 = the untrained network,
N = after N epochs): images, histograms and text to TensorBoard (warning once when there is no TensorBoard
logger), PNG files ``step_NNN.png``, and scalars to every logger through ``log_metrics(..., step=step)``
(as Lightning's ``LearningRateMonitor`` passes its step). Scalars of an epoch end are also put into
``trainer.callback_metrics`` (``pl_module.log(..., logger=False)``) for HParams and the run summary.
``render`` is public so that ``cnnfeat-explore`` draws the same pictures from checkpoints without a Trainer.

**One session per fit.** In ``setup`` every picture callback of the Trainer gets the same ``AnalysisSession``
(``cnnfeat.callbacks.session``): the probe (built once per DataModule and spec), the layer plan of the model (traced
once; ``layer_plan``) and one ``ProbePass`` per probe. A callback that sets ``uses_probe_pass`` runs no model over the
probe: it implements ``pass_request`` (the nodes it needs and an accumulator, ``cnnfeat.probe_pass``) and reads its fed
accumulator with ``pass_result`` in ``render``; the first that renders at a step runs the model once for all of them.
``share_session`` does the same for ``cnnfeat-explore`` and tests; a callback prepared on its own gets a session (and
a pass) of its own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard import summary as tb_summary
from typing_extensions import override

from cnnfeat import atlas, viz
from cnnfeat.callbacks.session import AnalysisSession, inference
from cnnfeat.errors import ConfigError, check_bool, check_int
from cnnfeat.graph import device_of as device_of  # the callbacks import it from here
from cnnfeat.plan import LayerPlan
from cnnfeat.probe import ProbeSet, ProbeSpec
from cnnfeat.probe_pass import PassResult, ProbePass
from cnnfeat.run import event_crc
from cnnfeat.run import lightning_api as pl
from cnnfeat.run.lightning_api import CSVLogger, TensorBoardLogger, rank_zero_warn
from cnnfeat.topk import PatchSearch
from cnnfeat.units import nonfinite_rows as nonfinite_rows  # the callbacks import it from here

log = logging.getLogger("cnnfeat")

#: the stratified probe images the pass consumers read by default (fewer when the split is smaller)
DEFAULT_PROBE_SIZE = 2000


def check_number(name: str, value: Any, minimum: float = -math.inf, above: bool = False) -> None:
    """Refuse unless ``value`` is a finite real number (not a bool) >= ``minimum`` (> when ``above``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (above and value == minimum):
        bound = "" if minimum == -math.inf else f" {'>' if above else '>='} {minimum:g}"
        raise ConfigError(f"{name} must be a finite number{bound}, got {value!r}")


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def check_names(name: str, values: Any, allow_none: bool = False) -> list[str] | None:
    """A list of distinct, non-empty names (layers, class names); a bare string, an empty list or a repeat is
    refused with the argument's name. ``None`` passes when ``allow_none`` (the callback's default)."""
    if values is None and allow_none:
        return None
    if not _is_list(values):
        raise ConfigError(f"{name} must be a list of names, got {values!r}")
    names = list(values)
    if not names:
        raise ConfigError(f"{name} is empty: give at least one name{' (or null for the default)' * allow_none}")
    bad = [v for v in names if not isinstance(v, str) or not v]
    if bad:
        raise ConfigError(f"{name} must hold names (strings), got {bad}")
    _check_unique(name, names)
    return names


def check_indices(name: str, values: Any, allow_none: bool = False, nonnegative: bool = True) -> list[int] | None:
    """A non-empty list of distinct integer indices (>= 0 unless ``nonnegative=False``: image IDs, channels, units);
    upper bounds are the model's or the probe's and are checked in ``check`` (with the valid range, when
    ``nonnegative=False`` leaves negative ones to that message too)."""
    if values is None and allow_none:
        return None
    ok = _is_list(values) and len(values) > 0
    if ok:
        ok = all(isinstance(v, int) and not isinstance(v, bool) and (v >= 0 or not nonnegative) for v in values)
    if not ok:
        shown = list(values) if _is_list(values) else values
        what = "indices >= 0" if nonnegative else "integer indices"
        raise ConfigError(f"{name} must be a non-empty list of {what}, got {shown!r}")
    _check_unique(name, list(values))
    return [int(v) for v in values]


def _check_unique(name: str, values: list) -> None:
    repeated = sorted({v for v in values if values.count(v) > 1}, key=values.index)
    if repeated:
        raise ConfigError(f"{name} lists {repeated} more than once")


def _check_floats(name: str, value: Any) -> None:
    """``None``, a number or a list of numbers (``mean``/``std``; ``ProbeSpec`` checks their values)."""
    items = list(value) if _is_list(value) else [value]
    if value is not None and not all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
        raise ConfigError(f"{name} must be a number or a list of numbers, got {value!r}")


#: threads that encode a render's pictures as PNG side by side (Pillow's encoder releases the GIL)
PNG_THREADS = 2


@cache
def _png_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(PNG_THREADS, thread_name_prefix="cnnfeat-png")


def _add_images(writer: SummaryWriter, images: Mapping[str, torch.Tensor], step: int) -> None:
    """``writer.add_image`` for each picture, in order, with the PNG encoding (most of the time: ~40 ms of a feature
    map render's 60) done on ``PNG_THREADS`` threads first: the same summaries, bytes and event order."""
    file_writer = getattr(writer, "_get_file_writer", None)  # what add_image itself writes to
    if len(images) < 2 or file_writer is None:
        for tag, img in images.items():
            writer.add_image(tag, img, step, dataformats="CHW")
        return
    summaries = list(
        _png_pool().map(lambda item: tb_summary.image(item[0], item[1], dataformats="CHW"), images.items())
    )
    for summary in summaries:
        file_writer().add_summary(summary, step)


@dataclass
class Pictures:
    """What one ``render`` produced: RGB images (3,H,W) in [0,1], scalars, histograms and text, by tag."""

    images: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    #: scalars for the loggers only, kept out of the trainer's metrics (``status.json``, HParams): per-unit series
    detail: dict[str, float] = field(default_factory=dict)

    def logged(self) -> dict[str, float]:
        """Every scalar the loggers receive: ``scalars`` and ``detail``."""
        return {**self.scalars, **self.detail}

    def write(self, writer: SummaryWriter | None, step: int, png_dir: Path | None = None, scalars: bool = True) -> None:
        """Send everything to ``writer`` (if any) and images to ``png_dir/<tag>/step_NNN.png`` (if set)."""
        if writer is not None:
            event_crc.install()  # the event records' checksums at compiled speed (cnnfeat.run.event_crc)
            _add_images(writer, self.images, step)
            for tag, values in self.histograms.items():
                writer.add_histogram(tag, values, step)
            for tag, text in self.texts.items():
                writer.add_text(tag, text, step)
            if scalars:
                for tag, value in self.logged().items():
                    writer.add_scalar(tag, value, step)
        if png_dir is not None:
            for tag, img in self.images.items():
                viz.save_png(img, png_dir / tag / f"step_{step:03d}.png")


def follows_recorded(step: int, recorded: Collection[int]) -> bool:
    """Whether the step before ``step`` (epochs trained) is among the ``recorded`` ones.

    A value named after the previous epoch (``cka/to_previous``, ``units/died``, ``umap/frame_shift``) is logged only
    then: across a gap (an epoch without a checkpoint in ``cnnfeat-explore``, ``every_n_epochs`` > 1) it would
    compare with an older epoch under the previous one's name.
    """
    return step - 1 in recorded


def tensorboard_writer(trainer: pl.Trainer) -> SummaryWriter | None:
    """The SummaryWriter of the trainer's TensorBoardLogger, or None."""
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            return lg.experiment
    return None


def share_session(callbacks: Sequence[Any]) -> AnalysisSession:
    """Give ``callbacks`` one new session (one probe pass per probe for the pass consumers): ``cnnfeat-explore`` and
    tests, after ``prepare``; a Trainer's callbacks get theirs in ``setup``."""
    session = AnalysisSession.attach(callbacks)
    for cb in callbacks:
        if isinstance(cb, VisualizationCallback):
            cb.join(session)
    return session


def log_dir(trainer: pl.Trainer) -> Path:
    """Where ``trainer.log_dir`` points, read without its hidden broadcast (the caller broadcasts once)."""
    if trainer.loggers:
        lg = trainer.loggers[0]
        return Path(lg.log_dir if isinstance(lg, (TensorBoardLogger, CSVLogger)) else lg.save_dir or ".")
    return Path(trainer.default_root_dir)


@dataclass(frozen=True, kw_only=True)
class CallbackOptions:
    """What every picture callback takes besides its own arguments: when it renders, where pictures go, which probe.

    Validated once, here (a bad value is refused with the argument's name); ``mean``, ``std`` and ``class_names`` are
    kept as tuples (a number as a 1-tuple), so equal options compare and hash equal. ``probe_spec`` is derived from
    ``split``, ``mean``, ``std`` and ``class_names``.

    Args:
        every_n_epochs: render after every N-th epoch (and after the last one).
        log_untrained: also render before training (step 0, the untrained network).
        save_png: also write every image as a PNG under ``<run dir>/images/<tag>/step_NNN.png``.
        during_training: ``False`` renders only before training: for layers that are frozen.
        split: the split the probe images come from (``test``, ``val`` or ``train``; ``test`` falls back to
            ``val`` when the DataModule builds its test set only in ``setup("test")``).
        mean, std: what the inputs are normalised with, when the dataset's transform has no torchvision
            ``Normalize`` to detect (pictures show ``x * std + mean``).
        class_names: class names when the dataset has no ``classes``.
    """

    every_n_epochs: int = 1
    log_untrained: bool = True
    save_png: bool = False
    during_training: bool = True
    split: str = "test"
    mean: Sequence[float] | float | None = None
    std: Sequence[float] | float | None = None
    class_names: Sequence[str] | None = None

    def __post_init__(self) -> None:
        check_int("every_n_epochs", self.every_n_epochs)
        for name in ("log_untrained", "save_png", "during_training"):
            check_bool(name, getattr(self, name))
        _check_floats("mean", self.mean)
        _check_floats("std", self.std)
        check_names("class_names", self.class_names, allow_none=True)
        spec = self.probe_spec  # checks split and mean/std
        for name, value in (("mean", spec.mean), ("std", spec.std), ("class_names", spec.class_names)):
            object.__setattr__(self, name, value)

    @cached_property
    def probe_spec(self) -> ProbeSpec:
        """The probe these options ask for (the session builds it once per DataModule and spec)."""
        return ProbeSpec.of(self.split, self.mean, self.std, self.class_names)


class VisualizationCallback(pl.Callback):
    """Base class: schedule, probe, output and module hygiene for picture callbacks (see the module docstring).

    Args:
        options: the arguments every picture callback shares (``CallbackOptions``); a subclass takes them as flat
            keyword arguments (the config's keys) and builds the options by keyword. Kept as ``options``;
            ``every_n_epochs``, ``log_untrained``, ``save_png``, ``during_training``, ``split`` and ``probe_spec``
            read them.
    """

    #: whether the callback reads probe images (the filters callback does not)
    needs_probe: ClassVar[bool] = True
    #: whether the callback reads the shared probe pass (implements ``pass_request``) instead of running the model
    uses_probe_pass: ClassVar[bool] = False

    def __init__(self, options: CallbackOptions) -> None:
        if not isinstance(options, CallbackOptions):
            raise TypeError(f"{type(self).__name__}: VisualizationCallback takes a CallbackOptions, got {options!r}")
        #: the shared arguments, validated (frozen)
        self.options = options
        #: the shared probe, set in ``setup`` (or by ``prepare``)
        self.probe: ProbeSet | None = None
        self._run_dir: Path | None = None
        self._warned: set[str] = set()
        #: wall seconds of each emission (render + write), for cost accounting in benchmarks
        self.seconds: list[float] = []
        #: wall seconds of the end of fit (``finish``, its pictures and ``end_of_fit``), rank 0; 0 until then
        self.end_seconds: float = 0.0
        #: what this callback shares with the others of its fit (probe, layer plan, probe pass); set in ``prepare``
        self.session: AnalysisSession | None = None
        #: the pass shared with the other consumers of the probe (a pass consumer's, set in ``prepare``)
        self.probe_pass: ProbePass | None = None

    @property
    def every_n_epochs(self) -> int:
        """``options.every_n_epochs``."""
        return self.options.every_n_epochs

    @property
    def log_untrained(self) -> bool:
        """``options.log_untrained``."""
        return self.options.log_untrained

    @property
    def save_png(self) -> bool:
        """``options.save_png``."""
        return self.options.save_png

    @property
    def during_training(self) -> bool:
        """``options.during_training``."""
        return self.options.during_training

    @property
    def split(self) -> str:
        """``options.split``."""
        return self.options.split

    @property
    def probe_spec(self) -> ProbeSpec:
        """``options.probe_spec``: the probe this callback reads."""
        return self.options.probe_spec

    # -- to implement --------------------------------------------------------------------------------
    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        """Validate arguments against the model and probe before training; raise a ``ConfigError``."""

    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        """Compute the pictures for ``step`` (epochs trained) under ``inference``; must not change the module."""
        raise NotImplementedError

    def should_render(self, writer: SummaryWriter | None) -> bool:
        """Rendering is pointless without a destination; callbacks with scalars override this."""
        return writer is not None or self.options.save_png

    # -- shared API ----------------------------------------------------------------------------------
    def prepare(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        """Keep the probe, join the session's probe pass (a session of its own if none was attached) and check the
        arguments against ``pl_module`` and ``probe`` (``setup``, explore and tests)."""
        self.probe = probe
        if self.session is None:
            self.session = AnalysisSession()
        self.join(self.session)
        self.check(pl_module, probe)

    def join(self, session: AnalysisSession) -> None:
        """Use ``session``; a pass consumer becomes a member of its probe pass."""
        self.session = session
        if self.uses_probe_pass:
            self.probe_pass = session.probe_pass(self.probe_spec)
            self.probe_pass.join(self)

    def layer_plan(self, pl_module: nn.Module) -> LayerPlan:
        """The layer plan of ``pl_module`` (``cnnfeat.plan``), traced once per model by the session on the probe."""
        if self.probe is None:
            raise ConfigError(f"{type(self).__name__}: the layer plan is traced on the probe: call prepare first")
        if self.session is None:
            self.session = AnalysisSession()
        return self.session.plan(pl_module, self.probe)

    def traced_plan(self, pl_module: nn.Module) -> LayerPlan | None:
        """The layer plan if the session traced it already (``layer_plan`` without a forward pass), else None."""
        return None if self.session is None else self.session.traced_plan(pl_module)

    def image_bytes(self, pl_module: nn.Module) -> int:
        """What one probe image's values take at every node (``LayerPlan.image_bytes``) once the plan is traced, else
        0: what a traced batch holds, to cut batches of big images to ``cnnfeat.probe.CAPTURE_BUDGET``."""
        plan = self.traced_plan(pl_module)
        return 0 if plan is None else plan.image_bytes()

    def patch_search(
        self, pl_module: nn.Module, probe: ProbeSet, step: int, layers: Sequence[str], k: int, n: int, batch_size: int
    ) -> PatchSearch:
        """The top-``k`` patch search of ``layers`` over the first ``n`` probe images at ``step``, shared with the other
        callbacks of the session that search the same way at the same step (``AnalysisSession.patch_search``)."""
        if self.session is None:
            self.session = AnalysisSession()
        return self.session.patch_search(pl_module, probe, step, layers, k, n, batch_size, self.image_bytes(pl_module))

    def pass_result(self, pl_module: nn.Module, probe: ProbeSet, step: int) -> PassResult | None:
        """This callback's accumulator fed by the shared probe pass at ``step`` (the first consumer to ask runs the
        model once for all; a callback without peers gets a pass of its own)."""
        if self.probe_pass is None:
            self.probe_pass = ProbePass([self])
        return self.probe_pass.collect(self, pl_module, probe, step)

    def fit_default_layers(
        self, pl_module: nn.Module, layers: list[str], default: Sequence[str], local: bool
    ) -> list[str]:
        """``layers``; the ``default`` (the lecture's conv names) alone, on a network without those convs, becomes the
        first conv of each stage (``LayerPlan.stage_convs``), and the log says which."""
        plan = self.layer_plan(pl_module)
        if tuple(layers) != tuple(default) or set(layers) <= set(plan.convs):
            return layers
        chosen = plan.stage_convs(local=local)
        log.info("%s: layers=%s (the first conv of each stage of %s)", type(self).__name__, chosen, plan.owner)
        return chosen

    def fit_probe_size(self, probe: ProbeSet, size: int, default: int) -> int:
        """``size`` checked against the probe; the ``default`` alone shrinks to a smaller split (and says so), so the
        defaults work on a data set of a few hundred images while an explicit larger size is refused."""
        if size == default and size > len(probe):
            log.info(
                "%s: probe_size=%d is more than %s: using all %d",
                type(self).__name__,
                size,
                probe.describe(),
                len(probe),
            )
            return len(probe)
        return probe.check_size(size)

    def warn_once(self, key: str, message: str) -> None:
        """A warning prefixed with the callback's name, once per callback and ``key``."""
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"{type(self).__name__}: {message}")

    def black_baseline(self, probe: ProbeSet, what: str) -> torch.Tensor | float:
        """The model input of a black picture, the baseline of ``what`` (``cnnfeat.atlas.black_input``: ``-mean / std``
        after a ``Normalize``); 0, with a warning, where the inputs are no per-channel affine map of the pictures."""
        black = atlas.black_input(probe.images[:256], probe.inputs[:256])
        if black is None:
            self.warn_once(
                "baseline",
                f"{what}: the model's inputs are not a per-channel affine map of the pictures, so the baseline is the "
                "all-zero input, which need not be a black picture",
            )
            return 0.0
        return black

    def skip_nonfinite(self, layer: str, what: str, bad: int, total: int, items: str, skipped: str, step: int) -> None:
        """Warn (once per layer, picture and step) that a picture is not drawn because its values are not finite: a
        NaN must never be drawn as if it were data."""
        share = f"all {total}" if bad == total else f"{bad} of {total}"
        self.warn_once(
            f"nonfinite:{layer}:{skipped}:{step}",
            f"layer {layer}: {what} are NaN or infinite for {share} {items} at step {step}, so {skipped} is not drawn",
        )

    # -- Lightning hooks -----------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._run_dir = Path(trainer.strategy.broadcast(log_dir(trainer)))  # the one collective, on every rank
        session = AnalysisSession.attach(trainer.callbacks, trainer)
        probe = session.probe(trainer.datamodule, self.options.probe_spec, pl_module) if self.needs_probe else None
        self.prepare(pl_module, probe)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed fit restores its epoch counter only after this hook: the checkpoint path tells it apart
        untrained = trainer.ckpt_path is None and trainer.current_epoch == 0 and trainer.global_step == 0
        if self.options.log_untrained and untrained:
            self._emit(trainer, pl_module, step=0)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.options.during_training:
            return
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.options.every_n_epochs == 0 or last:
            self._emit(trainer, pl_module, step=epoch)

    # -- plumbing ------------------------------------------------------------------------------------
    def _writer(self, trainer: pl.Trainer) -> SummaryWriter | None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            self.warn_once(
                "no-tensorboard",
                "no TensorBoardLogger on the trainer, so its pictures are not logged to TensorBoard (save_png=true "
                "writes images as PNG files)",
            )
        return writer

    def png_dir(self) -> Path | None:
        """``<run dir>/images`` when ``save_png`` (the run directory is resolved in ``setup``)."""
        return (self._run_dir or Path(".")) / "images" if self.options.save_png else None

    def finish(self, out_dir: Path | None) -> dict[int, Pictures]:
        """End-of-run outputs built from what ``render`` accumulated: files under ``out_dir`` (``None``: write no
        files) and pictures by step. Called once at the end of fit (rank 0) and by ``cnnfeat-explore`` after its
        last checkpoint, so both produce the same outputs. Default: nothing."""
        return {}

    def end_of_fit(self, trainer: pl.Trainer) -> None:
        """Rank 0's end-of-fit work that needs the trainer (e.g. the Projector), after ``finish``. Default: nothing."""

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        start = time.perf_counter()
        results = self.finish(self._run_dir)
        writer = tensorboard_writer(trainer)
        for step, pictures in results.items():
            pictures.write(writer, step, self.png_dir(), scalars=False)
            if pictures.logged():
                for lg in trainer.loggers:  # an explicit step, as everywhere else
                    lg.log_metrics(pictures.logged(), step=step)
        self.end_of_fit(trainer)
        self.end_seconds = time.perf_counter() - start

    def _emit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Render on rank 0 and write everything at ``step`` (= epochs trained); no collective is involved."""
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        start = time.perf_counter()
        writer = self._writer(trainer)
        if not self.should_render(writer):
            return
        with inference(pl_module):
            pictures = self.render(pl_module, self.probe, step)
        pictures.write(writer, step, self.png_dir(), scalars=False)
        if pictures.logged():
            for lg in trainer.loggers:  # an explicit step, as LearningRateMonitor does
                lg.log_metrics(pictures.logged(), step=step)
            if step > 0:  # also in trainer.callback_metrics (HParams, status.json); Lightning logs nothing here
                for tag, value in pictures.scalars.items():
                    pl_module.log(tag, value, on_step=False, on_epoch=True, logger=False, rank_zero_only=True)
        self.seconds.append(time.perf_counter() - start)
