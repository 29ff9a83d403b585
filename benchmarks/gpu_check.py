"""The GPU check behind ``benchmarks/gpu_check.sh``: gpu-marked tests, then the timed 15-epoch seed run.

Writes ``gpu_check.json`` and ``gpu_check.md`` (device, versions, test outcome, wall time, accuracy, time inside
the picture callbacks) to ``--out``. ``--dry-run`` checks the plumbing on a CPU (1 short epoch, no CUDA
asserts); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def device_info() -> dict[str, object]:
    info: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("pytorch_lightning", "torchvision", "hydra", "umap"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception as e:  # reported, not fatal: the run below would fail with the reason
            info[pkg] = f"missing ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def run_tests(out: Path, dry_run: bool) -> dict[str, object]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "tests/test_gpu.py", "-m", "gpu"]
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (out / "gpu_tests.log").write_text(r.stdout + r.stderr)
    summary = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    ok = r.returncode == 0 and (dry_run or ("passed" in summary and "skipped" not in summary))
    return {"returncode": r.returncode, "summary": summary, "ok": ok, "seconds": round(time.perf_counter() - start, 1)}


def seed_run(out: Path, dry_run: bool) -> dict[str, object]:
    run_dir = out / "seed_run"
    args = ["experiment=seed", f"hydra.run.dir={run_dir}", "callbacks.progress_log.every_s=10"]
    args += ["trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=20"] if dry_run else ["trainer=gpu"]
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cnnfeat.run.train", *args], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log = r.stdout + r.stderr
    (out / "seed_run.log").write_text(log)
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
    epochs = [float(m) for m in re.findall(r"End epoch \d+, train accuracy = ([\d.]+)%", log)]
    return {
        "returncode": r.returncode,
        "status": status.get("status"),
        "wall_s": round(wall, 1),
        "metrics": status.get("metrics", {}),
        "train_acc_per_epoch": epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu")
    parser.add_argument("--dry-run", action="store_true")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --dry-run to check the script on a CPU)")
    result = {"device": device_info(), "dry_run": a.dry_run, "tests": run_tests(a.out, a.dry_run)}
    result["seed_run"] = seed_run(a.out, a.dry_run)
    (a.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    d, t, s = result["device"], result["tests"], result["seed_run"]
    m = s["metrics"]
    lines = [
        f"# GPU check{' (DRY RUN on CPU: figures mean nothing)' if a.dry_run else ''}",
        "",
        f"- device: {d.get('gpu', 'CPU')} ({d.get('gpu_memory_gib', '?')} GiB), CUDA {d.get('cuda', '-')}, "
        f"torch {d['torch']}, Lightning {d['pytorch_lightning']}",
        f"- gpu-marked tests: {t['summary']} ({t['seconds']} s)",
        f"- experiment=seed, every picture: {s['status']} in {s['wall_s']} s (whole process), "
        f"test acc {100 * m.get('test/acc', float('nan')):.2f}%, last train acc "
        f"{s['train_acc_per_epoch'][-1] if s['train_acc_per_epoch'] else 'n/a'}%",
    ]
    (a.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if t["ok"] and s["status"] == "finished" else 1)


if __name__ == "__main__":
    main()
