"""Representation callbacks through a real Trainer: CKA and probe scalars against the core functions on the same
activations, a unit killed and revived at known epochs, pictures and their steps, resume, cross-model CKA, errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image

from cnnfeat import probes as pr
from cnnfeat import similarity as sim
from cnnfeat.callbacks.base import inference
from cnnfeat.callbacks.representations import (
    PIXELS,
    CrossModelCKACallback,
    RepresentationCallback,
    default_layers,
)
from cnnfeat.callbacks.session import build_probe
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.embedding import stratified_ids
from cnnfeat.errors import CheckpointError, ConfigError
from cnnfeat.graph import LayerError, capture, trace_graph
from cnnfeat.models import SmallCNN, TransferClassifier
from cnnfeat.run import lightning_api as pl
from cnnfeat.run.checkpoints import load_model, reference_model
from cnnfeat.run.explore import untrained_model
from cnnfeat.run.train import build, train
from tests.conftest import read_events

MakeCfg = Callable[..., DictConfig]
LAYERS = ["relu1", "relu2", "relu3", "relu4", "relu5", "fc3"]
SMALL = [
    "callbacks=[none,representations]",
    "callbacks.representations.probe_size=200",
    "callbacks.representations.block_size=50",
    "callbacks.representations.batch_size=100",
]


def events(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list], dict[str, list]]:
    """Scalars, images and text (tensors) of every event file under ``run_dir``."""
    e = read_events(run_dir)
    return e["scalars"], e["images"], e["tensors"]


def steps(series: list[tuple[int, float]]) -> list[int]:
    return [s for s, _ in series]


def at(series: list[tuple[int, float]], step: int) -> float:
    return next(v for s, v in series if s == step)


def pooled(a: torch.Tensor, pool: int = 4) -> torch.Tensor:
    return (F.avg_pool2d(a, pool, ceil_mode=True) if a.ndim == 4 else a).flatten(1)


class Recorder(pl.Callback):
    """Captures the representation callback's layers on its probe images whenever it measures (independently)."""

    def __init__(self, cb: RepresentationCallback) -> None:
        self.cb = cb
        self.acts: dict[int, dict[str, torch.Tensor]] = {}

    def _record(self, pl_module: pl.LightningModule, step: int) -> None:
        pos = self.cb.positions(self.cb.probe)
        with inference(pl_module), capture(pl_module, LAYERS) as out:
            pl_module(self.cb.probe.inputs[pos])
            self.acts[step] = {k: v.clone() for k, v in out.items()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(pl_module, 0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(pl_module, trainer.current_epoch + 1)


class KillAndRevive(pl.Callback):
    """Sets the bias of one FC unit (fc1 -> relu4) and one conv channel (conv3 -> relu3) to -1e3 at the start of
    epoch index 1 (so they are dead after 2 epochs) and restores them at the start of epoch index 3 (alive after 4).
    The units are the first ones the representation callback saw alive at steps 0 and 1."""

    def __init__(self, cb: RepresentationCallback) -> None:
        self.cb = cb
        self.saved: dict[str, tuple[int, float]] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            if trainer.current_epoch == 1:
                for layer, module in (("relu4", pl_module.fc1), ("relu3", pl_module.conv3)):
                    unit = int(self.cb.units.raster(layer).all(dim=1).nonzero()[0])
                    self.saved[layer] = (unit, float(module.bias[unit]))
                    module.bias[unit] = -1e3
            if trainer.current_epoch == 3:
                for layer, module in (("relu4", pl_module.fc1), ("relu3", pl_module.conv3)):
                    unit, bias = self.saved[layer]
                    module.bias[unit] = bias


def test_history_through_a_real_trainer(make_cfg: MakeCfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        *SMALL,
        "trainer.max_epochs=5",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "test=false",
        "save_png=true",
        "callbacks.representations.probe_every_n_epochs=2",
    )
    dm, model, trainer = build(cfg)
    cb = next(c for c in trainer.callbacks if isinstance(c, RepresentationCallback))
    recorder, killer = Recorder(cb), KillAndRevive(cb)
    trainer.callbacks.extend([recorder, killer])
    trainer.fit(model, datamodule=dm)
    scalars, images, texts = events(tmp_path)

    # the one step axis: epochs trained, 0 = untrained; probes at 0, every 2nd epoch and after the last
    for layer in LAYERS:
        assert steps(scalars[f"cka/to_previous/{layer}"]) == [1, 2, 3, 4, 5]
        assert steps(scalars[f"cka/to_final/{layer}"]) == [0, 1, 2, 3, 4, 5]
        assert at(scalars[f"cka/to_final/{layer}"], 5) == pytest.approx(1.0, abs=1e-6)
        assert steps(scalars[f"probe/acc/{layer}"]) == [0, 2, 4, 5]
    assert steps(scalars["probe/acc/pixels"]) == [0, 2, 4, 5]
    assert steps(scalars["cka/layers/pixels/relu1"]) == [0, 5]
    assert steps(scalars["units/dead/relu4"]) == [0, 1, 2, 3, 4, 5]

    # CKA and probe scalars equal the core functions on independently captured activations
    acts = {s: {k: pooled(v) for k, v in a.items()} for s, a in recorder.acts.items()}
    labels = cb.probe.labels[cb.positions(cb.probe)]
    split = pr.probe_split(labels, 0.5, 0)
    for layer in LAYERS:
        for s in range(1, 6):
            want = sim.cka(acts[s][layer], acts[s - 1][layer], block_size=50)
            assert at(scalars[f"cka/to_previous/{layer}"], s) == pytest.approx(want, abs=1e-5), (layer, s)
            final = sim.cka(acts[s][layer], acts[5][layer], block_size=50)
            assert at(scalars[f"cka/to_final/{layer}"], s) == pytest.approx(final, abs=1e-5), (layer, s)
        for s in (0, 2, 4, 5):
            want = pr.linear_probe(acts[s][layer], labels, split).test_acc
            assert at(scalars[f"probe/acc/{layer}"], s) == pytest.approx(want, abs=1e-6), (layer, s)
    pixels = cb.probe.inputs[cb.positions(cb.probe)].flatten(1)
    assert at(scalars["cka/layers/pixels/relu1"], 0) == pytest.approx(
        sim.cka(pixels, acts[0]["relu1"], block_size=50), abs=1e-5
    )

    # the killed units die exactly after epoch 2 and revive after epoch 4
    for layer, (unit, _) in killer.saved.items():
        assert int(cb.units.first_death(layer)[unit]) == 2, layer
        assert int(cb.units.first_revival(layer)[unit]) == 4, layer
        assert cb.units.raster(layer)[unit].tolist() == [True, True, False, False, True, True], layer
        assert at(scalars[f"units/died/{layer}"], 2) >= 1 and at(scalars[f"units/revived/{layer}"], 4) >= 1
    table = texts["units/deaths/text_summary"][-1].tensor_proto.string_val[0].decode()
    assert "| 2 | relu4 |" in table and "| died | revived |" in table

    # pictures: the growing ones once at the end (step 5), the layer x layer one at 0 and 5; labelled, not blank
    want = {f"cka/epochs/{layer}": [5] for layer in LAYERS} | {f"units/raster/relu{i}": [5] for i in range(1, 6)}
    want |= {"cka/layers": [0, 5], "cka/to_final": [5], "probe/acc_vs_depth": [5]}
    assert {t: [e.step for e in images[t]] for t in want} == want
    for tag in want:
        for e in images[tag]:
            img = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("L"), dtype=float)
            assert img.shape[0] >= 200 and img.shape[1] >= 300, tag
            assert img.std() > 20 and (img < 100).mean() > 0.01, f"{tag} looks blank"
    assert (tmp_path / "images" / "cka" / "epochs" / "relu3" / "step_005.png").is_file()
    saved = json.loads((tmp_path / "representations.json").read_text())
    assert saved["cka_epochs"]["relu3"]["epochs"] == [0, 1, 2, 3, 4, 5]
    assert np.allclose(saved["cka_epochs"]["relu3"]["cka"], cb.history.matrix("relu3").numpy())
    assert sorted(saved["probe_acc"]) == ["0", "2", "4", "5"]
    assert len(list((tmp_path / "representations").rglob("epoch_5.pt"))) == len(LAYERS), "signatures on disk"


def test_resume_continues_the_history(make_cfg: MakeCfg, tmp_path: Path) -> None:
    common = [*SMALL, "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "test=false"]
    common += ["callbacks.representations.probe_every_n_epochs=1", "callbacks.representations.layers=[relu1,relu4]"]
    train(make_cfg(*common, "trainer.max_epochs=3", f"paths.output_dir={tmp_path / 'straight'}"))
    train(make_cfg(*common, "trainer.max_epochs=2", f"paths.output_dir={tmp_path / 'resumed'}"))
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("RepresentationCallback"))
    assert state["cka"]["epochs"]["relu1"] == [0, 1, 2] and all(
        isinstance(p, str) for p in state["cka"]["signatures"]["relu1"]
    ), "the checkpoint holds the history and the paths of the signatures, not the signatures"
    train(make_cfg(*common, "trainer.max_epochs=3", f"paths.output_dir={tmp_path / 'resumed'}", "resume=true"))
    a = json.loads((tmp_path / "straight" / "representations.json").read_text())
    b = json.loads((tmp_path / "resumed" / "representations.json").read_text())
    assert b["cka_epochs"]["relu4"]["epochs"] == [0, 1, 2, 3]
    assert b["units"] == a["units"] and b["probe_acc"] == a["probe_acc"]
    for layer in ("relu1", "relu4"):
        assert np.allclose(a["cka_epochs"][layer]["cka"], b["cka_epochs"][layer]["cka"], atol=1e-6), layer
    scalars, _, _ = events(tmp_path / "resumed")
    assert sorted(set(steps(scalars["cka/to_previous/relu1"]))) == [1, 2, 3], "the resumed run logs epoch 3 only"


def test_a_state_from_other_settings_or_lost_files_is_not_mixed_in(tmp_path: Path) -> None:
    cb = RepresentationCallback(probe_size=8, block_size=4)
    cb.history.spill_dir = tmp_path
    cb.history.add(0, {"fc": sim.signature(torch.rand(8, 3), block_size=4)})
    cb.units.add(0, {"fc": torch.tensor([True, False])})
    state = cb.state_dict()
    other = RepresentationCallback(probe_size=8, block_size=8)
    with pytest.warns(UserWarning, match="recorded with other settings"):
        other.load_state_dict(state)
    assert not other.units.epochs
    for f in tmp_path.rglob("*.pt"):
        f.unlink()
    same = RepresentationCallback(probe_size=8, block_size=4)
    with pytest.warns(UserWarning, match="signature file\\(s\\) are gone"):
        same.load_state_dict(state)
    assert same.units.epochs == [0] and not same.history.epochs, "unit history continues, CKA starts afresh"


def smallcnn_checkpoint(path: Path, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    m = SmallCNN()
    torch.save(
        {
            "state_dict": m.state_dict(),
            "hyper_parameters": dict(m.hparams),
            "cnnfeat_model": f"{type(m).__module__}.{type(m).__qualname__}",
        },
        path,
    )
    return path


def test_cross_model_cka_equals_the_core_function(datamodule: FashionMNISTDataModule, tmp_path: Path) -> None:
    ckpt = smallcnn_checkpoint(tmp_path / "small.ckpt")
    transfer = TransferClassifier(weights="none", input_size=63, hidden=(16,)).eval()
    cb = CrossModelCKACallback(
        load_model(ckpt)[0],
        str(ckpt),
        layers=["backbone.relu1", "backbone.relu5"],
        probe_size=60,
        block_size=20,
        batch_size=25,
    )
    cb.prepare(transfer, build_probe(datamodule, cb.probe_spec))
    assert cb.ref_names == [PIXELS, *LAYERS]
    with inference(transfer):
        pictures = cb.render(transfer, cb.probe, 0)
    img = pictures.images["cka/cross/SmallCNN"]
    assert img.shape[0] == 3 and img.std() > 0.1
    reference = cb.reference
    x = cb.probe.inputs[stratified_ids(cb.probe.labels, 60, 0)]  # the probe's first 10k images: positions = IDs
    with torch.no_grad(), capture(transfer, cb.names) as mine, capture(reference, LAYERS) as theirs:
        transfer(x)
        reference(x)
        want = sim.cka(pooled(theirs["relu3"]), pooled(mine["backbone.relu5"]), block_size=20)
        pix = sim.cka(x.flatten(1), pooled(mine["backbone.relu1"]), block_size=20)
    assert pictures.scalars["cka/cross/relu3/backbone.relu5"] == pytest.approx(want, abs=1e-5)
    assert pictures.scalars["cka/cross/pixels/backbone.relu1"] == pytest.approx(pix, abs=1e-5)
    assert cb.matrix.shape == (7, 2)


def test_explore_path_renders_and_summarises_without_a_trainer(datamodule: FashionMNISTDataModule) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    cb = RepresentationCallback(probe_size=100, block_size=25, probe_every_n_epochs=4, images_every_n_epochs=2)
    cb.prepare(model, build_probe(datamodule, cb.probe_spec))
    assert cb.names == [PIXELS, *LAYERS] and cb.unit_layers == LAYERS[:5]
    for step in range(4):
        with inference(model):
            pictures = cb.render(model, cb.probe, step)
        assert "probe/acc/relu3" in pictures.scalars, "outside fit every checkpoint gets its probes"
        assert ("cka/epochs/relu1" in pictures.images) == (step == 2), "growing pictures every 2nd step"
        with torch.no_grad():
            model.fc1.weight.mul_(0.5)
    summary = cb.summary()
    assert sorted(summary) == [0, 1, 2, 3]
    assert summary[3].scalars["cka/to_final/fc3"] == pytest.approx(1.0)
    want = {"cka/layers", "cka/to_final", "probe/acc_vs_depth", "units/raster/relu1", "cka/epochs/relu1"}
    assert want <= set(summary[3].images) and not summary[2].images
    assert "units/deaths" in summary[3].texts


def test_default_layers_follow_the_graph() -> None:
    model = SmallCNN()
    assert default_layers(trace_graph(model, torch.zeros(1, 1, 28, 28))) == LAYERS
    transfer = TransferClassifier(weights="none", input_size=63, hidden=(8, 8))
    got = default_layers(trace_graph(transfer, torch.zeros(1, 1, 28, 28)))
    assert got == [*(f"backbone.relu{i}" for i in range(1, 6)), "hidden.2", "hidden.5", "classifier"]


def test_bad_arguments_fail_before_training_with_a_clear_message(datamodule: FashionMNISTDataModule) -> None:
    with pytest.raises(ConfigError, match="block_size must be an integer >= 4, got 2"):
        RepresentationCallback(block_size=2)
    with pytest.raises(ConfigError, match="block_size=500 is larger than probe_size=100"):
        RepresentationCallback(probe_size=100, block_size=500)
    with pytest.raises(ConfigError, match="pool must be an integer >= 1, got 0"):
        RepresentationCallback(pool=0)
    with pytest.raises(ConfigError, match="probe_every_n_epochs must be an integer >= 1, got 0"):
        RepresentationCallback(probe_every_n_epochs=0)
    with pytest.raises(ConfigError, match="probe_l2 must be a positive number, got 0"):
        RepresentationCallback(probe_l2=0)
    with pytest.raises(ConfigError, match="nothing to measure"):
        RepresentationCallback(cka=False, linear_probes=False, unit_history=False)
    model = SmallCNN()
    cb = RepresentationCallback(layers=["relu1", "conv9"], probe_size=100, block_size=25)
    with pytest.raises(LayerError, match=r"Unknown layer name\(s\) \['conv9'\] for SmallCNN; valid names: \['pixels'"):
        cb.prepare(model, build_probe(datamodule, cb.probe_spec))
    big = RepresentationCallback(probe_size=20_000)
    with pytest.raises(ConfigError, match="probe_size=20000 is larger than"):
        big.prepare(model, build_probe(datamodule, big.probe_spec))
    with pytest.raises(CheckpointError, match=r"/nonexistent/small\.ckpt does not exist"):
        reference_model("/nonexistent/small.ckpt")  # the config loads the reference; the callback gets a module


def test_configs_compose(make_cfg: MakeCfg) -> None:
    cfg = make_cfg("callbacks=[default,representations,cross_cka]")
    assert cfg.callbacks.representations._target_.endswith("RepresentationCallback")
    assert cfg.callbacks.cross_cka.reference_ckpt is None and "umap" in cfg.callbacks


@pytest.mark.slow
def test_ddp_rank_zero_measures_the_whole_probe(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    """Under DDP (2 CPU processes, gloo) rank 0 measures the whole probe once per step, with no collective: the
    numbers equal one process measuring the same weights (the seeded untrained network and the final checkpoint)."""
    run = tmp_path / "ddp"
    args = [
        sys.executable,
        "-m",
        "cnnfeat.run.train",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=2",
        "trainer.enable_model_summary=false",
        "test=false",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        f"hydra.run.dir={run}",
        *SMALL,
    ]
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    scalars, images, _ = events(run)
    assert steps(scalars["cka/to_final/relu3"]) == [0, 1] and steps(scalars["probe/acc/relu3"]) == [0, 1]
    assert [e.step for e in images["cka/layers"]] == [0, 1], "one picture per step: rank 0 only"

    ckpt = run / "checkpoints" / "last.ckpt"
    untrained, (final, _) = untrained_model(ckpt), load_model(ckpt)
    dm = FashionMNISTDataModule(data_dir=data_dir, cache_dir=cache_dir, download=False)
    dm.prepare_data()
    dm.setup()
    cb = RepresentationCallback(probe_size=200, block_size=50, batch_size=100)
    cb.prepare(final, build_probe(dm, cb.probe_spec))
    got = {}
    for step, model in ((0, untrained), (1, final)):
        with inference(model):
            got[step] = cb.render(model, cb.probe, step).scalars
    summary = cb.summary()
    for layer in LAYERS:
        assert at(scalars[f"cka/to_final/{layer}"], 0) == pytest.approx(
            summary[0].scalars[f"cka/to_final/{layer}"], abs=1e-6
        )
        for step in (0, 1):
            assert at(scalars[f"probe/acc/{layer}"], step) == pytest.approx(got[step][f"probe/acc/{layer}"], abs=1e-6)
