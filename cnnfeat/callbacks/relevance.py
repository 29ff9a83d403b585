"""Which probe patches make a unit matter, beside those that make it fire, and whether its optimised input can be
trusted (``cnnfeat.relevance``, issue 24 items 3 and 4)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from cnnfeat import atlas, attribution, featviz, relevance, tags, viz
from cnnfeat.callbacks.base import (
    DEFAULT_PROBE_SIZE,
    CallbackOptions,
    Pictures,
    VisualizationCallback,
    check_bool,
    check_names,
    device_of,
)
from cnnfeat.callbacks.importance import ablated_node
from cnnfeat.callbacks.top_patches import check_top_k
from cnnfeat.errors import ConfigError, check_int
from cnnfeat.plan import LayerPlan
from cnnfeat.probe import ProbeSet
from cnnfeat.probe_pass import PassBatch, PassRequest, shared_positions
from cnnfeat.receptive_field import ReceptiveField, crop
from cnnfeat.run import lightning_api as pl
from cnnfeat.topk import TopK, crop_sources
from cnnfeat.units import (
    ALL,
    DEFAULT_UNITS,
    SpreadAccumulator,
    check_units,
    choose_units,
    dump_chosen,
    load_chosen,
    needs_spread,
)

log = logging.getLogger("cnnfeat")

#: networks with more convs than this get the first conv of each stage (at most six, `LayerPlan.stage_convs`) by default
MAX_DEFAULT_LAYERS = 8
#: white pixels between the blocks of one picture
GAP = 6


def default_layers(plan: LayerPlan) -> list[str]:
    """Every conv, or on a network with more than ``MAX_DEFAULT_LAYERS`` the first conv of each stage (at most six)
    whose receptive field can be derived."""
    convs = list(plan.convs)
    return convs if len(convs) <= MAX_DEFAULT_LAYERS else plan.stage_convs(local=True)


def vstack(images: Sequence[torch.Tensor], gap: int = GAP) -> torch.Tensor:
    """RGB images (3, H, W) one under the other on white, centred."""
    w = max(i.shape[2] for i in images)
    h = sum(i.shape[1] for i in images) + gap * (len(images) - 1)
    out = torch.ones(3, h, w)
    y = 0
    for i in images:
        left = (w - i.shape[2]) // 2
        out[:, y : y + i.shape[1], left : left + i.shape[2]] = i
        y += i.shape[1] + gap
    return out


def outline(image: torch.Tensor, box: tuple[int, int, int, int], colour: tuple[float, float, float]) -> None:
    """Draw the border of ``box`` (top, left, bottom, right; inclusive, clipped to the image) on an RGB image
    (3, H, W) in place."""
    _, h, w = image.shape
    top, left, bottom, right = max(box[0], 0), max(box[1], 0), min(box[2], h - 1), min(box[3], w - 1)
    if top > bottom or left > right:
        return
    c = torch.tensor(colour, dtype=image.dtype).view(3, 1)
    image[:, top, left : right + 1] = c
    image[:, bottom, left : right + 1] = c
    image[:, top : bottom + 1, left] = c
    image[:, top : bottom + 1, right] = c


def table(refs: relevance.References, overlap: torch.Tensor, units: Sequence[int]) -> str:
    """A markdown table of every unit: its overlap and its best relevance and activation on the probe."""
    rows = ["| unit | overlap | top relevance | top activation |", "|---|---|---|---|"]
    for u in units:
        rel, act = float(refs.by_relevance.values[0, u]), float(refs.by_activation.values[0, u])
        if act <= 0:
            shown = "— (never fires)"
        elif rel <= 0:
            shown = "— (never relevant)"
        else:
            shown = f"{float(overlap[u]):.3f}"
        rows.append(f"| {u} | {shown} | {rel:.4g} | {act:.4g} |")
    return "\n".join(rows)


def path_table(check: relevance.PathCheck) -> str:
    """A markdown table of the path check: each unit's similarities and whether it is flagged."""
    rows = [
        "| unit | optimised vs real | real vs real | arbitrary vs real | flagged |",
        "|---|---|---|---|---|",
    ]
    for i, u in enumerate(check.units.tolist()):
        flag = "**flagged**" if check.flagged[i] else ""
        rows.append(
            f"| {u} | {float(check.optimised[i]):.3f} | {float(check.real[i]):.3f} "
            f"| {float(check.arbitrary[i]):.3f} | {flag} |"
        )
    return "\n".join(rows)


class _Spreads:
    """Each unit's variability (``cnnfeat.units.SpreadAccumulator``) at the nodes whose units are still to be chosen,
    fed by the shared probe pass."""

    def __init__(self, nodes: Sequence[str]) -> None:
        self.spread = {node: SpreadAccumulator() for node in nodes}

    def update(self, batch: PassBatch) -> None:
        for node, acc in self.spread.items():
            acc.update(batch.outputs[node])


class RelevanceCallback(VisualizationCallback):
    """Per unit, the top-k probe images by relevance for the predicted class beside the top-k by activation
    (``cnnfeat.relevance.references``: activation x gradient, one forward and one backward pass per batch for all
    layers), cut by the same receptive fields, at kept epochs.

    ``layers`` (``cnnfeat.plan`` names; ``None``: every conv, or the first conv of each stage on a network with more
    than ``MAX_DEFAULT_LAYERS``): a conv's or linear's units are read at the activation after it (as
    ``ImportanceCallback`` removes them). On the ``probe_size`` stratified probe images every pass consumer shares,
    per layer: ``relevance/refs/<layer>`` (per drawn unit two rows, activation references above relevance
    references), ``relevance/heatmaps/<layer>`` (each relevance reference image, the patch's receptive field
    outlined, above its conditional heatmap: where in the image the unit's relevance comes from, red for the
    predicted class, blue against; input x gradient with the input measured from a black picture, so that black
    pixels carry none also after a ``Normalize``),
    ``relevance/overlap/<layer>`` (the mean over all units of the share of relevance references that are activation
    references too) and the text ``relevance/<layer>/table`` (every unit's overlap).

    Drawn units (the picture blocks; the overlap and the table cover every unit), with the atlas's settings and
    meanings (``cnnfeat.units``): ``units`` a count N (default 16) = every unit of a layer up to N wide, else its N most
    *variable* (largest population standard deviation, across the ``probe_size`` probe images, of the unit's largest
    activation in each image, read at the node the layer is read at), decided at the first render from the shared
    probe pass (``cnnfeat.probe_pass``) and kept for every later render and a resumed fit; ``"all"``; or a list of
    unit indices drawn in every layer. ``max_units=N`` instead: the first N units of each layer (as the atlas's
    ``max_units``). The atlas recording the same layer on the same probe images (the defaults: ``probe_size`` = its
    ``alive_probe_size`` = 2000) at the same first render reads the same pass batches, so the same setting gives the
    same units (a smaller count: the most variable of them). The log says what was drawn.

    ``path_check`` (at the last epoch of the fit): the first ``path_units`` drawn units of each layer get an input
    optimised by ``cnnfeat.featviz`` (``path_settings``), whose activation path below the unit is compared with those
    of its top real images (``cnnfeat.relevance.path_check``, against ``path_arbitrary`` probe images):
    ``relevance/path_flagged/<layer>`` counts the flagged units and ``relevance/<layer>/path_table`` names them.
    Each unit is optimised once, at the position of its best real patch; on a CPU the layers' optimisations run
    side by side on ``workers`` threads (``cnnfeat.featviz.Workers``: the same images as one after the other;
    ``"auto"``: 2 for cnnfeat's own models, 1 for others: ``featviz.workers_for``).
    Renders run on ``threads`` CPU threads.
    """

    uses_probe_pass = True  #: only to choose the units of wide layers at the first render; references run the model

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        top_k: int = 8,
        probe_size: int = DEFAULT_PROBE_SIZE,
        units: int | str | Sequence[int] = DEFAULT_UNITS,
        max_units: int | None = None,
        batch_size: int = 256,
        heatmaps: bool = True,
        path_check: bool = True,
        path_units: int = 8,
        path_arbitrary: int = 64,
        path_settings: Mapping[str, Any] | None = None,
        min_cell: int = 40,
        max_cell: int = 96,
        heatmap_cell: int = 84,
        threads: int | None = 1,
        workers: int | str = featviz.AUTO_WORKERS,
        split: str = "test",
        every_n_epochs: int = 5,
        log_untrained: bool = True,
        save_png: bool = False,
        during_training: bool = True,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            CallbackOptions(
                every_n_epochs=every_n_epochs,
                log_untrained=log_untrained,
                save_png=save_png,
                during_training=during_training,
                split=split,
                mean=mean,
                std=std,
                class_names=class_names,
            )
        )
        check_top_k("top_k", top_k)
        for name, value in (
            ("probe_size", probe_size),
            ("batch_size", batch_size),
            ("path_units", path_units),
            ("path_arbitrary", path_arbitrary),
            ("min_cell", min_cell),
            ("max_cell", max_cell),
            ("heatmap_cell", heatmap_cell),
        ):
            check_int(name, value)
        check_int("threads", threads, allow_none=True)
        featviz.check_workers("workers", workers)
        check_int("max_units", max_units, allow_none=True)
        if max_units is not None and units != DEFAULT_UNITS:
            raise ConfigError(f"give units ({units!r}) or max_units ({max_units}), not both")
        check_bool("heatmaps", heatmaps)
        check_bool("path_check", path_check)
        if path_check and top_k < 2:
            raise ConfigError(
                f"path_check compares each unit with its top real images: top_k must be >= 2, got {top_k}"
            )
        self.layers = check_names("layers", layers, allow_none=True)
        self._given_layers = None if self.layers is None else list(self.layers)  # for state_key: check rewrites layers
        self.units = check_units("units", units)
        self.top_k, self.probe_size, self.max_units, self.batch_size = top_k, probe_size, max_units, batch_size
        self.heatmaps, self.path_check = heatmaps, path_check
        self.path_units, self.path_arbitrary = path_units, path_arbitrary
        self.path_settings = atlas.featviz_settings(path_settings)  # unknown keys: an error naming them
        self.min_cell, self.max_cell, self.heatmap_cell = min_cell, max_cell, heatmap_cell
        self.threads, self.workers = threads, workers
        #: set in ``check``: node read -> layer name in the tags, receptive field (None: (N, F)), drawn units
        self._layer_of: dict[str, str] = {}
        self._fields: dict[str, ReceptiveField | None] = {}
        self._drawn: dict[str, list[int]] = {}
        self._featviz_node: dict[str, str] = {}
        self._space: atlas.InputSpace | None = None
        #: what the conditional heatmaps are measured from: the model input of a black picture (set in ``check``)
        self.baseline: torch.Tensor | float = 0.0
        self._final = False  # whether the coming render is the fit's last (the path check runs then)
        #: ``{layer: units}`` chosen by variability (kept in checkpoints: a resumed fit draws the same units)
        self.chosen: dict[str, list[int]] = {}
        self._pending: dict[str, int] = {}  #: nodes whose units are chosen at the first render: ``{node: count}``
        self._widths: dict[str, int] = {}  #: units of each node
        self._said = False
        #: the last render's references and path checks by node (for a report or a test)
        self.last_references: dict[str, relevance.References] = {}
        self.last_path_checks: dict[str, relevance.PathCheck] = {}
        #: wall seconds of each path check (within ``seconds``), for cost accounting in benchmarks
        self.path_seconds: list[float] = []

    @override
    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        assert probe is not None
        plan = self.layer_plan(pl_module)
        if self.layers is None:
            self.layers = default_layers(plan)
        self.layers = [layer.name for layer in plan.resolve(self.layers)]
        self._layer_of, self._fields, self._drawn, self._featviz_node = {}, {}, {}, {}
        self._pending, self._widths, self._said = {}, {}, False
        for layer in self.layers:
            node = ablated_node(plan, layer)
            if node in self._layer_of:
                raise ConfigError(f"layers {self._layer_of[node]!r} and {layer!r} are read at the same node {node!r}")
            shape = plan.graph[node].output_shape
            if len(shape) not in (2, 4):
                raise ConfigError(
                    f"layer {layer!r} ({node!r}) outputs {tuple(shape)}: units need (N, C, h, w) or (N, F)"
                )
            self._layer_of[node] = layer
            self._fields[node] = plan.field(node) if len(shape) == 4 else None  # no geometry: an error naming why
            count = self._widths[node] = int(shape[1])
            setting = self.units if self.max_units is None else list(range(min(self.max_units, count)))
            if isinstance(setting, list):
                bad = [u for u in setting if u >= count]
                if bad:
                    raise ConfigError(
                        f"units {bad} out of range for {layer!r}, which has {count} (valid 0..{count - 1})"
                    )
            if needs_spread(setting, count):  # chosen at the first render (or kept from a resumed fit's state)
                self._drawn[node], self._pending[node] = [], int(setting)  # type: ignore[arg-type]
            else:
                self._drawn[node] = choose_units(setting, count, layer)
        self.probe_size = self.fit_probe_size(probe, self.probe_size, DEFAULT_PROBE_SIZE)
        self.baseline = self.black_baseline(probe, "conditional heatmaps")
        if self.path_check:
            if self.path_arbitrary > self.probe_size:
                raise ConfigError(f"path_arbitrary={self.path_arbitrary} is more than probe_size={self.probe_size}")
            try:
                self._space = atlas.fitted_space(probe.images[:256], probe.inputs[:256])
            except ConfigError as e:
                raise ConfigError(f"path_check: {e} (set path_check=false to skip it)") from e
            for node, layer in self._layer_of.items():
                self._featviz_node[node] = self._optimisable(pl_module, node, layer)
        self._apply_kept()
        if not self._pending:
            self._say()  # nothing to decide at the first render

    def _apply_kept(self) -> None:
        """Units chosen before (a resumed fit's state, restored after ``check``) for the nodes still pending."""
        for node, count in list(self._pending.items()):
            kept = self.chosen.get(self._layer_of[node]) or []
            if len(kept) == min(count, self._widths[node]) and all(u < self._widths[node] for u in kept):
                self._drawn[node] = list(kept)
                del self._pending[node]

    def _choose(self, pl_module: nn.Module, probe: ProbeSet, step: int) -> None:
        """Choose the pending nodes' units by variability (once), from this step's shared probe pass."""
        self._apply_kept()
        if self._pending:
            result = self.pass_result(pl_module, probe, step)
            assert result is not None
            spreads = {node: acc.finish() for node, acc in result.accumulator.spread.items()}
            for node, count in self._pending.items():
                layer = self._layer_of[node]
                self._drawn[node] = self.chosen[layer] = choose_units(count, self._widths[node], layer, spreads[node])
            self._pending = {}
        self._say()

    def _say(self) -> None:
        """One log line: the layers, where they are read, the probe, which units are drawn and how."""
        if self._said:
            return
        self._said = True
        parts = []
        for node, drawn in self._drawn.items():
            layer, width = self._layer_of[node], self._widths[node]
            parts.append(f"{layer} {len(drawn)} of {width}" + (f" {drawn}" if drawn != list(range(width)) else ""))
        setting = self.units
        how = (
            f"the first {self.max_units} units of each layer (max_units)"
            if self.max_units is not None
            else "every unit"
            if setting == ALL
            else f"the listed units {setting}"
            if isinstance(setting, list)
            else f"every unit of a layer up to {setting} wide, else its {setting} most variable (std over the "
            f"{self.probe_size} probe images of each unit's per-image max activation, chosen at the first render and "
            "kept)"
        )
        log.info(
            "%s: layers=%s (read at %s), %d probe images, drawn units: %s; %s%s",
            type(self).__name__,
            self.layers,
            list(self._layer_of),
            self.probe_size,
            ", ".join(parts),
            how,
            f"; path check of {self.path_units} units per layer at the last epoch" if self.path_check else "",
        )

    def pass_request(self, model: nn.Module, probe: ProbeSet, step: int) -> PassRequest | None:
        """While units are still to be chosen: the pending nodes' outputs on the probe images the references read
        (the atlas's alive probe with the defaults: one pass, the same batches)."""
        self._apply_kept()
        if not self._pending:
            return None
        nodes = list(self._pending)
        positions = shared_positions(probe, self.probe_size)
        return PassRequest(positions, self.batch_size, _Spreads(nodes), outputs=nodes)

    def _optimisable(self, pl_module: nn.Module, node: str, layer: str) -> str:
        """The node whose units ``cnnfeat.featviz`` optimises for ``node``: itself, else its layer (a functional
        activation after a conv module has the conv's maps, positions and maxima)."""
        assert self._space is not None
        for name in dict.fromkeys([node, layer]):
            try:
                atlas.layer_fn(pl_module, name, self._space)
            except ConfigError as e:
                error = e
                continue
            return name
        raise ConfigError(f"path_check: {error} (set path_check=false to skip it)")

    @override
    def should_render(self, writer: object) -> bool:
        return True  # the overlaps are scalars: logged to every logger

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        self._final = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        try:
            super().on_train_epoch_end(trainer, pl_module)
        finally:
            self._final = False

    @override
    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        with featviz.cpu_threads(self.threads):  # one thread: a render's many small ops ran 4x faster
            return self._render(pl_module, probe, step)

    def _render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int) -> Pictures:
        assert probe is not None
        self._choose(pl_module, probe, step)
        positions = shared_positions(probe, self.probe_size)
        ids, x = probe.ids[positions], probe.inputs[positions]
        refs = relevance.references(pl_module, x, list(self._layer_of), self.top_k, ids, self.batch_size)
        self.last_references, self.last_path_checks = refs, {}
        pictures = Pictures()
        for node, r in refs.items():
            layer = self._layer_of[node]
            valid = r.by_relevance.ids >= 0
            bad = ~torch.isfinite(r.by_relevance.values[valid]) | ~torch.isfinite(r.by_activation.values[valid])
            if bad.any():  # NaN maps: winners chosen by NaN would look like data
                self.skip_nonfinite(layer, "relevances", int(bad.sum()), int(valid.sum()), "references", layer, step)
                continue
            overlap = r.overlap()
            if not overlap.isnan().all():  # the mean over the units that fire and are relevant somewhere
                pictures.scalars[tags.RELEVANCE_OVERLAP.format(layer=layer)] = float(overlap.nanmean())
            pictures.texts[tags.RELEVANCE_TABLE.format(layer=layer)] = table(r, overlap, range(overlap.numel()))
            cells = self._cells(pl_module, probe, node, r)
            pictures.images[tags.RELEVANCE_REFS.format(layer=layer)] = self.refs_picture(
                node, cells, overlap, relevance.real_references(r.by_relevance).sum(dim=0)
            )
            if self.heatmaps:
                maps = self._heatmaps(pl_module, x, ids, node, r)
                images = self._images(probe, node, r)
                picture = self.heatmap_picture(node, images, maps, cells.get("relevance_boxes"))
                pictures.images[tags.RELEVANCE_HEATMAPS.format(layer=layer)] = picture
        if self.path_check and self._final:
            start = time.perf_counter()
            nodes = [n for n in refs if tags.RELEVANCE_TABLE.format(layer=self._layer_of[n]) in pictures.texts]
            workers = featviz.workers_for(pl_module, device_of(pl_module), self.workers)
            starts = {n: partial(self._start_path, pl_module, n, refs[n]) for n in nodes}
            started = featviz.side_by_side(starts, workers, self.path_settings.threads)
            for node in nodes:  # measured and compared with the render's thread count, as one after the other
                if started[node] is not None:
                    self._path(pl_module, x, ids, node, refs[node], started[node], pictures)
            self.path_seconds.append(time.perf_counter() - start)
        return pictures

    # -- pictures -------------------------------------------------------------------------------------------------
    def _boxes(self, node: str, r: relevance.References, top: TopK) -> torch.Tensor | None:
        field = self._fields[node]
        return None if field is None else relevance.boxes(r, top, field)

    def _cells(
        self, pl_module: nn.Module, probe: ProbeSet, node: str, r: relevance.References
    ) -> dict[str, torch.Tensor]:
        """(k, U', C, h, w) display patches of the drawn units' references, ``"activation"`` and ``"relevance"``
        (zeros where a unit has fewer than k), with the boxes they were cut by (``"<which>_boxes"``, (k, U', 4))."""
        drawn = self._drawn[node]
        field = self._fields[node]
        out: dict[str, torch.Tensor] = {}
        for which, top in (("activation", r.by_activation), ("relevance", r.by_relevance)):
            ids = top.ids[:, drawn]
            used = ids[ids >= 0].unique().tolist()
            src = dict(zip(used, crop_sources(pl_module, probe, used, field.frame if field else None), strict=True))
            boxes = self._boxes(node, r, top)
            k = len(ids)
            cells = []
            for j, u in enumerate(drawn):
                for rank in range(k):
                    i = int(ids[rank, j])
                    if field is None:
                        cell = src[i] if i >= 0 else probe.images[0] * 0
                    else:
                        box = tuple(int(v) for v in boxes[rank, u])
                        cell = crop(src[i], box) if i >= 0 else torch.zeros(probe.images.shape[1], *field.size)
                    cells.append(cell.float())
            stacked = torch.stack(cells)
            out[which] = stacked.view(len(drawn), k, *stacked.shape[1:]).transpose(0, 1)
            if boxes is not None:
                out[f"{which}_boxes"] = boxes[:, drawn]
        return out

    def _shrink(self, cells: torch.Tensor) -> torch.Tensor:
        """Cells larger than ``max_cell`` (AlexNet conv5: 163 px) are shrunk."""
        if cells.shape[-1] > self.max_cell:
            return torch.nn.functional.interpolate(cells, size=(self.max_cell, self.max_cell), mode="area")
        return cells

    def refs_picture(
        self, node: str, cells: dict[str, torch.Tensor], overlap: torch.Tensor, n_relevant: torch.Tensor
    ) -> torch.Tensor:
        """Per drawn unit: its activation references (top row) above its relevance references, captioned with how
        many of its ``n_relevant`` relevance references (positive relevance) are activation references too."""
        blocks = []
        act, rel = cells["activation"], cells["relevance"]
        k = len(act)
        for j, u in enumerate(self._drawn[node]):
            rows = self._shrink(torch.cat([act[:, j], rel[:, j]]))
            n_rel = int(n_relevant[u])
            if bool(overlap[u].isnan()):
                note = "no references: never fires or never relevant on the probe (cells are arbitrary)"
            else:
                note = f"{round(float(overlap[u]) * n_rel)}/{n_rel} shared"
            text = f"unit {u}: top {k} by activation (above), by relevance (below); {note}"
            blocks.append(viz.caption(viz.grid(viz.grey(rows), nrow=k, min_cell=self.min_cell), text))
        return vstack(blocks)

    def _heatmaps(
        self, pl_module: nn.Module, x: torch.Tensor, ids: torch.Tensor, node: str, r: relevance.References
    ) -> torch.Tensor:
        """(k, U', H, W) conditional heatmap of each drawn unit's relevance references (summed over channels),
        zeros where a unit has fewer than k."""
        drawn = self._drawn[node]
        top_ids = r.by_relevance.ids[:, drawn]
        k = len(top_ids)
        row_of = {int(i): j for j, i in enumerate(ids.tolist())}
        valid = top_ids >= 0
        rows = torch.tensor([row_of[int(i)] for i in top_ids[valid]], dtype=torch.long)
        units = torch.tensor(drawn, dtype=torch.long).expand(k, len(drawn))[valid]
        out = torch.zeros(k, len(drawn), *x.shape[-2:])
        maps = [
            attribution.conditional_heatmaps(
                pl_module,
                x[rows[s : s + self.batch_size]],
                node,
                units[s : s + self.batch_size],
                baselines=self.baseline,
            )
            for s in range(0, len(rows), self.batch_size)
        ]
        if maps:
            heat = torch.cat(maps)
            out[valid] = heat.sum(dim=1) if heat.ndim == 4 else heat
        return out

    def _images(self, probe: ProbeSet, node: str, r: relevance.References) -> torch.Tensor:
        """(k, U', C, H, W) the whole display images of the drawn units' relevance references (zeros where a unit
        has fewer than k)."""
        ids = r.by_relevance.ids[:, self._drawn[node]]
        out = torch.zeros(*ids.shape, *probe.images.shape[1:])
        valid = ids >= 0
        if valid.any():
            out[valid] = probe.images[probe.positions(ids[valid])].float()
        return out

    def heatmap_picture(
        self, node: str, images: torch.Tensor, maps: torch.Tensor, boxes: torch.Tensor | None
    ) -> torch.Tensor:
        """Per drawn unit: its relevance reference images (top row, the unit's receptive field outlined in yellow)
        above their conditional heatmaps in diverging colours on one scale per unit (red: relevance for the predicted
        class, blue: against; the field outlined in green)."""
        k = len(images)
        framed = boxes is not None and self._fields[node] is not None and self._fields[node].frame is None
        blocks = []
        for j, u in enumerate(self._drawn[node]):
            scale = maps[:, j].abs().max()
            heat = viz.diverging(maps[:, j], scale if scale > 0 else 1.0)
            grey = viz.grey(images[:, j]).clone()
            if framed:
                assert boxes is not None
                for rank in range(k):
                    box = tuple(int(v) for v in boxes[rank, j])
                    outline(grey[rank], box, (1.0, 0.85, 0.0))
                    outline(heat[rank], box, (0.0, 0.6, 0.0))
            rows = self._shrink(torch.cat([grey, heat]))
            text = f"unit {u}: top {k} by relevance (above), where it comes from (below, |max| {float(scale):.3g})"
            blocks.append(viz.caption(viz.grid(rows, nrow=k, min_cell=self.heatmap_cell), text))
        return vstack(blocks)

    # -- checkpoints: the units chosen by variability stay chosen -------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layers=self._given_layers, split=self.split)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"chosen": dump_chosen(self.chosen)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.chosen = load_chosen(state_dict.get("chosen", "{}"))

    # -- trust in optimised inputs --------------------------------------------------------------------------------
    def _start_path(
        self, pl_module: nn.Module, node: str, r: relevance.References, submit: featviz.Submit
    ) -> featviz.PendingVisualisation | None:
        """Hand the optimisation of an input for each of the first ``path_units`` drawn units of ``node`` to
        ``submit`` (once per unit, where its best real patch is: the path is compared there too); None: no unit
        fires on k probe images."""
        assert self._space is not None
        top = r.by_activation
        # a unit is checked when all its k activation references are real (it fires on k probe images)
        units = [u for u in self._drawn[node][: self.path_units] if bool(relevance.real_references(top)[:, u].all())]
        if not units:
            return None
        rows_, cols_ = r.rows_cols(top)
        spatial = self._fields[node] is not None
        reference = top.values[0].float()
        best = torch.stack([rows_[0], cols_[0]], dim=1) if spatial else None
        fv_node = self._featviz_node[node]
        fn = atlas.layer_fn(pl_module, fv_node, self._space)
        shape, device = self._space.shape, device_of(pl_module)
        return featviz.start_visualise(fn, units, shape, self.path_settings, reference, best, fv_node, device, submit)

    def _path(
        self,
        pl_module: nn.Module,
        x: torch.Tensor,
        ids: torch.Tensor,
        node: str,
        r: relevance.References,
        started: featviz.PendingVisualisation,
        pictures: Pictures,
    ) -> None:
        """Compare the path of each optimised input (``_start_path``) with the paths of the unit's top real images
        (by activation); add the count and the table to ``pictures``."""
        assert self._space is not None
        result = started.finish()
        units = result.units.tolist()
        layer, top = self._layer_of[node], r.by_activation
        rows_, cols_ = r.rows_cols(top)
        row_of = {int(i): j for j, i in enumerate(ids.tolist())}
        sel = torch.tensor(units)
        real_rows = torch.tensor([[row_of[int(i)] for i in top.ids[:, u]] for u in units])  # (P, k)
        real_pos = torch.stack([rows_[:, sel], cols_[:, sel]], dim=2).transpose(0, 1)  # (P, k, 2)
        optimised = self._space.to_model(result.images.float())
        check = relevance.path_check(
            pl_module,
            self.layer_plan(pl_module).graph,
            node,
            sel,
            optimised,
            result.positions,
            x[real_rows],
            real_pos,
            x[: self.path_arbitrary],
        )
        self.last_path_checks[node] = check
        pictures.scalars[tags.RELEVANCE_PATH_FLAGGED.format(layer=layer)] = float(check.flagged.sum())
        pictures.texts[tags.RELEVANCE_PATH_TABLE.format(layer=layer)] = path_table(check)
