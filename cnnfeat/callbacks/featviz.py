"""Feature visualisation by optimisation as TensorBoard pictures: an optimised input per unit, with its fidelity."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from cnnfeat import atlas, featviz, tags, viz
from cnnfeat.callbacks.base import (
    CallbackOptions,
    Pictures,
    VisualizationCallback,
    check_bool,
    check_indices,
    check_names,
    device_of,
    nonfinite_rows,
)
from cnnfeat.errors import ConfigError, check_int
from cnnfeat.probe import ProbeSet
from cnnfeat.run.progress import task_progress


class FeatureVisCallback(VisualizationCallback):
    """Logs ``featviz/<layer>``: for each of the first ``max_units`` units of each layer, the input optimised to
    maximise it (``cnnfeat.featviz``: Fourier parametrisation, jitter/scale/rotation robustness, deterministic for a
    seed), each captioned with its fidelity; units whose optimised input does not reach their best real activation
    are marked ``!`` (and NaN when the unit never fires on the probe), never dropped.

    Fidelity = the unit's largest activation on its optimised input / its largest activation over the first
    ``probe_size`` probe images (``featviz.real_best``). With the neuron objective on a spatial layer, each unit is
    optimised at the centre and, with ``at_real_best``, also where its best real patch is; the better image is kept.
    Scalars: ``featviz/fidelity_share/<layer>`` (share of units with fidelity >= 1), ``featviz/fidelity_median/<layer>``
    and ``featviz/seconds_per_unit/<layer>``; Text ``featviz/<layer>/table`` lists every unit's numbers.

    Args:
        layers: node names (module calls, ``name:k``); ``None``: every conv node and the last hidden Linear layer.
        max_units: units per layer (the first ones); ``units`` picks them instead (one list for every layer).
        settings: ``FeatVizSettings`` fields (objective, steps, lr, tv_weight, seed, threads, ...).
        workers: optimisations run side by side on a CPU (``cnnfeat.featviz.Workers``: the same images as one after
            the other; ``"auto"``: 2 for cnnfeat's own models, 1 for others and on other devices:
            ``featviz.workers_for``); ``seconds_per_unit`` is then the wall time of a unit's batch among them.
        input_module, input_mean, input_std: the optimised images enter this submodule (called directly) as
            ``(x - input_mean) / input_std`` instead of the model's input (the transfer model: ``backbone``, ImageNet
            mean/std: RGB 224 images for the frozen AlexNet).
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        max_units: int = 16,
        units: Sequence[int] | None = None,
        settings: Mapping[str, Any] | None = None,
        at_real_best: bool = True,
        workers: int | str = featviz.AUTO_WORKERS,
        input_module: str | None = None,
        input_mean: Sequence[float] | float | None = None,
        input_std: Sequence[float] | float | None = None,
        probe_size: int | None = None,
        batch_size: int = 500,
        nrow: int = 8,
        min_cell: int = 56,
        every_n_epochs: int = 5,
        log_untrained: bool = True,
        save_png: bool = False,
        split: str = "test",
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            CallbackOptions(
                every_n_epochs=every_n_epochs,
                log_untrained=log_untrained,
                save_png=save_png,
                during_training=True,
                split=split,
                mean=mean,
                std=std,
                class_names=class_names,
            )
        )
        for name, value in (("max_units", max_units), ("batch_size", batch_size), ("nrow", nrow)):
            check_int(name, value)
        check_int("min_cell", min_cell)
        if probe_size is not None and (
            not isinstance(probe_size, int) or isinstance(probe_size, bool) or probe_size < 1
        ):
            raise ConfigError(f"probe_size must be >= 1 or null, got {probe_size!r}")
        units = check_indices("units", units, allow_none=True)
        check_names("layers", layers, allow_none=True)
        check_bool("at_real_best", at_real_best)
        featviz.check_workers("workers", workers)
        if (input_module is None) != (input_mean is None or input_std is None):
            raise ConfigError(
                f"input_module needs input_mean and input_std (and they need input_module), got {input_module!r}"
            )
        self.layers = list(layers) if layers is not None else None
        self.max_units, self.units = max_units, units
        self.settings = atlas.featviz_settings(settings)
        self.at_real_best, self.input_module, self.workers = at_real_best, input_module, workers
        self.input_mean = [float(v) for v in input_mean] if isinstance(input_mean, Sequence) else input_mean
        self.input_std = [float(v) for v in input_std] if isinstance(input_std, Sequence) else input_std
        self.probe_size, self.batch_size, self.nrow, self.min_cell = probe_size, batch_size, nrow, min_cell
        #: set in ``check``
        self.names: list[str] = []
        self.space: atlas.InputSpace | None = None
        self._kinds: dict[str, str] = {}
        self._units: dict[str, list[int]] = {}
        #: the last render's results by layer (images, fidelity, ...), e.g. for a report or a test
        self.last_results: dict[str, featviz.FeatVizResult] = {}

    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        assert probe is not None
        probe.check_size(self.probe_size)
        example = probe.inputs[:1].to(device_of(pl_module))
        graph = self.layer_plan(pl_module).graph
        self.names = atlas.resolve_layers(graph, self.layers)
        self._kinds = {n: atlas.layer_kind(graph, n) for n in self.names}
        self._units = {}
        for n in self.names:
            count = graph[n].output_shape[1]
            chosen = self.units if self.units is not None else list(range(min(count, self.max_units)))
            bad = [u for u in chosen if u >= count]
            if bad:
                raise ConfigError(f"units {bad} out of range for {n!r}, which has {count} (valid 0..{count - 1})")
            self._units[n] = chosen
        if self.input_module is not None:
            assert self.input_mean is not None and self.input_std is not None
            mean = self.input_mean if isinstance(self.input_mean, list) else [float(self.input_mean)]
            std = self.input_std if isinstance(self.input_std, list) else [float(self.input_std)]
            self.space = atlas.module_space(pl_module, self.input_module, example, mean, std)
        else:
            self.space = atlas.fitted_space(probe.images[:256], probe.inputs[:256])
        for n in self.names:  # functional nodes are refused now, before training
            atlas.layer_fn(pl_module, n, self.space)

    def should_render(self, writer: object) -> bool:
        return True  # the fidelity scalars go to every logger

    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        assert probe is not None and self.space is not None
        n, device = probe.check_size(self.probe_size), device_of(pl_module)
        real = atlas.display_images(pl_module, self.space, probe.inputs[:n], probe.images[:n], self.batch_size)
        pictures = Pictures()
        self.last_results = {}
        total = sum(len(self._units[name]) for name in self.names)
        workers = featviz.workers_for(pl_module, device, self.workers)
        with task_progress(f"Feature visualisation, step {step}", total, "units") as advance:
            starts = {name: self._start_layer(pl_module, name, real, device) for name in self.names}
            threads = self.settings.threads
            pending = featviz.side_by_side(starts, workers, threads, lambda name: advance(len(self._units[name])))
            for name in self.names:  # measured with the caller's thread count, as one after the other does
                self._add_layer(name, pending[name].finish(), pictures, step)
        return pictures

    def _start_layer(
        self, pl_module: nn.Module, name: str, real: torch.Tensor, device: torch.device
    ) -> Callable[[featviz.Submit], atlas.PendingUnits]:
        """Each chosen unit's best real activation (now); what hands its optimisations to a pool (later)."""
        assert self.space is not None
        fn = atlas.layer_fn(pl_module, name, self.space)
        best = featviz.real_best(fn, real.to(device), self.batch_size)
        positions = best.positions if self._kinds[name] == "conv" else None
        return partial(
            atlas.start_optimise_units,
            fn,
            self._units[name],
            self.space,
            self.settings,
            best.values,
            positions,
            name,
            device,
            self.at_real_best,
        )

    def _add_layer(self, name: str, result: featviz.FeatVizResult, pictures: Pictures, step: int) -> None:
        """One layer's picture, scalars and table."""
        self.last_results[name] = result
        bad = int(nonfinite_rows(result.images).sum())
        if bad:  # a diverged network's optimised inputs are NaN: no picture of them
            self.skip_nonfinite(name, "optimised inputs", bad, len(result.images), "units", f"featviz/{name}", step)
        else:
            pictures.images[tags.FEATVIZ.format(layer=name)] = self.picture(result)
        fid = result.fidelity[torch.isfinite(result.fidelity)]
        pictures.scalars[tags.FEATVIZ_FIDELITY_SHARE.format(layer=name)] = result.share_reaching_real
        median = float(fid.median()) if len(fid) else float("nan")
        pictures.scalars[tags.FEATVIZ_FIDELITY_MEDIAN.format(layer=name)] = median
        pictures.scalars[tags.FEATVIZ_SECONDS_PER_UNIT.format(layer=name)] = result.seconds_per_unit
        pictures.texts[tags.FEATVIZ_TABLE.format(layer=name)] = self.table(result)

    def picture(self, result: featviz.FeatVizResult) -> torch.Tensor:
        """The optimised inputs as a grid, each captioned ``u<k> <fidelity>`` (``!`` where it is flagged)."""
        cells = []
        for u, img, fid, flag in zip(
            result.units.tolist(), result.images, result.fidelity.tolist(), result.flagged.tolist(), strict=True
        ):
            big = viz.upscale(viz.grey(img)[None], self.min_cell)[0]
            cells.append(viz.caption(big, f"{u}: {fid:.2f}{' !' if flag else ''}", size=11))
        width = max(c.shape[-1] for c in cells)
        height = max(c.shape[-2] for c in cells)
        padded = torch.ones(len(cells), 3, height, width)
        for i, c in enumerate(cells):
            padded[i, :, : c.shape[-2], : c.shape[-1]] = c
        return viz.grid(padded, nrow=min(self.nrow, len(cells)), min_cell=0)

    @staticmethod
    def table(result: featviz.FeatVizResult) -> str:
        """Markdown: every unit's activation, best real activation, fidelity and flag."""
        ref = result.reference if result.reference is not None else torch.full_like(result.activation, float("nan"))
        lines = ["| unit | activation | best real | fidelity | flagged |", "|---:|---:|---:|---:|:---|"]
        for u, a, r, f, flag in zip(
            result.units.tolist(),
            result.activation.tolist(),
            ref.tolist(),
            result.fidelity.tolist(),
            result.flagged.tolist(),
            strict=True,
        ):
            lines.append(f"| {u} | {a:.4g} | {r:.4g} | {f:.3f} | {'yes' if flag else ''} |")
        return "\n".join(lines)
