"""Picture callbacks in a real Trainer: TensorBoard tags, image sizes, steps, PNGs, numbers and errors.

Foreign networks and DataModules are covered in ``test_zoo_callbacks.py``.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from cnnfeat import layers
from cnnfeat.callbacks import (
    DeadReluCallback,
    EmbeddingCallback,
    FeatureMapCallback,
    FilterCallback,
    TopPatchesCallback,
    VisualizationCallback,
)
from cnnfeat.callbacks.base import inference
from cnnfeat.callbacks.session import build_probe
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.errors import ConfigError
from cnnfeat.models import SmallCNN
from cnnfeat.run.train import train
from tests.conftest import read_events

MakeCfg = Callable[..., DictConfig]
LECTURE_IDS = ["22", "193", "36", "312", "1087", "74"]
SMALL = [  # every callback on, small probes so the test stays quick
    "callbacks.dead_relu.probe_size=300",
    "callbacks.top_patches.probe_size=400",
    "callbacks.top_patches.every_n_epochs=1",
]


def test_all_pictures_logged_with_sizes_and_steps(make_cfg: MakeCfg, tmp_path: Path) -> None:
    train(make_cfg("trainer.max_epochs=2", "save_png=true", *SMALL))
    ev = read_events(tmp_path)
    images = ev["images"]

    def check(tag: str, width: int, height: int) -> None:
        assert tag in images, f"{tag} not in {sorted(images)[:10]}..."
        assert [e.step for e in images[tag]] == [0, 1, 2], "step 0 = untrained, then one per epoch"
        assert {(e.width, e.height) for e in images[tag]} == {(width, height)}
        assert (tmp_path / "images" / tag / "step_002.png").is_file()

    # 6 kernels of 3x3 upscaled to 24 px, 2 px gaps: a 1 x 6 row for conv1, a 6 x 6 out x in grid for conv2
    check("filters/conv1", 6 * 26 + 2, 24 + 4)
    check("filters/conv2", 6 * 26 + 2, 6 * 26 + 2)
    for img in LECTURE_IDS:
        for layer in ("conv1", "conv2"):
            for kind in ("conv", "relu"):
                check(f"feature_maps/{layer}/{kind}/img{img}", 6 * 58 + 2, 56 + 4)  # 6 maps of 28x28 x2
        assert f"feature_maps/input/img{img}" in images
    check("top_patches/conv1", 8 * 44 + 2, 6 * 44 + 2)  # 3x3 receptive field, upscaled x14
    check("top_patches/conv3", 8 * 42 + 2, 16 * 42 + 2)  # 10x10 receptive field, upscaled x4

    scalars = ev["scalars"]
    for relu in ("relu1", "relu2", "relu3", "relu4", "relu5", "all"):
        tag = f"relu/dead_fraction/{relu}"
        assert [s for s, _ in scalars[tag]] == [0, 1, 2], "scalars share the pictures' axis: epochs trained"
        assert all(0.0 <= v <= 1.0 for _, v in scalars[tag])
    assert [e.step for e in ev["histograms"]["relu/preact/relu1"]] == [0, 1, 2]
    assert [s for s, _ in scalars["train/loss"]] == [3, 7], "Lightning's own scalars stay at its global step"


def render(cb: VisualizationCallback, model: torch.nn.Module, dm: FashionMNISTDataModule, step: int = 0):
    """What a Trainer does for a callback, without one: the shared probe, the checks, one render."""
    with inference(model):
        cb.prepare(model, build_probe(dm, cb.probe_spec, model) if cb.needs_probe else None)
        return cb.render(model, cb.probe, step)


def test_dead_fraction_zero_by_default_and_one_with_huge_negative_bias(
    datamodule: FashionMNISTDataModule,
) -> None:
    cb = DeadReluCallback(probe_size=500)
    for bias, expected in ((None, 0.0), (-100.0, 1.0)):
        model = SmallCNN(conv_bias_init=bias)
        s = render(cb, model, datamodule).scalars
        for relu in ("relu1", "relu2", "relu3"):
            assert s[f"relu/dead_fraction/{relu}"] == expected, (bias, relu, s)
    assert s["relu/zero_fraction/relu1"] == 1.0


def test_rendering_leaves_module_and_modes_untouched(datamodule: FashionMNISTDataModule) -> None:
    model = SmallCNN(inplace_relu=True).train()
    model.fc1.eval()  # a submodule in its own mode (like a frozen backbone) must keep it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for cb in (
        FilterCallback(),
        FeatureMapCallback(),
        DeadReluCallback(probe_size=200),
        TopPatchesCallback(probe_size=200),
    ):
        render(cb, model, datamodule)
    assert model.training and not model.fc1.training and model.conv1.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks removed"


def test_feature_maps_pre_and_post_relu_differ_and_post_is_clamped(
    datamodule: FashionMNISTDataModule,
) -> None:
    model = SmallCNN(inplace_relu=True)
    x, _ = datamodule.images("test", [22, 193])
    with inference(model), layers.capture(model, ["conv2", "relu2"]) as out:
        model(x)
    assert not torch.equal(out["conv2"], out["relu2"])
    assert torch.equal(out["relu2"], out["conv2"].clamp(min=0))


def test_top_patches_streaming_matches_brute_force_and_crops_are_right(
    datamodule: FashionMNISTDataModule,
) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    cb = TopPatchesCallback(layers=["conv1"], top_k=5, probe_size=300, batch_size=64)
    with inference(model):
        top = cb.collect(model, build_probe(datamodule, cb.probe_spec))["conv1"]
        x, _ = datamodule.images("test", range(300))
        with layers.capture(model, ["conv1"]) as out:
            model(x)
    per_image = out["conv1"].flatten(2).amax(dim=2)  # (300, 6)
    ref_vals, ref_ids = per_image.topk(5, dim=0)
    assert torch.allclose(top.values, ref_vals) and torch.equal(top.ids, ref_ids)
    # an interior winner's 3x3 crop, through conv1 alone, reproduces the recorded activation
    w, b = model.conv1.weight.float(), model.conv1.bias
    checked = 0
    for c in range(6):
        for r in range(5):
            pos = int(top.positions[r, c])
            row, col = divmod(pos, 28)
            if 0 < row < 27 and 0 < col < 27:
                patch = x[int(top.ids[r, c]), :, row - 1 : row + 2, col - 1 : col + 2]
                act = F.conv2d(((patch - model.input_mean) / model.input_std)[None], w, b)[0, c, 0, 0]
                assert torch.isclose(act, top.values[r, c], atol=1e-4)
                checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "callbacks.filters.layers=[conv1,conv7]",
            r"Unknown conv layer name\(s\) \['conv7'\].*\['conv1', 'conv2', 'conv3'\]",
        ),
        (
            "callbacks.feature_maps.image_ids=[22,10000]",
            r"test image_ids \[10000\] out of range.*valid IDs 0..9999",
        ),
        ("callbacks.feature_maps.layers=[fc1]", r"Unknown conv layer name\(s\) \['fc1'\]"),
        ("callbacks.top_patches.layers=[fc2]", r"'fc2' comes after 'fc1', which has no spatial geometry"),
        (
            "callbacks.dead_relu.probe_size=20000",
            r"probe_size=20000 is larger than the test split \(10000 images\)",
        ),
        ("callbacks.filters.every_n_epochs=0", r"every_n_epochs must be an integer >= 1, got 0"),
        ("callbacks.filters.scale=global", r"scale must be 'layer' or 'filter', got 'global'"),
        (
            "callbacks.feature_maps.layers=[conv9]",
            r"Unknown conv layer name\(s\) \['conv9'\] for SmallCNN; valid names: \['conv1', 'conv2', 'conv3'\]",
        ),
        (
            "+callbacks.feature_maps.channels=[0,-2]",
            r"channels \[0, -2\] out of range for conv1 \(6 channels: valid 0..5\)",
        ),
        ("callbacks.top_patches.channels=[16]", r"channels \[16\] out of range for conv1 \(6 channels: valid 0..5\)"),
        (
            "callbacks.top_patches.layers=[conv3,pool9]",
            r"Unknown layer name\(s\) \['pool9'\] for SmallCNN; valid names: \['sub', 'div', 'contiguous', 'conv1'",
        ),
        (
            "callbacks.dead_relu.layers=[relu1,relu7]",
            r"Unknown ReLU layer name\(s\) \['relu7'\].*valid names: \['relu1', 'relu2', 'relu3', 'relu4', 'relu5'\]",
        ),
        ("callbacks.umap.layer=fc9", r"Unknown layer name\(s\) \['fc9'\] for SmallCNN; valid names: \['sub', 'div'"),
        ("callbacks.umap.split=holdout", r"split must be one of \['test', 'train', 'val'\], got 'holdout'"),
    ],
)
def test_bad_arguments_fail_before_training(make_cfg: MakeCfg, tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*SMALL, override))
    assert not (tmp_path / "checkpoints").exists(), "nothing may be trained or written"


def test_without_tensorboard_warns_once_and_still_logs_scalars(
    datamodule: FashionMNISTDataModule, tmp_path: Path
) -> None:
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FilterCallback(), DeadReluCallback(probe_size=100)],
    )
    with pytest.warns(UserWarning, match="no TensorBoardLogger") as record:
        trainer.fit(SmallCNN(), datamodule=datamodule)
    messages = [str(w.message) for w in record if "no TensorBoardLogger" in str(w.message)]
    assert sorted(m.split(":")[0] for m in messages) == ["DeadReluCallback", "FilterCallback"], "once each"
    assert "relu/dead_fraction/relu1" in trainer.callback_metrics, "epoch-end scalars reach callback_metrics"
    with (Path(trainer.logger.log_dir) / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("relu/dead_fraction/all")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2], "any logger gets the scalars at step = epochs trained"


def test_dead_relu_reports_a_diverged_network_instead_of_failing(datamodule: FashionMNISTDataModule) -> None:
    model = SmallCNN()
    with torch.no_grad():
        model.conv1.weight.fill_(float("nan"))
    p = render(DeadReluCallback(probe_size=100), model, datamodule)
    assert p.scalars["relu/nonfinite_fraction/relu1"] == 1.0
    assert "relu/preact/relu1" not in p.histograms, "no histogram of NaNs"


def test_a_model_without_relu_gets_a_warning_and_no_dead_relu_scalars(datamodule: FashionMNISTDataModule) -> None:
    class Tanh(SmallCNN):
        def __init__(self) -> None:
            super().__init__()
            for i in range(1, 6):
                setattr(self, f"relu{i}", torch.nn.Tanh())

    cb = DeadReluCallback(probe_size=50)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    with pytest.warns(UserWarning, match=r"DeadReluCallback: Tanh applies no ReLU-family activation"):
        trainer.fit(Tanh(), datamodule=datamodule)
    assert trainer.state.finished and not [k for k in trainer.callback_metrics if k.startswith("relu/")]
    assert cb.seconds == [], "nothing was rendered"


def test_one_probe_is_shared_by_every_callback(datamodule: FashionMNISTDataModule) -> None:
    cbs = [FeatureMapCallback(), DeadReluCallback(probe_size=100), TopPatchesCallback(probe_size=100)]
    cbs.append(EmbeddingCallback(probe_size=100, pixels=False, gif=False, projector=False))
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=cbs,
    )
    trainer.fit(SmallCNN(), datamodule=datamodule)
    assert len({id(cb.probe) for cb in cbs}) == 1, "built once, shared"
    probe = cbs[0].probe
    x, y = datamodule.images("test")
    assert torch.equal(probe.images, x) and torch.equal(probe.inputs, x) and torch.equal(probe.labels, y)
    assert probe.class_names == datamodule.classes and probe.split == "test" and not probe.note


def test_end_of_fit_work_is_counted_apart_from_the_renders(
    datamodule: FashionMNISTDataModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GIF and the Projector run after the last render; their time is ``end_seconds``, not lost (benchmarks
    add it to the renders' ``seconds``)."""
    cb = EmbeddingCallback(probe_size=100, pixels=False)
    calls = []

    def slow_end(trainer: pl.Trainer) -> None:
        calls.append(trainer)
        time.sleep(0.2)

    monkeypatch.setattr(cb, "end_of_fit", slow_end)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.fit(SmallCNN(), datamodule=datamodule)
    assert len(cb.seconds) == 2, "untrained + epoch 1: the end of fit is not a render"
    assert calls == [trainer] and cb.end_seconds >= 0.2
    assert (tmp_path / "umap_embedding.gif").is_file(), "finish wrote the GIF inside the timed end of fit"
