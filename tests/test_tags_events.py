"""One tag vocabulary (``cnnfeat.tags``) and one event reader (``cnnfeat.report.events``).

A short real run with every callback logs only tags the vocabulary names, every entry of the vocabulary, each on the
step axis it states; the reader merges a run's event files in the order they were written, so the newer write of a
step wins (a resumed run); the report and the dead-ReLU figure read what TensorBoard's own accumulator reads.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from cnnfeat import report, tags
from cnnfeat.callbacks import DeadReluCallback
from cnnfeat.callbacks.base import inference
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.models.small_cnn import SmallCNN
from cnnfeat.probe import probe_from_datamodule
from cnnfeat.report import events, figures
from cnnfeat.run.cli import CONFIG_DIR
from cnnfeat.run.train import train
from tests.conftest import REPO

EPOCHS = 2
BATCHES = 3  #: training batches per epoch: Lightning's global steps (3, 6) are not epochs (0..2)
#: every callback of the package, each on a small probe; filters also per output filter, the shape table, cross CKA
EVERY_CALLBACK = [
    "callbacks=[default,representations,atlas,featviz,cross_cka,attribution,importance,relevance]",
    "callbacks.relevance.probe_size=200",
    "callbacks.relevance.max_units=2",
    "callbacks.relevance.path_units=1",
    "callbacks.relevance.path_arbitrary=16",
    "callbacks.relevance.path_settings.steps=4",
    "callbacks.attribution.image_ids=[22]",
    "callbacks.importance.probe_size=200",
    "+callbacks.shape_table._target_=cnnfeat.callbacks.ShapeTableCallback",
    "+callbacks.filters.per_filter_grids=1",
    "callbacks.feature_maps.image_ids=[22]",
    "callbacks.dead_relu.probe_size=200",
    "callbacks.dead_relu.hist_samples=500",
    "callbacks.top_patches.probe_size=200",
    "callbacks.umap.probe_size=100",
    "callbacks.umap.full_epochs=10",
    "callbacks.umap.warm_epochs=5",
    "callbacks.umap.panel_size=120",
    "callbacks.representations.probe_size=100",
    "callbacks.representations.layers=[pixels,relu1,fc3]",
    "callbacks.representations.block_size=50",
    "callbacks.featviz.max_units=1",
    "callbacks.featviz.probe_size=200",
    "callbacks.featviz.settings.steps=4",
    "callbacks.atlas.probe_size=200",
    "callbacks.atlas.alive_probe_size=200",
    "callbacks.atlas.max_units=2",
    "callbacks.atlas.featviz_settings.steps=4",
    "callbacks.cross_cka.layers=null",
    "callbacks.cross_cka.probe_size=100",
    "callbacks.cross_cka.block_size=50",
]
#: entries a healthy run does not log (covered by ``test_a_diverged_networks_dead_relu_tags_are_named``)
ONLY_WHEN_DIVERGED = {tags.NONFINITE_FRACTION}
#: logged only with ``pixel_method=lrp`` (this run draws Integrated Gradients; ``tests/test_lrp.py`` reads it back)
ONLY_WITH_LRP = {tags.ATTRIBUTION_LRP_CONSERVED}


def _cfg(out: Path, data_dir: Path, cache_dir: Path, *overrides: str) -> DictConfig:
    """The real ``train`` config for a tiny CPU run into ``out`` (as ``tests/conftest.py``'s ``make_cfg``)."""
    base = [
        "trainer=cpu",
        f"trainer.max_epochs={EPOCHS}",
        f"trainer.limit_train_batches={BATCHES}",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
        "callbacks.rich_progress_bar=null",
        "report=false",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        "data.download=false",
        f"paths.root_dir={REPO}",
        f"paths.output_dir={out}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, cache_dir: Path) -> Path:
    """``cnnfeat-train`` (fit, test, HParams) with every callback; cross CKA against a one-batch reference run."""
    root = tmp_path_factory.mktemp("tags")
    reference = root / "reference"
    train(_cfg(reference, data_dir, cache_dir, "callbacks=none", "trainer.max_epochs=1", "test=false"))
    ckpt = reference / "checkpoints" / "last.ckpt"
    train(_cfg(root / "run", data_dir, cache_dir, *EVERY_CALLBACK, f"callbacks.cross_cka.reference_ckpt={ckpt}"))
    return root / "run"


@pytest.fixture(scope="module")
def logged(run: Path) -> events.Events:
    return events.read_run(run)


# -- (a) the vocabulary and a real run ------------------------------------------------------------------------
def test_every_logged_tag_is_named_and_every_named_tag_is_logged(logged: events.Events) -> None:
    unnamed = sorted(f"{kind} {tag}" for tag, kind in logged.kinds.items() if tags.family(tag, kind) is None)
    assert not unnamed, f"logged, but named nowhere in cnnfeat/tags.py: {unnamed}"
    named = {tags.family(tag, kind) for tag, kind in logged.kinds.items()}
    missing = sorted(t.pattern for t in set(tags.ALL) - ONLY_WHEN_DIVERGED - ONLY_WITH_LRP - named)
    assert not missing, f"named in cnnfeat/tags.py, but no callback of a run with all of them logged: {missing}"


def test_each_tag_is_logged_on_its_step_axis(logged: events.Events) -> None:
    steps: dict[tags.Tag, set[int]] = {}
    for kind in ("scalars", "images", "histograms", "texts"):
        for tag, values in getattr(logged, kind).items():
            family = tags.family(tag, logged.kinds[tag])
            assert family is not None, tag
            steps.setdefault(family, set()).update(s for s, _ in values)
    for family, seen in steps.items():
        if family.axis is tags.Axis.EPOCHS:
            assert seen <= set(range(EPOCHS + 1)), f"{family.pattern}: {sorted(seen)} are not epochs trained"
        elif family.axis is tags.Axis.ZERO:
            assert seen == {0}, family.pattern
    # Lightning's global step: the epoch's last batch for the module's metrics, its first for the learning rate
    epoch_ends = {BATCHES * (e + 1) - 1 for e in range(EPOCHS)}
    for family in (tags.TRAIN_ACC, tags.TRAIN_LOSS, tags.VAL_ACC, tags.VAL_LOSS):
        assert steps[family] == epoch_ends, family.pattern
    assert steps[tags.LR] == {BATCHES * e for e in range(EPOCHS)}
    assert steps[tags.TEST_ACC] == steps[tags.TEST_LOSS] == {BATCHES * EPOCHS}
    assert steps[tags.EPOCH] == epoch_ends | {BATCHES * EPOCHS}
    epoch_of = dict(logged.scalars[tags.EPOCH.name])
    assert [epoch_of[s] for s, _ in logged.scalars[tags.VAL_ACC.name]] == list(range(EPOCHS)), "epoch maps the steps"


def test_a_diverged_networks_dead_relu_tags_are_named(datamodule: FashionMNISTDataModule) -> None:
    model = SmallCNN()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    cb = DeadReluCallback(probe_size=64, hist_samples=100)
    probe = probe_from_datamodule(datamodule, cb.probe_spec)
    cb.prepare(model, probe)
    with inference(model):
        pictures = cb.render(model, probe, 3)
    written = {**pictures.scalars, **pictures.histograms}
    assert {tags.family(t) for t in written} >= {tags.NONFINITE_FRACTION, tags.DEAD_FRACTION, tags.DEAD_FRACTION_ALL}
    assert all(tags.family(t) is not None for t in written), sorted(written)


def test_a_family_formats_its_tags_and_parses_them_back() -> None:
    assert tags.DEAD_FRACTION.format(node="conv1") == "relu/dead_fraction/conv1"
    assert tags.parse("relu/dead_fraction/layer1.0.relu:1") == (tags.DEAD_FRACTION, {"node": "layer1.0.relu:1"})
    assert tags.family("relu/dead_fraction/all") is tags.DEAD_FRACTION_ALL, "the single tag, not the family"
    assert tags.family("feature_maps/conv1/conv/img22") is tags.FEATURE_MAP_CONV
    assert tags.parse("feature_maps/conv1/gelu/img7") == (
        tags.FEATURE_MAP_ACTIVATION,
        {"conv": "conv1", "activation": "gelu", "image": "7"},
    )
    assert tags.family("cka/layers", "image") is tags.CKA_LAYERS_HEATMAP
    assert tags.family("cka/layers/pixels/relu1", "scalar") is tags.CKA_LAYERS
    assert tags.family("umap/frame_shift") is tags.UMAP_FRAME_SHIFT and tags.family("umap/other") is None
    assert tags.parse("hp/relu/dead_fraction/all") == (tags.HP_METRIC, {"metric": "relu/dead_fraction/all"})
    text = tags.FEATVIZ_TABLE.logged(layer="fc2")
    assert text == "featviz/fc2/table/text_summary" and tags.family(text, "text") is tags.FEATVIZ_TABLE
    assert tags.family("train/acc", "image") is None and tags.family("train/acc", "tensor") is None
    assert tags.TRAIN_ACC.name == "train/acc" and tags.DEAD_FRACTION.prefix == "relu/dead_fraction/"
    for t in tags.ALL:
        assert t.writer and t.description, t
        values = {f: t.choices[f][0] if f in t.choices else "x.1:2" for f in t.fields}
        assert tags.parse(t.logged(**values), t.kind) == (t, values), t
    assert len({(t.pattern, t.kind) for t in tags.ALL}) == len(tags.ALL)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: tags.DEAD_FRACTION.format(), r"needs \['node'\]"),
        (lambda: tags.DEAD_FRACTION.format(node="a/b"), "without '/'"),
        (lambda: tags.UMAP_QUALITY.format(metric="speed"), "must be one of"),
        (lambda: tags.DEAD_FRACTION.name, r"is a family: use format\(node=...\)"),
    ],
)
def test_a_tag_that_cannot_be_formatted_says_why(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# -- (b) merging event files in the order they were written ---------------------------------------------------
TAG = tags.DEAD_FRACTION_ALL.name
FIRST = {0: 0.75, 1: 0.5, 2: 0.375, 3: 0.25}  #: a run stopped after epoch 3 ...
RESUMED = {2: 0.125, 3: 0.0625, 4: 0.03125}  #: ... resumed from epoch 1's checkpoint: epochs 2 and 3 again
MERGED = [(0, 0.75), (1, 0.5), (2, 0.125), (3, 0.0625), (4, 0.03125)]


def _write(run_dir: Path, values: dict[int, float], wall_time: float, image: bool = False) -> None:
    """One SummaryWriter (one new event file) writing ``values`` at ``wall_time + step``."""
    with SummaryWriter(str(run_dir)) as w:
        for step, v in values.items():
            w.add_scalar(TAG, v, step, walltime=wall_time + step)
            if image:
                w.add_image(tags.CKA_LAYERS_HEATMAP.name, torch.full((3, 2, 2), v), step, walltime=wall_time + step)
                w.add_histogram(tags.PREACT.format(node="relu1"), torch.full((4,), v), step, walltime=wall_time + step)
                w.add_text(tags.UNITS_DEATHS.name, f"value {v}", step, walltime=wall_time + step)


READERS: dict[str, Callable[[Path], list[tuple[int, float]]]] = {
    "figures.read_scalars": lambda d: figures.read_scalars(d, tags.DEAD_FRACTION.prefix)[TAG],
    "events.read_run": lambda d: events.read_run(d).scalars[TAG],
    "the report": lambda d: report.RunData.read(d).scalars[TAG],
}


@pytest.mark.parametrize("reader", list(READERS))
def test_a_resumed_runs_newer_write_of_a_step_wins(tmp_path: Path, reader: str) -> None:
    """The resumed run's file (written later, values smaller) gives epochs 2 and 3; each step once."""
    now = time.time()
    _write(tmp_path, FIRST, now - 100)
    _write(tmp_path, RESUMED, now)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert READERS[reader](tmp_path) == MERGED


def test_the_merge_follows_the_time_of_writing_not_file_names_or_dates(tmp_path: Path) -> None:
    """The older file sorts last by name and has the newest modification time: what was written later still wins,
    for every kind; ``records`` keeps every write, in the order written."""
    now = time.time()
    _write(tmp_path / "z_first", FIRST, now - 100, image=True)
    _write(tmp_path / "a_resumed", RESUMED, now, image=True)
    first_file = next((tmp_path / "z_first").glob("events.out.tfevents.*"))
    os.utime(first_file, (now + 50, now + 50))
    merged = events.read_run(tmp_path)
    assert merged.scalars[TAG] == MERGED
    pictures = merged.images[tags.CKA_LAYERS_HEATMAP.name]
    assert [s for s, _ in pictures] == [0, 1, 2, 3, 4]
    resumed_step_2 = events.read([next((tmp_path / "a_resumed").glob("events.out.tfevents.*"))]).images
    assert pictures[2][1] == resumed_step_2[tags.CKA_LAYERS_HEATMAP.name][0][1]
    assert merged.latest_images()[tags.CKA_LAYERS_HEATMAP.name] == pictures[-1]
    assert merged.texts[tags.UNITS_DEATHS.logged()] == [(s, f"value {v}") for s, v in MERGED]
    assert [(s, h.max) for s, h in merged.histograms[tags.PREACT.format(node="relu1")]] == MERGED
    written = [(r.step, r.scalar()) for r in events.records(events.event_files(tmp_path)) if r.tag == TAG]
    assert written == [*FIRST.items(), *RESUMED.items()]
    shown = report.RunData.read(tmp_path)
    assert shown.scalars[TAG] == MERGED and shown.images[tags.CKA_LAYERS_HEATMAP.name] == pictures[-1]


# -- (c) the report and the figure read what TensorBoard reads ------------------------------------------------
def _accumulated(
    run_dir: Path,
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, tuple[int, bytes]], dict[str, list], dict[str, list]]:
    """Scalars, the latest picture per tag, every picture per tag and every text per tag, read with TensorBoard's
    ``EventAccumulator`` one file at a time, a later file's value of a step replacing an earlier one: an answer
    independent of ``cnnfeat.report.events``."""
    files = sorted(run_dir.rglob("events.out.tfevents.*"), key=lambda p: EventAccumulator(str(p)).FirstEventTimestamp())
    scalars: dict[str, dict[int, float]] = {}
    images: dict[str, tuple[int, bytes]] = {}
    series: dict[str, dict[int, bytes]] = {}
    texts: dict[str, dict[int, str]] = {}
    for f in files:
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update((e.step, e.value) for e in ea.Scalars(tag))
        for tag in ea.Tags()["images"]:
            for e in ea.Images(tag):
                series.setdefault(tag, {})[e.step] = e.encoded_image_string
                if tag not in images or e.step >= images[tag][0]:
                    images[tag] = (e.step, e.encoded_image_string)
        for tag in ea.Tags()["tensors"]:
            for e in ea.Tensors(tag):
                texts.setdefault(tag, {})[e.step] = "\n".join(v.decode() for v in e.tensor_proto.string_val)
    return (
        {t: sorted(d.items()) for t, d in scalars.items()},
        images,
        {t: sorted(d.items()) for t, d in series.items()},
        {t: sorted(d.items()) for t, d in texts.items()},
    )


def test_the_report_and_the_dead_relu_figure_read_what_tensorboard_reads(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scalars, images, _, _ = _accumulated(run)
    shown = {t: v for t, v in images.items() if t.startswith(report.IMAGE_PREFIXES)}
    data = report.RunData.read(run)
    assert data.scalars == scalars and data.images == shown and not data.notes
    dead = {t: v for t, v in scalars.items() if t.startswith(tags.DEAD_FRACTION.prefix)}
    assert figures.read_scalars(run, tags.DEAD_FRACTION.prefix) == dead and tags.DEAD_FRACTION_ALL.name in dead

    sweep = tmp_path / "sweep"
    shutil.copytree(run, sweep / "0")
    ours = figures.dead_relu_figure(sweep, tmp_path / "ours.png").read_bytes()
    page = report.write_report(run, tmp_path / "ours").read_text()

    def accumulated(run_dir: Path | str, *args: object, **kwargs: object) -> events.Events:
        s, i, every, texts = _accumulated(Path(run_dir))
        shown = {t: [v] for t, v in i.items() if t.startswith(report.IMAGE_PREFIXES)}
        shown.update({t: v for t, v in every.items() if t.startswith(tags.ATTRIBUTION.prefix)})  # strips: every step
        kept = {t: v for t, v in texts.items() if tags.IMPORTANCE_TABLE.match(t) is not None}
        return events.Events(scalars=s, images=shown, texts=kept)

    monkeypatch.setattr(events, "read_run", accumulated)
    monkeypatch.setattr(figures, "read_scalars", lambda d, prefix="": {**dead})
    assert figures.dead_relu_figure(sweep, tmp_path / "theirs.png").read_bytes() == ours, "the same figure"
    assert report.write_report(run, tmp_path / "theirs").read_text() == page, "the same overview page"
    assert "Dying ReLU" in page and "cka/layers" in page and "Training curves" in page
