"""Hostile constructor arguments of every callback: each is refused with a ConfigError that names the argument,
in ``__init__`` where the value alone is wrong, in ``prepare`` (``setup``) where the model or the probe decides."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from cnnfeat.callbacks import (
    AtlasCallback,
    CrossModelCKACallback,
    DeadReluCallback,
    DivergenceGuard,
    EmbeddingCallback,
    FeatureMapCallback,
    FeatureVisCallback,
    FilterCallback,
    ProgressLog,
    RelevanceCallback,
    RepresentationCallback,
    TopPatchesCallback,
)
from cnnfeat.errors import ConfigError
from cnnfeat.models import SmallCNN
from cnnfeat.probe import probe_from_tensors

CASES: list[tuple[Callable[..., Any], dict[str, Any], str]] = [
    # counts: zero, negative, bool, float, string, huge
    (FilterCallback, {"every_n_epochs": 0}, r"every_n_epochs must be an integer >= 1, got 0"),
    (FilterCallback, {"every_n_epochs": True}, r"every_n_epochs must be an integer >= 1, got True"),
    (FilterCallback, {"max_filters": True}, r"max_filters must be an integer >= 1 or null, got True"),
    (FilterCallback, {"per_filter_grids": 1.5}, r"per_filter_grids must be an integer >= 0, got 1.5"),
    (FilterCallback, {"min_cell": 0}, r"min_cell must be an integer >= 1, got 0"),
    (FeatureMapCallback, {"nrow": 0}, r"nrow must be an integer >= 1, got 0"),
    (FeatureMapCallback, {"min_cell": "big"}, r"min_cell must be an integer >= 1, got 'big'"),
    (DeadReluCallback, {"probe_size": 2.5}, r"probe_size must be an integer >= 1, got 2.5"),
    (DeadReluCallback, {"hist_samples": -1}, r"hist_samples must be an integer >= 0, got -1"),
    (DeadReluCallback, {"batch_size": "256"}, r"batch_size must be an integer >= 1, got '256'"),
    (TopPatchesCallback, {"top_k": True}, r"top_k must be an integer >= 1, got True"),
    (TopPatchesCallback, {"top_k": 10**9}, r"top_k=1000000000 is more than a probe holds \(10000 images\)"),
    (TopPatchesCallback, {"max_channels": 0}, r"max_channels must be an integer >= 1, got 0"),
    (TopPatchesCallback, {"probe_size": -3}, r"probe_size must be an integer >= 1 or null, got -3"),
    (TopPatchesCallback, {"min_cell": 50, "max_cell": 40}, r"max_cell \(40\) must be >= min_cell \(50\)"),
    (EmbeddingCallback, {"probe_size": "2000"}, r"probe_size must be an integer >= 1, got '2000'"),
    (EmbeddingCallback, {"n_neighbors": 1}, r"n_neighbors must be an integer >= 2, got 1"),
    (EmbeddingCallback, {"knn_k": 0}, r"knn_k must be an integer >= 1, got 0"),
    (EmbeddingCallback, {"cv_folds": 1}, r"cv_folds must be an integer >= 2, got 1"),
    (EmbeddingCallback, {"gif_frame_ms": 0}, r"gif_frame_ms must be an integer >= 1, got 0"),
    (RepresentationCallback, {"seed": -1}, r"seed must be an integer >= 0, got -1"),
    (AtlasCallback, {"top_k": 10**9}, r"top_k=1000000000 is more than a probe holds \(10000 images\)"),
    (AtlasCallback, {"class_top": 0}, r"class_top must be an integer >= 1, got 0"),
    (AtlasCallback, {"featviz_workers": 0}, r"featviz_workers must be an integer >= 1 or 'auto', got 0"),
    (FeatureVisCallback, {"workers": 1.5}, r"workers must be an integer >= 1 or 'auto', got 1.5"),
    (RelevanceCallback, {"workers": "two"}, r"workers must be an integer >= 1 or 'auto', got 'two'"),
    (FeatureVisCallback, {"probe_size": True}, r"probe_size must be >= 1 or null, got True"),
    (DivergenceGuard, {"check_every_n_steps": 0.5}, r"check_every_n_steps must be an integer >= 1, got 0.5"),
    # numbers: NaN, infinity, bool, out of range
    (EmbeddingCallback, {"min_dist": math.nan}, r"min_dist must be a finite number >= 0, got nan"),
    (EmbeddingCallback, {"axis_limit": math.inf}, r"axis_limit must be a finite number > 0, got inf"),
    (RepresentationCallback, {"probe_l2": True}, r"probe_l2 must be a positive number, got True"),
    (RepresentationCallback, {"probe_train_fraction": math.nan}, r"probe_train_fraction must be in \(0, 1\), got nan"),
    (RepresentationCallback, {"probe_train_fraction": "half"}, r"probe_train_fraction must be in \(0, 1\), got 'half'"),
    (ProgressLog, {"every_s": math.nan}, r"every_s must be a finite number > 0, got nan"),
    # switches: a string is not a bool ("false" would be true)
    (FilterCallback, {"rgb": "false"}, r"rgb must be true or false, got 'false'"),
    (FilterCallback, {"log_untrained": "no"}, r"log_untrained must be true or false, got 'no'"),
    (RepresentationCallback, {"cka": "yes"}, r"cka must be true or false, got 'yes'"),
    (EmbeddingCallback, {"gif": 1}, r"gif must be true or false, got 1"),
    # lists: a bare string, empty, duplicates, not names
    (FilterCallback, {"layers": "conv1"}, r"layers must be a list of names, got 'conv1'"),
    (FilterCallback, {"layers": []}, r"layers is empty: give at least one name"),
    (FilterCallback, {"layers": ["conv1", "conv2", "conv1"]}, r"layers lists \['conv1'\] more than once"),
    (FeatureMapCallback, {"layers": ["conv1", 2]}, r"layers must hold names \(strings\), got \[2\]"),
    (DeadReluCallback, {"layers": []}, r"layers is empty: give at least one name \(or null for the default\)"),
    (TopPatchesCallback, {"layers": ("conv2", "conv2")}, r"layers lists \['conv2'\] more than once"),
    (RepresentationCallback, {"layers": ["relu1", "relu1"]}, r"layers lists \['relu1'\] more than once"),
    (CrossModelCKACallback, {"reference_layers": []}, r"reference_layers is empty"),
    (AtlasCallback, {"layers": ["conv1", "conv1"]}, r"layers lists \['conv1'\] more than once"),
    (FeatureVisCallback, {"layers": "conv1"}, r"layers must be a list of names, got 'conv1'"),
    (EmbeddingCallback, {"layer": ""}, r"layer must be a node name or null, got ''"),
    (FilterCallback, {"layers": None}, r"layers must be a list of names, got None"),
    (FeatureMapCallback, {"class_names": "TShirt"}, r"class_names must be a list of names, got 'TShirt'"),
    (FeatureMapCallback, {"mean": "0.5", "std": 0.5}, r"mean must be a number or a list of numbers, got '0.5'"),
    # indices: empty, negative, float, bool, duplicates
    (FeatureMapCallback, {"image_ids": []}, r"image_ids must be a non-empty list of indices >= 0, got \[\]"),
    (
        FeatureMapCallback,
        {"image_ids": [22, -1]},
        r"image_ids must be a non-empty list of indices >= 0, got \[22, -1\]",
    ),
    (FeatureMapCallback, {"image_ids": [22.5]}, r"image_ids must be a non-empty list of indices >= 0, got \[22.5\]"),
    (FeatureMapCallback, {"image_ids": [True]}, r"image_ids must be a non-empty list of indices >= 0, got \[True\]"),
    (FeatureMapCallback, {"image_ids": [22, 193, 22]}, r"image_ids lists \[22\] more than once"),
    (FeatureMapCallback, {"channels": [1.5]}, r"channels must be a non-empty list of integer indices, got \[1.5\]"),
    (TopPatchesCallback, {"channels": []}, r"channels must be a non-empty list of integer indices, got \[\]"),
    (TopPatchesCallback, {"channels": [3, 3]}, r"channels lists \[3\] more than once"),
    (FeatureVisCallback, {"units": []}, r"units must be a non-empty list of indices >= 0, got \[\]"),
    (FeatureVisCallback, {"units": [1, 1]}, r"units lists \[1\] more than once"),
]


@pytest.mark.parametrize(("cls", "kwargs", "message"), CASES, ids=[f"{c.__name__}-{k}" for c, k, _ in CASES])
def test_hostile_arguments_are_refused_in_init_naming_the_argument(
    cls: Callable[..., Any], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        cls(**kwargs)


@pytest.fixture(scope="module")
def probe() -> Any:
    g = torch.Generator().manual_seed(0)
    return probe_from_tensors(torch.rand(40, 1, 28, 28, generator=g), torch.arange(40) % 10)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FilterCallback(layers=["conv1", "conv7"]), r"Unknown conv layer name\(s\) \['conv7'\].*'conv1'"),
        (lambda: FeatureMapCallback(image_ids=[3, 40]), r"test image_ids \[40\] out of range.*valid IDs 0..39"),
        (lambda: FeatureMapCallback(image_ids=[3], layers=["fc1"]), r"Unknown conv layer name\(s\) \['fc1'\]"),
        (lambda: FeatureMapCallback(image_ids=[3], channels=[6]), r"channels \[6\] out of range for conv1"),
        (lambda: TopPatchesCallback(channels=[0, -1]), r"channels \[0, -1\] out of range for conv1 \(6 channels"),
        (lambda: TopPatchesCallback(probe_size=41), r"probe_size=41 is larger than"),
        (lambda: AtlasCallback(layers=["conv9"], featviz=False), r"Unknown layer name\(s\) \['conv9'\]"),
        (lambda: DeadReluCallback(probe_size=20, layers=["relu9"]), r"Unknown ReLU layer name\(s\) \['relu9'\]"),
        (lambda: EmbeddingCallback(probe_size=41), r"probe_size=41 is larger than"),
        (lambda: RepresentationCallback(probe_size=20, block_size=None, layers=["fc9"]), r"\['fc9'\]"),
        (lambda: FeatureVisCallback(layers=["conv1"], units=[6], probe_size=20), r"units \[6\] out of range"),
    ],
)
def test_arguments_the_model_or_probe_decide_are_refused_in_prepare(
    make: Callable[[], Any], message: str, probe: Any
) -> None:
    cb = make()
    with pytest.raises(ConfigError, match=message):
        cb.prepare(SmallCNN().eval(), probe)
