"""Dying-ReLU accounting: which ReLU units never fire on a fixed probe set."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from cnnfeat import layers
from cnnfeat.callbacks.base import Pictures, VisualizationCallback, probe_images


class DeadReluCallback(VisualizationCallback):
    """Logs, for every ReLU, the fraction of units that output 0 for every probe image.

    A unit is a channel for conv feature maps (dead = not positive at any position of any probe image)
    and a neuron for fully connected layers. Scalars ``relu/dead_fraction/<layer>``, the overall
    ``relu/dead_fraction/all`` and ``relu/zero_fraction/<layer>`` (share of all activations that are 0);
    histograms ``relu/preact/<layer>`` of the ReLU inputs (a fixed sample of ``hist_samples`` values).
    When training diverges, ``relu/nonfinite_fraction/<layer>`` reports the share of NaN/inf inputs and the
    histograms keep the finite values. The probe set is the first ``probe_size`` images of ``split``;
    pre-activations are read with forward pre-hooks on the ReLU modules, which see the input before an
    inplace ReLU changes it.
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
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, log_untrained=log_untrained, save_png=False)
        if probe_size < 1 or batch_size < 1 or hist_samples < 0:
            raise ValueError(
                f"probe_size and batch_size must be >= 1 and hist_samples >= 0, got {probe_size}, "
                f"{batch_size}, {hist_samples}"
            )
        self.probe_size, self.split, self.batch_size = probe_size, split, batch_size
        self.layers = list(layers) if layers else None
        self.hist_samples = hist_samples

    def relu_names(self, pl_module: pl.LightningModule) -> list[str]:
        names = self.layers or list(layers.relu_layers(pl_module))
        layers.resolve_layers(pl_module, names, layers.ACTIVATIONS, what="ReLU layer")
        return names

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.relu_names(pl_module):
            raise ValueError(f"{type(pl_module).__name__} has no ReLU modules to watch")
        self.check_probe_size(trainer, self.split, self.probe_size)

    def should_render(self, trainer: pl.Trainer) -> bool:
        return True  # scalars go through pl_module.log to any logger

    def render(
        self, pl_module: pl.LightningModule, datamodule: pl.LightningDataModule | None, step: int = 0
    ) -> Pictures:
        names = self.relu_names(pl_module)
        unit_max: dict[str, torch.Tensor] = {}
        zeros = dict.fromkeys(names, 0)
        nonfinite = dict.fromkeys(names, 0)
        total = dict.fromkeys(names, 0)
        samples: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        gen = torch.Generator().manual_seed(0)
        per_batch = max(1, self.hist_samples * self.batch_size // self.probe_size)
        with layers.capture(pl_module, names, inputs=True) as pre:
            for start in range(0, self.probe_size, self.batch_size):
                ids = torch.arange(start, min(start + self.batch_size, self.probe_size))
                x, _ = probe_images(datamodule, self.split, ids)
                pl_module(x.to(pl_module.device))
                for n in names:
                    a = pre[n]
                    m = a.amax(dim=(0, *range(2, a.ndim)))  # per channel (conv) / per neuron (fc)
                    unit_max[n] = m if n not in unit_max else torch.maximum(unit_max[n], m)
                    zeros[n] += a.numel() - int(torch.count_nonzero(a > 0))
                    nonfinite[n] += a.numel() - int(torch.count_nonzero(torch.isfinite(a)))
                    total[n] += a.numel()
                    if self.hist_samples:
                        flat = a.flatten()
                        idx = torch.randint(len(flat), (min(per_batch, len(flat)),), generator=gen)
                        samples[n].append(flat[idx.to(flat.device)].float().cpu())
        pictures = Pictures()
        dead_units = all_units = 0
        for n in names:
            dead = unit_max[n] <= 0
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
