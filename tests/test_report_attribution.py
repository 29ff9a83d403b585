"""Issue 24 in the report and in cnnfeat-explore: a real run with the attribution, importance and atlas callbacks,
its report (the attribution strips are the logged pictures, byte for byte; the importance tables and the numbers
beside them are the logged text and scalars; each atlas card carries its unit's importance per kept epoch), a run
without those callbacks (no such pages), and cnnfeat-explore on the run's checkpoints (the same tags at the
checkpoints' steps). The event files are read back with TensorBoard's own ``EventAccumulator``, not the report's
reader."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnfeat import tags
from cnnfeat.atlas import slug
from cnnfeat.report import fmt, pct, write_report
from cnnfeat.run.cli import CONFIG_DIR
from cnnfeat.run.explore import explore
from cnnfeat.run.train import train
from tests.conftest import REPO
from tests.helpers.browser import Chromium
from tests.test_report import check_pages

IDS = [22, 193]
PROBE = 200
STEPS = [0, 1, 2]
#: importance layer -> the atlas page whose cards show it (SmallCNN: fc2's units are read at relu5)
CARD_PAGES = {"conv3": "conv3", "relu5": "fc2"}
ROLES = {
    "fires a lot, does not matter": "fires a lot but does not matter",
    "rarely fires, matters": "rarely fires but matters",
}


def _compose(name: str, overrides: list[str], data_dir: Path, cache_dir: Path) -> DictConfig:
    base = [f"data.data_dir={data_dir}", f"data.cache_dir={cache_dir}", "data.download=false", f"paths.root_dir={REPO}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=[*base, *overrides])


def _train(out: Path, callbacks: str, data_dir: Path, cache_dir: Path, *extra: str) -> Path:
    cfg = _compose(
        "train",
        [
            "trainer=cpu",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=4",
            "trainer.limit_val_batches=2",
            "trainer.num_sanity_val_steps=0",
            "trainer.enable_model_summary=false",
            f"callbacks={callbacks}",
            "callbacks.rich_progress_bar=null",
            "test=false",
            "report=false",
            "save_png=false",
            f"paths.output_dir={out}",
            *extra,
        ],
        data_dir,
        cache_dir,
    )
    train(cfg)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, cache_dir: Path) -> Path:
    """Two short epochs with attribution, importance (every epoch) and the atlas; every epoch's checkpoint kept."""
    out = _train(
        tmp_path_factory.mktemp("run"),
        "[none,attribution,importance,atlas]",
        data_dir,
        cache_dir,
        f"callbacks.attribution.image_ids=[{','.join(map(str, IDS))}]",
        f"callbacks.importance.probe_size={PROBE}",
        "callbacks.importance.every_n_epochs=1",
        "callbacks.atlas.featviz=false",
        f"callbacks.atlas.probe_size={PROBE}",
        f"callbacks.atlas.alive_probe_size={PROBE}",
        "callbacks.model_checkpoint.save_top_k=-1",
    )
    (out / ".hydra").mkdir()
    (out / ".hydra" / "config.yaml").write_text("seed: 0\n")  # what a CLI run leaves: explore re-creates step 0
    return out


def logged(run_dir: Path) -> EventAccumulator:
    """Every event of ``run_dir``'s event files, by TensorBoard's own reader (nothing dropped)."""
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def texts(acc: EventAccumulator, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}


def table_rows(text: str) -> list[list[str]]:
    """The body cells of a markdown table."""
    return [[c.strip() for c in line.strip()[1:-1].split("|")] for line in text.strip().splitlines()[2:]]


def html_rows(fragment: str) -> list[list[str]]:
    """The body cells (tags stripped) of the first HTML table in ``fragment``."""
    first = fragment[: fragment.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", first)
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", r)] for r in rows if "<td" in r]


def section(page: str, start: str, end: str = "<h2") -> str:
    """The HTML from ``start`` to the next ``end``."""
    i = page.index(start)
    j = page.find(end, i + len(start))
    return page[i : j if j >= 0 else len(page)]


@pytest.fixture(scope="module")
def report(run: Path) -> Path:
    return write_report(run).parent


def test_attribution_page_shows_the_logged_pictures_and_gaps_per_step(run: Path, report: Path) -> None:
    acc = logged(run)
    pages = check_pages(report)
    assert "attribution.html" in pages and "attribution.html" in pages["index.html"].links
    page = (report / "attribution.html").read_text()
    for image in IDS:
        tag = tags.ATTRIBUTION.format(image=image)
        events = {e.step: e for e in acc.Images(tag)}
        assert sorted(events) == STEPS
        gaps = scalars(acc, tags.ATTRIBUTION_IG_GAP.format(image=image))
        part = section(page, f"<h2 id='img{image}'>")
        rows = html_rows(part)
        assert [r[0].split()[0] for r in rows] == [str(s) for s in STEPS], "one row per step, in order"
        for step, row in zip(STEPS, rows, strict=True):
            src = f"assets/attribution/img{image}_step{step:03d}.png"
            assert f'src="{src}"' in part
            shown = (report / src).read_bytes()
            assert shown == events[step].encoded_image_string, f"{tag} step {step}: the logged picture, as logged"
            with Image.open(io.BytesIO(shown)) as im:
                assert im.size == (events[step].width, events[step].height)
                assert np.asarray(im.convert("L")).std() > 10, "a picture, not a blank"
            assert row[2] == pct(gaps[step]), f"{tag} step {step}: IG gap"


def test_importance_page_shows_the_logged_tables_and_scalars(run: Path, report: Path) -> None:
    acc = logged(run)
    page = (report / "importance.html").read_text()
    for layer in ("conv1", "conv2", "conv3", "relu5"):
        part = section(page, f"<h2 id='{slug(layer)}'>")
        drop = scalars(acc, tags.IMPORTANCE_ACC_DROP_MAX.format(layer=layer))
        busy = scalars(acc, tags.IMPORTANCE_BUSY_IDLE.format(layer=layer))
        rare = scalars(acc, tags.IMPORTANCE_RARE_VITAL.format(layer=layer))
        summary = html_rows(part)
        assert summary == [[str(s), pct(drop[s]), fmt(busy[s]), fmt(rare[s])] for s in STEPS], layer
        tables = texts(acc, tags.IMPORTANCE_TABLE.logged(layer=layer))
        assert sorted(tables) == STEPS
        expected = table_rows(tables[2])
        ranking = section(part, "<h3>Ranking at step 2", "<div class='figs'>")
        shown = html_rows(ranking) + (
            html_rows(ranking[ranking.index("<details>") :]) if "<details>" in ranking else []
        )
        assert shown == [[*r[:5], ROLES.get(r[5], r[5])] for r in expected], f"{layer}: the logged table at step 2"
        assert max(float(r[2]) for r in expected) == pytest.approx(drop[2], abs=5e-5), "table and scalar agree"
        for role, count in (("fires a lot but does not matter", busy[2]), ("rarely fires but matters", rare[2])):
            line = re.search(rf"<b>{role[0].upper() + role[1:]}</b> \(step 2\): (.*?)</p>", part)
            assert line is not None, (layer, role)
            assert len(re.findall(r"unit \d+", line.group(1))) == int(count), (layer, role)
        if layer in CARD_PAGES:  # each atlas card: its unit's row of every kept step's table
            cards = (report / f"{CARD_PAGES[layer]}.html").read_text()
            by_unit = {int(r[1]): {} for r in expected}
            for step, text in tables.items():
                for r in table_rows(text):
                    by_unit[int(r[1])][step] = r
            for unit, steps in by_unit.items():
                card = section(cards, f"id='{'c' if layer == 'conv3' else 'n'}{unit}'", "</section>")
                imp = card[card.index("importance when removed") :]
                assert html_rows(imp) == [[str(s), r[2], r[3], r[4], r[0]] for s, r in sorted(steps.items())]
                assert ("does not matter" in card) == (steps[2][5] == "fires a lot, does not matter"), unit


def test_run_without_the_callbacks_has_no_such_pages(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, cache_dir: Path
) -> None:
    bare = _train(tmp_path_factory.mktemp("bare"), "none", data_dir, cache_dir, "trainer.max_epochs=1")
    out = write_report(bare).parent
    assert not (out / "attribution.html").exists() and not (out / "importance.html").exists()
    index = (out / "index.html").read_text()
    assert "Attribution and unit importance" not in index and "importance.html" not in index
    assert "Training curves" in index, "the rest renders as before"


def test_explore_logs_attribution_and_importance_at_the_checkpoint_steps(
    run: Path, tmp_path: Path, data_dir: Path, cache_dir: Path
) -> None:
    cfg = _compose(
        "explore",
        [
            f"ckpt={run / 'checkpoints'}",
            f"paths.output_dir={tmp_path}",
            "callbacks=[attribution,importance]",
            f"callbacks.attribution.image_ids=[{','.join(map(str, IDS))}]",
            f"callbacks.importance.probe_size={PROBE}",
            "save_png=false",
            "device=cpu",
        ],
        data_dir,
        cache_dir,
    )
    explore(cfg)
    acc, trained = logged(tmp_path), logged(run)
    for image in IDS:
        assert [e.step for e in acc.Images(tags.ATTRIBUTION.format(image=image))] == STEPS
        assert sorted(scalars(acc, tags.ATTRIBUTION_IG_GAP.format(image=image))) == STEPS
    for layer in ("conv1", "conv2", "conv3", "relu5"):
        tag = tags.IMPORTANCE_TABLE.logged(layer=layer)
        explored, during = texts(acc, tag), texts(trained, tag)
        assert sorted(explored) == STEPS
        # the same weights at the same step (step 0 re-created from the seed): the same ablation table
        assert explored == during, layer
        assert scalars(acc, tags.IMPORTANCE_ACC_DROP_MAX.format(layer=layer)) == pytest.approx(
            scalars(trained, tags.IMPORTANCE_ACC_DROP_MAX.format(layer=layer))
        )
    # explore writes its report: the attribution and importance pages from the explored steps
    pages = check_pages(tmp_path / "report")
    assert {"attribution.html", "importance.html"} <= set(pages)
    with Chromium() as browser:
        for name in ("attribution.html", "importance.html"):
            result = browser.check((tmp_path / "report" / name).as_uri())
            assert result.ok, (name, result.errors, result.broken_images)
            assert result.images == (2 * len(STEPS) if name == "attribution.html" else 0), name


def test_a_run_that_changed_its_pixel_method_names_each_steps_method(tmp_path: Path) -> None:
    """IG at steps 0-1, then LRP at step 2 (a resume with another ``pixel_method``): each row says which it shows."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    writer = SummaryWriter(run)
    rng = np.random.default_rng(0)
    for step in (0, 1, 2):
        writer.add_image(tags.ATTRIBUTION.format(image=22), rng.random((3, 40, 60)).astype(np.float32), step)
        family = tags.ATTRIBUTION_IG_GAP if step < 2 else tags.ATTRIBUTION_LRP_CONSERVED
        writer.add_scalar(family.format(image=22), 0.005 * (step + 1) if step < 2 else 0.75, step)
    writer.close()
    page = (write_report(run).parent / "attribution.html").read_text()
    assert "Integrated Gradients" in page and "LRP" in page and "each row names its own" in page
    rows = html_rows(section(page, "<h2 id='img22'>"))
    assert [r[0].split()[0] for r in rows] == ["0", "1", "2"]
    assert [("IG" in r[0], "LRP" in r[0]) for r in rows] == [(True, False), (True, False), (False, True)]
    assert [r[2] for r in rows] == [pct(0.005), pct(0.01), fmt(0.75)]
