"""cnnfeat-explore on a run with missing epochs: last.ckpt is the final network, gaps are named, values named after
the previous epoch never compare across a gap; a checkpoint with NaN weights is refused, NaN is never drawn."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from cnnfeat import viz
from cnnfeat.callbacks import EmbeddingCallback, FeatureMapCallback, FilterCallback, TopPatchesCallback
from cnnfeat.callbacks.base import inference
from cnnfeat.callbacks.session import build_probe
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.embedding import stratified_ids
from cnnfeat.errors import CheckpointError
from cnnfeat.models import SmallCNN
from cnnfeat.run.checkpoints import load_model
from cnnfeat.run.cli import CONFIG_DIR, EXIT_USER_ERROR, run_cli
from cnnfeat.run.explore import LAST, checkpoints_in, explore, networks
from cnnfeat.run.train import train
from cnnfeat.similarity import CKAHistory, signature
from cnnfeat.units import UnitHistory
from tests.conftest import REPO, read_events

PROBE = 200
EXPLORE_CALLBACKS = [
    "callbacks=[none,representations,umap]",
    f"callbacks.representations.probe_size={PROBE}",
    "callbacks.representations.exact=true",  # full-probe CKA on unpooled maps: the test's reference is simple
    f"callbacks.umap.probe_size={PROBE}",
    "callbacks.umap.pixels=false",
    "callbacks.umap.gif=false",
    "callbacks.umap.full_epochs=20",
    "callbacks.umap.warm_epochs=5",
    "callbacks.model_checkpoint=null",
    "callbacks.last_checkpoint=null",
    "report=false",
    "save_png=false",
    "device=cpu",
]


def _compose(name: str, overrides: list[str], data_dir: Path, cache_dir: Path) -> DictConfig:
    base = [
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        "data.download=false",
        f"paths.root_dir={REPO}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, cache_dir: Path) -> Path:
    """A real 4-epoch run keeping every epoch's checkpoint (epoch00..03) and last.ckpt, no pictures."""
    out = tmp_path_factory.mktemp("run")
    cfg = _compose(
        "train",
        [
            "trainer=cpu",
            "trainer.max_epochs=4",
            "trainer.limit_train_batches=8",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
            "trainer.enable_model_summary=false",
            "callbacks=none",
            "callbacks.rich_progress_bar=null",
            "callbacks.model_checkpoint.save_top_k=-1",
            "logger=none",
            "test=false",
            "report=false",
            f"paths.output_dir={out}",
        ],
        data_dir,
        cache_dir,
    )
    train(cfg)
    (out / ".hydra").mkdir()
    (out / ".hydra" / "config.yaml").write_text("seed: 0\n")  # what a CLI run leaves beside its checkpoints
    return out


def _epoch_file(run: Path, epoch: int) -> Path:
    (f,) = (run / "checkpoints").glob(f"epoch{epoch:02d}-*.ckpt")
    return f


@pytest.fixture(scope="module")
def gappy(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run with only epochs 1 and 3 of 4 kept, plus last.ckpt (epoch 4): step 2 is a gap."""
    gap = tmp_path_factory.mktemp("gap")
    (gap / "checkpoints").mkdir()
    shutil.copytree(run / ".hydra", gap / ".hydra")
    for f in (_epoch_file(run, 0), _epoch_file(run, 2), run / "checkpoints" / LAST):
        shutil.copy(f, gap / "checkpoints" / f.name)
    return gap


@pytest.fixture(scope="module")
def explored(
    gappy: Path, tmp_path_factory: pytest.TempPathFactory, data_dir: Path, cache_dir: Path
) -> tuple[Path, dict, list[str]]:
    """``explore`` on the gappy run: (output dir, events, cnnfeat's log lines)."""
    out = tmp_path_factory.mktemp("explore")
    cfg = _compose(
        "explore", [f"ckpt={gappy / 'checkpoints'}", f"paths.output_dir={out}", *EXPLORE_CALLBACKS], data_dir, cache_dir
    )
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("cnnfeat")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        explore(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, read_events(out), records


def steps(events: list[tuple[int, float]]) -> list[int]:
    return sorted(s for s, _ in events)


def at(events: list[tuple[int, float]], step: int) -> float:
    (value,) = [v for s, v in events if s == step]
    return value


def ref_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased linear CKA written out from Song et al.'s HSIC formula, in float64 (independent of cnnfeat)."""

    def hsic(k: torch.Tensor, m: torch.Tensor) -> float:
        n = len(k)
        k, m = k.clone().fill_diagonal_(0), m.clone().fill_diagonal_(0)
        one = torch.ones(n, dtype=torch.float64)
        value = torch.trace(k @ m) + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2))
        value = value - 2 / (n - 2) * (one @ k @ m @ one)
        return float(value) / (n * (n - 3))

    kx, ky = (a.flatten(1).double() @ a.flatten(1).double().T for a in (x, y))
    return hsic(kx, ky) / (hsic(kx, kx) * hsic(ky, ky)) ** 0.5


def test_last_ckpt_is_explored_as_its_epoch_and_the_gaps_are_written_down(
    explored: tuple[Path, dict, list[str]], gappy: Path
) -> None:
    out, events, log_lines = explored
    record = json.loads((out / "explored.json").read_text())
    names = {p.name for p in (gappy / "checkpoints").iterdir()}
    epoch0 = next(n for n in names if n.startswith("epoch00-"))
    epoch2 = next(n for n in names if n.startswith("epoch02-"))
    assert record == {"explored": [0, 1, 3, 4], "missing": [2], "checkpoints": {"1": epoch0, "3": epoch2, "4": LAST}}
    assert steps(events["scalars"]["probe/acc/fc3"]) == [0, 1, 3, 4], "last.ckpt (epoch 4) is the final network"
    assert [e.step for e in events["images"]["umap/features"]] == [0, 1, 3, 4]
    assert any("[0, 1, 3, 4]" in line and "missing" in line and "[2]" in line for line in log_lines), log_lines


def test_values_named_after_the_previous_epoch_never_compare_across_a_gap(
    explored: tuple[Path, dict, list[str]],
) -> None:
    _, events, _ = explored
    sc = events["scalars"]
    for layer in ("relu1", "relu3", "relu5", "fc3"):
        assert steps(sc[f"cka/to_previous/{layer}"]) == [1, 4], "step 3's previous epoch (2) has no checkpoint"
        assert steps(sc[f"cka/to_untrained/{layer}"]) == [1, 3, 4]
        assert steps(sc[f"cka/to_final/{layer}"]) == [0, 1, 3, 4]
    for layer in ("relu1", "relu4"):
        assert steps(sc[f"units/dead/{layer}"]) == [0, 1, 3, 4]
        assert steps(sc[f"units/died/{layer}"]) == steps(sc[f"units/revived/{layer}"]) == [0, 1, 4]
    assert steps(sc["umap/frame_shift"]) == [1, 4]
    table = events["tensors"]["units/deaths/text_summary"][-1].tensor_proto.string_val[0].decode()
    assert "| 2..3 | relu4 |" in table and "| 4 | relu4 |" in table and "| 3 | relu4 |" not in table


def test_to_final_and_to_previous_are_measured_against_the_right_networks(
    explored: tuple[Path, dict, list[str]], gappy: Path, datamodule: FashionMNISTDataModule
) -> None:
    _, events, _ = explored
    sc = events["scalars"]
    ckpts = gappy / "checkpoints"
    model = {1: _load(_epoch_file(gappy, 0)), 3: _load(_epoch_file(gappy, 2)), 4: _load(ckpts / LAST)}
    probe = build_probe(datamodule, EmbeddingCallback(probe_size=PROBE).probe_spec)
    pos = probe.positions(probe.ids[stratified_ids(probe.labels, PROBE, 0)])  # the callback's stratified sample
    with torch.no_grad():
        logits = {s: m(probe.inputs[pos]) for s, m in model.items()}
    final = sc["cka/to_final/fc3"]
    assert at(final, 4) == pytest.approx(1.0, abs=1e-6)
    for s in (1, 3):
        assert at(final, s) == pytest.approx(ref_cka(logits[s], logits[4]), abs=1e-5), s
    assert abs(ref_cka(logits[1], logits[4]) - ref_cka(logits[1], logits[3])) > 1e-3, "the test tells 3 from 4"
    assert at(sc["cka/to_previous/fc3"], 4) == pytest.approx(ref_cka(logits[3], logits[4]), abs=1e-5)


def _load(path: Path) -> torch.nn.Module:
    return load_model(path)[0].eval()


def test_last_ckpt_and_an_epoch_file_of_the_same_epoch_are_one_network(run: Path, tmp_path: Path) -> None:
    files = checkpoints_in(run / "checkpoints")
    assert [f.name for f in files][-1] == LAST and len(files) == 5
    nets = networks(files, include_untrained=True)
    assert [n.step for n in nets] == [0, 1, 2, 3, 4]
    assert nets[-1].file == _epoch_file(run, 3), "epoch03 and last.ckpt both hold epoch 4: explored once"
    # the default checkpointing: the best epoch and last.ckpt; the final network is not lost
    best = tmp_path / "checkpoints"
    best.mkdir()
    for f in (_epoch_file(run, 1), run / "checkpoints" / LAST):
        shutil.copy(f, best / f.name)
    assert [(n.step, n.file.name if n.file else None) for n in networks(checkpoints_in(best), False)] == [
        (2, _epoch_file(run, 1).name),
        (4, LAST),
    ]


def test_history_helpers_name_gaps() -> None:
    hist = CKAHistory()
    for e in (0, 1, 3):
        hist.add(e, {"x": signature(torch.randn(20, 5))})
    assert [e for e, _ in hist.to_previous("x")] == [1], "no CKA 'to the previous epoch' from 3 to 1"
    units = UnitHistory()
    for e, alive in ((2, [True, False]), (3, [False, False]), (6, [True, False])):
        units.add(e, {"fc": torch.tensor(alive)})
    assert [units.when(e) for e in units.epochs] == ["0..2", "3", "4..6"]


# -- non-finite weights and activations ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_ckpt(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = torch.load(run / "checkpoints" / LAST, map_location="cpu", weights_only=True)
    ckpt["state_dict"]["conv2.weight"][0, 0, 0, 0] = float("nan")
    ckpt["state_dict"]["fc1.bias"][3] = float("inf")
    path = tmp_path_factory.mktemp("nan") / "nan.ckpt"
    torch.save(ckpt, path)
    return path


def test_explore_refuses_nan_weights_naming_the_tensors(
    nan_ckpt: Path, tmp_path: Path, data_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _compose("explore", [f"ckpt={nan_ckpt}", f"paths.output_dir={tmp_path}", "report=false"], data_dir, cache_dir)
    with caplog.at_level(logging.ERROR, logger="cnnfeat"), pytest.raises(SystemExit) as exit_:
        run_cli(explore, cfg)  # what cnnfeat-explore does with a CnnfeatError: its message, exit code 2
    assert exit_.value.code == EXIT_USER_ERROR == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert line.startswith(f"CheckpointError: {nan_ckpt}: the weights conv2.weight, fc1.bias hold NaN or infinite")
    assert not list(tmp_path.glob("events.out.tfevents.*")), "refused before anything was drawn"


def test_a_nan_checkpoint_in_a_directory_is_refused_before_the_others_are_drawn(
    run: Path, nan_ckpt: Path, tmp_path: Path
) -> None:
    d = tmp_path / "checkpoints"
    d.mkdir()
    shutil.copy(_epoch_file(run, 0), d / _epoch_file(run, 0).name)
    shutil.copy(nan_ckpt, d / "epoch03-val_acc0.1.ckpt")
    with pytest.raises(CheckpointError, match=r"epoch03-val_acc0.1.ckpt: the weights conv2.weight, fc1.bias hold NaN"):
        networks(checkpoints_in(d), include_untrained=False)


def test_pictures_of_non_finite_layers_are_skipped_with_a_warning_naming_the_layer(
    datamodule: FashionMNISTDataModule, recwarn: pytest.WarningsRecorder
) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")  # conv2's channel 0 is NaN everywhere, conv3 and fc after it
    callbacks = [
        FilterCallback(layers=["conv1", "conv2"]),
        FeatureMapCallback(image_ids=[22, 193], layers=["conv1", "conv2"]),
        TopPatchesCallback(layers=["conv1", "conv2", "conv3"], probe_size=64, top_k=2),
        EmbeddingCallback(probe_size=60, pixels=False, n_neighbors=5, knn_k=2, cv_folds=2),
    ]
    images: set[str] = set()
    for cb in callbacks:
        cb.prepare(model, build_probe(datamodule, cb.probe_spec) if cb.needs_probe else None)
        with inference(model):
            images |= set(cb.render(model, cb.probe, step=7).images)
    assert {"filters/conv1", "top_patches/conv1", "feature_maps/conv1/relu/img22", "feature_maps/input/img22"} <= images
    drawn_nan = {"filters/conv2", "top_patches/conv2", "top_patches/conv3", "umap/features"}
    drawn_nan |= {f"feature_maps/conv2/{k}/img{i}" for k in ("conv", "relu") for i in (22, 193)}
    assert not drawn_nan & images, drawn_nan & images
    messages = [str(w.message) for w in recwarn]
    for want in (
        "FilterCallback: layer conv2: weights are NaN or infinite for 1 of 6 filters at step 7, so filters/conv2",
        "FeatureMapCallback: layer conv2: activations are NaN or infinite for all 2 chosen images at step 7",
        "TopPatchesCallback: layer conv3: activations are NaN or infinite for all 64 probe images at step 7",
        "EmbeddingCallback: layer features(): features are NaN or infinite for all 60 probe images at step 7",
    ):
        assert any(want in m for m in messages), (want, messages)


def test_viz_refuses_to_draw_nan_instead_of_an_index_error() -> None:
    w = torch.randn(4, 2, 3, 3)
    w[1, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"1 of 72 values are NaN or infinite; they cannot be drawn as data"):
        viz.filter_grid(w)
    with pytest.raises(ValueError, match="NaN or infinite"):
        viz.grey(torch.full((1, 1, 4, 4), float("inf")))


@pytest.mark.slow
def test_step_0_of_a_fine_tuned_pretrained_network_is_the_pretrained_one(
    tmp_path: Path, data_dir: Path, cache_dir: Path
) -> None:
    """Fine-tuning from weights: the untrained network (step 0) is the one the weights file gives, not a random one
    under the name "untrained"; with the file gone, step 0 is left out with a warning."""
    from cnnfeat.models import TorchvisionClassifier
    from cnnfeat.run.explore import untrained_model

    start = TorchvisionClassifier("mobilenet_v3_small", num_classes=10, in_channels=1, image_size=28, weights="none")
    weights = tmp_path / "start.pth"
    torch.save(start.net.state_dict(), weights)
    out = tmp_path / "run"
    cfg = _compose(
        "train",
        [
            "model=torchvision",
            "model.arch=mobilenet_v3_small",
            f"model.weights={weights}",
            "trainer=cpu",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
            "callbacks=none",
            "callbacks.rich_progress_bar=null",
            "logger=none",
            "test=false",
            "report=false",
            f"paths.output_dir={out}",
        ],
        data_dir,
        cache_dir,
    )
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    train(cfg)
    ckpt = sorted((out / "checkpoints").glob("*.ckpt"))[0]
    model = untrained_model(ckpt)
    assert model is not None
    want = start.net.state_dict()
    got = model.net.state_dict()
    assert not [k for k in want if not torch.equal(got[k], want[k])], "step 0 is the weights file's network"
    trained, _ = load_model(ckpt)
    assert not all(torch.equal(trained.net.state_dict()[k], want[k]) for k in want), "training changed it"
    weights.unlink()
    assert untrained_model(ckpt) is None
