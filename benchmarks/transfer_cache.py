"""The frozen-feature cache of the transfer classifier: one-off extraction cost and what it saves per epoch.

1. Extraction: every image of both splits (70k by default) through the frozen AlexNet part, timed, into
   ``--cache-dir`` (a fresh temporary directory unless given; an existing cache would be reused).
2. Head training steps (batch 128) on cached vectors vs the same steps recomputing the backbone from
   images, for the default head (AlexNet's 4096-4096 classifier) and a small one; per-epoch times are
   the measured step time x the steps of a 55,000-image epoch.
Weights are random (``weights=none``): the compute does not depend on them, and ImageNet weights cannot be
downloaded here. Results: benchmarks/results/transfer_cache.{json,md}.

    python benchmarks/transfer_cache.py [--max-images 70000] [--steps 20]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json, write_markdown

from cnnfeat.data.feature_cache import FrozenFeatureDataModule
from cnnfeat.models import FrozenAlexNet, TransferClassifier

EPOCH_IMAGES = 55_000


def step_seconds(model: TransferClassifier, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean seconds of an SGD step of the head over ``batches`` (after one warm-up step)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    times = []
    for x, y in batches:
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return sum(times[1:]) / max(len(times) - 1, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-images", type=int, default=None, help="per split (default: all 60k + 10k)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=os.environ.get("CNNFEAT_DATA"))
    args = p.parse_args()
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="cnnfeat-transfer-"))

    dm = FrozenFeatureDataModule(
        FrozenAlexNet("none"), data_dir=args.data_dir, cache_dir=cache, max_images=args.max_images, download=False
    )
    dm.images_dm.prepare_data()
    existed = all(dm.cache_file(s).is_file() for s in ("train", "test"))
    t = time.perf_counter()
    dm.prepare_data()
    extract_s = time.perf_counter() - t
    dm.setup()
    n_extracted = len(dm.dataset("train").features) + len(dm.dataset("test").features)
    size_mb = sum(dm.cache_file(s).stat().st_size for s in ("train", "test")) / 2**20
    print(f"extraction: {n_extracted} images in {extract_s:.0f} s ({'reused' if existed else 'computed'})", flush=True)

    rows = []
    bs = 128
    ids = [list(range(i * bs, (i + 1) * bs)) for i in range(args.steps)]
    for hidden in ([4096, 4096], [512]):
        torch.manual_seed(0)
        model = TransferClassifier(weights="none", hidden=hidden)
        cached = [dm.dataset("train").__getitems__(b) for b in ids]
        cached = [(x.float(), y) for x, y in cached]
        images = [dm.images("train", b) for b in ids]
        t_cached = step_seconds(model, cached)
        t_images = step_seconds(model, images)
        steps = math.ceil(EPOCH_IMAGES / bs)
        rows.append(
            {
                "head": hidden,
                "cached_step_s": t_cached,
                "images_step_s": t_images,
                "cached_epoch_s": t_cached * steps,
                "images_epoch_s": t_images * steps,
                "speedup": t_images / t_cached,
            }
        )
        print(
            f"head {hidden}: epoch {t_cached * steps:.0f} s cached vs {t_images * steps:.0f} s recomputing "
            f"({t_images / t_cached:.1f}x)",
            flush=True,
        )

    m = machine()
    md = [
        f"One-off extraction: {n_extracted:,} images in {extract_s:.0f} s ({n_extracted / extract_s:.0f} images/s"
        f"{', reused an existing cache' if existed else ''}), {size_mb:.0f} MB on disk (float16).",
        "",
        "| head | epoch on cached features | epoch recomputing the backbone | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {'-'.join(map(str, r['head']))} | {r['cached_epoch_s']:.0f} s | {r['images_epoch_s']:.0f} s | "
            f"{r['speedup']:.1f}x |"
        )
    md.append(
        f"\nEpoch = {EPOCH_IMAGES:,} images at batch {bs}, from {args.steps} timed steps; {m['machine']} CPU, "
        f"{m['threads']} threads, torch {m['torch']}; random frozen weights (same compute as ImageNet's)."
    )
    write_markdown("transfer_cache", md, echo=False)
    write_json(
        "transfer_cache",
        {
            "meta": m,
            "extract_seconds": extract_s,
            "images": n_extracted,
            "cache_mb": size_mb,
            "reused": existed,
            "rows": rows,
        },
    )
    print("\n".join(md))


if __name__ == "__main__":
    main()
