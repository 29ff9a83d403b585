"""The lecture's run as a plain PyTorch script, the way a user would write it: the baseline of whole_process.py.

Same data (the official gzip files, decoded with gzip + NumPy), same network, SGD lr 0.2 with MultiStepLR
[2,5,8,11,14] x0.5, batch 128, inputs in [0, 1]; after every epoch the 10k test set is evaluated (the
lecture's "valid" column, as ``experiment=seed`` does), and once more at the end. No Lightning, no Hydra.

    python benchmarks/plain_train.py --data ../shared/data/FashionMNIST/raw --epochs 15 [--channels-last]
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def load(raw: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16)
    with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    x = torch.from_numpy(images.copy()).view(-1, 1, 28, 28).float() / 255
    return x, torch.from_numpy(labels.copy()).long()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 16, 3, padding=1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 120), nn.Linear(120, 100), nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, fmt: torch.memory_format) -> tuple[float, float]:
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            out = net(x[i : i + 1000].contiguous(memory_format=fmt))
            loss += F.cross_entropy(out, y[i : i + 1000], reduction="sum").item()
            correct += (out.argmax(1) == y[i : i + 1000]).sum().item()
    net.train()
    return correct / len(x), loss / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args()
    start = time.perf_counter()
    torch.manual_seed(a.seed)
    xtr, ytr = load(a.data, "train")
    xte, yte = load(a.data, "t10k")
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    net = Net().to(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 5, 8, 11, 14], gamma=0.5)
    for epoch in range(a.epochs):
        perm = torch.randperm(len(xtr))
        correct, total_loss = 0, 0.0
        for i in range(0, len(xtr), 128):
            idx = perm[i : i + 128]
            out = net(xtr[idx].contiguous(memory_format=fmt))
            loss = F.cross_entropy(out, ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(idx)
            correct += (out.argmax(1) == ytr[idx]).sum().item()
        sched.step()
        acc, _ = evaluate(net, xte, yte, fmt)
        print(
            f">>> End epoch {epoch + 1}, train accuracy = {100 * correct / len(xtr):.2f}%, "
            f"train avgLoss = {total_loss / len(xtr):.4f} | valid accuracy = {100 * acc:.2f}%",
            flush=True,
        )
    acc, _ = evaluate(net, xte, yte, fmt)
    print(f"test accuracy {100 * acc:.2f}%  ({time.perf_counter() - start:.1f} s after imports)")


if __name__ == "__main__":
    main()
