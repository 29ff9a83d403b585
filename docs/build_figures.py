"""Assemble the README pictures from the PNGs of a run made with ``save_png=true``.

cnnfeat-train experiment=seed save_png=true hydra.run.dir=outputs/runs/seed_docs
python docs/build_figures.py outputs/runs/seed_docs
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnfeat import viz

DOCS = Path(__file__).resolve().parent


def load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def vstack(images: list[torch.Tensor], gap: int = 8) -> torch.Tensor:
    w = max(i.shape[2] for i in images)
    out = torch.ones(3, sum(i.shape[1] for i in images) + gap * (len(images) - 1), w)
    y = 0
    for i in images:
        out[:, y : y + i.shape[1], : i.shape[2]] = i
        y += i.shape[1] + gap
    return out


def save(image: torch.Tensor, name: str) -> None:
    viz.save_png(image, DOCS / name)
    print(DOCS / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--last", type=int, default=15, help="the last epoch of the run")
    args = p.parse_args()
    img = args.run_dir / "images"
    last = f"step_{args.last:03d}.png"

    filters = [
        viz.caption(load(img / "filters" / layer / step), f"{layer}, {when}")
        for layer in ("conv1", "conv2")
        for step, when in (("step_000.png", "untrained"), (last, "trained"))
    ]
    save(viz.hstack(filters, gap=16), "filters.png")

    rows = []
    for image_id in (22, 193, 1087):
        parts = [viz.caption(load(img / "feature_maps" / "input" / f"img{image_id}" / last), "")]
        for layer in ("conv1", "conv2"):
            for kind, label in (("conv", "before ReLU"), ("relu", "after ReLU")):
                parts.append(
                    viz.caption(load(img / "feature_maps" / layer / kind / f"img{image_id}" / last), f"{layer} {label}")
                )
        rows.append(viz.hstack(parts, gap=10))
    save(vstack(rows, gap=12), "feature_maps.png")

    save(
        viz.hstack(
            [
                viz.caption(load(img / "top_patches" / layer / last), f"{layer}: top 8 patches per channel")
                for layer in ("conv2", "conv3")
            ],
            gap=16,
        ),
        "top_patches.png",
    )

    umap_frames = [load(img / "umap" / "pixels" / "step_000.png")] + [
        load(img / "umap" / "features" / f"step_{s:03d}.png") for s in (0, 1, args.last)
    ]
    save(vstack([viz.hstack(umap_frames[:2]), viz.hstack(umap_frames[2:])]), "umap.png")
    shutil.copy(args.run_dir / "umap_embedding.gif", DOCS / "umap_embedding.gif")
    print(DOCS / "umap_embedding.gif")

    # issue 24: where the network looks (one image over the epochs, and the others at the end), which units matter
    strips = [
        viz.caption(load(img / "attribution" / "img312" / f"step_{s:03d}.png"), label)
        for s, label in ((0, "untrained"), (1, "after epoch 1"), (5, "after epoch 5"), (args.last, "trained"))
    ]
    strips += [load(img / "attribution" / f"img{i}" / last) for i in (22, 193, 36, 1087, 74)]
    save(vstack(strips, gap=10), "attribution.png")
    save(load(img / "relevance" / "refs" / "conv3" / last), "relevance_conv3.png")


if __name__ == "__main__":
    main()
