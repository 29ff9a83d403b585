"""Dying-ReLU accounting: which units of each ReLU-family application never fire on a fixed probe set."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnfeat import tags
from cnnfeat.callbacks.base import DEFAULT_PROBE_SIZE, CallbackOptions, Pictures, VisualizationCallback, check_names
from cnnfeat.errors import check_int
from cnnfeat.graph import unknown_names
from cnnfeat.probe import ProbeSet
from cnnfeat.probe_pass import PassBatch, PassRequest, shared_positions
from cnnfeat.units import FiringAccumulator, fires


class DeadReluCallback(VisualizationCallback):
    """Logs, for every application of a ReLU-family activation, the fraction of units that never fire.

    Applications are the graph's ReLU/ReLU6 nodes (``cnnfeat.graph.relu_family_nodes``): ``nn.ReLU`` modules,
    ``F.relu``, ``torch.relu``, ``x.relu_()``, ``F.relu6``; a module applied twice per forward pass (ResNet's
    ``BasicBlock.relu``) is two entries, ``layer1.0.relu`` and ``layer1.0.relu:1``. A unit is a channel of a conv
    feature map or a neuron of a fully connected layer, dead when it fires nowhere on the probe (``cnnfeat.units``:
    fires = > 0, so NaN never fires). Scalars ``relu/dead_fraction/<node>``, ``relu/dead_fraction/all`` (every unit
    of every application counted once) and ``relu/zero_fraction/<node>`` (share of all activations that do not
    fire: the ReLU outputs 0, or NaN); histograms ``relu/preact/<node>`` of the activation's inputs (a fixed sample
    of ``hist_samples`` values). When training diverges, ``relu/nonfinite_fraction/<node>`` reports the share of
    NaN/inf inputs and the histograms keep the finite values. The probe is the stratified selection of ``probe_size``
    images that every pass consumer shares (``cnnfeat.probe_pass.shared_positions``: the UMAP and representation
    callbacks' images for the same size); the callback runs no model itself but reads the shared probe pass, whose
    inputs are cloned when each application is called, before an inplace ReLU changes them. A model without a
    ReLU-family activation gets a warning and the callback does nothing.
    """

    uses_probe_pass = True

    def __init__(
        self,
        probe_size: int = DEFAULT_PROBE_SIZE,
        split: str = "test",
        layers: Sequence[str] | None = None,
        batch_size: int = 256,
        hist_samples: int = 20_000,
        every_n_epochs: int = 1,
        log_untrained: bool = True,
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
        check_int("probe_size", probe_size)
        check_int("batch_size", batch_size)
        check_int("hist_samples", hist_samples, 0)
        self.probe_size, self.batch_size = probe_size, batch_size
        self.layers = check_names("layers", layers, allow_none=True)
        self.hist_samples = hist_samples
        #: the applications counted (set in ``check``; empty: the model has none and nothing is logged)
        self.names: list[str] = []
        #: probe IDs of the images the last render counted, in order
        self.pass_ids: torch.Tensor | None = None

    def relu_names(self, pl_module: nn.Module) -> list[str]:
        """The ReLU-family applications to count (all, or ``layers``) from the layer plan; unknown names list the
        valid ones."""
        found = self.layer_plan(pl_module).relus
        if self.layers is None:
            return found
        bad = [n for n in self.layers if n not in found]
        if bad:
            raise unknown_names(bad, found, type(pl_module).__name__, "ReLU layer")
        return list(self.layers)

    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        assert probe is not None
        self.probe_size = self.fit_probe_size(probe, self.probe_size, DEFAULT_PROBE_SIZE)
        self.names = self.relu_names(pl_module)
        if not self.names:
            self.warn_once(
                "none",
                f"{type(pl_module).__name__} applies no ReLU-family activation (nn.ReLU, nn.ReLU6, F.relu, "
                "torch.relu, Tensor.relu, F.relu6), so there are no dead units to count; the callback does nothing",
            )

    def should_render(self, writer: object) -> bool:
        return bool(self.names)  # scalars go to every logger

    def pass_request(self, model: nn.Module, probe: ProbeSet, step: int) -> PassRequest | None:
        """The inputs of the counted applications on the shared stratified probe (``cnnfeat.probe_pass``)."""
        if not self.names:
            return None
        positions = shared_positions(probe, self.probe_size)
        return PassRequest(positions, self.batch_size, _DeadReluAccumulator(self, len(positions)), inputs=self.names)

    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        assert probe is not None
        names = self.names
        if not names:
            return Pictures()
        result = self.pass_result(pl_module, probe, step)
        assert result is not None
        acc: _DeadReluAccumulator = result.accumulator
        self.pass_ids = result.ids
        pictures = Pictures()
        alive = acc.firing.finish()
        dead_units = all_units = 0
        for n in names:
            dead = ~alive[n]
            dead_units, all_units = dead_units + int(dead.sum()), all_units + dead.numel()
            pictures.scalars[tags.DEAD_FRACTION.format(node=n)] = float(dead.float().mean())
            pictures.scalars[tags.ZERO_FRACTION.format(node=n)] = acc.zeros[n] / acc.total[n]
            if acc.nonfinite[n]:  # a diverged network: say so instead of failing
                pictures.scalars[tags.NONFINITE_FRACTION.format(node=n)] = acc.nonfinite[n] / acc.total[n]
            values = torch.cat(acc.samples[n]) if acc.samples[n] else torch.empty(0)
            values = values[torch.isfinite(values)]
            if len(values):
                pictures.histograms[tags.PREACT.format(node=n)] = values
        pictures.scalars[tags.DEAD_FRACTION_ALL.name] = dead_units / all_units
        return pictures


class _DeadReluAccumulator:
    """Firing, zero and non-finite counts and a histogram sample of each application's inputs, batch by batch."""

    def __init__(self, cb: DeadReluCallback, size: int) -> None:
        names = cb.names
        self.names, self.size, self.hist_samples = names, size, cb.hist_samples
        self.firing = FiringAccumulator()
        self.zeros = dict.fromkeys(names, 0)
        self.nonfinite = dict.fromkeys(names, 0)
        self.total = dict.fromkeys(names, 0)
        self.samples: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.gen = torch.Generator().manual_seed(0)

    def update(self, batch: PassBatch) -> None:
        pre = batch.inputs
        per_batch = max(1, self.hist_samples * batch.batch_size // self.size)
        self.firing.update({n: pre[n] for n in self.names})
        for n in self.names:
            a = pre[n]
            self.zeros[n] += a.numel() - int(torch.count_nonzero(fires(a)))
            if not torch.isfinite(a.sum()):  # NaN and infinity propagate into the sum: only then count them
                self.nonfinite[n] += a.numel() - int(torch.count_nonzero(torch.isfinite(a)))
            self.total[n] += a.numel()
            if self.hist_samples:
                flat = a.flatten()
                idx = torch.randint(len(flat), (min(per_batch, len(flat)),), generator=self.gen)
                self.samples[n].append(flat[idx.to(flat.device)].float().cpu())
