"""The run atlas during training: per-unit data of every conv channel and last-hidden neuron, for the HTML report.

A thin adapter around ``cnnfeat.atlas`` (the storage format and the feature-visualisation input), the streaming top-k
search of ``cnnfeat.topk`` (the one the top-patches picture uses) and the layer plan (``cnnfeat.plan``). Files go to
``<run dir>/atlas/``; ``cnnfeat-report RUN_DIR`` draws them.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from cnnfeat import atlas, featviz, tags
from cnnfeat.callbacks.base import (
    CallbackOptions,
    Pictures,
    VisualizationCallback,
    check_bool,
    check_names,
    device_of,
    inference,
)
from cnnfeat.callbacks.top_patches import check_top_k
from cnnfeat.errors import ConfigError, check_int
from cnnfeat.featviz import check_workers
from cnnfeat.graph import activation_after
from cnnfeat.plan import LayerPlan
from cnnfeat.probe import ProbeSet
from cnnfeat.probe_pass import PassBatch, PassRequest, ProbePass, shared_positions
from cnnfeat.receptive_field import crop
from cnnfeat.run.progress import task_progress
from cnnfeat.topk import PatchSearch, TopK, crop_sources, ranked_at, search_vectors
from cnnfeat.units import (
    ALL,
    DEFAULT_UNITS,
    FiringAccumulator,
    SpreadAccumulator,
    check_units,
    choose_units,
    dump_chosen,
    fires,
    load_chosen,
    needs_spread,
)

if TYPE_CHECKING:  # Lightning names for the hooks' types only: cnnfeat picks the package (pytorch_lightning)
    import pytorch_lightning as pl

log = logging.getLogger("cnnfeat")
AUTO = "auto"


class _AliveAccumulator:
    """Each recorded layer's largest activation per unit over the pass (``cnnfeat.units.FiringAccumulator``) and,
    for the layers in ``spread`` (units still to be chosen), each unit's variability (``SpreadAccumulator``)."""

    def __init__(self, nodes: dict[str, str], spread: Sequence[str] = ()) -> None:
        self.nodes, self.firing = nodes, FiringAccumulator()
        self.spread = {name: SpreadAccumulator() for name in spread}

    def update(self, batch: PassBatch) -> None:
        self.firing.update({name: batch.outputs[node] for name, node in self.nodes.items()})
        for name, acc in self.spread.items():
            acc.update(batch.outputs[self.nodes[name]])


class AtlasCallback(VisualizationCallback):
    """Records, per unit, what the report's unit cards show (format: ``cnnfeat.atlas``).

    ``uses_probe_pass``: the per-epoch alive test reads the shared pass; the top-k search over the larger probe runs
    on its own schedule (``patches_every_n_epochs``) over other images, so it runs the model itself.

    Every epoch (and for the untrained network, step 0): each unit's incoming weights and its largest activation on
    ``alive_probe_size`` probe images (alive = fired somewhere), read from the probe pass shared with the dead-ReLU
    and representation callbacks (``cnnfeat.probe_pass``: the same stratified images, one forward pass).
    Every ``patches_every_n_epochs`` epochs: the ``top_k`` probe patches that excite each unit most, cropped by its
    receptive field (whole images for fully connected units), shrunk to at most ``max_cell`` pixels. At the end of
    fit (``finish``): the final patches, the classes of each unit's ``class_top`` strongest probe images, and its
    optimised input with fidelity (``cnnfeat.featviz``; reference: the unit's best probe activation, objective read
    at the centre and at that patch's position, the better kept). Layers without trainable weights (a frozen
    backbone) are recorded once.

    Args:
        layers: node names (``cnnfeat.graph``); ``None``: every conv node and the last hidden Linear layer.
        units: which units of each layer get a card: ``"auto"`` (default) = every unit of every layer when no
            recorded conv layer is wider than 16 channels (SmallCNN: conv1-3 and fc2's 100 neurons), else the 16 most
            variable units of each layer wider than 16; an integer N: the N most variable units of a layer wider than
            N (all of a narrower one); ``"all"``; a list of unit indices (every layer); or ``{layer: any of these}``
            (unlisted layers: ``"auto"``). *Variable*: largest population standard deviation, across the
            ``alive_probe_size`` images of the shared probe pass, of the unit's largest activation (after its
            activation function, the value whose sign says alive) in each image (``cnnfeat.units``); decided at the
            first render (the untrained network when ``log_untrained``) and kept for every later step and a resumed
            fit, so a unit's cards compare across epochs. The log says what was chosen. A fit resumed into an atlas
            that holds a layer's history keeps the units that history was recorded for, whatever ``units`` and
            ``max_units`` say (a warning names the layers and both settings): a card never shows another unit's past.
        max_units: instead of ``units``, the first N units of each layer (``None``: use ``units``).
        probe_size: probe images searched for top patches and classes (``None``: the whole probe split).
        atlas_dir: where the files go (``None``: ``<run dir>/atlas``, the folder ``cnnfeat-report`` reads).
        featviz: optimise inputs at the end; ``featviz_max_units`` caps the units per layer (``None``: all recorded),
            ``featviz_settings`` are ``cnnfeat.featviz.FeatVizSettings`` fields (``featviz_fc_settings`` override them
            for fully connected layers, whose inputs are whole images), ``featviz_at_real_best`` also starts
            each conv unit's neuron objective at its best real patch. ``featviz_workers``: optimisations run side
            by side on a CPU (``cnnfeat.featviz.Workers``, the same images as one after the other; ``"auto"``: 2 for
            cnnfeat's own models, 1 for others and on other devices: ``featviz.workers_for``). ``featviz_input``: a
            module whose output the optimised image replaces as ``(x - featviz_mean) / featviz_std`` (``None``: the
            model's input, through the affine map the probe's images and inputs define).
    """

    uses_probe_pass = True

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        units: int | str | Sequence[int] | Mapping[str, Any] = AUTO,
        max_units: int | None = None,
        top_k: int = 8,
        class_top: int = 100,
        patches_every_n_epochs: int = 5,
        probe_size: int | None = None,
        alive_probe_size: int = 2000,
        max_cell: int = 64,
        batch_size: int = 256,
        atlas_dir: str | None = None,
        featviz: bool = True,
        featviz_max_units: int | None = None,
        featviz_settings: Mapping[str, Any] | None = None,
        featviz_fc_settings: Mapping[str, Any] | None = None,
        featviz_at_real_best: bool = True,
        featviz_workers: int | str = featviz.AUTO_WORKERS,
        featviz_input: str | None = None,
        featviz_mean: Sequence[float] | float | None = None,
        featviz_std: Sequence[float] | float | None = None,
        every_n_epochs: int = 1,
        log_untrained: bool = True,
        split: str = "test",
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            CallbackOptions(
                every_n_epochs=every_n_epochs,
                log_untrained=log_untrained,
                save_png=False,
                during_training=True,
                split=split,
                mean=mean,
                std=std,
                class_names=class_names,
            )
        )
        for name, value, none_ok in (
            ("max_units", max_units, True),
            ("top_k", top_k, False),
            ("class_top", class_top, False),
            ("patches_every_n_epochs", patches_every_n_epochs, False),
            ("probe_size", probe_size, True),
            ("alive_probe_size", alive_probe_size, False),
            ("max_cell", max_cell, False),
            ("batch_size", batch_size, False),
            ("featviz_max_units", featviz_max_units, True),
        ):
            check_int(name, value, allow_none=none_ok)
        check_top_k("top_k", top_k)
        check_top_k("class_top", class_top)
        check_names("layers", layers, allow_none=True)
        check_bool("featviz", featviz)
        check_bool("featviz_at_real_best", featviz_at_real_best)
        check_workers("featviz_workers", featviz_workers)  # (``featviz`` is the flag here, not the module)
        if (featviz_mean is None or featviz_std is None) != (featviz_input is None):
            raise ConfigError(
                "featviz_input needs featviz_mean and featviz_std (and they need featviz_input), got "
                f"{featviz_input!r}, {featviz_mean!r}, {featviz_std!r}"
            )
        if max_units is not None and units != AUTO:
            raise ConfigError(f"give units ({units!r}) or max_units ({max_units}), not both")
        self.units = self._check_units(units)
        self.layers = list(layers) if layers is not None else None
        self.max_units, self.top_k, self.class_top = max_units, top_k, class_top
        self.patches_every_n_epochs, self.probe_size = patches_every_n_epochs, probe_size
        self.alive_probe_size, self.max_cell, self.batch_size = alive_probe_size, max_cell, batch_size
        self.alive_size = alive_probe_size  #: images the alive test reads (the probe may be smaller; see check)
        self.featviz, self.featviz_max_units = featviz, featviz_max_units
        self.settings = atlas.featviz_settings(featviz_settings)
        self.fc_settings = atlas.featviz_settings({**self.settings.to_dict(), **dict(featviz_fc_settings or {})})
        self.featviz_at_real_best, self.featviz_workers = featviz_at_real_best, featviz_workers
        self.featviz_input = featviz_input
        self.featviz_mean = self._floats(featviz_mean)
        self.featviz_std = self._floats(featviz_std)
        #: set in ``check``
        self.infos: list[atlas.LayerInfo] = []
        self.space: atlas.InputSpace | None = None
        #: where the atlas goes: ``atlas_dir``, else ``<run dir>/atlas`` (set in ``setup``)
        self.atlas_dir: Path | None = Path(atlas_dir) if atlas_dir is not None else None
        self._max_epochs: int | None = None
        self._timings: dict[str, float] = {}
        self._recorded: set[tuple[str, str, int]] = set()  # (layer, "step" or "patches", step) written or queued
        self._staging: Path | None = None  # where files go until the output folder is known (explore)
        self._model: weakref.ref[nn.Module] | None = None  # the last rendered network, for ``finish``
        self._last_step: int | None = None
        self._finished: dict[str, Any] = {}
        self._alive_todo: list[atlas.LayerInfo] | None = None  # the layers a render of its own asks the pass for
        #: probe IDs of the images the last alive test read, in order
        self.pass_ids: torch.Tensor | None = None
        #: layers whose units are chosen by variability at the first render: ``{layer: count}`` (set in ``check``)
        self._pending: dict[str, int] = {}
        #: ``{layer: units}`` chosen by variability (kept in checkpoints: a resumed fit shows the same units)
        self.chosen: dict[str, list[int]] = {}
        self._said = False
        #: the atlas found in ``atlas_dir`` before the first render (a resumed fit's), read once; None: none
        self._record: atlas.Atlas | None = None
        self._record_read = False

    @staticmethod
    def _check_units(units: Any) -> int | str | list[int] | dict[str, int | str | list[int]]:
        if units == AUTO:
            return AUTO
        if isinstance(units, Mapping):
            if not units:
                raise ConfigError("units is an empty mapping: give {layer: count, 'all' or [indices]} or 'auto'")
            return {
                str(k): AUTO if v == AUTO else check_units(f"units[{k!r}]", v)  # type: ignore[misc]
                for k, v in units.items()
            }
        return check_units("units", units)

    def _setting(self, name: str, wide: bool) -> int | str | list[int]:
        """The ``units`` setting of one layer; ``wide``: some recorded conv layer is wider than ``DEFAULT_UNITS``."""
        value = self.units.get(name, AUTO) if isinstance(self.units, dict) else self.units
        if value == AUTO:
            return DEFAULT_UNITS if wide else ALL
        return value  # type: ignore[return-value]

    @staticmethod
    def _floats(v: Sequence[float] | float | None) -> list[float] | None:
        if v is None:
            return None
        return [float(x) for x in v] if isinstance(v, Sequence) else [float(v)]

    # -- checks --------------------------------------------------------------------------------------
    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        assert probe is not None
        probe.check_size(self.probe_size)
        self.alive_size = min(self.alive_probe_size, len(probe))
        example = probe.inputs[:1].to(device_of(pl_module))
        plan = self.layer_plan(pl_module)
        names = atlas.resolve_layers(plan.graph, self.layers)
        convs = [n for n in names if atlas.layer_kind(plan.graph, n) == "conv"]
        if self.layers is None:  # the default, every conv: those whose units see the whole image are left out
            without: dict[str, str] = {}
            for n in convs:
                try:
                    plan.field(n)
                except ConfigError as e:
                    without[n] = str(e)
            if without:
                first = next(iter(without.values()))
                self.warn_once(
                    "no-field",
                    f"left out {len(without)} conv(s) without a receptive field ({first}; also "
                    f"{list(without)[1:6]}{' ...' if len(without) > 6 else ''}): name layers with "
                    "callbacks.atlas.layers=[...] to choose others",
                )
                names = [n for n in names if n not in without]
                convs = [n for n in convs if n not in without]
        fields = plan.fields(convs)  # a node without geometry: an error naming what prevents it
        irregular = [n for n, rf in fields.items() if not rf.regular]
        if irregular:  # the atlas stores one size/jump/start per layer: phase-dependent boxes would be cut wrong
            raise ConfigError(
                f"the atlas cannot record {irregular}: their receptive fields change size with the unit's phase (a "
                "strided transposed conv upsampled them); name other layers with callbacks.atlas.layers=[...]"
            )
        if isinstance(self.units, dict):
            unknown = [k for k in self.units if k not in names]
            if unknown:
                raise ConfigError(f"units names {unknown}, which the atlas does not record; its layers: {names}")
        wide = any(plan.graph[n].output_shape[1] > DEFAULT_UNITS for n in convs)
        self._pending = {}
        self.infos = [self._info(pl_module, plan, n, fields.get(n), wide) for n in names]
        self.space = None
        if self.featviz:
            if self.featviz_input is not None:
                assert self.featviz_mean is not None and self.featviz_std is not None
                self.space = atlas.module_space(
                    pl_module, self.featviz_input, example, self.featviz_mean, self.featviz_std
                )
            else:
                self.space = atlas.fitted_space(probe.images[:256], probe.inputs[:256])
            for info in self.infos:  # refuse functional nodes now, not after training
                if info.featviz_units or info.name in self._pending:
                    atlas.layer_fn(pl_module, info.name, self.space)

    def _info(self, model: nn.Module, plan: LayerPlan, name: str, rf: Any, wide: bool) -> atlas.LayerInfo:
        layer = plan[name]
        kind = atlas.layer_kind(plan.graph, name)
        units = plan.graph[name].output_shape[1]
        if self.max_units is not None:
            shown, how = list(range(min(units, self.max_units))), "first"
        elif needs_spread(setting := self._setting(name, wide), units):
            assert isinstance(setting, int)
            shown, how = self.chosen.get(name, []), "variability"
            if len(shown) != min(setting, units) or any(u >= units for u in shown):
                shown, self._pending[name] = [], setting  # chosen at the first render, by variability
        else:
            shown = choose_units(setting, units, name)  # every unit, or the listed ones (an error names the layer)
            how = "list" if isinstance(setting, list) else "all"
        module = atlas.layer_module(plan.graph, name)
        if layer.kind in ("conv", "linear"):
            act, why = layer.activation, layer.activation_note
        else:
            act, why = activation_after(plan.graph, name)
        if act is None:
            self.warn_once(
                f"activation:{name}",
                f"{why}: the cards read {name!r}'s units on its own output and call one that is never positive "
                "'never positive', not dead",
            )
        frozen = module is not None and not any(p.requires_grad for p in module.parameters())
        if module is None:  # a functional op: frozen unless the model has anything trainable
            frozen = not any(p.requires_grad for p in model.parameters())
        fv = shown[: self.featviz_max_units or len(shown)] if self.featviz else []
        return atlas.LayerInfo(
            name=name,
            kind=kind,
            units=units,
            shown=shown,
            chosen_by=how,
            activation=act,
            weights=module is not None,
            frozen=frozen,
            rf_size=list(rf.size) if rf is not None else None,
            rf_jump=[float(v) for v in rf.jump] if rf is not None else None,
            rf_start=[float(v) for v in rf.start] if rf is not None else None,
            frame=rf.frame if rf is not None else None,
            output_shape=list(layer.output_shape),
            featviz_units=fv,
        )

    # -- Lightning -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.atlas_dir is None:
            self.atlas_dir = (self._run_dir or Path(".")) / atlas.ATLAS_DIR
        self._max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        self._read_record()  # before training: a damaged manifest fails now, not after the first epoch

    @override
    def should_render(self, writer: object) -> bool:
        return True  # writes files, not pictures

    # -- recording -----------------------------------------------------------------------------------
    def _atlas(self) -> atlas.AtlasWriter:
        """The writer; until the output folder is known (``cnnfeat-explore`` names it in ``finish``) into a staging
        folder of its own, moved there by ``finish``."""
        if self.atlas_dir is None and self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="cnnfeat-atlas-"))
        return atlas.AtlasWriter(self.atlas_dir if self.atlas_dir is not None else self._staging)

    def _has(self, info: atlas.LayerInfo, kind: str, step: int | None = None) -> bool:
        """Whether ``kind`` ("step" or "patches") was recorded for the layer (at ``step``; any step if None): in this
        process, or on disk from before a resume."""
        mine = {s for name, k, s in self._recorded if name == info.name and k == kind}
        if self.atlas_dir is not None:  # a resumed fit: what the files hold
            mine |= {int(p.stem.rsplit("_", 1)[1]) for p in (self.atlas_dir / info.slug).glob(f"{kind}_*.npz")}
        return bool(mine) if step is None else step in mine

    def _read_record(self) -> None:
        """Read, once and before anything is written, the atlas already in ``atlas_dir`` (a resumed fit's)."""
        if not self._record_read:
            self._record_read = True
            self._record = atlas.Atlas.load(self.atlas_dir) if self.atlas_dir is not None else None

    def _keep_recorded(self) -> None:
        """At the first render: every layer whose history ``atlas_dir`` holds keeps the units it was recorded for (the
        report reads each file's rows as the manifest's ``shown`` units) and how they were chosen (``chosen_by``, per
        layer). Where this run's ``units`` / ``max_units`` would show others, warn naming the layers and both
        settings."""
        self._read_record()
        record, self._record = self._record, None
        if record is None:
            return
        settings = record.manifest.get("settings") or {}
        by_variability = set(settings.get("units_chosen_by_variability") or [])
        old_layers = {i.name: i for i in record.layers}
        changed = []
        for info in self.infos:
            old = old_layers.get(info.name)
            if old is None or old.units != info.units or not old.shown or not record.has_history(old):
                continue
            pending = self._pending.get(info.name)
            if pending is None and info.shown == old.shown:
                continue
            if not (pending is not None and info.name in by_variability and len(old.shown) == min(pending, info.units)):
                asked = f"the {pending} most variable" if pending is not None else str(info.shown)
                changed.append(f"{info.name}: recorded {old.shown}, asked {asked}")
            self._set_shown(info, old.shown, atlas.chosen_by(old, settings))
        if not changed:
            return
        asked = f"units={self.units!r}, max_units={self.max_units}"
        recorded = f"units={settings.get('units', AUTO)!r}, max_units={settings.get('max_units')}"
        self.warn_once(
            "kept-units",
            f"{record.dir} holds the history of units recorded with {recorded}; this run asks {asked}. Keeping the "
            f"recorded units so that each unit's cards show its own history ({'; '.join(changed)}); to record other "
            "units, start a new run or give another atlas_dir",
        )

    def write_manifest(self, probe: ProbeSet) -> None:
        """The atlas's static description plus what was measured so far."""
        n = probe.check_size(self.probe_size)
        self._atlas().manifest(
            {
                "layers": [vars(i) for i in self.infos],
                "class_names": list(probe.class_names),
                "probe": {
                    "split": probe.split,
                    "describe": probe.describe() if n == len(probe) else f"the first {n} images of {probe.describe()}",
                    "patch_images": n,
                    "alive_images": self.alive_size,
                },
                "settings": {
                    "top_k": self.top_k,
                    "class_top": self.class_top,
                    "patches_every_n_epochs": self.patches_every_n_epochs,
                    "max_units": self.max_units,
                    "units": self.units,
                    "units_chosen_by_variability": sorted(self.chosen),
                    "max_cell": self.max_cell,
                    "featviz": self.featviz,
                    "featviz_max_units": self.featviz_max_units,
                    "featviz_at_real_best": self.featviz_at_real_best,
                    "featviz_settings": self.settings.to_dict(),
                    "featviz_fc_settings": self.fc_settings.to_dict(),
                    "input_space": self.space.to_dict() if self.space is not None else None,
                },
                "seconds": self._timings,
                "finished": self._finished,
            }
        )

    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        """Record step ``step``: weights and alive/dead of every layer, and the top patches at kept steps."""
        assert probe is not None
        start = time.perf_counter()
        writer = self._atlas()
        self._model, self._last_step = weakref.ref(pl_module), step
        self._apply_chosen()
        self._keep_recorded()
        todo = [i for i in self.infos if not (i.frozen and self._has(i, "step")) or i.name in self._pending]
        maxima, spread = self._unit_max(pl_module, probe, todo, step)
        self._choose(spread)
        modules = dict(pl_module.named_modules())
        for info in todo:
            weights = None
            if info.weights:
                weights = modules[info.name.rsplit(":", 1)[0]].weight.detach()[info.shown]
            layer_dead = int((~fires(maxima[info.name])).sum())  # the whole layer, not only the shown units
            writer.step(info.name, step, maxima[info.name][info.shown], weights, layer_dead, info.shown)
            self._recorded.add((info.name, "step", step))
        last = self._max_epochs is not None and step >= self._max_epochs
        if step % self.patches_every_n_epochs == 0 and not last:
            todo = [i for i in self.infos if not (i.frozen and self._has(i, "patches"))]
            self._record_patches(pl_module, probe, step, todo, self.top_k)
        self._timings[f"step_{step:03d}"] = round(time.perf_counter() - start, 4)
        self.write_manifest(probe)
        return Pictures()

    def _unit_max(
        self, model: nn.Module, probe: ProbeSet, infos: list[atlas.LayerInfo], step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each unit's largest activation (after its activation function) on the alive probe: ``cnnfeat.units``'s
        ``unit_max``, whose ``fires`` is the unit's alive/dead; and the variability of the units of the layers still
        to be chosen (``SpreadAccumulator``); read from the shared probe pass."""
        if not infos:
            return {}, {}
        self._alive_todo = infos
        spreads = [i.name for i in infos if i.name in self._pending]

        def missing(acc: _AliveAccumulator) -> bool:
            return any(i.name not in acc.firing.maxima() for i in infos) or any(n not in acc.spread for n in spreads)

        try:
            result = self.pass_result(model, probe, step)
            assert result is not None
            if missing(result.accumulator):  # fed for other layers: a pass of its own for these
                result = ProbePass([self]).collect(self, model, probe, step)
                assert result is not None
        finally:
            self._alive_todo = None
        self.pass_ids = result.ids
        maxima = result.accumulator.firing.maxima()
        spread = {name: result.accumulator.spread[name].finish() for name in spreads}
        return {i.name: maxima[i.name] for i in infos}, spread

    def _apply_chosen(self) -> None:
        """Units chosen before (a resumed fit's checkpoint) for the layers still pending."""
        for info in self.infos:
            got = self.chosen.get(info.name) or []
            wanted = min(self._pending.get(info.name, 0), info.units)
            if info.name in self._pending and len(got) == wanted and all(u < info.units for u in got):
                self._set_shown(info, got)

    def _set_shown(self, info: atlas.LayerInfo, units: list[int], how: str = "variability") -> None:
        """``info`` shows ``units``, chosen ``how`` (``atlas.CHOSEN_BY``); a choice by variability is kept in the
        checkpoint."""
        info.shown, info.chosen_by = list(units), how
        info.featviz_units = info.shown[: self.featviz_max_units or len(info.shown)] if self.featviz else []
        self._pending.pop(info.name, None)
        if how == "variability":
            self.chosen[info.name] = info.shown
        else:
            self.chosen.pop(info.name, None)

    def _choose(self, spread: dict[str, torch.Tensor]) -> None:
        """Choose the pending layers' units by variability (once), then say in one log line what every layer shows."""
        for info in self.infos:
            if info.name in self._pending:
                self._set_shown(info, choose_units(self._pending[info.name], info.units, info.name, spread[info.name]))
        if self._said:
            return
        self._said = True
        parts = [
            f"{i.name} {len(i.shown)} of {i.units}" + (f" {i.shown}" if i.name in self.chosen else "")
            for i in self.infos
        ]
        how = (
            f"the first {self.max_units}"
            if self.max_units is not None
            else f"units={self.units!r}; a count picks the most variable units (std over {self.alive_size} probe "
            "images of each unit's per-image max activation, chosen at the first render and kept)"
        )
        log.info("%s: units: %s; %s", type(self).__name__, ", ".join(parts), how)

    def pass_request(self, model: nn.Module, probe: ProbeSet, step: int) -> PassRequest | None:
        """The activations of the recorded layers on the shared stratified probe (``cnnfeat.probe_pass``)."""
        todo = self._alive_todo
        if todo is None:
            todo = [i for i in self.infos if not (i.frozen and self._has(i, "step"))]
        if not todo:
            return None
        nodes = {i.name: i.activation or i.name for i in todo}
        positions = shared_positions(probe, self.alive_size)
        spread = [i.name for i in todo if i.name in self._pending]
        return PassRequest(
            positions, self.batch_size, _AliveAccumulator(nodes, spread), outputs=list(set(nodes.values()))
        )

    def _top(
        self, model: nn.Module, probe: ProbeSet, step: int, infos: list[atlas.LayerInfo], k: int
    ) -> dict[str, Any]:
        """Top-k per unit: ``{layer: (TopK, PatchSearch or None)}`` (fc layers: one whole image each), from the search
        the top-patches picture uses (``cnnfeat.topk``; at a step where it searched the same way, its very search)."""
        result: dict[str, Any] = {}
        n = probe.check_size(self.probe_size)
        convs = [i.name for i in infos if i.kind == "conv"]
        if convs:
            search = self.patch_search(model, probe, step, convs, k, n, self.batch_size)
            result.update({name: (search.tops[name], search) for name in convs})
        fcs = [i.name for i in infos if i.kind == "fc"]
        if fcs:
            found = search_vectors(model, probe, fcs, k, n, self.batch_size)
            result.update({name: (top, None) for name, top in found.items()})
        return result

    def _record_patches(
        self,
        model: nn.Module,
        probe: ProbeSet,
        step: int,
        infos: list[atlas.LayerInfo],
        k: int,
        write: set[str] | None = None,
    ) -> dict[str, TopK]:
        """Top-k search, then crops of the first ``top_k`` per unit written as ``patches_<step>`` (for the layers in
        ``write``, default all)."""
        if not infos:
            return {}
        writer, tops = self._atlas(), self._top(model, probe, step, infos, k)
        for info in infos:
            if write is not None and info.name not in write:
                continue
            top, search = tops[info.name]
            shown = info.shown
            values = top.values[: self.top_k, shown].T.cpu()  # (U, k)
            ids = top.ids[: self.top_k, shown].T.cpu()
            pos = top.positions[: self.top_k, shown].T.cpu()
            rows, cols = torch.zeros_like(pos), torch.zeros_like(pos)
            boxes = torch.zeros(*pos.shape, 4, dtype=torch.long)
            cells: list[torch.Tensor | None] = []
            sources = self._sources(model, probe, search, info, ids)
            for u in range(len(shown)):
                for r in range(ids.shape[1]):
                    i = int(ids[u, r])
                    if i < 0:  # fewer probe images than k: an empty cell
                        cells.append(None)
                        continue
                    if search is None:
                        src = sources[i]
                        boxes[u, r] = torch.tensor([0, 0, src.shape[-2] - 1, src.shape[-1] - 1])
                        cells.append(src)
                        continue
                    rf = search.field(i, info.name)
                    rows[u, r], cols[u, r] = divmod(int(pos[u, r]), rf.output_shape[1])
                    box = rf.box(int(rows[u, r]), int(cols[u, r]))
                    boxes[u, r] = torch.tensor(box)
                    cells.append(crop(sources[i], box))
            like = next(c for c in cells if c is not None)
            filled = [c if c is not None else torch.zeros_like(like) for c in cells]
            side = max(max(c.shape[-2:]) for c in filled)
            crops = atlas.squares(filled, side, self.max_cell).reshape(
                len(shown), ids.shape[1], -1, *(2 * [min(side, self.max_cell)])
            )
            writer.patches(
                info.name,
                step,
                units=np.asarray(shown, dtype=np.int64),
                values=values.float().numpy(),
                ids=ids.numpy(),
                labels=torch.where(ids >= 0, probe.labels[self._positions(probe, ids).clamp(min=0)], -1).numpy(),
                rows=rows.numpy(),
                cols=cols.numpy(),
                boxes=boxes.numpy(),
                crops=atlas.to_uint8(crops),
            )
            self._recorded.add((info.name, "patches", step))
        return {name: t for name, (t, _) in tops.items()}

    def _sources(
        self, model: nn.Module, probe: ProbeSet, search: PatchSearch | None, info: atlas.LayerInfo, ids: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        """The images the boxes refer to, by probe ID: display images, or the output of an input transform."""
        wanted = sorted({int(i) for i in ids.flatten().tolist() if i >= 0})
        by_frame: dict[str | None, list[int]] = {}
        for i in wanted:
            by_frame.setdefault(search.field(i, info.name).frame if search is not None else None, []).append(i)
        out: dict[int, torch.Tensor] = {}
        for frame, frame_ids in by_frame.items():
            out.update(zip(frame_ids, crop_sources(model, probe, frame_ids, frame).float(), strict=True))
        return out

    # -- the end of fit ------------------------------------------------------------------------------
    @override
    def finish(self, out_dir: Path | None) -> dict[int, Pictures]:
        """The end of fit (rank 0) or of ``cnnfeat-explore``: ``final`` on the last rendered network; files go to
        ``<out_dir>/atlas`` unless the folder was known before (``None`` and none known: nothing is written)."""
        model = self._model() if self._model is not None else None
        if model is None or self.probe is None or self._last_step is None:
            return {}
        if self.atlas_dir is None:
            staged, self._staging = self._staging, None
            if out_dir is None:
                if staged is not None:
                    shutil.rmtree(staged, ignore_errors=True)
                return {}
            self.atlas_dir = Path(out_dir) / atlas.ATLAS_DIR
            if staged is not None:  # what was recorded before the folder was known
                self.atlas_dir.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(staged, self.atlas_dir)
        with inference(model):
            share = self.final(model, self.probe, self._last_step)
        scalars = {tags.ATLAS_FIDELITY_SHARE.format(layer=k): v for k, v in share.items()}
        return {self._last_step: Pictures(scalars=scalars)}

    def final(self, pl_module: nn.Module, probe: ProbeSet, step: int) -> dict[str, float]:
        """Final patches, classes of the top activations and optimised inputs of ``pl_module`` at ``step`` (call
        under ``inference``); returns each layer's share of units whose optimised input reaches fidelity 1."""
        start = time.perf_counter()
        writer = self._atlas()
        if any(not self._has(i, "step", step) for i in self.infos if not i.frozen):
            self.render(pl_module, probe, step)  # the last epoch was not recorded (e.g. stopped early)
        k = max(self.top_k, self.class_top)
        write = {i.name for i in self.infos if not (i.frozen and self._has(i, "patches"))}  # frozen: once
        tops = self._record_patches(pl_module, probe, step, self.infos, k, write)
        for info in self.infos:
            top = tops[info.name]
            ids = top.ids[: self.class_top, info.shown].T.cpu()
            counts = atlas.class_counts(probe.labels, self._positions(probe, ids), len(probe.class_names))
            writer.classes(
                info.name, step, counts, top.values[: self.class_top, info.shown].T.float().cpu().numpy(), ids.numpy()
            )
        self._timings["final_patches_classes"] = round(time.perf_counter() - start, 4)
        share: dict[str, float] = {}
        if self.featviz and self.space is not None:
            t0 = time.perf_counter()
            share = self._featviz(pl_module, probe, step, tops)
            self._timings["featviz"] = round(time.perf_counter() - t0, 4)
            self._finished["fidelity_share"] = share
        self._finished["step"] = step
        self.write_manifest(probe)
        return share

    @staticmethod
    def _positions(probe: ProbeSet, ids: torch.Tensor) -> torch.Tensor:
        """Probe IDs -> positions in the probe (IDs < 0 stay -1)."""
        out = torch.full_like(ids, -1)
        ok = ids >= 0
        if ok.any():
            out[ok] = probe.positions(ids[ok])
        return out

    def _featviz(self, model: nn.Module, probe: ProbeSet, step: int, tops: dict[str, TopK]) -> dict[str, float]:
        """Optimise every recorded layer's units, write them to the atlas; per layer the share reaching their best
        real activation. The deepest layers (the costliest per unit) are handed to the workers first."""
        device = device_of(model)
        writer, share = self._atlas(), {}
        todo = [info for info in self.infos if info.featviz_units]
        sizes = {info.name: len(info.featviz_units) for info in todo}
        total = sum(sizes.values())
        workers = featviz.workers_for(model, device, self.featviz_workers)
        with task_progress("Atlas: optimised inputs", total, "units") as advance:
            for threads in dict.fromkeys(self._settings_of(info).threads for info in todo):
                group = {info.name: info for info in todo if self._settings_of(info).threads == threads}
                starts = {n: partial(self._start_featviz_layer, model, i, tops[n], device) for n, i in group.items()}
                pending = featviz.side_by_side(starts, workers, threads, lambda name: advance(sizes[name]))
                for info in group.values():  # measured with the caller's thread count, as one after the other does
                    result = pending[info.name].finish()
                    writer.featviz(info.name, step, result)
                    share[info.name] = result.share_reaching_real
        return share

    def _settings_of(self, info: atlas.LayerInfo) -> featviz.FeatVizSettings:
        return self.settings if info.kind == "conv" else self.fc_settings

    def _start_featviz_layer(
        self, model: nn.Module, info: atlas.LayerInfo, top: TopK, device: torch.device, submit: featviz.Submit
    ) -> atlas.PendingUnits:
        """Hand one layer's optimisations to ``submit``; its best probe activation is the reference, optimised at the
        node that ranked it (``cnnfeat.topk.ranked_at``: a conv before a BatchNorm at its activation), so that the
        fidelity divides two values of the same quantity."""
        assert self.space is not None
        reference = top.values[0].float().cpu()  # (units,) best probe activation
        positions = None
        if info.kind == "conv":
            flat = top.positions[0].cpu()
            width = info.output_shape[-1]
            positions = torch.stack([flat // width, flat % width], dim=1)
        fn = atlas.layer_fn(model, ranked_at(self.layer_plan(model).graph, info.name), self.space)
        return atlas.start_optimise_units(
            fn,
            info.featviz_units,
            self.space,
            self._settings_of(info),
            reference,
            positions,
            info.name,
            device,
            self.featviz_at_real_best,
            submit,
        )

    # -- checkpoints: the atlas files are the state ---------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, split=self.split)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"timings": json.dumps(self._timings), "chosen": dump_chosen(self.chosen)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            self._timings = dict(json.loads(state_dict.get("timings", "{}")))
        except (TypeError, ValueError):
            self._timings = {}
        self.chosen = load_chosen(state_dict.get("chosen", "{}"))
