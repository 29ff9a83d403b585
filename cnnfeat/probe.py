"""The fixed images every picture callback looks at: one typed object, built once per run from any DataModule.

A :class:`ProbeSet` holds the first ``n`` images of one split (IDs ``0 .. n-1``: positions in the split's
dataset; for cnnfeat's test split, the official test-set indices): ``images`` to show ((N, C, H, W) in
[0, 1]), ``inputs`` exactly as the model receives them in training, labels, class names, and optionally
``batch_inputs`` (what the DataModule's batches hold instead, e.g. cached frozen-backbone features).

:func:`probe_from_datamodule` builds one from any LightningDataModule (duck-typed: no Lightning import here):

- the split's dataset is the one behind ``<split>_dataloader()``; items are fetched and collated as that
  DataLoader does, then passed through the DataModule's ``on_before_batch_transfer`` and
  ``on_after_batch_transfer`` hooks, so ``inputs`` are what the model gets (cnnfeat's uint8 batches become
  floats in [0, 1] there);
- when the test split is not available (a DataModule that builds it only in ``setup("test")``), the
  validation split is used and ``ProbeSet.note`` says so;
- display images: the inverse of the one torchvision ``Normalize`` in the dataset's transform (through
  ``Subset``), or of the ``mean``/``std`` given; inputs that are not in [0, 1] after that are refused;
- class names: the dataset's ``classes`` (or the DataModule's), else the ``class_names`` given, else
  ``"0" .. "K-1"``.

A DataModule that knows better implements :class:`ProbeSource` (``probe_set(spec)``) and is asked instead,
as cnnfeat's frozen-feature DataModule does. Nothing here runs a collective: under DDP every process builds
the same probe from the same indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Subset

from cnnfeat.errors import ConfigError

#: Splits and the DataModule method that serves each.
LOADERS = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}
#: A probe holds at most this many images (the first ones of its split).
MAX_IMAGES = 10_000
_READ_BATCH = 1000


@dataclass(frozen=True)
class ProbeSpec:
    """Which probe a callback wants: the split and what cannot be detected (hashable: equal specs share a probe).

    ``mean``/``std``: per-channel values the inputs were normalised with (when the DataModule's transform has no
    torchvision ``Normalize`` to detect); ``class_names``: used when the dataset has no ``classes``.
    """

    split: str = "test"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    max_images: int = MAX_IMAGES

    def __post_init__(self) -> None:
        if self.split not in LOADERS:
            raise ConfigError(f"split must be one of {sorted(LOADERS)}, got {self.split!r}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError(f"give both mean and std (or neither), got mean={self.mean}, std={self.std}")
        if self.std is not None and (
            not self.std
            or len(self.std) != len(self.mean or ())
            or not all(math.isfinite(s) and s > 0 for s in self.std)
            or not all(math.isfinite(m) for m in self.mean or ())
        ):
            raise ConfigError(f"mean and std must be finite, of equal length, std > 0; got {self.mean}, {self.std}")
        if self.max_images < 1:
            raise ConfigError(f"max_images must be >= 1, got {self.max_images}")

    @classmethod
    def of(
        cls,
        split: str = "test",
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> ProbeSpec:
        """A spec from config values (lists or numbers)."""

        def floats(v: Sequence[float] | float | None) -> tuple[float, ...] | None:
            if v is None:
                return None
            return tuple(float(x) for x in v) if isinstance(v, Sequence) else (float(v),)

        names = tuple(str(n) for n in class_names) if class_names is not None else None
        return cls(split, floats(mean), floats(std), names)


@dataclass(frozen=True, eq=False)
class ProbeSet:
    """The first ``len(self)`` images of one split, as pictures and as model inputs (see the module docstring)."""

    images: torch.Tensor  # (N, C, H, W) float in [0, 1]: what pictures show
    inputs: torch.Tensor  # (N, ...) what the model receives for these images (its forward's input)
    labels: torch.Tensor  # (N,) int64
    class_names: tuple[str, ...]
    ids: torch.Tensor  # (N,) the images' indices in the split's dataset
    split: str
    split_size: int  # images in the whole split (len(self) is smaller when capped at max_images)
    batch_inputs: torch.Tensor | None = None  # what the DataModule's batches hold instead of inputs, if different
    note: str = ""  # what the builder had to decide (e.g. the validation split instead of test), said once
    _index: dict[int, int] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.images.ndim != 4 or not (len(self.images) == len(self.inputs) == len(self.labels) == n):
            raise ConfigError(
                f"probe tensors disagree: images {tuple(self.images.shape)} (need N, C, H, W), inputs "
                f"{tuple(self.inputs.shape)}, labels {tuple(self.labels.shape)}, ids {n}"
            )
        if self.batch_inputs is not None and len(self.batch_inputs) != n:
            raise ConfigError(f"batch_inputs has {len(self.batch_inputs)} rows for {n} probe images")
        self._index.update({int(i): p for p, i in enumerate(self.ids.tolist())})

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self) -> str:
        """``"the test split (10000 images)"`` or ``"the first 10000 of 55000 train images"``."""
        if len(self) < self.split_size:
            return f"the probe (the first {len(self)} of {self.split_size} {self.split} images)"
        return f"the {self.split} split ({self.split_size} images)"

    def positions(self, ids: Sequence[int] | torch.Tensor, what: str = "image_ids") -> torch.Tensor:
        """Positions of dataset IDs in this probe; IDs it does not hold raise a ``ConfigError`` naming them."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i not in self._index]
        if bad:
            raise ConfigError(
                f"{self.split} {what} {bad} out of range: the probe split has {len(self)} images "
                f"(valid IDs 0..{len(self) - 1})"
            )
        return torch.tensor([self._index[i] for i in ids], dtype=torch.long)

    def check_size(self, size: int | None, what: str = "probe_size") -> int:
        """``size`` (``None``: all probe images), refused with a clear message when the probe is smaller."""
        if size is None:
            return len(self)
        if size > len(self):
            raise ConfigError(f"{what}={size} is larger than {self.describe()}")
        return size

    def example_ids(self, count: int = 6) -> list[int]:
        """Probe IDs of the first image of each of the first ``count`` classes present (in class order)."""
        out = []
        for label in self.labels.unique().tolist()[:count]:
            out.append(int(self.ids[(self.labels == label).nonzero()[0, 0]]))
        return out

    def class_name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)


@runtime_checkable
class ProbeSource(Protocol):
    """A DataModule that builds its own probe (e.g. cached frozen features beside the images)."""

    def probe_set(self, spec: ProbeSpec) -> ProbeSet: ...


#: bytes of activations a batch of the probe may hold at once (float32); batches of big images are cut to fit, which
#: changes results only by float rounding (the analyses sum or merge over images); small images stay as asked
CAPTURE_BUDGET = 512 * 2**20


def fitting_batch(batch_size: int, bytes_per_image: int, budget: int | None = None) -> int:
    """``batch_size``, cut so that ``bytes_per_image`` x the batch stays within ``budget`` (default
    ``CAPTURE_BUDGET``; at least one image)."""
    budget = CAPTURE_BUDGET if budget is None else budget
    return max(1, min(batch_size, budget // max(bytes_per_image, 1)))


def batches(positions: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive chunks of ``positions``."""
    for start in range(0, len(positions), batch_size):
        yield positions[start : start + batch_size]


# -- building a probe from any DataModule -----------------------------------------------------------------
def unwrap(dataset: Any) -> Any:
    """The dataset under any ``Subset`` layers (``random_split`` returns them)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def find_normalize(dataset: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` of the one torchvision ``Normalize`` in the dataset's ``transform`` (through ``Subset``).

    ``None`` when there is none; more than one is ambiguous and raises a ``ConfigError``.
    """
    from torchvision import transforms
    from torchvision.transforms import v2

    found: list[Any] = []

    def walk(t: Any) -> None:
        if isinstance(t, (transforms.Normalize, v2.Normalize)):
            found.append(t)
        for child in getattr(t, "transforms", None) or []:  # Compose (v1 and v2), RandomApply, ...
            walk(child)

    walk(getattr(unwrap(dataset), "transform", None))
    if not found:
        return None
    if len(found) > 1:
        raise ConfigError(
            f"the dataset's transform has {len(found)} Normalize steps; give the callbacks mean=... std=... for the "
            "inputs as the model receives them"
        )
    t = found[0]
    return tuple(float(v) for v in torch.as_tensor(t.mean).flatten()), tuple(
        float(v) for v in torch.as_tensor(t.std).flatten()
    )


def dataset_classes(dataset: Any, datamodule: Any = None) -> tuple[str, ...] | None:
    """The ``classes`` of the dataset (through ``Subset``), else of the DataModule, else ``None``."""
    for owner in (unwrap(dataset), datamodule):
        names = getattr(owner, "classes", None)
        if isinstance(names, Sequence) and not isinstance(names, str) and len(names):
            return tuple(str(n) for n in names)
    return None


def _split_loader(datamodule: Any, split: str) -> tuple[DataLoader | None, str]:
    """The split's DataLoader, or ``None`` and why it is not available now."""
    try:
        loader = getattr(datamodule, LOADERS[split])()
    except Exception as e:  # not implemented, or the dataset is built in another stage's setup
        return None, f"{type(e).__name__}: {e}"
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if len(loader) else None
    if loader is None:
        return None, "it returned no DataLoader"
    if not isinstance(loader, DataLoader):
        raise ConfigError(f"{LOADERS[split]}() returned a {type(loader).__name__}; a probe needs a torch DataLoader")
    if len(loader.dataset) == 0:  # type: ignore[arg-type]
        return None, "its dataset is empty"
    return loader, ""


def _fetch(loader: DataLoader, ids: list[int]) -> Any:
    """A batch of dataset items as ``loader`` builds it (``__getitems__`` when the dataset has it, then collate)."""
    ds = loader.dataset
    getitems = getattr(ds, "__getitems__", None)
    items = getitems(ids) if callable(getitems) else [ds[i] for i in ids]
    return loader.collate_fn(items) if loader.collate_fn is not None else items


def _inputs_and_labels(batch: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(isinstance(b, torch.Tensor) for b in batch[:2]):
        return batch[0], batch[1]
    raise ConfigError(f"{where} must give (inputs, labels) batches of tensors, got {type(batch).__name__}")


def to_display(
    inputs: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None, where: str
) -> torch.Tensor:
    """Model inputs -> images in [0, 1]: undo ``(x - mean) / std``, or scale uint8; refuse anything else."""
    x = inputs
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ConfigError(f"{where}: a probe needs image inputs (N, C, H, W), got shape {tuple(inputs.shape)}")
    if not x.is_floating_point():
        return x.float() / (255.0 if x.dtype == torch.uint8 else 1.0)
    if mean is not None and std is not None:
        if len(mean) not in (1, x.shape[1]):
            raise ConfigError(f"{where}: mean/std have {len(mean)} values for {x.shape[1]} channels")
        shape = (1, len(mean), 1, 1)
        x = x.float() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
        return x.clamp_(0.0, 1.0)
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        raise ConfigError(
            f"{where}: the inputs lie in [{lo:.3g}, {hi:.3g}], not [0, 1], and the dataset's transform has no "
            "torchvision Normalize to undo; give the callbacks mean=[...] std=[...] (what the data is normalised "
            "with) so that pictures show the images"
        )
    return x


def probe_from_datamodule(datamodule: Any, spec: ProbeSpec, read_batch: int = _READ_BATCH) -> ProbeSet:
    """The first ``spec.max_images`` images of ``spec.split`` (see the module docstring); ``ProbeSource``s are asked."""
    if isinstance(datamodule, ProbeSource):
        return datamodule.probe_set(spec)
    split, note = spec.split, ""
    loader, why = _split_loader(datamodule, split)
    if loader is None and split == "test":
        loader, why_val = _split_loader(datamodule, "val")
        if loader is not None:
            note = (
                f"the test split is not available during fit ({why}); the picture callbacks use the validation "
                "split instead (its image IDs are positions in the validation set)"
            )
            split = "val"
        else:
            why = f"{why}; validation: {why_val}"
    if loader is None:
        raise ConfigError(f"{type(datamodule).__name__} has no {spec.split} split to draw probe images from ({why})")
    dm_name = type(datamodule).__name__
    where = f"{dm_name}.{LOADERS[split]}()"
    size = len(loader.dataset)  # type: ignore[arg-type]
    n = min(size, spec.max_images)
    hook_before: Callable[[Any, int], Any] = getattr(datamodule, "on_before_batch_transfer", lambda b, i: b)
    hook_after: Callable[[Any, int], Any] = getattr(datamodule, "on_after_batch_transfer", lambda b, i: b)
    xs, ys = [], []
    for start in range(0, n, read_batch):
        batch = _fetch(loader, list(range(start, min(start + read_batch, n))))
        x, y = _inputs_and_labels(hook_after(hook_before(batch, 0), 0), where)
        xs.append(x.cpu())
        ys.append(y.cpu())
    inputs, labels = torch.cat(xs), torch.cat(ys).long()
    if spec.mean is not None:
        mean, std = spec.mean, spec.std
    else:
        mean, std = find_normalize(loader.dataset) or (None, None)
    images = to_display(inputs, mean, std, where)
    names = dataset_classes(loader.dataset, datamodule) or spec.class_names
    if names is None:
        names = tuple(str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0))
    return ProbeSet(images, inputs, labels, names, torch.arange(n), split, size, note=note)


def probe_from_tensors(
    images: torch.Tensor,
    labels: torch.Tensor,
    split: str = "test",
    class_names: Sequence[str] | None = None,
    inputs: torch.Tensor | None = None,
) -> ProbeSet:
    """A probe from tensors in hand (images in [0, 1]; ``inputs`` default to the images), e.g. in a notebook."""
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(int(labels.max()) + 1))
    return ProbeSet(
        images,
        images if inputs is None else inputs,
        labels.long(),
        names,
        torch.arange(len(images)),
        split,
        len(images),
    )


def check_batch_inputs(model: torch.nn.Module, probe: ProbeSet, atol: float = 0.02) -> None:
    """Refuse a probe whose ``batch_inputs`` do not give the model's output for its ``inputs``.

    A frozen-feature cache built from another backbone than the model's would otherwise train and test the head
    on features the model's own backbone never computes, while the pictures show that backbone.
    Runs two images both ways (the caller sets eval mode and no_grad).
    """
    if probe.batch_inputs is None or not len(probe):
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    a = model(probe.inputs[:2].to(device)).float()
    b = model(probe.batch_inputs[:2].to(device)).float()
    err = float((a - b).abs().max() / a.abs().max().clamp(min=1e-6))
    if not err <= atol:
        raise ConfigError(
            f"the DataModule's batches (e.g. cached frozen-backbone features) do not give {type(model).__name__} the "
            f"output its own forward computes from the images (relative difference {err:.3g}): the cache was built "
            "with another backbone, weights or preprocessing than the model's. Give model and data the same backbone "
            "(experiment=transfer ties both to one node: backbone.weights=..., backbone.seed=..., "
            "backbone.input_size=...)"
        )
