"""The picture callbacks' shared arguments as one typed object: ``CallbackOptions`` is frozen and validated once,
every picture callback keeps it as ``options`` (built from its flat keyword arguments), and every callback config
in ``conf/callbacks`` still instantiates with the options its YAML gives."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

import cnnfeat.callbacks as callbacks_pkg
from cnnfeat.callbacks import (
    AtlasCallback,
    AttributionCallback,
    CallbackOptions,
    CrossModelCKACallback,
    DeadReluCallback,
    EmbeddingCallback,
    FeatureMapCallback,
    FeatureVisCallback,
    FilterCallback,
    ImportanceCallback,
    RelevanceCallback,
    RepresentationCallback,
    ShapeTableCallback,
    TopPatchesCallback,
    VisualizationCallback,
)
from cnnfeat.errors import ConfigError
from cnnfeat.probe import ProbeSpec
from cnnfeat.run.cli import CONFIG_DIR, instantiate_node

FIELDS = [f.name for f in dataclasses.fields(CallbackOptions)]

#: options a callback fixes instead of taking them as arguments (anything else: the constructor's default)
FIXED: dict[type[VisualizationCallback], dict[str, Any]] = {
    ShapeTableCallback: {"during_training": False},
}

#: per picture callback: the minimal valid construction's arguments
MINIMAL: dict[type[VisualizationCallback], dict[str, Any]] = {
    AtlasCallback: {},
    AttributionCallback: {},
    ImportanceCallback: {},
    RelevanceCallback: {},
    CrossModelCKACallback: {},
    DeadReluCallback: {},
    EmbeddingCallback: {},
    FeatureMapCallback: {},
    FeatureVisCallback: {},
    FilterCallback: {},
    RepresentationCallback: {},
    ShapeTableCallback: {},
    TopPatchesCallback: {},
}

#: a value other than the default for each shared argument
NOT_DEFAULT: dict[str, Any] = {
    "every_n_epochs": 3,
    "log_untrained": False,
    "save_png": True,
    "during_training": False,
    "split": "val",
    "mean": [0.5],
    "std": [0.25],
    "class_names": ["a", "b", "c"],
}


def expected_options(cls: type[VisualizationCallback], given: dict[str, Any]) -> CallbackOptions:
    """The options ``cls(**given)`` should hold: the given shared arguments over the constructor's defaults."""
    params = inspect.signature(cls).parameters
    values = {name: params[name].default for name in FIELDS if name in params}
    values |= FIXED.get(cls, {})
    values |= {name: value for name, value in given.items() if name in FIELDS}
    return CallbackOptions(**values)


# -- the options object ---------------------------------------------------------------------------------------------


def test_defaults_are_the_callbacks_former_defaults() -> None:
    opts = CallbackOptions()
    assert (opts.every_n_epochs, opts.log_untrained, opts.save_png, opts.during_training) == (1, True, False, True)
    assert (opts.split, opts.mean, opts.std, opts.class_names) == ("test", None, None, None)
    assert opts.probe_spec == ProbeSpec()
    assert list(NOT_DEFAULT) == FIELDS


def test_frozen_keyword_only_and_hashable() -> None:
    opts = CallbackOptions(every_n_epochs=2, mean=0.5, std=[0.25], class_names=["x", "y"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.every_n_epochs = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        CallbackOptions(2)  # type: ignore[misc]
    # lists and numbers are kept as tuples: equal values give equal, hashable options
    assert (opts.mean, opts.std, opts.class_names) == ((0.5,), (0.25,), ("x", "y"))
    same = CallbackOptions(every_n_epochs=2, mean=[0.5], std=0.25, class_names=("x", "y"))
    assert opts == same and hash(opts) == hash(same) and len({opts, same}) == 1
    assert opts != CallbackOptions(every_n_epochs=2)
    assert opts.probe_spec == ProbeSpec.of("test", [0.5], [0.25], ["x", "y"])
    assert pickle.loads(pickle.dumps(opts)) == opts and copy.deepcopy(opts) == opts


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"every_n_epochs": 0}, r"every_n_epochs must be an integer >= 1, got 0"),
        ({"every_n_epochs": True}, r"every_n_epochs must be an integer >= 1, got True"),
        ({"every_n_epochs": 1.0}, r"every_n_epochs must be an integer >= 1, got 1.0"),
        ({"log_untrained": "no"}, r"log_untrained must be true or false, got 'no'"),
        ({"save_png": 1}, r"save_png must be true or false, got 1"),
        ({"during_training": "false"}, r"during_training must be true or false, got 'false'"),
        ({"split": "holdout"}, r"split must be one of \['test', 'train', 'val'\], got 'holdout'"),
        ({"mean": "0.5", "std": 0.5}, r"mean must be a number or a list of numbers, got '0.5'"),
        ({"mean": 0.5, "std": [True]}, r"std must be a number or a list of numbers, got \[True\]"),
        ({"mean": [0.5]}, r"give both mean and std \(or neither\)"),
        ({"mean": [0.5], "std": [0.0]}, r"mean and std must be finite, of equal length, std > 0"),
        ({"class_names": "TShirt"}, r"class_names must be a list of names, got 'TShirt'"),
        ({"class_names": []}, r"class_names is empty: give at least one name \(or null for the default\)"),
        ({"class_names": ["a", "a"]}, r"class_names lists \['a'\] more than once"),
    ],
)
def test_bad_values_are_refused_with_the_arguments_name(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CallbackOptions(**values)
    with pytest.raises(ConfigError, match=message):  # a changed copy is validated too
        dataclasses.replace(CallbackOptions(), **values)


def test_the_base_class_takes_only_options() -> None:
    with pytest.raises(TypeError, match="takes a CallbackOptions, got 1"):
        VisualizationCallback(1)  # type: ignore[arg-type]
    cb = VisualizationCallback(CallbackOptions(save_png=True))
    assert cb.options == CallbackOptions(save_png=True)


# -- every picture callback -----------------------------------------------------------------------------------------


def test_every_picture_callback_is_covered() -> None:
    exported = {
        obj
        for name in callbacks_pkg.__all__
        if isinstance(obj := getattr(callbacks_pkg, name), type)
        and issubclass(obj, VisualizationCallback)
        and obj is not VisualizationCallback
    }
    assert exported == set(MINIMAL)


@pytest.mark.parametrize("cls", list(MINIMAL), ids=lambda c: c.__name__)
def test_callback_keeps_the_options_it_was_given(cls: type[VisualizationCallback]) -> None:
    cb = cls(**MINIMAL[cls])
    assert cb.options == expected_options(cls, {})
    params = inspect.signature(cls).parameters
    given = {name: value for name, value in NOT_DEFAULT.items() if name in params}
    cb = cls(**MINIMAL[cls], **given)
    opts = expected_options(cls, given)
    assert cb.options == opts
    assert all(getattr(cb.options, name) != getattr(CallbackOptions(), name) for name in given), "all non-default"
    # the former attributes read the options and cannot drift from them
    for name in ("every_n_epochs", "log_untrained", "save_png", "during_training", "split", "probe_spec"):
        assert getattr(cb, name) == getattr(opts, name)
        with pytest.raises(AttributeError):
            setattr(cb, name, getattr(opts, name))
    assert cb.probe_spec == ProbeSpec.of(opts.split, opts.mean, opts.std, opts.class_names)


@pytest.mark.parametrize(
    "cls", [c for c in MINIMAL if "every_n_epochs" in inspect.signature(c).parameters], ids=lambda c: c.__name__
)
def test_callback_refuses_bad_shared_arguments_by_name(cls: type[VisualizationCallback]) -> None:
    with pytest.raises(ConfigError, match=r"every_n_epochs must be an integer >= 1, got 0"):
        cls(**MINIMAL[cls], every_n_epochs=0)
    with pytest.raises(ConfigError, match=r"log_untrained must be true or false, got 'no'"):
        cls(**MINIMAL[cls], log_untrained="no")


# -- the configs ----------------------------------------------------------------------------------------------------

CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "callbacks").glob("*.yaml"))
#: configs that hold no picture callback
NO_PICTURES = {
    "divergence_guard",
    "epoch_summary",
    "last_checkpoint",
    "lr_monitor",
    "model_checkpoint",
    "none",
    "progress_log",
    "rich_progress_bar",
}


def test_every_callback_config_is_listed() -> None:
    assert {"default", "none", "transfer", "atlas", "cross_cka", "representations", "featviz"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_callback_config_instantiates_with_its_options(name: str, make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg(f"callbacks=[none,{name}]", "save_png=true")
    pictures = 0
    for key, node in cfg.callbacks.items():
        if node is None:
            continue
        cb = instantiate_node(node, f"callbacks.{key}")
        if not isinstance(cb, VisualizationCallback):
            continue
        pictures += 1
        values = OmegaConf.to_container(node, resolve=True)
        assert isinstance(values, dict)
        assert cb.options == expected_options(type(cb), values), key
        for field in ("every_n_epochs", "log_untrained", "save_png", "during_training", "split"):
            if field in values:  # what the YAML says
                assert getattr(cb.options, field) == values[field], f"{key}.{field}"
        if "save_png" in inspect.signature(type(cb)).parameters:
            assert cb.options.save_png is True, f"{key}: save_png=${{save_png}} reaches the options"
        assert isinstance(hash(cb.options), int)
    assert pictures > 0 or name in NO_PICTURES, name
