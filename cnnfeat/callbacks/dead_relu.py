"""Dying-ReLU accounting: which units of each ReLU-family application never fire on a fixed probe set."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnfeat.callbacks.base import CallbackOptions, Pictures, VisualizationCallback, check_names, device_of
from cnnfeat.errors import check_int
from cnnfeat.graph import capture, relu_family_nodes, trace_graph, unknown_names
from cnnfeat.probe import ProbeSet, batches
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
    NaN/inf inputs and the histograms keep the finite values. The probe is the first ``probe_size`` images of the
    split; inputs are cloned when each application is called, before an inplace ReLU changes them. A model without
    a ReLU-family activation gets a warning and the callback does nothing.
    """

    def __init__(
        self,
        probe_size: int = 2000,
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

    def relu_names(self, pl_module: nn.Module, x: torch.Tensor) -> list[str]:
        """The ReLU-family applications to count (all, or ``layers``); unknown names list the valid ones."""
        found = relu_family_nodes(trace_graph(pl_module, x))
        if self.layers is None:
            return found
        bad = [n for n in self.layers if n not in found]
        if bad:
            raise unknown_names(bad, found, type(pl_module).__name__, "ReLU layer")
        return list(self.layers)

    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        assert probe is not None
        probe.check_size(self.probe_size)
        self.names = self.relu_names(pl_module, probe.inputs[:1].to(device_of(pl_module)))
        if not self.names:
            self.warn_once(
                "none",
                f"{type(pl_module).__name__} applies no ReLU-family activation (nn.ReLU, nn.ReLU6, F.relu, "
                "torch.relu, Tensor.relu, F.relu6), so there are no dead units to count; the callback does nothing",
            )

    def should_render(self, writer: object) -> bool:
        return bool(self.names)  # scalars go to every logger

    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        assert probe is not None
        names, device = self.names, device_of(pl_module)
        if not names:
            return Pictures()
        firing = FiringAccumulator()
        zeros = dict.fromkeys(names, 0)
        nonfinite = dict.fromkeys(names, 0)
        total = dict.fromkeys(names, 0)
        samples: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        gen = torch.Generator().manual_seed(0)
        per_batch = max(1, self.hist_samples * self.batch_size // self.probe_size)
        with capture(pl_module, names, inputs=True) as pre:
            for ids in batches(torch.arange(self.probe_size), self.batch_size):
                pl_module(probe.inputs[ids].to(device))
                firing.update({n: pre[n] for n in names})
                for n in names:
                    a = pre[n]
                    zeros[n] += a.numel() - int(torch.count_nonzero(fires(a)))
                    nonfinite[n] += a.numel() - int(torch.count_nonzero(torch.isfinite(a)))
                    total[n] += a.numel()
                    if self.hist_samples:
                        flat = a.flatten()
                        idx = torch.randint(len(flat), (min(per_batch, len(flat)),), generator=gen)
                        samples[n].append(flat[idx.to(flat.device)].float().cpu())
        pictures = Pictures()
        alive = firing.finish()
        dead_units = all_units = 0
        for n in names:
            dead = ~alive[n]
            dead_units, all_units = dead_units + int(dead.sum()), all_units + dead.numel()
            pictures.scalars[f"relu/dead_fraction/{n}"] = float(dead.float().mean())
            pictures.scalars[f"relu/zero_fraction/{n}"] = zeros[n] / total[n]
            if nonfinite[n]:  # a diverged network: say so instead of failing
                pictures.scalars[f"relu/nonfinite_fraction/{n}"] = nonfinite[n] / total[n]
            values = torch.cat(samples[n]) if samples[n] else torch.empty(0)
            values = values[torch.isfinite(values)]
            if len(values):
                pictures.histograms[f"relu/preact/{n}"] = values
        pictures.scalars["relu/dead_fraction/all"] = dead_units / all_units
        return pictures
