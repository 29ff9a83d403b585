"""The probe contract on small in-memory DataModules: display space, class names, the split fallback, errors."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from cnnfeat.errors import ConfigError
from cnnfeat.probe import ProbeSpec, probe_from_datamodule

RAW = torch.rand(20, 1, 6, 6, generator=torch.Generator().manual_seed(0))  # images in [0, 1]
LABELS = torch.arange(20) % 4


class Images(Dataset):
    """Images through a torchvision transform, as torchvision datasets apply theirs."""

    def __init__(self, transform: transforms.Compose | None = None, classes: list[str] | None = None) -> None:
        self.transform = transform
        if classes is not None:
            self.classes = classes

    def __len__(self) -> int:
        return len(RAW)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = RAW[i]
        return (self.transform(x) if self.transform else x), int(LABELS[i])


class DM(pl.LightningDataModule):
    """Train/val/test from one dataset; ``test=False`` leaves the test split to ``setup("test")``."""

    def __init__(self, dataset: Dataset, test: bool = True, val: bool = True, classes: list[str] | None = None):
        super().__init__()
        self.ds, self.test, self.val = dataset, test, val
        if classes is not None:
            self.classes = classes

    def val_dataloader(self) -> DataLoader:
        if not self.val:
            raise AttributeError("'DM' object has no attribute 'ds_val'")
        return DataLoader(Subset(self.ds, range(10, 20)), batch_size=4)

    def test_dataloader(self) -> DataLoader:
        if not self.test:
            raise AttributeError("'DM' object has no attribute 'ds_test'")
        return DataLoader(self.ds, batch_size=4)


NORMALISED = transforms.Compose([transforms.Normalize((0.3,), (0.2,))])


def test_normalize_is_undone_and_inputs_are_what_the_model_gets() -> None:
    probe = probe_from_datamodule(DM(Images(NORMALISED)), ProbeSpec())
    assert torch.allclose(probe.inputs, (RAW - 0.3) / 0.2) and torch.allclose(probe.images, RAW, atol=1e-6)
    assert torch.equal(probe.labels, LABELS) and torch.equal(probe.ids, torch.arange(20))
    assert probe.class_names == ("0", "1", "2", "3") and probe.split == "test" and not probe.note


def test_explicit_mean_and_std_and_unknown_scaling_is_refused() -> None:
    unknown = transforms.Compose([transforms.Lambda(lambda x: (x - 0.3) / 0.2)])
    with pytest.raises(
        ConfigError,
        match=r"DM.test_dataloader\(\): the inputs lie in \[-1.49, 3.5\], not \[0, 1\].*give the callbacks mean=",
    ):
        probe_from_datamodule(DM(Images(unknown)), ProbeSpec())
    probe = probe_from_datamodule(DM(Images(unknown)), ProbeSpec.of(mean=0.3, std=[0.2]))
    assert torch.allclose(probe.images, RAW, atol=1e-6)
    two = transforms.Compose([NORMALISED, transforms.Normalize((0.0,), (2.0,))])
    with pytest.raises(ConfigError, match=r"2 Normalize steps; give the callbacks mean=\.\.\. std=\.\.\."):
        probe_from_datamodule(DM(Images(two)), ProbeSpec())


def test_class_names_from_the_dataset_else_the_datamodule_else_config_else_indices() -> None:
    names = ["a", "b", "c", "d"]
    assert probe_from_datamodule(DM(Images(classes=names)), ProbeSpec()).class_names == tuple(names)
    assert probe_from_datamodule(DM(Images(), classes=names), ProbeSpec()).class_names == tuple(names)
    assert probe_from_datamodule(DM(Images()), ProbeSpec.of(class_names=names)).class_names == tuple(names)


def test_without_a_test_split_the_validation_split_is_used_and_said() -> None:
    probe = probe_from_datamodule(DM(Images(), test=False), ProbeSpec())
    assert probe.split == "val" and len(probe) == 10 and torch.equal(probe.images, RAW[10:])
    assert probe.note.startswith("the test split is not available during fit (AttributeError: 'DM' object has no")
    with pytest.raises(ConfigError, match=r"DM has no test split .*ds_test.*; validation: AttributeError.*ds_val"):
        probe_from_datamodule(DM(Images(), test=False, val=False), ProbeSpec())
    with pytest.raises(ConfigError, match=r"DM has no val split"):
        probe_from_datamodule(DM(Images(), val=False), ProbeSpec("val"))


def test_probe_size_ids_and_spec_errors_name_the_values() -> None:
    probe = probe_from_datamodule(DM(Images()), ProbeSpec(max_images=8))
    assert len(probe) == 8 and probe.split_size == 20
    with pytest.raises(ConfigError, match=r"probe_size=9 is larger than the probe \(the first 8 of 20 test images\)"):
        probe.check_size(9)
    with pytest.raises(ConfigError, match=r"test image_ids \[8, -1\] out of range: .* \(valid IDs 0..7\)"):
        probe.positions([3, 8, -1])
    with pytest.raises(ConfigError, match=r"split must be one of \['test', 'train', 'val'\], got 'dev'"):
        ProbeSpec("dev")
    with pytest.raises(ConfigError, match=r"give both mean and std"):
        ProbeSpec.of(mean=0.5)
    with pytest.raises(ConfigError, match=r"std > 0"):
        ProbeSpec.of(mean=0.5, std=0.0)
