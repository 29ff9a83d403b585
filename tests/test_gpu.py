"""The GPU path (skipped without CUDA): training really runs on the device, at the configured precision.

``benchmarks/gpu_check.sh`` runs these on a lent GPU; CI has none.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from cnnfeat.run.train import build
from tests.conftest import read_events

MakeCfg = Callable[..., DictConfig]
pytestmark = pytest.mark.gpu
GPU = ["trainer.accelerator=gpu", "trainer.precision=16-mixed"]  # conftest's make_cfg starts from trainer=cpu


class _Observe(pl.Callback):
    """What training steps really ran on: the module's device and conv1's output dtype inside a training step."""

    def __init__(self) -> None:
        self.devices: set[str] = set()
        self.dtypes: set[torch.dtype] = set()
        self._handle: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.devices.add(pl_module.device.type)
        self._handle = pl_module.conv1.register_forward_hook(lambda m, a, out: self.dtypes.add(out.dtype))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._handle.remove()


@pytest.mark.parametrize(("precision", "dtype"), [("16-mixed", torch.float16), ("32-true", torch.float32)])
def test_training_runs_on_cuda_at_the_configured_precision(
    make_cfg: MakeCfg, tmp_path: Path, precision: str, dtype: torch.dtype
) -> None:
    dm, model, trainer = build(make_cfg(*GPU, f"trainer.precision={precision}", "callbacks=none"))
    seen = _Observe()
    trainer.callbacks.append(seen)
    trainer.fit(model, datamodule=dm)
    assert trainer.strategy.root_device.type == "cuda" and trainer.precision == precision
    assert seen.devices == {"cuda"}, "every training step ran on the GPU"
    assert seen.dtypes == {dtype}, f"conv1 computed in {seen.dtypes} under {precision}"


def test_every_picture_is_drawn_from_a_gpu_run(make_cfg: MakeCfg, tmp_path: Path) -> None:
    dm, model, trainer = build(
        make_cfg(
            *GPU,
            "callbacks.dead_relu.probe_size=300",
            "callbacks.top_patches.probe_size=300",
            "callbacks.umap.probe_size=300",
        )
    )
    trainer.fit(model, datamodule=dm)
    images = read_events(tmp_path)["images"]
    for tag in ("filters/conv1", "feature_maps/conv2/relu/img22", "top_patches/conv3", "umap/features"):
        assert [e.step for e in images[tag]] == [0, 1], tag
