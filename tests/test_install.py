"""cnnfeat as users install it: a built wheel (not the checkout) trains and explores from any directory, and a
user's own config folder adds a model of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import pytest
import tomllib
import torch

from tests.conftest import read_events
from tests.helpers.procs import strict_json

REPO = Path(__file__).resolve().parents[1]

USER_MODEL = '''
import torch
from torch import nn

from cnnfeat.models import ImageClassifier


class TinyNet(ImageClassifier):
    """A user's own model: one conv block and a linear head."""

    def __init__(self, width: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Linear(width * 16, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.relu(self.conv(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
'''

USER_MODEL_CONFIG = """
_target_: my_models.TinyNet
_recursive_: false
_convert_: all
width: 8
optimizer:
  _target_: torch.optim.SGD
  lr: 0.1
"""

USER_EXPERIMENT = """
# @package _global_
defaults:
  - override /model: tiny_net
callbacks:
  filters: {layers: [conv]}
  feature_maps: {layers: [conv]}
  top_patches: {layers: [conv]}
"""


def test_conf_subfolders_are_all_packaged() -> None:
    """Every config group folder is listed in pyproject's packages, so the wheel holds all of conf/."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    groups = {
        "cnnfeat." + str(d.relative_to(REPO)).replace(os.sep, ".") for d in (REPO / "conf").rglob("*") if d.is_dir()
    }
    assert groups | {"cnnfeat.conf"} <= listed, f"add to pyproject packages: {sorted(groups - listed)}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from the checkout, installed (without dependencies) into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(root)],
        check=True,
        capture_output=True,
    )
    (wheel,) = root.glob("cnnfeat-*.whl")
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


def _run(installed: Path, cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{installed}{os.pathsep}{cwd}", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_trains_and_explores_from_an_unrelated_directory(
    installed: Path, tmp_path: Path, data_dir: Path, cache_dir: Path
) -> None:
    where = _run(
        installed, tmp_path, sys.executable, "-c", "import cnnfeat.run.cli as c; print(c.__file__, c.CONFIG_DIR)"
    )
    module_file, config_dir = where.stdout.split()
    assert module_file.startswith(str(installed)) and config_dir == str(installed / "cnnfeat" / "conf"), where.stderr
    data = [f"data.data_dir={data_dir}", f"data.cache_dir={cache_dir}", "trainer=cpu"]
    r = _run(
        installed,
        tmp_path,
        str(installed / "bin" / "cnnfeat-train"),
        "experiment=quick",
        "trainer.limit_train_batches=3",
        *data,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").glob("*/*")
    assert strict_json(run_dir / "status.json")["status"] == "finished"
    r = _run(
        installed,
        tmp_path,
        str(installed / "bin" / "cnnfeat-explore"),
        f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
        "callbacks=none",
        *data[:2],
    )
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_user_config_folder_adds_a_model_and_an_experiment(
    installed: Path, tmp_path: Path, data_dir: Path, cache_dir: Path
) -> None:
    (tmp_path / "my_models.py").write_text(dedent(USER_MODEL))
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "experiment").mkdir()
    (tmp_path / "my_conf" / "model" / "tiny_net.yaml").write_text(USER_MODEL_CONFIG)
    (tmp_path / "my_conf" / "experiment" / "tiny.yaml").write_text(USER_EXPERIMENT)
    r = _run(
        installed,
        tmp_path,
        str(installed / "bin" / "cnnfeat-train"),
        "hydra.searchpath=[file://./my_conf]",
        "experiment=tiny",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "callbacks.dead_relu.probe_size=200",
        "callbacks.top_patches.probe_size=200",
        "callbacks.umap.probe_size=200",
        "hydra.run.dir=outputs/tiny",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "outputs" / "tiny" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["cnnfeat_model"] == "my_models.TinyNet" and ckpt["hyper_parameters"]["width"] == 8
    images = read_events(tmp_path / "outputs" / "tiny")["images"]
    for tag in ("filters/conv", "feature_maps/conv/relu/img22", "top_patches/conv", "umap/features"):
        assert [e.step for e in images[tag]] == [0, 1], tag
