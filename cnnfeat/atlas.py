"""The run atlas: per-unit data of a run (filters, alive/dead, top patches, classes, optimised inputs) on disk.

Core module (no Lightning): the ``AtlasCallback`` (``cnnfeat.callbacks.atlas``) collects the data during training
and ``cnnfeat.report`` draws it as HTML. What is a unit: every channel of a conv node (``kind="conv"``, anchor
``c<k>``) and every neuron of the last hidden fully connected layer (``kind="fc"``, anchor ``n<k>``, the last
``Linear`` that an activation follows; for SmallCNN ``fc2``, whose ReLU gives ``features(x)``).

**Format** (version ``FORMAT``; numpy files read with ``allow_pickle=False``), under ``<run dir>/atlas/``::

    manifest.json             layers (name, kind, units, shown units, activation node, receptive field, frozen ...),
                              class names, probe, settings, per-step seconds, what ``finish`` measured
    <slug>/step_NNN.npz       units (U,): the shown units, row by row; weights (U, in, kh, kw) or (U, in) float32;
                              unit_max (U,) float32: each unit's largest activation on the alive probe (alive = > 0;
                              NaN counts as dead); layer_dead: dead units of the whole layer
    <slug>/patches_NNN.npz    units (U,); values, ids (U, k); rows, cols (U, k) in the layer's output; boxes (U, k, 4)
                              (top, left, bottom, right, inclusive, in ``frame``'s pixels); crops (U, k, C, s, s) uint8
    <slug>/classes.npz        step; counts (U, classes): classes of each unit's top activations; values, ids (U, t)
    <slug>/featviz.npz        step; units (F,); images (F, C, H, W) uint8; activation, reference, fidelity (F,) float32;
                              flagged (F,) bool; targets (F, 2): where the objective read (-1: channel
                              objective); peaks (F, 2): where the activation is largest; seconds; settings (JSON)

``NNN`` is the step (= epochs trained, 0 = untrained): the same axis as every TensorBoard picture. ``<slug>`` is the
node name made safe for file names and URLs (``slug``), stable for a name. The step files are the callback's state:
a resumed run rewrites the steps it redoes and keeps the others, and keeps the units they were recorded for (a
resume with another ``units`` setting is warned about, not obeyed). A step or patch file whose ``units`` are not the
manifest's ``shown`` is refused when read (a ``DataError``), never drawn under the wrong unit.

**Feature visualisation input** (``InputSpace``): optimised images live in display space, [0, 1]. By default they
enter the model as its own input, mapped by the per-channel affine map that takes the probe's display images to the
model's inputs (fitted, and refused with the reason when the inputs are not such a map). With ``module=<name>`` they
enter that submodule, called directly, as ``(x - mean) / std``: the transfer model's frozen AlexNet ``backbone`` gets
RGB 224 images behind ImageNet normalisation. ``layer_fn`` stops the forward pass at the unit's node.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import reprlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnfeat import featviz
from cnnfeat.errors import ConfigError, DataError
from cnnfeat.graph import Graph, activation_after, conv_nodes, split_call, unknown_names
from cnnfeat.run.atomic import atomic_write, json_safe
from cnnfeat.topk import centre_pad

FORMAT = 1
ATLAS_DIR = "atlas"
MANIFEST = "manifest.json"
KINDS = ("conv", "fc")


def slug(name: str) -> str:
    """A file- and URL-safe, stable name for a node: itself when already safe, else cleaned plus a short hash."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "node"
    return clean if clean == name else f"{clean}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def anchor(kind: str, unit: int) -> str:
    """A unit's HTML anchor: ``c3`` (conv channel 3), ``n17`` (fully connected neuron 17)."""
    return f"{'c' if kind == 'conv' else 'n'}{unit}"


# -- which layers -----------------------------------------------------------------------------------------
def last_hidden(graph: Graph) -> str | None:
    """The last ``Linear`` node (module or ``F.linear``) followed by an activation: the last hidden layer."""
    for node in reversed(list(graph)):
        linear = (node.kind == "module" and not node.alias and isinstance(node.module, nn.Linear)) or (
            node.kind == "function" and node.op == "linear"
        )
        if linear and len(node.output_shape) == 2 and activation_after(graph, node.name)[0] is not None:
            return node.name
    return None


def default_layers(graph: Graph) -> list[str]:
    """Every conv node, then the last hidden fully connected layer (if any), in execution order."""
    names = conv_nodes(graph)
    fc = last_hidden(graph)
    return [*names, fc] if fc is not None else names


def layer_kind(graph: Graph, name: str) -> str:
    """``conv`` for a node with a spatial output (N, C, H, W), ``fc`` for (N, F); anything else is refused."""
    shape = graph[name].output_shape
    if len(shape) == 4:
        return "conv"
    if len(shape) == 2:
        return "fc"
    raise ConfigError(f"layer {name!r} outputs shape {tuple(shape)}: the atlas needs (N, C, H, W) or (N, F) units")


def resolve_layers(graph: Graph, layers: Sequence[str] | None) -> list[str]:
    """The atlas's layers: ``layers`` checked against the graph (unknown names list the valid ones), or the default."""
    if layers is None:
        names = default_layers(graph)
        if not names:
            raise ConfigError(f"{graph.owner} has no conv node and no hidden Linear layer: name layers=[...]")
        return names
    names = list(dict.fromkeys(layers))
    if not names:
        raise ConfigError("layers is empty: give node names, or null for every conv and the last hidden layer")
    bad = [n for n in names if n not in graph or graph.nodes[n].kind == "input"]
    if bad:
        raise unknown_names(bad, graph.names, graph.owner)
    return names


@dataclass
class LayerInfo:
    """One layer of the atlas, as the manifest records it."""

    name: str
    kind: str  #: "conv" or "fc"
    units: int  #: units in the layer
    shown: list[int]  #: the units recorded: all, the most variable, listed ones, or the first ``max_units``
    activation: str | None  #: the node whose sign says alive/dead (the activation after the layer), else the layer
    weights: bool  #: whether incoming weights are recorded (a Conv2d / Linear module)
    frozen: bool  #: no trainable weights: per-step data is recorded once
    rf_size: list[int] | None = None  #: receptive field (height, width) in ``frame``'s pixels; None for fc
    rf_jump: list[float] | None = None  #: input pixels between neighbouring units (per axis)
    rf_start: list[float] | None = None  #: input coordinate of unit (0, 0)'s centre (per axis)
    frame: str | None = None  #: node whose output the boxes refer to (None: the model's input)
    output_shape: list[int] = field(default_factory=list)  #: (C, H, W) or (F,) of one image
    featviz_units: list[int] = field(default_factory=list)  #: units given an optimised input at the end
    #: how ``shown`` was chosen (``CHOSEN_BY``); None in an atlas of an older version (its settings say, ``chosen_by``)
    chosen_by: str | None = None

    @property
    def slug(self) -> str:
        return slug(self.name)

    def box(self, row: int, col: int) -> tuple[int, int, int, int] | None:
        """The input box (top, left, bottom, right; inclusive) of the unit at (row, col); None without a field."""
        if not (self.rf_size and self.rf_jump and self.rf_start):
            return None
        out = []
        for axis, pos in ((0, row), (1, col)):
            lo = round(self.rf_start[axis] + pos * self.rf_jump[axis] - (self.rf_size[axis] - 1) / 2)
            out.append((lo, lo + self.rf_size[axis] - 1))
        (top, bottom), (left, right) = out
        return top, left, bottom, right

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerInfo:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


#: the ways a layer's shown units are chosen: every unit, the first N, listed ones, the most variable
CHOSEN_BY = ("all", "first", "list", "variability")


def chosen_by(info: LayerInfo, settings: Mapping[str, Any]) -> str:
    """How ``info``'s shown units were chosen (one of ``CHOSEN_BY``): its own record, else (an atlas of an older
    version) what the atlas's ``settings`` say."""
    if info.chosen_by is not None:
        return info.chosen_by
    if info.name in (settings.get("units_chosen_by_variability") or []):
        return "variability"
    if len(info.shown) == info.units:
        return "all"
    return "list" if isinstance(settings.get("units"), (list, dict)) else "first"


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _pair(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(check(x) for x in v))


def _str_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


#: what each field of a manifest's layer must be (beside its ``units`` and ``shown``), and how a message says it
_LAYER_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "kind": (lambda v: v in KINDS, "'conv' or 'fc'"),
    "units": (_is_int, "an integer >= 0"),
    "activation": (_str_or_none, "a node name or null"),
    "weights": (lambda v: isinstance(v, bool), "true or false"),
    "frozen": (lambda v: isinstance(v, bool), "true or false"),
    "rf_size": (_pair(lambda x: _is_int(x, 1)), "null or two integers >= 1"),
    "rf_jump": (_pair(_is_number), "null or two numbers"),
    "rf_start": (_pair(_is_number), "null or two numbers"),
    "frame": (_str_or_none, "a node name or null"),
    "output_shape": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integers >= 0"),
    "chosen_by": (lambda v: v is None or v in CHOSEN_BY, f"null or one of {', '.join(CHOSEN_BY)}"),
}
_REQUIRED = ("name", "kind", "units", "shown", "activation", "weights", "frozen")


def _got(value: Any) -> str:
    return f"{type(value).__name__} {reprlib.repr(value)}" if isinstance(value, dict | list) else reprlib.repr(value)


def manifest_layers(manifest: Any, path: Path) -> list[LayerInfo]:
    """The layers of an atlas manifest read from ``path``, after checking its structure: anything else than what
    ``AtlasWriter`` writes raises a ``DataError`` that names the file and the first thing wrong."""

    def bad(what: str) -> DataError:
        return DataError(
            f"{path}: {what}; the atlas is damaged or not cnnfeat's (delete the atlas directory and rerun)"
        )

    if not isinstance(manifest, dict):
        raise bad(f"the manifest must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has atlas format {manifest.get('format')!r}; this cnnfeat reads format {FORMAT}")
    layers = manifest.get("layers", [])
    if not isinstance(layers, list):
        raise bad(f"'layers' must be a list, got {_got(layers)}")
    for key in ("probe", "settings"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise bad(f"'{key}' must be an object, got {_got(manifest[key])}")
    settings = manifest.get("settings") or {}
    for key in ("featviz_settings", "featviz_fc_settings"):
        if settings.get(key) is not None and not isinstance(settings[key], dict):
            raise bad(f"'settings.{key}' must be an object, got {_got(settings[key])}")
    names = manifest.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise bad(f"'class_names' must be a list of strings, got {_got(names)}")
    out, seen = [], set()
    for i, d in enumerate(layers):
        where = f"layers[{i}]"
        if not isinstance(d, dict):
            raise bad(f"{where} must be an object, got {_got(d)}")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            label = f"{where} ({d['name']})" if isinstance(d.get("name"), str) else where
            raise bad(f"{label} lacks {', '.join(repr(k) for k in sorted(missing))}")
        for key, (check, expected) in _LAYER_FIELDS.items():
            if key in d and not check(d[key]):
                raise bad(f"{where}.{key} must be {expected}, got {_got(d[key])}")
        for key in ("shown", "featviz_units"):
            units = d.get(key, [])
            if not (isinstance(units, list) and all(_is_int(u) and u < d["units"] for u in units)):
                raise bad(f"{where}.{key} must be unit numbers in [0, {d['units']}), got {_got(units)}")
        if slug(d["name"]) in seen:
            raise bad(f"{where}: layer {d['name']!r} is listed twice")
        seen.add(slug(d["name"]))
        out.append(LayerInfo.from_dict(d))
    return out


def layer_module(graph: Graph, name: str) -> nn.Module | None:
    """The Conv2d / Linear module whose weights make the node's units (None for a functional op)."""
    node = graph[name]
    mod = node.module if node.kind == "module" and not node.alias else None
    return mod if isinstance(mod, (nn.Conv2d, nn.Linear)) else None


# -- storage ----------------------------------------------------------------------------------------------
def _npz(path: Path, **arrays: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] -> uint8 (rounded)."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _step_of(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


class AtlasWriter:
    """Writes an atlas directory (see the module docstring); every file is replaced atomically."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)

    def manifest(self, data: Mapping[str, Any]) -> Path:
        text = json.dumps(json_safe({"format": FORMAT, **data}), indent=1, allow_nan=False) + "\n"
        return atomic_write(self.dir / MANIFEST, lambda f: f.write(text.encode()))

    def step(
        self,
        layer: str,
        step: int,
        unit_max: torch.Tensor,
        weights: torch.Tensor | None,
        layer_dead: int | None = None,
        units: Sequence[int] | None = None,
    ) -> Path:
        """``unit_max`` and ``weights`` of the shown units (``units``: which, row by row); ``layer_dead``: dead units
        of the whole layer (shown or not: a most-variable choice never shows a dead unit, whose variability is 0)."""
        arrays = {"unit_max": unit_max.detach().float().cpu().numpy()}
        if units is not None:
            arrays["units"] = np.asarray(list(units), dtype=np.int64)
        if layer_dead is not None:
            arrays["layer_dead"] = np.int64(layer_dead)
        if weights is not None:
            arrays["weights"] = weights.detach().float().cpu().numpy()
        return _npz(self.dir / slug(layer) / f"step_{step:03d}.npz", **arrays)

    def patches(self, layer: str, step: int, **arrays: np.ndarray) -> Path:
        return _npz(self.dir / slug(layer) / f"patches_{step:03d}.npz", **arrays)

    def classes(self, layer: str, step: int, counts: np.ndarray, values: np.ndarray, ids: np.ndarray) -> Path:
        return _npz(self.dir / slug(layer) / "classes.npz", step=np.int64(step), counts=counts, values=values, ids=ids)

    def featviz(self, layer: str, step: int, result: featviz.FeatVizResult) -> Path:
        return _npz(
            self.dir / slug(layer) / "featviz.npz",
            step=np.int64(step),
            units=result.units.numpy(),
            images=to_uint8(result.images),
            activation=result.activation.float().numpy(),
            reference=(
                result.reference if result.reference is not None else torch.full_like(result.activation, math.nan)
            )
            .float()
            .numpy(),
            fidelity=result.fidelity.float().numpy(),
            flagged=result.flagged.numpy(),
            targets=result.targets.numpy(),
            peaks=result.positions.numpy(),
            seconds=np.float64(result.seconds),
            settings=np.array(json.dumps(result.settings.to_dict())),
        )


@dataclass
class Atlas:
    """An atlas read back (see the module docstring); arrays are numpy, loaded on demand."""

    dir: Path
    manifest: dict[str, Any]
    layers: list[LayerInfo]

    @classmethod
    def load(cls, run_dir: Path | str) -> Atlas | None:
        """The atlas of ``run_dir`` (or the atlas directory itself); ``None`` when the run has none."""
        run_dir = Path(run_dir)
        directory = run_dir if (run_dir / MANIFEST).is_file() else run_dir / ATLAS_DIR
        path = directory / MANIFEST
        if not path.is_file():
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
        return cls.from_text(directory, text, path)

    @classmethod
    def from_text(cls, directory: Path, text: str, path: Path) -> Atlas:
        """The atlas in ``directory`` whose manifest, read from ``path``, is ``text``; a manifest that is not JSON or
        not of the expected structure raises a ``DataError`` naming the file and what is wrong."""
        try:
            manifest = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path} is not valid JSON ({e}); delete the atlas directory and rerun") from e
        return cls(directory, manifest, manifest_layers(manifest, path))

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.get("class_names") or [])

    def _load(self, path: Path) -> dict[str, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from e

    def _of_shown(self, layer: LayerInfo, path: Path) -> dict[str, np.ndarray]:
        """A per-unit file of ``layer``; one that names other units than the manifest's ``shown`` (written under
        another ``units`` setting) is refused: its rows would be drawn as the wrong units."""
        arrays = self._load(path)
        units = arrays.get("units")
        if units is not None and units.tolist() != list(layer.shown):
            raise DataError(
                f"{path} holds units {units.tolist()} of {layer.name}, the manifest shows {list(layer.shown)}: it was "
                "recorded under another units setting; delete the atlas directory and rerun"
            )
        return arrays

    def steps(self, layer: LayerInfo) -> list[int]:
        """Recorded steps of the layer's weights and alive/dead, in order."""
        return sorted(_step_of(p) for p in (self.dir / layer.slug).glob("step_*.npz"))

    def step_data(self, layer: LayerInfo) -> tuple[list[int], dict[int, dict[str, np.ndarray]]]:
        steps = self.steps(layer)
        return steps, {s: self._of_shown(layer, self.dir / layer.slug / f"step_{s:03d}.npz") for s in steps}

    def patch_steps(self, layer: LayerInfo) -> list[int]:
        return sorted(_step_of(p) for p in (self.dir / layer.slug).glob("patches_*.npz"))

    def patches(self, layer: LayerInfo, step: int) -> dict[str, np.ndarray]:
        return self._of_shown(layer, self.dir / layer.slug / f"patches_{step:03d}.npz")

    def has_history(self, layer: LayerInfo) -> bool:
        """Whether per-step files (weights and alive/dead, or patches) of the layer's shown units exist."""
        return bool(self.steps(layer) or self.patch_steps(layer))

    def classes(self, layer: LayerInfo) -> dict[str, np.ndarray] | None:
        path = self.dir / layer.slug / "classes.npz"
        return self._load(path) if path.is_file() else None

    def featviz(self, layer: LayerInfo) -> dict[str, np.ndarray] | None:
        path = self.dir / layer.slug / "featviz.npz"
        return self._load(path) if path.is_file() else None


# -- feature visualisation input --------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpace:
    """Where optimised display images (C, H, W) in [0, 1] enter the model: ``value = display * scale + shift`` per
    channel, as the model's input (``module=None``) or as the input of its submodule ``module``, which is then
    called directly (the transfer model's frozen ``backbone``, whose own forward runs without gradients)."""

    shape: tuple[int, int, int]
    scale: tuple[float, ...]
    shift: tuple[float, ...]
    module: str | None = None

    def _view(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._view(self.scale, x) + self._view(self.shift, x)

    def to_display(self, v: torch.Tensor) -> torch.Tensor:
        return ((v - self._view(self.shift, v)) / self._view(self.scale, v)).clamp(0, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fitted_space(images: torch.Tensor, inputs: torch.Tensor, tol: float = 1e-3) -> InputSpace:
    """The per-channel affine map from display ``images`` to model ``inputs`` (least squares); refused with the
    reason when the inputs are not such a map of the images (then name the module that receives images)."""
    x, y = images.float(), inputs
    if y.ndim == 3:
        y = y.unsqueeze(1)
    if not y.is_floating_point() or y.shape != x.shape:
        raise ConfigError(
            f"feature visualisation optimises the model's input, but its inputs ({tuple(inputs.shape)}, "
            f"{inputs.dtype}) are not floating-point images shaped like the display images {tuple(images.shape)}; "
            "name the submodule that receives images (featviz_input=..., with featviz_mean/std) or set featviz=false"
        )
    y = y.float()
    scale, shift = [], []
    for c in range(x.shape[1]):
        xc, yc = x[:, c].flatten().double(), y[:, c].flatten().double()
        var = float(xc.var(unbiased=False))
        a = float(((xc - xc.mean()) * (yc - yc.mean())).mean() / var) if var > 0 else 1.0
        b = float(yc.mean() - a * xc.mean())
        err = float((yc - (a * xc + b)).abs().max())
        spread = float(yc.max() - yc.min()) or 1.0
        if a <= 0 or err > tol * spread:
            raise ConfigError(
                f"feature visualisation: the model's inputs are not a per-channel affine map of the display images "
                f"(channel {c}: residual {err:.3g} of a range {spread:.3g}); name the submodule that receives images "
                "(featviz_input=...) or set featviz=false"
            )
        scale.append(a)
        shift.append(b)
    return InputSpace(tuple(int(v) for v in x.shape[1:]), tuple(scale), tuple(shift))  # type: ignore[arg-type]


def black_input(images: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor | None:
    """The model input of an all-black picture, (1, C, H, W): zeros when the inputs are the display images, else the
    shift of the per-channel affine map from images to inputs (``-mean / std`` after a ``Normalize``); ``None``
    when the inputs are no such map of the images (cached backbone features, another shape)."""
    if inputs.shape == images.shape and torch.equal(inputs.float(), images.float()):
        return torch.zeros(1, *images.shape[1:])
    try:
        space = fitted_space(images, inputs)
    except ConfigError:
        return None
    return space.to_model(torch.zeros(1, *space.shape)).reshape(1, *inputs.shape[1:])


def _module(model: nn.Module, name: str, what: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise unknown_names([name], [n for n in modules if n], type(model).__name__, what)
    return modules[name]


@contextmanager
def _module_inputs(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the first tensor argument of every call of ``module``."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def module_space(
    model: nn.Module, module: str, example_input: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> InputSpace:
    """Optimised images enter submodule ``module`` (called directly) as ``(x - mean) / std``, e.g. the frozen
    AlexNet behind ImageNet normalisation: RGB 224 images, not the model's 28x28 grey ones."""
    mod = _module(model, module, "featviz_input")
    with _module_inputs(mod) as seen, torch.no_grad():
        model(example_input[:1])
    if not seen or seen[0].ndim != 4:
        raise ConfigError(
            f"featviz_input={module!r} must receive images (N, C, H, W); got "
            f"{tuple(seen[0].shape) if seen else 'no call in a forward pass'}"
        )
    c = seen[0].shape[1]
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) == 1:
        mean, std = mean * c, std * c
    if len(mean) != c or len(std) != c or not all(s > 0 for s in std):
        raise ConfigError(f"featviz_mean/std need 1 or {c} values (std > 0), got {mean}, {std}")
    return InputSpace(
        tuple(int(v) for v in seen[0].shape[1:]),  # type: ignore[arg-type]
        tuple(1 / s for s in std),
        tuple(-m / s for m, s in zip(mean, std, strict=True)),
        module,
    )


def layer_fn(model: nn.Module, node: str, space: InputSpace) -> featviz.LayerFn:
    """A ``featviz.LayerFn``: display images (N, C, H, W) -> the output of ``node`` (a module call, ``name:k`` for
    its k-th call in a forward pass), with gradients; the forward pass (of the model, or of ``space.module``) stops
    there. Functional nodes (``F.relu``) and nodes outside ``space.module`` are refused."""
    base, call = split_call(node)
    modules = dict(model.named_modules())
    if base not in modules or not base:
        raise ConfigError(
            f"feature visualisation needs a module node; {node!r} is a functional op of {type(model).__name__}"
        )
    target = modules[base]
    runner = _module(model, space.module, "featviz_input") if space.module is not None else model
    if space.module is not None and not base.startswith(f"{space.module}."):
        raise ConfigError(f"{node!r} is not inside featviz_input={space.module!r}, which the optimised images enter")

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = featviz.output_of_call(runner, target, call, space.to_model(x))
        if out is None:
            raise ConfigError(f"{node!r} did not run in {type(runner).__name__}'s forward pass")
        return out

    return fn


@torch.no_grad()
def display_images(
    model: nn.Module, space: InputSpace, inputs: torch.Tensor, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """The probe in the optimisation's display space: ``images`` themselves, or ``space.module``'s input shown."""
    if space.module is None:
        return images
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    with _module_inputs(_module(model, space.module, "featviz_input")) as seen:
        for start in range(0, len(inputs), batch_size):
            seen.clear()
            model(inputs[start : start + batch_size].to(device))
            out.append(space.to_display(seen[0].float()).cpu())
    return torch.cat(out)


@dataclass
class PendingUnits:
    """A layer's optimisations submitted by :func:`start_optimise_units`; ``finish`` gives the better start per unit."""

    starts: list[featviz.PendingVisualisation]

    def wait(self) -> None:
        for start in self.starts:
            start.wait()

    def finish(self) -> featviz.FeatVizResult:
        results = [start.finish() for start in self.starts]
        return results[0] if len(results) == 1 else featviz.best_of(results)


def _spatial(fn: featviz.LayerFn, space: InputSpace, device: torch.device) -> bool:
    """Whether the layer's output has positions (N, K, h, w): where the neuron objective can start elsewhere."""
    with torch.no_grad():
        return fn(torch.full((1, *space.shape), 0.5, device=device)).dim() == 4


def start_optimise_units(
    fn: featviz.LayerFn,
    units: Sequence[int],
    space: InputSpace,
    settings: featviz.FeatVizSettings,
    reference: torch.Tensor | None,
    positions: torch.Tensor | None,
    layer: str,
    device: torch.device,
    at_real_best: bool = True,
    submit: featviz.Submit | None = None,
) -> PendingUnits:
    """:func:`optimise_units` with its optimisations handed to ``submit`` (``featviz.Workers.submit``; ``None``: run
    now); the caller sets the thread count and calls ``finish()``."""
    starts = [featviz.start_visualise(fn, list(units), space.shape, settings, reference, None, layer, device, submit)]
    if at_real_best and positions is not None and settings.objective == "neuron" and _spatial(fn, space, device):
        starts.append(
            featviz.start_visualise(fn, list(units), space.shape, settings, reference, positions, layer, device, submit)
        )
    return PendingUnits(starts)


def optimise_units(
    fn: featviz.LayerFn,
    units: Sequence[int],
    space: InputSpace,
    settings: featviz.FeatVizSettings,
    reference: torch.Tensor | None,
    positions: torch.Tensor | None,
    layer: str,
    device: torch.device,
    at_real_best: bool = True,
) -> featviz.FeatVizResult:
    """Optimise an input per unit; with the neuron objective on a spatial layer and ``positions``, also where the
    unit's best real patch is, keeping per unit the image that reaches more (``featviz.best_of``)."""
    with featviz.cpu_threads(settings.threads):
        pending = start_optimise_units(fn, units, space, settings, reference, positions, layer, device, at_real_best)
    return pending.finish()


def featviz_settings(values: Mapping[str, Any] | None) -> featviz.FeatVizSettings:
    """``FeatVizSettings`` from config values; unknown keys and bad values raise a ``ConfigError`` naming them."""
    values = dict(values or {})
    known = {f.name for f in fields(featviz.FeatVizSettings)}
    bad = sorted(set(values) - known)
    if bad:
        raise ConfigError(f"unknown feature-visualisation setting(s) {bad}; valid: {sorted(known)}")
    for key in ("scales", "angles"):
        if key in values and values[key] is not None:
            values[key] = tuple(float(v) for v in values[key])
    try:
        return featviz.FeatVizSettings(**values)
    except featviz.FeatVizError as e:
        raise ConfigError(f"feature visualisation: {e}") from e


def class_counts(labels: torch.Tensor, ids: torch.Tensor, num_classes: int) -> np.ndarray:
    """(units, classes) counts of the labels of each unit's top images; ``ids`` (units, t) are probe positions
    (negative entries, from a probe smaller than t, are skipped)."""
    counts = np.zeros((ids.shape[0], num_classes), dtype=np.int64)
    for u, row in enumerate(ids.tolist()):
        for i in row:
            if i >= 0:
                counts[u, int(labels[i])] += 1
    return counts


def squares(cells: Iterable[torch.Tensor], side: int, max_side: int) -> torch.Tensor:
    """Crops (C, h, w) of possibly different sizes -> one (N, C, s, s) tensor: each crop centred, unchanged, on a
    zero canvas of the largest side (``cnnfeat.topk.centre_pad``: fields that differ between batches are not
    stretched to one scale), shrunk (area) to ``max_side`` when larger; ``side`` is the largest crop side."""
    out = centre_pad([c.float() for c in cells])
    if out.shape[-1] != side:
        raise ValueError(f"the largest crop side is {out.shape[-1]}, not {side}")
    if side > max_side:
        out = torch.nn.functional.interpolate(out, size=(max_side, max_side), mode="area")
    return out
