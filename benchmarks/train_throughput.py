"""Training throughput: cnnfeat's Trainer.fit path against plain PyTorch loops, in one process.

Variants, all training the lecture's SmallCNN with SGD for the same number of steps on the same data:
  plain        a plain loop slicing in-memory float tensors (NCHW): the obvious hand-written baseline
  plain_cl     the same loop with channels_last (what cnnfeat's model does by default)
  torchvision  a loop over torchvision's FashionMNIST + ToTensor DataLoader (per-image PIL work)
  cnnfeat      Trainer.fit from the composed Hydra config (callbacks=none, TensorBoard logger, Rich bar)
Images/s are measured after a warm-up, over the timed steps only. Variants run round-robin ``--repeats``
times and the median is reported. Results go to benchmarks/results/train_throughput.{json,md}.

    python benchmarks/train_throughput.py --batch-sizes 128 64 --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.datasets import FashionMNIST
from torchvision.transforms import ToTensor

from cnnfeat.data.fashion_mnist import FashionMNISTDataModule, to_float

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose_config

from cnnfeat.models import SmallCNN
from cnnfeat.run.train import build

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP = 20


def _sgd_steps(model: SmallCNN, batches, steps: int, device: torch.device) -> float:
    """Run WARMUP + steps SGD steps over ``batches`` (an iterator of (x, y)); return timed images/s."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    model.train()
    n, t0 = 0, 0.0
    for i in range(WARMUP + steps):
        if i == WARMUP:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= WARMUP:
            n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _slices(x: torch.Tensor, y: torch.Tensor, bs: int):
    """Endless shuffled batches by slicing in-memory tensors, the way a plain loop does it."""
    while True:
        perm = torch.randperm(len(y), device=y.device)
        for i in range(0, len(y) - bs + 1, bs):
            idx = perm[i : i + bs]
            yield x[idx], y[idx]


def plain(dm: FashionMNISTDataModule, bs: int, steps: int, device: torch.device, channels_last: bool) -> float:
    ds = dm.dataset("train")
    x = to_float(ds.images[ds.image_ids]).to(device)  # float [0,1], NCHW
    y = ds.labels[ds.image_ids].to(device)
    torch.manual_seed(0)
    model = SmallCNN(channels_last=channels_last).to(device)
    return _sgd_steps(model, _slices(x, y, bs), steps, device)


def torchvision_loop(root: Path, bs: int, steps: int, device: torch.device) -> float:
    ds = FashionMNIST(root, train=True, download=True, transform=ToTensor())
    loader = DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True)

    def endless():
        while True:
            yield from loader

    torch.manual_seed(0)
    model = SmallCNN(channels_last=False).to(device)
    return _sgd_steps(model, endless(), steps, device)


class _Timer(pl.Callback):
    """Images/s between the end of warm-up and the end of training."""

    def __init__(self) -> None:
        self.t0, self.n = 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        if trainer.global_step >= WARMUP:
            self.n += len(batch[1])

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.rate = self.n / (time.perf_counter() - self.t0)


def cnnfeat_fit(data_dir: str, cache_dir: str, bs: int, steps: int, accelerator: str, out: Path) -> float:
    overrides = [
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        f"data.batch_size={bs}",
        "callbacks=none",
        f"trainer.accelerator={accelerator}",
        f"trainer.max_steps={WARMUP + steps}",
        "trainer.max_epochs=-1",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
        "test=false",
    ]
    if accelerator == "gpu":
        overrides.append("trainer.precision=16-mixed")
    dm, model, trainer = build(compose_config(overrides, out))
    timer = _Timer()
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=dm)
    return timer.rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 64])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--data-dir", default=os.environ.get("CNNFEAT_DATA"))
    p.add_argument("--tag", default="", help="suffix for the results file (e.g. gpu)")
    args = p.parse_args()

    device = torch.device(args.device)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="cnnfeat-bench-"))
    cache = tmp / "cache"
    dm = FashionMNISTDataModule(data_dir=args.data_dir, cache_dir=cache, download=False)
    dm.prepare_data()
    dm.setup()
    # torchvision needs a writable root holding FashionMNIST/raw/*.gz (it extracts next to them)
    tv_root = tmp / "tv"
    shutil.copytree(Path(dm.source_files()["t10k-images-idx3-ubyte"]).parent, tv_root / "FashionMNIST" / "raw")

    variants = {
        "plain": lambda bs: plain(dm, bs, args.steps, device, channels_last=False),
        "plain_cl": lambda bs: plain(dm, bs, args.steps, device, channels_last=True),
        "torchvision": lambda bs: torchvision_loop(tv_root, bs, args.steps, device),
        "cnnfeat": lambda bs: cnnfeat_fit(args.data_dir, str(cache), bs, args.steps, accelerator, tmp / "run"),
    }
    results: dict[str, dict[str, list[float]]] = {}
    for bs in args.batch_sizes:
        runs: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(args.repeats):
            for name, fn in variants.items():
                runs[name].append(fn(bs))
                print(f"bs={bs} repeat={r} {name}: {runs[name][-1]:,.0f} img/s", flush=True)
        results[str(bs)] = runs

    rows = []
    for bs, runs in results.items():
        med = {k: statistics.median(v) for k, v in runs.items()}
        rows.append(
            {
                "batch_size": int(bs),
                **{f"{k}_img_s": round(v) for k, v in med.items()},
                "cnnfeat_over_plain": round(med["cnnfeat"] / med["plain"], 2),
                "cnnfeat_over_plain_cl": round(med["cnnfeat"] / med["plain_cl"], 2),
                "cnnfeat_over_torchvision": round(med["cnnfeat"] / med["torchvision"], 2),
            }
        )
    meta = {
        "device": args.device,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "steps": args.steps,
        "warmup": WARMUP,
        "repeats": args.repeats,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = "train_throughput" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "raw": results}, indent=2))
    md = [
        "| batch | plain loop | plain + channels_last | torchvision ToTensor loop | cnnfeat Trainer.fit "
        "| cnnfeat / plain | cnnfeat / plain+cl | cnnfeat / torchvision |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        md.append(
            f"| {r['batch_size']} | {r['plain_img_s']:,} | {r['plain_cl_img_s']:,} | "
            f"{r['torchvision_img_s']:,} | {r['cnnfeat_img_s']:,} | {r['cnnfeat_over_plain']}x | "
            f"{r['cnnfeat_over_plain_cl']}x | {r['cnnfeat_over_torchvision']}x |"
        )
    md.append(
        f"\nimages/s, median of {args.repeats}; {args.steps} timed steps after {WARMUP} warm-up; "
        f"{meta['device']} ({meta['gpu'] or meta['machine']}, {meta['threads']} threads), "
        f"torch {meta['torch']}, Lightning {meta['lightning']}"
    )
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
