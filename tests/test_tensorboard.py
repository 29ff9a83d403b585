"""README's TensorBoard command serves every logged picture step, the untrained network (step 0) included.

TensorBoard's image plugin keeps 10 samples per tag unless told otherwise, which hid step 0 of a 15-epoch
run; the command README gives must show all of them. (``--samples_per_plugin images=0`` does not mean "all":
TensorBoard 2.21 then serves no image at all, so README asks for 1000.) The test runs that exact command on a
log shaped like the seed run's (pictures at steps 0..15, top patches every 5 epochs) and asks the HTTP API for
the steps.
"""

from __future__ import annotations

import json
import re
import shlex
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from tests.helpers.procs import Proc, wait_for

REPO = Path(__file__).resolve().parents[1]
STEPS = {
    "filters/conv1": list(range(16)),
    "feature_maps/conv2/relu/img22": list(range(16)),
    "umap/features": list(range(16)),
    "top_patches/conv3": [0, 5, 10, 15],
}


def readme_tensorboard_command() -> list[str]:
    """The ``tensorboard --logdir ...`` command of README's "Install and train" block, as arguments."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.strip().startswith("tensorboard --logdir"):
            return shlex.split(line.split("#")[0])
    raise AssertionError("README has no 'tensorboard --logdir' command")


def _fifteen_epoch_log(run_dir: Path) -> None:
    writer = SummaryWriter(str(run_dir))
    for tag, steps in STEPS.items():
        for step in steps:
            writer.add_image(tag, torch.full((3, 8, 8), step / 15), step)
    writer.close()


def _served_steps(args: list[str], logdir: Path) -> dict[str, list[int]]:
    """Start TensorBoard with ``args`` (``--logdir`` replaced), read each tag's steps, stop it."""
    i = args.index("--logdir")
    args = [*args[1 : i + 1], str(logdir), *args[i + 2 :], "--host", "127.0.0.1", "--port", "0"]
    tb = Proc("tensorboard.main", *args)
    try:
        line = tb.wait_for_line(lambda s: re.search(r"http://[\w.]+:(\d+)/", s) is not None, timeout=120)
        base = re.search(r"(http://[\w.]+:\d+)/", line).group(1)
        tags: dict = {}

        def loaded() -> bool:
            nonlocal tags
            try:
                with urllib.request.urlopen(f"{base}/data/plugin/images/tags", timeout=5) as r:
                    tags = json.loads(r.read())
            except OSError:
                return False
            return {t for run in tags.values() for t in run} >= set(STEPS)

        wait_for(loaded, 120, "TensorBoard to load every tag")
        run = next(iter(tags))
        out: dict[str, list[int]] = {}

        def last_steps_served() -> bool:  # loading finishes per tag; the newest step is always kept
            for tag in STEPS:
                query = urllib.parse.urlencode({"run": run, "tag": tag})
                with urllib.request.urlopen(f"{base}/data/plugin/images/images?{query}", timeout=10) as r:
                    out[tag] = sorted(e["step"] for e in json.loads(r.read()))
            return all(out[t] and out[t][-1] == STEPS[t][-1] for t in STEPS)

        wait_for(last_steps_served, 120, "TensorBoard to serve the last step of every tag")
        return out
    finally:
        tb.p.terminate()
        tb.wait(timeout=30)


def test_readme_command_serves_step_0_and_the_last_step_of_every_picture(tmp_path: Path) -> None:
    _fifteen_epoch_log(tmp_path / "run")
    command = readme_tensorboard_command()
    assert command[0] == "tensorboard" and "--samples_per_plugin" in command
    assert _served_steps(command, tmp_path) == STEPS, "every step of every picture, 0 and 15 included"


def test_without_the_flag_tensorboard_drops_steps(tmp_path: Path) -> None:
    """The reason for the flag: TensorBoard's default keeps 10 of the 16 steps."""
    _fifteen_epoch_log(tmp_path / "run")
    served = _served_steps(["tensorboard", "--logdir", "x"], tmp_path)
    assert len(served["filters/conv1"]) == 10 and served["top_patches/conv3"] == [0, 5, 10, 15]
