"""Arrows point one way: data never imports models (the frozen backbone is given to the feature cache), and callbacks
receive modules, never load checkpoints (the config loads ``reference_ckpt`` at the edge)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from cnnfeat.callbacks.representations import CrossModelCKACallback
from cnnfeat.data.feature_cache import FrozenFeatureDataModule
from cnnfeat.errors import CheckpointError, ConfigError
from cnnfeat.models import FrozenAlexNet, FrozenTorchvision, SmallCNN, TorchvisionClassifier, TransferClassifier
from cnnfeat.probe import probe_from_tensors
from cnnfeat.run.checkpoints import reference_model
from cnnfeat.run.cli import instantiate_node

MakeCfg = Callable[..., DictConfig]
PACKAGE = Path(__file__).resolve().parents[1] / "cnnfeat"
#: the data side of the architecture: the DataModules and the probe they hand to callbacks
DATA_SIDE = (
    "cnnfeat.data",
    "cnnfeat.data.common",
    "cnnfeat.data.fashion_mnist",
    "cnnfeat.data.feature_cache",
    "cnnfeat.data.image_folder",
    "cnnfeat.data.official",
    "cnnfeat.probe",
)
CALLBACKS = tuple(sorted(f"cnnfeat.callbacks.{p.stem}" for p in (PACKAGE / "callbacks").glob("*.py")))


# -- the import graph, read from the source -------------------------------------------------------------------
def _source(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for path in (PACKAGE / rel / "__init__.py", PACKAGE / rel.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imports(module: str) -> set[str]:
    """cnnfeat modules that ``module`` imports anywhere in its source (function bodies too), with their parent
    packages; the top-level ``cnnfeat`` facade (``from cnnfeat import SmallCNN``) is not an edge of the graph."""
    path = _source(module)
    assert path is not None, module
    return imports_in(path.read_text(), module if path.name == "__init__.py" else module.rpartition(".")[0])


def imports_in(source: str, package: str) -> set[str]:
    """The cnnfeat modules (and their parent packages) that ``source``, a module of ``package``, imports."""
    named: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            named |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            named |= {base, *(f"{base}.{a.name}" for a in node.names)}  # `from cnnfeat import models` is a module
    found = set()
    for name in named:
        if name.split(".")[0] != "cnnfeat":
            continue
        while name.count(".") and _source(name) is None:  # `from m import function` -> m
            name = name.rpartition(".")[0]
        parts = name.split(".")
        found |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return found


def import_closure(*roots: str) -> set[str]:
    """Every cnnfeat module that importing ``roots`` reaches through cnnfeat's own imports."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _imports(module)
    return seen


def test_the_import_graph_reader_sees_the_edges_it_must() -> None:
    """The checker itself: imports in function bodies, relative imports, ``from package import module``, parents."""
    source = textwrap.dedent(
        """
        import torch
        from cnnfeat import errors

        def late():
            from ..run import checkpoints
            from cnnfeat.models.alexnet import FrozenAlexNet
            import cnnfeat.graph
        """
    )
    found = imports_in(source, "cnnfeat.callbacks")
    assert found == {
        "cnnfeat.errors",
        "cnnfeat.run",
        "cnnfeat.run.checkpoints",
        "cnnfeat.graph",
        "cnnfeat.models",
        "cnnfeat.models.alexnet",
    }
    assert {"cnnfeat.callbacks", "cnnfeat.callbacks.base"} <= _imports("cnnfeat.callbacks.filters")
    assert "cnnfeat.models" in import_closure("cnnfeat.run.checkpoints")


@pytest.mark.parametrize("module", DATA_SIDE)
def test_data_never_imports_models(module: str) -> None:
    reached = sorted(m for m in import_closure(module) if m == "cnnfeat.models" or m.startswith("cnnfeat.models."))
    assert not reached, f"{module} reaches {reached}: give the data side a backbone instead of importing a model"


@pytest.mark.parametrize("module", CALLBACKS)
def test_callbacks_never_import_checkpoint_loading(module: str) -> None:
    assert "cnnfeat.run.checkpoints" not in import_closure(module), (
        f"{module} reaches cnnfeat.run.checkpoints: callbacks receive modules; checkpoints are loaded by the config"
    )


def test_importing_the_data_side_loads_no_model() -> None:
    """At run time too (a dynamic import would escape the source check); the package facade is left out."""
    code = textwrap.dedent(
        f"""
        import sys, types
        facade = types.ModuleType("cnnfeat")
        facade.__path__ = [{str(PACKAGE)!r}]
        sys.modules["cnnfeat"] = facade
        import {", ".join(DATA_SIDE)}
        print(sorted(m for m in sys.modules if m.startswith("cnnfeat.models") or m == "cnnfeat.run.checkpoints"))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


#: the analysis core: the top-level modules (tensors in, tensors out)
CORE = tuple(sorted(f"cnnfeat.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"))
#: what the core may import besides itself: the error types and the stdlib-only atomic file writer
CORE_MAY_USE = {"cnnfeat.errors", "cnnfeat.run", "cnnfeat.run.atomic"}


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_only_the_core(module: str) -> None:
    """No Lightning adapter, run plumbing, model, data module or report reaches the analysis core."""
    outside = sorted(m for m in import_closure(module) - CORE_MAY_USE if m.count(".") > 1 or m not in CORE)
    assert not outside, f"{module} (analysis core) reaches {outside}"
    source = (PACKAGE / f"{module.split('.')[1]}.py").read_text()
    assert "lightning" not in imports_of_packages(source), f"{module} (analysis core) imports Lightning"


def imports_of_packages(source: str) -> set[str]:
    """Top-level package names that ``source`` imports (any depth of the AST)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0].replace("pytorch_", "") for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0].replace("pytorch_", ""))
    return names


# -- the feature cache is given its backbone ------------------------------------------------------------------
class TinyBackbone(nn.Module):
    """A frozen backbone of one's own: what the cache asks of one (a name, a fingerprint, images -> vectors)."""

    name = "Tiny"

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).flatten(1)

    def fingerprint(self) -> str:
        return "0123456789abcdef"


def test_the_feature_cache_takes_any_frozen_backbone(data_dir: Path, tmp_path: Path) -> None:
    dm = FrozenFeatureDataModule(TinyBackbone(), data_dir=data_dir, cache_dir=tmp_path, max_images=8, download=False)
    assert dm.cache_file("test") == tmp_path / "features" / "tiny-0123456789abcdef" / "test-first8.pt"
    dm.prepare_data()
    dm.setup()
    x, _ = dm.images("test", range(8))
    assert torch.equal(dm.inputs("test", range(8)), TinyBackbone()(x).half().float())


def test_a_backbone_factory_is_built_once_on_first_use(data_dir: Path, tmp_path: Path) -> None:
    calls = []

    def make() -> nn.Module:
        calls.append(1)
        return TinyBackbone()

    dm = FrozenFeatureDataModule(make, data_dir=data_dir, cache_dir=tmp_path, max_images=8, download=False)
    assert not calls, "nothing is built before the cache is needed"
    for split in ("train", "test"):
        dm.cache_file(split)
    assert len(calls) == 1 and isinstance(dm.backbone, TinyBackbone)


def test_what_is_not_a_backbone_is_refused(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.backbone must be a frozen backbone .* got Linear"):
        FrozenFeatureDataModule(nn.Linear(2, 2), data_dir=data_dir, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"data.backbone must be a frozen backbone .* got str"):
        FrozenFeatureDataModule("imagenet", data_dir=data_dir, cache_dir=tmp_path)  # type: ignore[arg-type]
    made = FrozenFeatureDataModule(lambda: nn.Linear(2, 2), data_dir=data_dir, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"data.backbone built a Linear, not a frozen backbone"):
        made.cache_file("test")


@pytest.mark.parametrize(
    "overrides",
    [
        ("data=alexnet_features", "data.backbone.weights=none", "data.backbone.input_size=64", "data.max_images=8"),
        ("experiment=transfer_quick", "backbone.weights=none", "backbone.input_size=64", "backbone.seed=3"),
    ],
)
def test_the_config_gives_the_cache_a_frozen_alexnet(make_cfg: MakeCfg, overrides: tuple[str, ...]) -> None:
    cfg = make_cfg(*overrides)
    dm = instantiate_node(cfg.data, "data")
    seed = 3 if "backbone.seed=3" in overrides else 0
    if "experiment=transfer_quick" in overrides:  # experiment=transfer: torchvision's AlexNet up to its new MLP top
        expected = FrozenTorchvision(
            "alexnet", "none", seed, 64, head_hidden=[4096, 4096], grey_to_rgb=True, channels_last=True
        )
        assert isinstance(dm.backbone, FrozenTorchvision) and dm.fingerprint == expected.fingerprint()
        model = instantiate_node(cfg.model, "model")
        assert isinstance(model, TorchvisionClassifier) and model.fingerprint() == dm.fingerprint
    else:  # the data config's default: the original route's FrozenAlexNet
        assert isinstance(dm.backbone, FrozenAlexNet)
        assert dm.fingerprint == FrozenAlexNet("none", seed, 64).fingerprint()
    assert dm.cache_file("test").parent.name == f"alexnet-{dm.fingerprint}", "the cache key of earlier versions"


# -- the cross-model CKA callback is given its reference ------------------------------------------------------
def small_checkpoint(path: Path) -> Path:
    torch.manual_seed(1)
    m = SmallCNN()
    torch.save(
        {
            "state_dict": m.state_dict(),
            "hyper_parameters": dict(m.hparams),
            "cnnfeat_model": f"{type(m).__module__}.{type(m).__qualname__}",
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def probe() -> object:
    g = torch.Generator().manual_seed(0)
    return probe_from_tensors(torch.rand(40, 1, 28, 28, generator=g), torch.arange(40) % 10)


def cfg_overrides(ckpt: Path) -> tuple[str, ...]:
    """The README's command line: ``cnnfeat-train experiment=transfer callbacks.cross_cka.reference_ckpt=...``."""
    return "experiment=transfer", "backbone.weights=none", f"callbacks.cross_cka.reference_ckpt={ckpt}"


CKA = {"probe_size": 20, "block_size": 10, "batch_size": 8, "layers": ["backbone.relu1", "backbone.relu5"]}


def render(cb: CrossModelCKACallback, model: nn.Module, probe: object) -> dict[str, float]:
    cb.prepare(model, probe)
    return cb.render(model, cb.probe, 0).scalars


def test_the_callback_takes_a_module_and_gives_it_back_as_it_was(probe: object) -> None:
    torch.manual_seed(1)
    reference = SmallCNN().train()
    transfer = TransferClassifier(weights="none", input_size=63, hidden=(8,)).eval()
    cb = CrossModelCKACallback(reference, **CKA)
    scalars = render(cb, transfer, probe)
    assert cb.ref_names[0] == "pixels" and len(scalars) == len(cb.ref_names) * 2
    assert reference.training and all(m.training for m in reference.modules()), "its train/eval mode is restored"
    assert next(reference.parameters()).device.type == "cpu"
    again = CrossModelCKACallback(reference.eval(), **CKA)
    assert render(again, transfer, probe) == scalars, "the reference's own mode does not change the numbers"


def test_a_path_is_not_a_reference(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"reference must be a network \(an nn.Module\) or null, got str"):
        CrossModelCKACallback(str(tmp_path / "small.ckpt"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"reference_ckpt=.*small.ckpt only names the reference's file"):
        CrossModelCKACallback(reference_ckpt=str(tmp_path / "small.ckpt"))


def test_reference_ckpt_on_the_command_line_gives_the_callback_the_loaded_network(
    make_cfg: MakeCfg, tmp_path: Path, probe: object
) -> None:
    ckpt = small_checkpoint(tmp_path / "small.ckpt")
    off = instantiate(make_cfg("experiment=transfer", "backbone.weights=none").callbacks.cross_cka)
    assert off.reference is None and off.reference_ckpt is None
    cfg = make_cfg(*cfg_overrides(ckpt))
    cb = instantiate_node(cfg.callbacks.cross_cka, "callbacks.cross_cka")
    assert isinstance(cb, CrossModelCKACallback) and isinstance(cb.reference, SmallCNN)
    assert cb.reference_ckpt == str(ckpt) and not cb.reference.training
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in cb.reference.state_dict().items())
    small = [f"callbacks.cross_cka.{k}={v}" for k, v in CKA.items() if k != "layers"]
    cfg = make_cfg(*cfg_overrides(ckpt), *small, "callbacks.cross_cka.layers=[backbone.relu1,backbone.relu5]")
    cb = instantiate_node(cfg.callbacks.cross_cka, "callbacks.cross_cka")
    transfer = TransferClassifier(weights="none", input_size=63, hidden=(8,)).eval()
    assert render(cb, transfer, probe) == render(CrossModelCKACallback(reference_model(ckpt), **CKA), transfer, probe)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (None, r"callbacks.cross_cka: Checkpoint .*reference.ckpt does not exist"),
        (b"", r"callbacks.cross_cka: .*reference.ckpt is empty \(0 bytes\)"),
        (b"garbage", r"callbacks.cross_cka: .*reference.ckpt is not a readable checkpoint"),
    ],
)
def test_a_bad_reference_ckpt_is_refused_at_the_edge(
    make_cfg: MakeCfg, tmp_path: Path, write: bytes | None, message: str
) -> None:
    path = tmp_path / "reference.ckpt"
    if write is not None:
        path.write_bytes(write)
    cfg = make_cfg(*cfg_overrides(path))
    with pytest.raises(CheckpointError, match=message):
        instantiate_node(cfg.callbacks.cross_cka, "callbacks.cross_cka")
