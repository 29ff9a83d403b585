"""A DataModule written as Lightning's docs write one drives every picture callback.

torchvision ``FashionMNIST`` with ``ToTensor`` + ``Normalize``, a ``random_split`` for validation, the test set only
in ``setup("test")``, no ``classes`` on the DataModule: the callbacks fall back to the validation split (saying so
once), show the un-normalised images, feed the model the normalised ones, and name the classes.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from torchvision.datasets import FashionMNIST

from cnnfeat import viz
from cnnfeat.callbacks import (
    DeadReluCallback,
    EmbeddingCallback,
    FeatureMapCallback,
    FilterCallback,
    TopPatchesCallback,
)
from cnnfeat.graph import capture
from cnnfeat.models import SmallCNN
from tests.conftest import read_events
from tests.helpers.lightning_zoo import TutorialFashionMNIST, torchvision_root

IDS = [0, 7]


@pytest.fixture(scope="module")
def root(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return torchvision_root(data_dir, tmp_path_factory.mktemp("torchvision"))


def pixels(event: object) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")).astype(int)  # type: ignore[attr-defined]


def png(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).numpy().astype(np.float32) * 255).clip(0, 255).astype(np.uint8).astype(int)


def test_tutorial_datamodule_drives_every_callback(root: Path, tmp_path: Path) -> None:
    dm = TutorialFashionMNIST(root)
    model = SmallCNN(input_mean=None, input_std=None)  # the DataModule normalises
    feature_maps = FeatureMapCallback(image_ids=IDS, layers=["conv1"], min_cell=28)
    top = TopPatchesCallback(layers=["conv3"], top_k=2, max_channels=2, probe_size=64, every_n_epochs=1)
    callbacks = [
        FilterCallback(),
        feature_maps,
        DeadReluCallback(probe_size=64),
        top,
        EmbeddingCallback(probe_size=40, n_neighbors=5, full_epochs=20, warm_epochs=5, cv_folds=2, gif=False),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",  # the ground truth is computed on the CPU: the same kernels, the same pixels
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    fallback = [str(w.message) for w in record if "test split is not available" in str(w.message)]
    assert len(fallback) == 1, "said once for the whole run"
    assert fallback[0].startswith("TutorialFashionMNIST: the test split is not available during fit (AttributeError")
    assert "'fmnist_test'" in fallback[0] and "use the validation split instead" in fallback[0]

    probe = feature_maps.probe
    assert probe is not None and all(cb.probe is probe for cb in callbacks[1:]), "one probe for all"
    assert probe.split == "val" and len(probe) == 5000

    # ground truth from the raw uint8 files: the validation subset's images, un-normalised, and their class names
    full = FashionMNIST(str(root), train=True)
    rows = torch.tensor(dm.fmnist_val.indices)
    raw = full.data[rows[:64]].unsqueeze(1).float() / 255
    assert torch.allclose(probe.images[:64], raw, atol=1e-6), "pictures show the images, not the normalised inputs"
    assert torch.allclose(probe.inputs[:64], (raw - 0.2860) / 0.3530, atol=1e-5), "the model gets what it trains on"
    assert probe.class_names == tuple(FashionMNIST.classes) and torch.equal(probe.labels[:64], full.targets[rows[:64]])

    ev = read_events(tmp_path)
    images = ev["images"]
    for i in IDS:
        caption = f"val {i}: {FashionMNIST.classes[int(full.targets[rows[i]])]}"
        expected = viz.caption(viz.upscale(viz.grey(raw[i : i + 1]), 112)[0], caption)
        got = images[f"feature_maps/input/img{i}"]
        assert [e.step for e in got] == [0, 1]
        assert np.abs(pixels(got[1]) - png(expected)).max() <= 1, "the input picture is the un-normalised image"
        with torch.no_grad(), capture(model.eval(), ["conv1"]) as out:
            model((raw[i : i + 1] - 0.2860) / 0.3530)
        conv = viz.map_grid(out["conv1"][0], signed=True, min_cell=28)
        assert np.abs(pixels(images[f"feature_maps/conv1/conv/img{i}"][1]) - png(conv)).max() <= 1
    assert [e.step for e in images["top_patches/conv3"]] == [0, 1] and "umap/pixels" in images
    for _, _, img_id, _, box in top.last_boxes["conv3"]:
        assert img_id < 64 and box[2] - box[0] == 9, "10x10 fields from display images"
    assert [s for s, _ in ev["scalars"]["relu/dead_fraction/all"]] == [0, 1]
