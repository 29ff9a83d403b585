"""Loading an image folder: cnnfeat's ImageFolderDataModule against torchvision's ImageFolder + DataLoader.

Same folder, same transforms (grey/RGB conversion, ``Resize(S)`` + ``CenterCrop(S)``, float in [0, 1]), same
batch size and workers, shuffled, one full epoch per measurement with a fresh DataLoader (worker start-up
included for both). Pairs run back to back, the order alternating between repeats; medians of ``--repeats``.
Two folders are built here from real images:

- ``grey28``: Fashion-MNIST test images as 28x28 grey PNGs (tiny files: per-item overhead dominates);
- ``photos224``: JPEG crops (240-420 px) of scikit-learn's two sample photographs, read at 224x224 (decoding and
  resizing dominate).

Paths: ``streaming`` (cnnfeat decodes on access in the workers: ``in_memory=false``) and ``in memory``
(cnnfeat's decoded uint8 cache: ``in_memory=true``); torchvision decodes every epoch either way. cnnfeat's
batches are uint8 and become float on the device (here: ``on_after_batch_transfer`` on the CPU, timed), so both
sides end with the same float tensors. The one-off costs (scan, decode pass into the cache) are timed separately.
Results: benchmarks/results/image_folder_loading.{json,md}.

    python benchmarks/image_folder_loading.py                    # ~6 min on 2 cores
    python benchmarks/image_folder_loading.py --smoke            # proves it runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json, write_markdown

from cnnfeat.data import FashionMNISTDataModule, ImageFolderDataModule
from cnnfeat.data.fashion_mnist import CLASSES


def grey_folder(root: Path, n: int, data_dir: str | None) -> Path:
    """The first ``n`` Fashion-MNIST test images as grey PNGs, one folder per class."""
    fm = FashionMNISTDataModule(data_dir=data_dir, download=False)
    fm.prepare_data()
    fm.setup()
    ds = fm.dataset("test")
    for i in range(n):
        d = root / CLASSES[int(ds.labels[i])].replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i].numpy()).save(d / f"{i:05d}.png")
    return root


def photo_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEG crops (shorter side 240-420 px, aspect up to 1.5) of scikit-learn's sample photographs."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    for i in range(n):
        name, img = ("china", "flower")[i % 2], photos[i % 2]
        short = int(rng.integers(240, 421))
        long = min(int(short * rng.uniform(1.0, 1.5)), img.shape[1])
        h, w = (short, long) if i % 4 < 2 else (min(long, img.shape[0]), short)
        y0, x0 = int(rng.integers(0, img.shape[0] - h + 1)), int(rng.integers(0, img.shape[1] - w + 1))
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[y0 : y0 + h, x0 : x0 + w]).save(root / name / f"{i:05d}.jpg", quality=90)
    return root


def torchvision_epoch(root: Path, size: int, mode: str, batch: int, workers: int) -> tuple[float, int]:
    """Seconds and images of one shuffled epoch of torchvision's ImageFolder + DataLoader."""
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    ds = ImageFolder(str(root), transform=tf, loader=lambda p: Image.open(p).convert(mode))
    start = time.perf_counter()
    n = 0
    for x, _ in DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers):
        n += len(x)
    return time.perf_counter() - start, n


def cnnfeat_epoch(dm: ImageFolderDataModule) -> tuple[float, int]:
    """Seconds and images of one epoch of the DataModule's train loader (+ uint8 -> float), all images in train."""
    start = time.perf_counter()
    n = 0
    for batch in dm.train_dataloader():
        x, _ = dm.on_after_batch_transfer(batch, 0)
        n += len(x)
    return time.perf_counter() - start, n


def datamodule(root: Path, cache: Path, size: int, in_memory: bool, batch: int, workers: int) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(
        root=root,
        cache_dir=cache,
        image_size=size,
        in_memory=in_memory,
        batch_size=batch,
        num_workers=workers,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    dm.prepare_data()
    dm.setup()
    return dm


def one_off(root: Path, cache: Path, size: int, in_memory: bool, workers: int) -> dict[str, float]:
    """Seconds of a cold scan (+ detection) and of the decode pass, in a fresh cache."""
    t0 = time.perf_counter()
    dm = ImageFolderDataModule(root=root, cache_dir=cache, image_size=size, in_memory=in_memory, num_workers=workers)
    dm.scan()
    t1 = time.perf_counter()
    dm.prepare_data()
    t2 = time.perf_counter()
    return {"scan_s": t1 - t0, "decode_s": t2 - t1}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grey", type=int, default=10_000, help="Fashion-MNIST PNGs")
    p.add_argument("--photos", type=int, default=1_000, help="JPEG photo crops")
    p.add_argument("--workers", type=int, nargs="+", default=[2, 0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", default=os.environ.get("CNNFEAT_DATA"))
    p.add_argument("--smoke", action="store_true", help="small folders, 1 repeat")
    args = p.parse_args()
    if args.smoke:
        args.grey, args.photos, args.repeats, args.workers = 500, 60, 1, [2]
    # one thread in this process for both sides: on a shared 2-core machine a second OpenMP thread turns a 0.2 ms
    # batch conversion into 25 ms whenever the other core is busy (DataLoader workers use one thread each anyway)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="cnnfeat-imagefolder-"))
    try:
        measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args: argparse.Namespace, tmp: Path) -> None:
    """Build the folders under ``tmp``, time both loaders, write the results."""
    folders = {
        "grey28": (grey_folder(tmp / "grey28", args.grey, args.data_dir), 28, "L"),
        "photos224": (photo_folder(tmp / "photos224", args.photos), 224, "RGB"),
    }
    rows: list[dict[str, Any]] = []
    costs: dict[str, dict[str, float]] = {}
    for name, (root, size, mode) in folders.items():
        costs[f"{name} in memory"] = one_off(root, tmp / f"cold-{name}-mem", size, True, max(args.workers))
        costs[f"{name} streaming"] = one_off(root, tmp / f"cold-{name}-stream", size, False, max(args.workers))
        for workers in args.workers:
            for path, in_memory in (("streaming", False), ("in memory", True)):
                dm = datamodule(root, tmp / f"cache-{name}", size, in_memory, args.batch_size, workers)
                torchvision_epoch(root, size, mode, args.batch_size, workers)  # warm-up pair, untimed
                cnnfeat_epoch(dm)
                tv_s, ours_s = [], []
                for r in range(args.repeats):
                    order = ("tv", "ours") if r % 2 == 0 else ("ours", "tv")
                    for who in order:
                        if who == "tv":
                            s, n_tv = torchvision_epoch(root, size, mode, args.batch_size, workers)
                            tv_s.append(s)
                        else:
                            s, n_ours = cnnfeat_epoch(dm)
                            ours_s.append(s)
                    what = f"{name} {path} workers={workers} repeat {r}"
                    print(f"{what}: torchvision {tv_s[-1]:.2f} s, cnnfeat {ours_s[-1]:.2f} s", flush=True)
                assert n_tv == n_ours, (n_tv, n_ours)
                rows.append(
                    {
                        "folder": name,
                        "path": path,
                        "workers": workers,
                        "images": n_tv,
                        "torchvision_s": tv_s,
                        "cnnfeat_s": ours_s,
                        "torchvision_img_s": n_tv / median(tv_s),
                        "cnnfeat_img_s": n_ours / median(ours_s),
                        "speedup": median(tv_s) / median(ours_s),
                        "pair_speedups": [a / b for a, b in zip(tv_s, ours_s, strict=True)],
                    }
                )
    m = machine()
    if args.smoke:
        print(rows, costs)
        return
    write_json("image_folder_loading", {"machine": m, "args": vars(args), "rows": rows, "one_off": costs})
    lines = [
        "# Loading an image folder: cnnfeat vs torchvision ImageFolder + DataLoader",
        "",
        "One shuffled epoch over every image, same transforms (grey/RGB, Resize + CenterCrop, float in [0, 1]), "
        f"batch {args.batch_size}, same workers; one untimed warm-up pair, then back-to-back pairs (order "
        f"alternating), median of {args.repeats} repeat(s) "
        "(`python benchmarks/image_folder_loading.py`).",
        "",
        "| folder | cnnfeat path | workers | images | torchvision img/s | cnnfeat img/s | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['folder']} | {r['path']} | {r['workers']} | {r['images']:,} | {r['torchvision_img_s']:,.0f} | "
            f"{r['cnnfeat_img_s']:,.0f} | {r['speedup']:.2f}x |"
        )
    lines += [
        "",
        "One-off, cold cache (scan: every file's header; decode: every image once, proving it decodes and taking the "
        "pixel sums; the in-memory path also writes the uint8 cache):",
        "",
        "| folder, path | scan | decode pass |",
        "|---|---:|---:|",
        *(f"| {k} | {v['scan_s']:.1f} s | {v['decode_s']:.1f} s |" for k, v in costs.items()),
        "",
        f"grey28: {args.grey:,} Fashion-MNIST test images as 28x28 grey PNGs; photos224: {args.photos:,} JPEG crops "
        "(quality 90, shorter side 240-420 px) of scikit-learn's sample photographs, read at 224x224 RGB. Speed-up = "
        "median torchvision epoch / median cnnfeat epoch. cnnfeat's in-memory path batches in the main process (one "
        "indexing op per batch; its workers would only run augmentation); the workers column is torchvision's there.",
        f"{m['machine']} CPU ({m['cpu_count']} cores, shared with other work while this ran), 1 torch thread in the "
        f"main process, torch {m['torch']}.",
    ]
    write_markdown("image_folder_loading", lines)


if __name__ == "__main__":
    main()
