"""cnnfeat-report on hostile input (issue 21): it never deletes what it did not write, never reads through a symbolic
link or out of the run directory, refuses a damaged atlas manifest with its own error, shows explored.json, and
answers every problem a user can name with one line and exit code 2 (or a warning that names the file it skipped),
never a traceback. Runs are small synthetic run folders (status.json, config, real TensorBoard event files)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from cnnfeat.atlas import AtlasWriter
from cnnfeat.errors import ConfigError, DataError
from cnnfeat.report import main, report_at_end, write_report, write_sweep_report
from tests.conftest import REPO

MARKER = ".cnnfeat-report"  # the file by which cnnfeat-report knows a report folder it wrote
SECRET = "SECRET-7f3a9c"  # what a private file outside the run holds: it must never reach the report


def make_run(run: Path, epochs: int = 3) -> Path:
    """A small run folder as cnnfeat-train leaves it: config, overrides, status.json and scalars per epoch."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 12\nmodel:\n  lr: 0.01\n")
    (run / ".hydra" / "overrides.yaml").write_text("- seed=12\n")
    (run / "status.json").write_text(json.dumps({"status": "finished", "epoch": epochs, "metrics": {"val/acc": 0.5}}))
    with SummaryWriter(str(run)) as w:
        for e in range(epochs):
            step = 10 * (e + 1)
            w.add_scalar("epoch", e, step)
            w.add_scalar("train/acc", 0.3 + 0.1 * e, step)
            w.add_scalar("train/loss", 1.0 / (e + 1), step)
            w.add_scalar("val/acc", 0.25 + 0.1 * e, step)
    return run


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("template") / "run")


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the small run for one test."""
    return Path(shutil.copytree(template, tmp_path / "run", symlinks=True))


def cli(args: list[str | Path], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``cnnfeat-report ARGS``: its exit code and its stderr (a traceback fails the test)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnfeat-report: "), err
    return lines[0]


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (not following links): files by content, links by target."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def leaked(folder: Path) -> list[str]:
    """Files under ``folder`` holding the secret."""
    return [k for k, v in tree(folder).items() if isinstance(v, bytes) and SECRET.encode() in v]


def gif_bytes(comment: str = "") -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("P", (8, 8), i) for i in range(2)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], comment=comment.encode())
    return buf.getvalue()


def add_summary(run: Path, value: Summary.Value, step: int = 1) -> None:
    with SummaryWriter(str(run)) as w:
        w._get_file_writer().add_summary(Summary(value=[value]), step)


def make_atlas(run: Path, **extra: object) -> Path:
    """A small, well-formed atlas: one conv layer of 2 units with weights and alive/dead at steps 0 and 1."""
    writer = AtlasWriter(run / "atlas")
    layer = {
        "name": "conv1",
        "kind": "conv",
        "units": 2,
        "shown": [0, 1],
        "activation": "relu1",
        "weights": True,
        "frozen": False,
        "rf_size": [3, 3],
        "rf_jump": [1, 1],
        "rf_start": [1, 1],
        "output_shape": [2, 26, 26],
    }
    writer.manifest({"layers": [layer], "class_names": ["a", "b"], "probe": {"alive_images": 8}, **extra})
    for step in (0, 1):
        rng = np.random.default_rng(step)
        writer.dir.joinpath("conv1").mkdir(parents=True, exist_ok=True)
        np.savez(
            writer.dir / "conv1" / f"step_{step:03d}.npz",
            unit_max=np.array([1.0, -1.0], np.float32),
            weights=rng.normal(size=(2, 1, 3, 3)).astype(np.float32),
        )
    return run / "atlas"


# -- 1. the output folder: never remove or replace what the report did not write ----------------------------
def test_o_on_a_folder_of_the_users_is_refused_and_nothing_is_deleted(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    before = set(os.listdir(tmp_path))
    code, err = cli([run, "-o", docs], capsys)
    line = one_line(err)
    assert code == 2 and "is not a cnnfeat report" in line and str(docs) in line and "notes.txt" in line, line
    assert tree(docs) == {"notes.txt": b"mine"}, "the user's folder is untouched"
    assert set(os.listdir(tmp_path)) == before, "no temporary folder is left beside it"


def test_o_dot_refuses_a_busy_folder_and_fills_an_empty_one(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    monkeypatch.chdir(busy)
    code, err = cli([run, "-o", "."], capsys)
    assert code == 2 and "is not a cnnfeat report" in one_line(err), err
    assert tree(busy) == {"notes.txt": b"mine"}
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for _ in range(2):  # an empty folder, then the report it now holds: both are fine
        code, err = cli([run, "-o", "."], capsys)
        assert code == 0, err
        assert (empty / "index.html").is_file() and (empty / MARKER).is_file()
        assert Path.cwd() == empty and empty.is_dir(), "the working directory itself is kept, not replaced"
    assert sorted(os.listdir(tmp_path)) == ["busy", "empty", "run"], "nothing left beside it"


def test_a_previous_report_is_replaced_but_a_file_added_to_it_is_kept(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    for _ in range(2):
        code, err = cli([run, "-o", out], capsys)
        assert code == 0 and (out / "index.html").is_file(), err
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask, "the usual permissions: a static host can serve it"
    for _ in range(2):
        assert write_report(run) == run / "report" / "index.html", "the default location regenerates"
    (out / "notes.txt").write_text("mine")
    (out / "assets").mkdir(exist_ok=True)
    (out / "assets" / "logo.png").write_bytes(b"mine too")
    index = (out / "index.html").read_bytes()
    code, err = cli([run, "-o", out], capsys)
    line = one_line(err)
    assert code == 2 and "notes.txt" in line and "assets/logo.png" in line and "did not write" in line, line
    assert (out / "notes.txt").read_text() == "mine" and (out / "assets" / "logo.png").read_bytes() == b"mine too"
    assert (out / "index.html").read_bytes() == index, "the previous report is left as it was"
    assert sorted(os.listdir(tmp_path)) == ["out", "run"]


def test_a_report_folder_of_an_older_cnnfeat_is_still_replaced(run: Path) -> None:
    old = run / "report"
    (old / "assets" / "conv1").mkdir(parents=True)
    (old / "index.html").write_text("<!DOCTYPE html>\n<html><head><title>cnnfeat report · run</title></head></html>")
    (old / "conv1.html").write_text("<html></html>")
    (old / "assets" / "conv1" / "c0_filters.png").write_bytes(b"png")
    assert write_report(run) == old / "index.html"
    assert not (old / "conv1.html").exists() and (old / MARKER).is_file()


def test_the_default_report_folder_holding_a_users_file_is_refused(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_report(run)
    (run / "report" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds notes.txt, which cnnfeat-report did not write"):
        write_report(run)
    with caplog.at_level(logging.WARNING, logger="cnnfeat"):
        assert report_at_end(run) is None, "the end of a training run logs it instead of failing"
    assert "notes.txt" in caplog.text
    assert (run / "report" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("what", ["file", "link", "run", "images", "parent-is-a-file", "inside-a-report"])
def test_o_at_a_file_a_link_the_run_its_images_or_inside_a_report_is_refused(
    what: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_report(run)
    (run / "images").mkdir()
    (run / "images" / "filters_0.png").write_bytes(b"png")
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    out, message = {
        "file": (tmp_path / "afile", "is a file, not a folder"),
        "link": (tmp_path / "link", "is a symbolic link"),
        "run": (run, "is not a cnnfeat report"),
        "images": (run / "images", "is not a cnnfeat report"),
        "parent-is-a-file": (tmp_path / "afile" / "report", "cannot create the report folder"),
        "inside-a-report": (run / "report" / "sub", f"is inside the report folder {run / 'report'}"),
    }[what]
    before, run_before = tree(tmp_path), tree(run)
    code, err = cli([run, "-o", out], capsys)
    line = one_line(err)
    assert code == 2 and message in line and str(out) in line, line
    assert tree(tmp_path) == before and tree(run) == run_before, "nothing written, nothing removed"


def test_the_sweep_report_folder_is_protected_and_o_is_honoured(
    template: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = tmp_path / "sweep"
    shutil.copytree(template, sweep / "0")
    (sweep / "report").mkdir()
    (sweep / "report" / "notes.txt").write_text("mine")
    code, err = cli([sweep], capsys)
    assert code == 2 and "is not a cnnfeat report" in one_line(err)
    assert tree(sweep / "report") == {"notes.txt": b"mine"}
    with pytest.raises(ConfigError, match="is not a cnnfeat report"):
        write_sweep_report(sweep)
    code, err = cli([sweep, "-o", tmp_path / "sweep_report"], capsys)
    assert code == 0, err
    text = (tmp_path / "sweep_report" / "index.html").read_text()
    assert 'href="../sweep/0/report/index.html"' in text, "links to the job reports from where the index is"
    shutil.rmtree(sweep / "report")
    code, err = cli([sweep], capsys)
    assert code == 0 and (sweep / "report" / MARKER).is_file(), err
    code, err = cli([sweep], capsys)
    assert code == 0, "regenerating the sweep report replaces it"


def test_a_run_with_a_projector_folder_is_a_run_not_a_sweep(run: Path, capsys: pytest.CaptureFixture) -> None:
    """TensorBoard's Projector writes a numbered folder into a run; a run without status.json (built with ``build`` and
    ``fit`` in a script) was taken for a sweep and got an empty "sweep report"."""
    (run / "status.json").unlink(missing_ok=True)
    (run / "00015" / "umap%2ffeatures").mkdir(parents=True)
    assert list(run.glob("events.out.tfevents.*")), "the run's own event files are at its top"
    code, err = cli([run], capsys)
    assert code == 0, err
    text = (run / "report" / "index.html").read_text()
    assert "Sweep" not in text.split("</title>")[0] and "Training curves" in text


def test_a_sweep_job_linked_out_of_the_sweep_is_skipped(
    template: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    sweep, outside = tmp_path / "sweep", tmp_path / "outside"
    shutil.copytree(template, sweep / "0")
    shutil.copytree(template, outside)
    (sweep / "1").symlink_to(outside)
    shutil.copytree(template, sweep / "2")
    (sweep / "2" / ".hydra" / "overrides.yaml").unlink()
    (tmp_path / "private.yaml").write_text(f"- {SECRET}=1\n")
    (sweep / "2" / ".hydra" / "overrides.yaml").symlink_to(tmp_path / "private.yaml")
    before = tree(outside)
    with caplog.at_level(logging.WARNING, logger="cnnfeat"):
        code, err = cli([sweep], capsys)
    assert code == 0, err
    assert tree(outside) == before, "nothing is written outside the sweep"
    assert "1" in caplog.text and "symbolic link" in caplog.text
    assert "overrides.yaml" in caplog.text
    text = (sweep / "report" / "index.html").read_text()
    assert "job 0" in text and "job 2" in text and "job 1" not in text
    assert not leaked(sweep)


# -- 2. symbolic links and files that are not regular -------------------------------------------------------
def _private(tmp_path: Path, what: str) -> Path:
    """A private file (or folder) outside the run, of the kind ``what`` names, holding the secret."""
    p = tmp_path / "private" / what
    p.parent.mkdir(parents=True, exist_ok=True)
    if what == ".hydra":
        p.mkdir()
        (p / "config.yaml").write_text(f"password: {SECRET}\n")
    elif what == "umap_embedding.gif":
        p.write_bytes(gif_bytes(SECRET))
    elif what == "status.json":
        p.write_text(json.dumps({"status": SECRET}))
    elif what == "explored.json":
        p.write_text(json.dumps({"explored": [0, 1], "missing": [], "checkpoints": {"1": f"{SECRET}.ckpt"}}))
    elif what == "atlas/manifest.json":
        p.write_text(json.dumps({"format": 1, "layers": [], "probe": {"describe": SECRET}}))
    elif what == "atlas":
        make_atlas(p.parent / "a")
        p = p.parent / "a" / "atlas"
        (p / "manifest.json").write_text(
            (p / "manifest.json").read_text().replace('"alive_images"', f'"describe": "{SECRET}", "alive_images"')
        )
    elif what == "events":
        add_summary(p, Summary.Value(tag=f"cka/{SECRET}", image=Summary.Image(encoded_image_string=gif_bytes())))
        p = next(p.glob("events.out.tfevents.*"))
    else:
        p.write_text(f"password: {SECRET}\n")
    return p


@pytest.mark.parametrize(
    "name",
    [
        ".hydra/config.yaml",
        ".hydra",
        "status.json",
        "umap_embedding.gif",
        "explored.json",
        "atlas/manifest.json",
        "atlas",
        "events.out.tfevents.1.link",
    ],
)
def test_a_symbolic_link_out_of_the_run_is_skipped_and_named(
    name: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    target = _private(tmp_path, "events" if name.startswith("events") else name)
    link = run / name
    if link.is_dir():
        shutil.rmtree(link)
    link.unlink(missing_ok=True)
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(target)
    private_before = tree(tmp_path / "private")
    with caplog.at_level(logging.WARNING, logger="cnnfeat"):
        code, err = cli([run], capsys)
    assert code == 0, err
    assert f"{name}: a symbolic link" in caplog.text, caplog.text
    assert not leaked(run / "report"), "the linked file's content is neither embedded nor copied"
    assert not (run / "report" / "assets" / "umap_embedding.gif").exists()
    index = (run / "report" / "index.html").read_text()
    assert f"{name}: a symbolic link" in index, "the page says what it skipped"
    assert tree(tmp_path / "private") == private_before


def test_a_link_inside_the_atlas_is_skipped_and_a_step_file_of_another_name_ignored(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    atlas_dir = make_atlas(run)
    private = tmp_path / "private.npz"
    shutil.move(atlas_dir / "conv1" / "step_001.npz", private)
    (atlas_dir / "conv1" / "step_001.npz").symlink_to(private)
    (atlas_dir / "conv1" / "step_x.npz").write_bytes(b"not a step")
    (atlas_dir / "conv1" / "step_7.npz").write_bytes(b"not a step either")
    with caplog.at_level(logging.WARNING, logger="cnnfeat"):
        code, err = cli([run], capsys)
    assert code == 0, err
    assert "atlas/conv1/step_001.npz: a symbolic link" in caplog.text
    text = (run / "report" / "conv1.html").read_text()
    assert "alive/dead, epoch 0 " in text, "only the regular step file is read"


def test_a_fifo_is_skipped_without_waiting_for_it(run: Path) -> None:
    (run / "status.json").unlink()
    os.mkfifo(run / "status.json")
    os.mkfifo(run / "events.out.tfevents.2.fifo")
    proc = subprocess.run(
        [sys.executable, "-m", "cnnfeat.report", str(run)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "status.json: not a regular file" in proc.stderr and "events.out.tfevents.2.fifo" in proc.stderr


# -- 3. an atlas manifest of the wrong structure -------------------------------------------------------------
@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ({"format": 1, "layers": {"conv1": {}}}, "'layers' must be a list"),
        ({"format": 1, "layers": [{"name": "conv1"}]}, r"layers\[0\] \(conv1\) lacks 'activation', 'frozen'"),
        ({"format": 1, "layers": [{"name": "c", "kind": "conv", "units": "6", "shown": [0], "activation": None,
          "weights": True, "frozen": False}]}, r"layers\[0\]\.units must be an integer >= 0, got '6'"),
        ({"format": 1, "layers": [{"name": "c", "kind": "lstm", "units": 6, "shown": [0], "activation": None,
          "weights": True, "frozen": False}]}, r"layers\[0\]\.kind must be 'conv' or 'fc', got 'lstm'"),
        ({"format": 1, "layers": [{"name": "c", "kind": "conv", "units": 2, "shown": [0, 5], "activation": None,
          "weights": True, "frozen": False}]}, r"layers\[0\]\.shown must be unit numbers in \[0, 2\)"),
        ({"format": 1, "layers": [], "probe": ["x"]}, "'probe' must be an object"),
        ({"format": 1, "layers": [], "settings": {"featviz_settings": 3}}, "'settings.featviz_settings' must be"),
        ({"format": 1, "layers": [], "class_names": "abc"}, "'class_names' must be a list of strings"),
    ],
)  # fmt: skip
def test_an_atlas_manifest_of_the_wrong_structure_is_refused_naming_the_file(
    manifest: object, message: str, run: Path, capsys: pytest.CaptureFixture
) -> None:
    path = run / "atlas" / "manifest.json"
    path.parent.mkdir()
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=message):
        write_report(run)
    code, err = cli([run], capsys)
    line = one_line(err)
    assert code == 2 and "DataError" in line and str(path) in line, line
    assert not (run / "report").exists(), "no half report"


def test_a_damaged_step_file_is_refused_naming_it(run: Path, capsys: pytest.CaptureFixture) -> None:
    atlas_dir = make_atlas(run)
    np.savez(atlas_dir / "conv1" / "step_001.npz", weights=np.zeros((2, 1, 3, 3), np.float32))
    code, err = cli([run], capsys)
    line = one_line(err)
    assert code == 2 and "step_001.npz" in line and "unit_max" in line, line
    np.savez(atlas_dir / "conv1" / "step_001.npz", unit_max=np.zeros(5, np.float32))
    code, err = cli([run], capsys)
    line = one_line(err)
    assert code == 2 and "step_001.npz" in line and "2 shown units" in line, line


# -- 4. explored.json (cnnfeat-explore) ----------------------------------------------------------------------
def test_explored_and_missing_epochs_are_shown_near_the_top(run: Path, capsys: pytest.CaptureFixture) -> None:
    explored = {
        "explored": [0, 1, 3, 15],
        "missing": [2, *range(4, 15)],
        "checkpoints": {"1": "epoch00-step10.ckpt", "3": "epoch02-step30.ckpt", "15": "last.ckpt"},
    }
    (run / "explored.json").write_text(json.dumps(explored))
    make_atlas(run)
    code, err = cli([run], capsys)
    assert code == 0, err
    text = (run / "report" / "index.html").read_text()
    line = (
        "Explored epochs 0, 1, 3, 15; missing 2, 4&ndash;14: values that compare with a previous epoch compare with the"
    )
    assert line in text and "previous <i>explored</i> one" in text
    assert text.index(line) < text.index("Training curves"), "near the top"
    assert "epoch02-step30.ckpt" in text and "last.ckpt" in text
    assert "Explored epochs 0, 1, 3, 15; missing 2, 4&ndash;14" in (run / "report" / "conv1.html").read_text()
    (run / "explored.json").write_text(json.dumps({"explored": [0, 1, 2], "missing": [], "checkpoints": {}}))
    write_report(run)
    assert "Explored epochs 0&ndash;2 (none missing)" in (run / "report" / "index.html").read_text()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[0, 1]", "must be a JSON object"),
        ('{"explored": ["0", "1"], "missing": []}', "'explored' must be a list of epochs"),
        ('{"explored": [0, true], "missing": []}', "'explored' must be a list of epochs"),
        ('{"explored": [0, -1], "missing": []}', "'explored' must be a list of epochs"),
        ('{"explored": [0, 3], "missing": [3]}', "both explored and missing: 3"),
        ('{"explored": [0, 3], "missing": "1,2"}', "'missing' must be a list of epochs"),
        ('{"explored": [0, 3], "missing": [1, 2], "checkpoints": ["a.ckpt"]}', "'checkpoints' must map"),
        ('{"explored": [0, 3], "missing": [1, 2], "checkpoints": {"x": "a.ckpt"}}', "'checkpoints' must map"),
    ],
)
def test_explored_json_of_the_wrong_structure_is_skipped_with_a_warning(
    content: str, message: str, run: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    (run / "explored.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="cnnfeat"):
        code, err = cli([run], capsys)
    assert code == 0, err
    assert "explored.json" in caplog.text and message in caplog.text, caplog.text
    text = (run / "report" / "index.html").read_text()
    assert "Explored epochs" not in text and "explored.json" in text


# -- 5. more hostile input -----------------------------------------------------------------------------------
def test_a_file_or_an_empty_folder_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("x")
    code, err = cli([tmp_path / "afile"], capsys)
    assert code == 2 and "is a file, not a run directory" in one_line(err)
    (tmp_path / "empty").mkdir()
    code, err = cli([tmp_path / "empty"], capsys)
    assert code == 2 and "nothing to report" in one_line(err)
    assert os.listdir(tmp_path / "empty") == [], "nothing written into it"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_a_run_folder_without_read_permission(run: Path, capsys: pytest.CaptureFixture) -> None:
    run.chmod(0o300)
    try:
        code, err = cli([run], capsys)
    finally:
        run.chmod(0o755)
    assert code == 2 and "cannot read" in one_line(err)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped"])
def test_a_corrupt_event_file_is_named_and_the_rest_is_shown(
    damage: str, run: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    bad = run / "events.out.tfevents.9.bad"
    good = next(run.glob("events.out.tfevents.*"))
    data = bytearray(good.read_bytes())
    if damage == "garbage":
        bad.write_bytes(bytes(range(256)) * 8)
    elif damage == "truncated":
        bad.write_bytes(bytes(data[: len(data) - 7]))
    else:
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="cnnfeat"):
        code, err = cli([run], capsys)
    assert code == 0, err
    assert "events.out.tfevents.9.bad" in caplog.text and "corrupt" in caplog.text, caplog.text
    assert "Training curves</h2><div class='figs'><svg" in (run / "report" / "index.html").read_text()


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object"), (b"\xff\xfe\x00", "not valid JSON")],
)
def test_a_status_json_that_is_not_a_json_object_is_ignored_with_a_warning(
    content: str | bytes, message: str, run: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    if isinstance(content, bytes):
        (run / "status.json").write_bytes(content)
    else:
        (run / "status.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="cnnfeat"):
        code, err = cli([run], capsys)
    assert code == 0, err
    assert "status.json" in caplog.text and message in caplog.text


def test_odd_values_in_status_and_events_are_shown_as_missing(run: Path, capsys: pytest.CaptureFixture) -> None:
    (run / "status.json").write_text(
        json.dumps({"status": "diverged", "metrics": {"val/acc": "nan", "train/acc": "high", "val/loss": [1]}})
    )
    (run / ".hydra" / "config.yaml").write_bytes(b"lr: \xff\xfe\n")
    with SummaryWriter(str(run)) as w:
        w.add_scalar("epoch", float("nan"), 99)
        w.add_scalar("train/acc", float("nan"), 99)
        w.add_scalar("epoch", 1e9, 100)  # an absurd epoch number must not make a billion-row table
        w.add_scalar("train/acc", 0.9, 100)
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=seed\n")  # the lecture table, by epoch
    code, err = cli([run], capsys)
    assert code == 0, err
    text = (run / "report" / "index.html").read_text()
    assert "<b>diverged</b>" in text and 'val/acc</td><td class="l">&ndash;' in text


def test_a_gif_or_a_logged_picture_that_is_not_an_image_is_skipped(
    run: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    (run / "umap_embedding.gif").write_text("not a gif")
    add_summary(run, Summary.Value(tag="cka/layers", image=Summary.Image(encoded_image_string=b"not a png")))
    (run / "events.out.tfevents.5.dir").mkdir()
    with caplog.at_level(logging.WARNING, logger="cnnfeat"):
        code, err = cli([run], capsys)
    assert code == 0, err
    assert "umap_embedding.gif: not a GIF" in caplog.text and "cka/layers" in caplog.text
    assert not (run / "report" / "assets" / "umap_embedding.gif").exists()
    assert not list((run / "report").rglob("*.png")), "no undecodable picture is copied"
