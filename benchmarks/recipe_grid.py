"""Which batch size and input scaling match the lecture? The recipe in a plain loop, one configuration per run.

The lecture gives the network, SGD lr 0.2 and MultiStepLR [2,5,8,11,14] x0.5 for 15 epochs, but neither the
batch size nor the input scaling. This script trains that recipe on all 60k training images (validation on
the 10k test set, as the lecture's "valid" column) and prints one JSON line per run: per epoch
(epoch, train acc %, train loss, test acc %, test loss). The README's comparison table comes from
benchmarks/results/recipe_grid.jsonl, made with

    for bs in 64 128 256; do for norm in std unit; do for seed in 0 1 2; do
        python benchmarks/recipe_grid.py $norm $bs $seed >> benchmarks/results/recipe_grid.jsonl; done; done; done

(not every combination was run to the end; the file holds those that were). One thread per run, so two
runs can share a 2-core machine.
"""

from __future__ import annotations

import gzip
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn

RAW = os.path.join(os.environ.get("CNNFEAT_DATA", "../shared/data"), "FashionMNIST", "raw")


def load(name: str, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    with gzip.open(os.path.join(RAW, name)) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset).reshape(shape)


def net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(784, 120),
        nn.ReLU(),
        nn.Linear(120, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def main() -> None:
    norm, bs, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])  # norm: std (mean/std) or unit ([0, 1])
    torch.set_num_threads(1)
    x = torch.from_numpy(load("train-images-idx3-ubyte.gz", 16, (-1, 1, 28, 28)).copy())
    y = torch.from_numpy(load("train-labels-idx1-ubyte.gz", 8, (-1,)).astype(np.int64))
    xt = torch.from_numpy(load("t10k-images-idx3-ubyte.gz", 16, (-1, 1, 28, 28)).copy())
    yt = torch.from_numpy(load("t10k-labels-idx1-ubyte.gz", 8, (-1,)).astype(np.int64))

    def prep(b: torch.Tensor) -> torch.Tensor:
        b = b.float().div_(255)
        if norm == "std":
            b = (b - 0.2860) / 0.3530
        return b.contiguous(memory_format=torch.channels_last)

    torch.manual_seed(seed)
    model = net().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 5, 8, 11, 14], 0.5)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for epoch in range(15):
        model.train()
        perm = torch.randperm(60000, generator=gen)
        correct, total_loss = 0, 0.0
        for i in range(0, 60000, bs):
            idx = perm[i : i + bs]
            out = model(prep(x[idx]))
            loss = loss_fn(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += (out.argmax(1) == y[idx]).sum().item()
            total_loss += loss.item() * len(idx)
        sched.step()
        model.eval()
        with torch.no_grad():
            out = torch.cat([model(prep(xt[i : i + 1000])) for i in range(0, 10000, 1000)])
        rows.append(
            (
                epoch + 1,
                correct / 600,
                total_loss / 60000,
                (out.argmax(1) == yt).float().mean().item() * 100,
                loss_fn(out, yt).item(),
            )
        )
    print(json.dumps({"norm": norm, "bs": bs, "seed": seed, "rows": rows}), flush=True)


if __name__ == "__main__":
    main()
