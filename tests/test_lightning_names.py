"""cnnfeat under both Lightning import names: ``pytorch_lightning`` (this test process) and ``lightning.pytorch``.

A ``lightning.pytorch.Trainer`` refuses objects derived from ``pytorch_lightning`` classes, so the other name
runs in fresh processes: a user program that imports ``lightning.pytorch`` first, and the command line with
``CNNFEAT_LIGHTNING=lightning.pytorch``. Both must never import ``pytorch_lightning`` at all.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import pytest

from cnnfeat.errors import ConfigError
from cnnfeat.run import lightning_api
from tests.conftest import read_events

REPO = Path(__file__).resolve().parents[1]
needs_lightning = pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="the unified `lightning` package is not installed"
)

USER_PROGRAM = """
import sys
import lightning.pytorch as L
from lightning.pytorch.loggers import TensorBoardLogger

from cnnfeat.callbacks import (
    DeadReluCallback, DivergenceGuard, EmbeddingCallback, EpochSummary, FeatureMapCallback, FilterCallback,
    ProgressLog, TopPatchesCallback,
)
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.models import SmallCNN

out, data, cache = sys.argv[1:4]
trainer = L.Trainer(
    max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
    enable_model_summary=False, enable_progress_bar=False, logger=TensorBoardLogger(out, name="", version=""),
    callbacks=[
        FilterCallback(), FeatureMapCallback(image_ids=[22, 193]), DeadReluCallback(probe_size=200),
        TopPatchesCallback(probe_size=200), EmbeddingCallback(probe_size=200), EpochSummary(), DivergenceGuard(),
        ProgressLog(every_n_steps=1, always=True),
    ],
)
trainer.fit(SmallCNN(), datamodule=FashionMNISTDataModule(data_dir=data, cache_dir=cache, download=False))
print("pytorch_lightning imported:", "pytorch_lightning" in sys.modules)
"""


def test_the_chosen_package_in_this_process_is_pytorch_lightning() -> None:
    assert (
        lightning_api.PACKAGE == "pytorch_lightning" and lightning_api.target("Trainer") == "pytorch_lightning.Trainer"
    )


def test_a_bad_choice_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(lightning_api.ENV, "lightning.fabric")
    with pytest.raises(ConfigError, match=r"CNNFEAT_LIGHTNING='lightning.fabric': choose one of"):
        lightning_api.choose()


@needs_lightning
def test_callbacks_models_and_data_under_lightning_pytorch(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    (tmp_path / "user.py").write_text(dedent(USER_PROGRAM))
    r = subprocess.run(
        [sys.executable, "user.py", str(tmp_path / "run"), str(data_dir), str(cache_dir)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pytorch_lightning imported: False" in r.stdout
    images = read_events(tmp_path / "run")["images"]
    for tag in ("filters/conv1", "feature_maps/conv2/relu/img22", "top_patches/conv3", "umap/features"):
        assert [e.step for e in images[tag]] == [0, 1], tag


@needs_lightning
def test_the_command_line_under_lightning_pytorch(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    code = (
        "import sys, cnnfeat.run.train as t; t.main(); "
        "print('pytorch_lightning imported:', 'pytorch_lightning' in sys.modules)"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "experiment=quick",
            "trainer=cpu",
            "trainer.limit_train_batches=3",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"data.data_dir={data_dir}",
            f"data.cache_dir={cache_dir}",
        ],
        env={**os.environ, "CNNFEAT_LIGHTNING": "lightning.pytorch", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pytorch_lightning imported: False" in r.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
