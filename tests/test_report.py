"""The run atlas and its HTML report: a short real `cnnfeat-train experiment=seed` run, pages that parse, files that
exist, a card per unit with a stable anchor, a multirun index, a real headless browser, other models, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from cnnfeat import atlas, viz
from cnnfeat.callbacks.atlas import AtlasCallback
from cnnfeat.callbacks.base import inference
from cnnfeat.errors import ConfigError, DataError
from cnnfeat.graph import capture
from cnnfeat.lecture import LECTURE_LOG as LECTURE
from cnnfeat.probe import ProbeSpec, probe_from_datamodule
from cnnfeat.report import main, write_report
from tests.conftest import REPO
from tests.helpers.browser import CHROMIUM, Chromium
from tests.helpers.zoo import zoo

SMALL_LAYERS = {"conv1": ("c", 6), "conv2": ("c", 6), "conv3": ("c", 16), "fc2": ("n", 100)}


class Page(HTMLParser):
    """Every id, src and href of a page (html.parser: a page that does not parse raises)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.links: list[str] = []
        self.sources: list[str] = []
        self.card_ids: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(str(a["id"]))
            if tag == "section" and "card" in (a.get("class") or ""):
                self.card_ids.append(str(a["id"]))
        if tag == "a" and a.get("href"):
            self.links.append(str(a["href"]))
        if tag in ("img", "script", "link", "source", "iframe") and (a.get("src") or a.get("href")):
            self.sources.append(str(a.get("src") or a.get("href")))


def check_pages(report: Path) -> dict[str, Page]:
    """Parse every page; every referenced file exists, every in-report anchor exists, nothing is fetched remotely."""
    pages = {p.name: Page(p.read_text(encoding="utf-8")) for p in sorted(report.glob("*.html"))}
    for name, page in pages.items():
        for src in page.sources:
            assert not urlsplit(src).scheme, f"{name}: {src} is not a local file"
            assert (report / unquote(src)).is_file(), f"{name}: {src} does not exist"
        for href in page.links:
            parts = urlsplit(href)
            assert parts.scheme in ("", "file"), f"{name}: link {href} leaves the report"
            target = (report / unquote(parts.path)).resolve() if parts.path else report / name
            assert target.is_file(), f"{name}: link {href} points at a missing file"
            if parts.fragment and target.parent == report.resolve():
                assert parts.fragment in pages[target.name].ids, f"{name}: #{parts.fragment} not in {target.name}"
    return pages


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """`cnnfeat-train experiment=seed` for 2 short epochs with the atlas, dead-ReLU and UMAP callbacks."""
    run = tmp_path_factory.mktemp("seed") / "run"
    cache = tmp_path_factory.mktemp("cache")
    cmd = [
        sys.executable,
        "-m",
        "cnnfeat.run.train",
        "experiment=seed",
        "callbacks=[none,atlas,dead_relu,umap]",
        "callbacks.rich_progress_bar=null",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache}",
        "data.download=false",
        "callbacks.atlas.probe_size=300",
        "callbacks.atlas.alive_probe_size=300",
        "callbacks.atlas.patches_every_n_epochs=1",
        "callbacks.atlas.featviz_settings.steps=8",
        "callbacks.dead_relu.probe_size=300",
        "callbacks.umap.probe_size=100",
        "callbacks.umap.full_epochs=20",
        "callbacks.umap.warm_epochs=5",
        "callbacks.umap.projector=false",
        "callbacks.umap.panel_size=120",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "report" / "index.html").is_file(), "cnnfeat-train writes the report at the end of the run"
    # what the representation callbacks log, found by tag prefix (the report does not import them)
    with SummaryWriter(str(run)) as w:
        w.add_image("cka/layers", viz.diverging(torch.linspace(-1, 1, 64).view(8, 8)), 2, dataformats="CHW")
        for step in (0, 1, 2):
            w.add_scalar("probe/acc/relu3", 0.5 + 0.1 * step, step)
    return run


@pytest.fixture(scope="module")
def report(seed_run: Path) -> Path:
    return write_report(seed_run).parent


def test_every_page_parses_and_every_referenced_file_exists(report: Path) -> None:
    pages = check_pages(report)
    assert set(pages) == {"index.html", *(f"{n}.html" for n in SMALL_LAYERS)}
    text = (report / "index.html").read_text()
    for needle in ("Training curves", "<svg", "Dying ReLU", "UMAP", "umap_embedding.gif", "cka/layers", "relu3"):
        assert needle in text, needle
    assert "<script" not in "".join(p.read_text() for p in report.glob("*.html")), "no script is needed"


def test_every_unit_has_a_card_with_its_pictures_and_flags(report: Path, seed_run: Path) -> None:
    a = atlas.Atlas.load(seed_run)
    assert a is not None and [i.name for i in a.layers] == list(SMALL_LAYERS)
    for name, (prefix, units) in SMALL_LAYERS.items():
        text = (report / f"{name}.html").read_text()
        page = Page(text)
        assert page.card_ids == [f"{prefix}{u}" for u in range(units)], name
        for u in (0, units - 1):
            for kind in ("featviz", "filters", "patches"):
                assert f"assets/{name}/{prefix}{u}_{kind}.png" in page.sources
        fv = np.load(seed_run / "atlas" / name / "featviz.npz")
        assert fv["units"].tolist() == list(range(units))
        assert text.count("badge flag") == int(fv["flagged"].sum()), "every flagged unit is marked on its card"
        assert text.count("class='bars'") == units and text.count("class='tl'") == units
        steps = a.steps(a.layers[list(SMALL_LAYERS).index(name)])
        assert steps == [0, 1, 2], "weights and alive/dead at every step, 0 = untrained"
    classes = np.load(seed_run / "atlas" / "conv3" / "classes.npz")
    assert int(classes["step"]) == 2 and classes["counts"].shape == (16, 10)
    assert (classes["counts"].sum(axis=1) == 100).all(), "classes of each unit's top 100 activations"
    patches = np.load(seed_run / "atlas" / "conv3" / "patches_002.npz")
    assert patches["crops"].shape == (16, 8, 1, 10, 10), "conv3's 10x10 receptive field"
    conv3 = a.layers[2]
    for u, r in ((0, 0), (7, 3), (15, 7)):  # the stored geometry gives the boxes the patches were cut with
        assert conv3.box(int(patches["rows"][u, r]), int(patches["cols"][u, r])) == tuple(patches["boxes"][u, r])
    assert "assets/conv3/c0_featviz_field.png" in Page((report / "conv3.html").read_text()).sources
    with Image.open(report / "assets" / "conv3" / "c0_featviz.png") as img:
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    assert pixels.std() > 5, "the optimised input is a picture, not a flat image"


def test_lecture_table_beside_the_seed_run(report: Path, seed_run: Path) -> None:
    text = (report / "index.html").read_text()
    assert "The lecture's table beside this run" in text
    assert f"{LECTURE[0][0]:.2f}%" in text and f"{LECTURE[14][2]:.2f}%" in text
    status = json.loads((seed_run / "status.json").read_text())
    assert f"{100 * status['metrics']['val/acc']:.2f}%" in text, "our final epoch's valid (=test) accuracy"


def test_anchors_and_files_survive_regeneration(report: Path, seed_run: Path) -> None:
    before = {p.relative_to(report): p.read_bytes() for p in report.rglob("*") if p.is_file()}
    write_report(seed_run)
    after = {p.relative_to(report): p.read_bytes() for p in report.rglob("*") if p.is_file()}
    assert before.keys() == after.keys()
    assert before == after, "the same run gives the same report, byte for byte"
    assert "c3" in Page((report / "conv2.html").read_text()).card_ids


def test_multirun_index_links_its_jobs_side_by_side(seed_run: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        shutil.copytree(seed_run, sweep / job, ignore=shutil.ignore_patterns("report", "checkpoints"))
    main([str(sweep)])
    index = sweep / "report" / "index.html"
    page = Page(index.read_text())
    assert "../0/report/index.html" in page.links and "../1/report/index.html" in page.links
    check_pages(sweep / "report")
    for job in ("0", "1"):
        check_pages(sweep / job / "report")


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium (apt-get install -y chromium)")
def test_pages_load_in_headless_chromium_without_errors_or_broken_images(report: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><body><img src="missing.png" alt="x"></body></html>')
    with Chromium() as browser:
        canary = browser.check(broken.as_uri())
        assert canary.broken_images and canary.errors, "the check notices a missing image"
        for page in sorted(report.glob("*.html")):
            result = browser.check(page.as_uri())
            assert result.ok, (page.name, result.errors, result.broken_images, result.foreign_requests)
            assert result.images > 0, page.name
        shot = browser.screenshot((report / "conv2.html").as_uri(), tmp_path / "conv2.png", max_height=900)
    with Image.open(shot) as img:
        arr = np.asarray(img.convert("L"), dtype=np.float32)
    assert arr.shape == (900, 1280) and arr.std() > 10, "a screenshot with content"


def _atlas_for(model: torch.nn.Module, datamodule, tmp: Path, **kwargs) -> Path:
    """The atlas of ``model`` without a Trainer (as cnnfeat-explore draws pictures): step 0, step 1, finish."""
    probe = probe_from_datamodule(datamodule, ProbeSpec(max_images=kwargs.pop("probe_images", 64)))
    cb = AtlasCallback(**kwargs)
    cb.prepare(model, probe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with inference(model):
        cb.render(model, probe, 0)
        cb.render(model, probe, 1)
    assert not (tmp / "atlas").exists(), "kept until the output folder is named, as cnnfeat-explore does at the end"
    shares = cb.finish(tmp)
    assert list(shares) == [1] and all(k.startswith("atlas/fidelity_share/") for k in shares[1].scalars)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "recording and optimising change no weight"
    assert all(p.grad is None for p in model.parameters()), "feature visualisation leaves .grad alone"
    assert model.training, "the module's mode is restored"
    return write_report(tmp).parent


def test_foreign_model_functional_relus_get_unit_pages(datamodule, tmp_path: Path) -> None:
    model = zoo()["mnist_net"].model()
    report = _atlas_for(
        model,
        datamodule,
        tmp_path,
        max_units=8,
        probe_size=64,
        alive_probe_size=64,
        batch_size=32,
        featviz_max_units=2,
        featviz_settings={"steps": 4},
    )
    pages = check_pages(report)
    assert set(pages) == {"index.html", "conv1.html", "conv2.html", "fc1.html"}, "convs and the last hidden layer"
    assert pages["fc1.html"].card_ids == [f"n{u}" for u in range(8)]
    a = atlas.Atlas.load(tmp_path)
    assert a is not None and a.layers[-1].activation == "relu:2", "F.relu after fc1 says alive/dead"


class _Residual(torch.nn.Module):
    """conv2 feeds a residual add: no activation of its own; its unit 0 is never positive (zero weights, bias -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 7 * 7, 10)
        with torch.no_grad():
            self.conv2.weight[0] = 0
            self.conv2.bias[0] = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(h + self.conv2(h))
        return self.fc(torch.nn.functional.max_pool2d(h, 4).flatten(1))


def test_a_layer_without_activation_is_never_positive_not_dead(datamodule, tmp_path: Path) -> None:
    """A conv that feeds a residual add is read on its own output: a unit that is never positive there is not a dead
    ReLU unit (removing it still changes the sum), so its card, its page and the index say "never positive", and a
    warning names the node that comes first."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"no activation after 'conv2': 'add' .* comes first"):
        report = _atlas_for(
            _Residual(),
            datamodule,
            tmp_path,
            layers=["conv1", "conv2"],
            probe_size=64,
            alive_probe_size=64,
            batch_size=32,
            featviz=False,
        )
    a = atlas.Atlas.load(tmp_path)
    assert a is not None and [i.activation for i in a.layers] == ["relu", None]
    conv2 = (report / "conv2.html").read_text()
    assert "never positive since step 0" in conv2 and "dead since" not in conv2 and "dead at the end" not in conv2
    assert "title='epoch 1: never positive" in conv2 and "title='epoch 1: dead" not in conv2
    assert "no activation after it" in conv2 and "never positive at the end: 1 of 4" in conv2
    index = (report / "index.html").read_text()
    assert "1 of 4 never positive" in index
    assert "alive/dead read at relu" in (report / "conv1.html").read_text()


class _ConvBNReLU(torch.nn.Module):
    """conv -> BatchNorm (channel 1 with a negative scale) -> ReLU module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
        self.fc = torch.nn.Linear(4 * 7 * 7, 10)
        with torch.no_grad():
            self.bn1.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 1.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.max_pool2d(self.relu(self.bn1(self.conv1(x))), 4).flatten(1))


def test_the_atlas_optimises_a_conv_before_batchnorm_where_its_patches_were_ranked(datamodule, tmp_path: Path) -> None:
    """Patches of a conv behind a BatchNorm are ranked at its activation; the optimised input's fidelity divides by the
    best patch's value, so the optimisation must maximise that same activation: the best real patch, put through the
    optimised function, gives exactly its reference (it gave the raw conv output: a fidelity of -0.47 against itself
    for a negative-scale unit)."""
    torch.manual_seed(0)
    model = _ConvBNReLU().eval()
    _atlas_for(
        model, datamodule, tmp_path, probe_size=64, alive_probe_size=64, batch_size=32, featviz_settings={"steps": 4}
    )
    a = atlas.Atlas.load(tmp_path)
    assert a is not None
    info = next(i for i in a.layers if i.name == "conv1")
    fv, patches = a.featviz(info), a.patches(info, 1)
    probe = probe_from_datamodule(datamodule, ProbeSpec(max_images=64))
    x = probe.inputs[probe.positions([int(i) for i in patches["ids"][:, 0]])]
    with torch.no_grad(), capture(model.eval(), ["relu", "conv1"]) as out:  # _atlas_for left it in train mode
        model(x)
    for j, unit in enumerate(fv["units"].tolist()):
        row, col = int(patches["rows"][j, 0]), int(patches["cols"][j, 0])
        assert float(out["relu"][j, unit, row, col]) == pytest.approx(float(fv["reference"][j]), rel=1e-5)
    flipped = fv["units"].tolist().index(1)
    assert float(out["conv1"][flipped, 1, int(patches["rows"][flipped, 0]), int(patches["cols"][flipped, 0])]) < 0
    # the optimised image, put through the ReLU, gives the activation the card states (within its 8-bit rounding)
    images = torch.from_numpy(fv["images"]).float() / 255
    with torch.no_grad(), capture(model, ["relu"]) as opt:
        model(images)
    for j, unit in enumerate(fv["units"].tolist()):
        row, col = (int(v) for v in fv["peaks"][j])
        assert float(opt["relu"][j, unit, row, col]) == pytest.approx(float(fv["activation"][j]), abs=0.05, rel=0.05)


def test_foreign_model_and_tutorial_datamodule_through_a_trainer(data_dir: Path, tmp_path: Path) -> None:
    """LeNet (functional ReLUs and pooling, padded 28 -> 32) in a plain LightningModule, fed by a DataModule written
    as Lightning's docs write one (torchvision Normalize, no test split during fit)."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from tests.helpers.lightning_zoo import TutorialFashionMNIST, ZooModule, torchvision_root

    dm = TutorialFashionMNIST(torchvision_root(data_dir, tmp_path / "tv"))
    model = ZooModule(zoo()["lenet"].model(), input_size=32)
    cb = AtlasCallback(
        probe_size=64, alive_probe_size=64, batch_size=32, featviz_max_units=3, featviz_settings={"steps": 4}
    )
    run = tmp_path / "run"
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(run, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.fit(model, datamodule=dm)
    a = atlas.Atlas.load(run)
    assert a is not None and [i.name for i in a.layers] == ["net.conv1", "net.conv2", "net.fc2"]
    space = a.manifest["settings"]["input_space"]
    assert space["scale"][0] == pytest.approx(1 / 0.3530, rel=1e-4), "the Normalize found from images vs inputs"
    assert space["shift"][0] == pytest.approx(-0.2860 / 0.3530, rel=1e-4)
    assert a.manifest["probe"]["split"] == "val", "the tutorial DataModule has no test split during fit"
    pages = check_pages(write_report(run).parent)
    assert pages["net.conv2.html"].card_ids == [f"c{u}" for u in range(16)]
    assert pages["net.fc2.html"].card_ids == [f"n{u}" for u in range(84)]
    assert a.steps(a.layers[0]) == [0, 1] and a.featviz(a.layers[1])["images"].shape == (3, 1, 28, 28)


def test_transfer_model_alexnet_conv1_to_conv5_with_rgb_224_optimised_inputs(datamodule, tmp_path: Path) -> None:
    from cnnfeat.models import TransferClassifier
    from cnnfeat.models.alexnet import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    model = TransferClassifier(weights="none")
    layers = [f"backbone.conv{i}" for i in range(1, 6)]
    report = _atlas_for(
        model,
        datamodule,
        tmp_path,
        probe_images=12,
        layers=layers,
        max_units=2,
        top_k=2,
        class_top=4,
        probe_size=12,
        alive_probe_size=12,
        batch_size=12,
        featviz_max_units=1,
        featviz_at_real_best=False,
        featviz_settings={"steps": 2},
        featviz_input="backbone",
        featviz_mean=list(IMAGENET_MEAN),
        featviz_std=list(IMAGENET_STD),
    )
    pages = check_pages(report)
    assert set(pages) == {"index.html", *(f"{n}.html" for n in layers)}
    a = atlas.Atlas.load(tmp_path)
    assert a is not None and all(i.frozen for i in a.layers) and a.steps(a.layers[0]) == [0], "frozen: once"
    assert [i.rf_size for i in a.layers] == [[11, 11], [51, 51], [99, 99], [131, 131], [163, 163]]
    fv = a.featviz(a.layers[4])
    assert fv is not None and fv["images"].shape == (1, 3, 224, 224), "RGB 224 inputs of the frozen AlexNet"
    assert a.patch_steps(a.layers[0]) == [0], "a frozen layer's patches are recorded once"
    assert pages["backbone.conv5.html"].card_ids == ["c0", "c1"]


def test_bad_input_is_refused_with_the_reason(tmp_path: Path, datamodule, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="nothing to report"):
        write_report(tmp_path / "empty")
    (tmp_path / "bad" / "atlas").mkdir(parents=True)
    (tmp_path / "bad" / "atlas" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        write_report(tmp_path / "bad")
    (tmp_path / "bad" / "atlas" / "manifest.json").write_text('{"format": 99}')
    with pytest.raises(DataError, match="atlas format 99; this cnnfeat reads format 1"):
        write_report(tmp_path / "bad")
    for kwargs, message in (
        ({"max_units": 0}, "max_units must be an integer >= 1 or null, got 0"),
        ({"featviz_input": "backbone"}, "featviz_input needs featviz_mean and featviz_std"),
        ({"featviz_settings": {"stepz": 3}}, r"unknown feature-visualisation setting\(s\) \['stepz'\]"),
        ({"featviz_settings": {"steps": 0}}, "steps must be >= 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            AtlasCallback(**kwargs)
    from cnnfeat.models import SmallCNN

    probe = probe_from_datamodule(datamodule, ProbeSpec(max_images=32))
    with pytest.raises(
        ConfigError, match=r"Unknown layer name\(s\) \['conv9'\] for SmallCNN; valid names: \[.*'conv1'"
    ):
        AtlasCallback(layers=["conv9"]).prepare(SmallCNN(), probe)
    with pytest.raises(ConfigError, match=r"outputs shape \(1, 2, 6\): the atlas needs \(N, C, H, W\) or \(N, F\)"):
        atlas.layer_kind(_graph_with_3d_node(), "x")
    with pytest.raises(ConfigError, match="probe_size=20000 is larger than"):
        AtlasCallback(probe_size=20000).prepare(SmallCNN(), probe)
    cb, model = AtlasCallback(featviz=False, probe_size=32, alive_probe_size=32), SmallCNN()
    cb.prepare(model, probe)
    with inference(model):
        cb.render(model, probe, 0)
    assert cb.finish(None) == {} and cb.atlas_dir is None, "no output folder: nothing is written anywhere"


def _graph_with_3d_node():
    from cnnfeat.graph import trace_graph

    class Seq(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x = torch.nn.Conv1d(1, 2, 3)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.x(t)

    return trace_graph(Seq(), torch.zeros(1, 1, 8))
