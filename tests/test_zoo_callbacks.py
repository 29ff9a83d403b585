"""Every picture callback on foreign networks, through a real Trainer, checked against independent ground truth.

For each zoo network (functional ops, ResNet-18, a bare Sequential, VGG-BN with inplace ReLUs, an Inception
concat block, GELU/SiLU, Python control flow) the five picture callbacks run for one short epoch; the test reads
the event files back and compares: each feature-map picture with one drawn from tensors taken by plain module
hooks; each dead fraction with per-call counts of an independent ReLU recorder; each top-patch box with the
support of the unit's input gradient; the warnings where an "after" picture cannot exist.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnfeat import viz
from cnnfeat.callbacks import (
    DeadReluCallback,
    EmbeddingCallback,
    FeatureMapCallback,
    FilterCallback,
    TopPatchesCallback,
)
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.embedding import stratified_ids
from tests.conftest import read_events
from tests.helpers.gradient_support import clipped, measured_boxes
from tests.helpers.lightning_zoo import Padded, ZooModule
from tests.helpers.zoo import zoo

ZOO = zoo()
IMAGE_IDS = [0, 3]  # test images 0 (ankle boot) and 3 (trouser)
PROBE = 64  # dead ReLU probe: 64 stratified test images (the shared probe pass); top patches: the first 64
relu, gelu, silu = F.relu, F.gelu, F.silu


@dataclass(frozen=True)
class Spec:
    """What a network should give, written down by hand from its source.

    ``after``: conv -> (tag kind, module whose output feeds the activation, its call, activation, signed colours).
    ``no_after``: conv -> the warning's reason. ``relus``: every ReLU-family application, in execution order.
    ``patches``: module calls (path, call) whose boxes are measured. ``embed``: the UMAP node and its width.
    """

    convs: list[str]
    after: dict[str, tuple[str, str, int, Callable, bool]]
    relus: list[str]
    patches: list[tuple[str, int]]
    embed: tuple[str, int]
    no_after: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _resnet_relus() -> list[str]:
    return ["net.relu"] + [f"net.layer{i}.{b}.relu{k}" for i in range(1, 5) for b in (0, 1) for k in ("", ":1")]


def _inception_relus() -> list[str]:
    branches = ("branch1", "branch2.0", "branch2.1", "branch3.0", "branch3.1", "branch4.1")
    return ["net.conv1.relu"] + [f"net.inception3{x}.{b}.relu" for x in "ab" for b in branches]


SPECS: dict[str, Spec] = {
    "mnist_net": Spec(
        ["net.conv1", "net.conv2"],
        {"net.conv1": ("relu", "net.conv1", 0, relu, False), "net.conv2": ("relu", "net.conv2", 0, relu, False)},
        ["net.relu", "net.relu:1", "net.relu:2"],
        [("net.conv2", 0), ("net.dropout1", 0)],  # dropout1 comes right after the functional max-pool
        ("net.fc1", 128),
    ),
    "lenet": Spec(
        ["net.conv1", "net.conv2"],
        {"net.conv1": ("relu", "net.conv1", 0, relu, False), "net.conv2": ("relu", "net.conv2", 0, relu, False)},
        ["net.relu", "net.relu:1", "net.relu:2", "net.relu:3"],
        [("net.conv1", 0), ("net.conv2", 0)],  # conv2 sees through F.max_pool2d and the wrapper's F.pad
        ("net.fc2", 84),
    ),
    "resnet18": Spec(
        ["net.conv1", "net.layer1.0.conv1", "net.layer1.0.conv2"],
        {
            "net.conv1": ("relu", "net.bn1", 0, relu, False),
            "net.layer1.0.conv1": ("relu", "net.layer1.0.bn1", 0, relu, False),
        },
        _resnet_relus(),
        [("net.layer1.0", 0), ("net.layer2", 0)],  # residual blocks with a downsampling shortcut
        ("net.avgpool", 512),
        no_after={"net.layer1.0.conv2": "'net.layer1.0.add' (add of input-dependent tensors) comes first"},
    ),
    "sequential": Spec(
        ["net.0", "net.3"],
        {"net.3": ("relu", "net.3", 0, relu, False)},
        ["net.2", "net.4"],
        [("net.3", 0)],
        ("net.6", 16),
        no_after={"net.0": "'net.1' (MaxPool2d) comes first"},
    ),
    "vgg_bn": Spec(
        ["net.features.0", "net.features.7"],
        {
            "net.features.0": ("relu", "net.features.1", 0, relu, False),
            "net.features.7": ("relu", "net.features.8", 0, relu, False),
        },
        ["net.features.2", "net.features.5", "net.features.9", "net.features.12", "net.classifier.1"],
        [("net.features.7", 0)],
        ("net.classifier.1", 64),  # an inplace ReLU's output
    ),
    "inception": Spec(
        ["net.conv1.conv", "net.inception3a.branch3.1.conv"],
        {
            "net.conv1.conv": ("relu", "net.conv1.bn", 0, relu, False),
            "net.inception3a.branch3.1.conv": ("relu", "net.inception3a.branch3.1.bn", 0, relu, False),
        },
        _inception_relus(),
        [("net.inception3a", 0), ("net.maxpool1", 0)],  # the concatenation of four branches
        ("net.avgpool", 40),
    ),
    "gelu_silu": Spec(
        ["net.conv1", "net.conv2"],
        {"net.conv1": ("gelu", "net.conv1", 0, gelu, True), "net.conv2": ("silu", "net.conv2", 0, silu, True)},
        [],
        [("net.conv2", 0)],
        ("net.mean", 16),
        warnings=["DeadReluCallback: ZooModule applies no ReLU-family activation"],
    ),
    "dynamic": Spec(
        ["net.conv1", "net.shared", "net.shared:1"],
        {
            "net.conv1": ("relu", "net.conv1", 0, relu, False),
            "net.shared": ("relu", "net.shared", 0, relu, False),
            "net.shared:1": ("relu", "net.shared", 1, relu, False),
        },
        ["net.relu", "net.relu:1", "net.relu:2"],
        [("net.shared", 1)],
        ("net.amax", 8),
        warnings=["'net.shared' runs 2 times in one forward pass of ZooModule (net.shared, net.shared:1)"],
    ),
}


def node(path: str, call: int) -> str:
    return path if call == 0 else f"{path}:{call}"


# -- independent ground truth ------------------------------------------------------------------------------
def module_outputs(model: nn.Module, paths: set[str], x: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """Every call's output of the named submodules (plain forward hooks, cloned), in eval mode, without grad."""
    outs: dict[tuple[str, int], torch.Tensor] = {}
    calls: dict[str, int] = {}
    modules = dict(model.named_modules())

    def hook(path: str) -> Callable:
        def keep(m: nn.Module, a: tuple, o: torch.Tensor) -> None:
            outs[(path, calls.get(path, 0))] = o.detach().clone()
            calls[path] = calls.get(path, 0) + 1

        return keep

    handles = [modules[p].register_forward_hook(hook(p)) for p in paths]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return outs


class ReluRecorder(TorchFunctionMode):
    """The input of every ReLU-family application, in order: ``nn.ReLU``/``ReLU6`` calls by module hooks, and
    ``F.relu``, ``torch.relu``, ``x.relu_()``, ``F.relu6`` by a function mode (not the ones inside a module)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.inside = 0
        self.handles = []
        for m in model.modules():
            if isinstance(m, (nn.ReLU, nn.ReLU6)):
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, m: nn.Module, args: tuple) -> None:
        self.inputs.append(args[0].detach().clone())
        self.inside += 1

    def _post(self, m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.inside -= 1

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        if not self.inside and getattr(func, "__name__", "") in ("relu", "relu_", "relu6"):
            self.inputs.append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


def dead_fractions(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Per ReLU-family application: the share of units (dim 1) whose input is never > 0 on ``x``."""
    rec = ReluRecorder(model)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), rec:
            model(x)
    finally:
        model.train(was_training)
        for h in rec.handles:
            h.remove()
    return [float((a.transpose(0, 1).flatten(1).amax(1) <= 0).float().mean()) for a in rec.inputs]


def png(image: torch.Tensor) -> np.ndarray:
    """The pixels TensorBoard stores for a float RGB (3,H,W) image."""
    return (image.permute(1, 2, 0).numpy().astype(np.float32) * 255).clip(0, 255).astype(np.uint8)


def pixels(event: object) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))  # type: ignore[attr-defined]


def crop_by_slicing(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The box of a (C,H,W) image, zeros outside it (by padding the image, not by cnnfeat.receptive_field.crop)."""
    top, left, bottom, right = box
    p = max(0, -top, -left, bottom - image.shape[1] + 1, right - image.shape[2] + 1)
    padded = F.pad(image, (p, p, p, p))
    return padded[:, top + p : bottom + p + 1, left + p : right + p + 1]


# -- the test ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_dm(data_dir: Path, cache_dir: Path) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(data_dir=data_dir, cache_dir=cache_dir, batch_size=32, val_size=1000, download=False)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.mark.parametrize("name", list(SPECS))
def test_zoo_network_pictures_equal_ground_truth(name: str, small_dm: FashionMNISTDataModule, tmp_path: Path) -> None:
    spec, entry = SPECS[name], ZOO[name]
    module = ZooModule(entry.model(), entry.input_size)
    untrained = copy.deepcopy(module)
    filters = [c for c in spec.convs if ":" not in c]
    top = TopPatchesCallback(
        layers=[node(p, k) for p, k in spec.patches], top_k=2, max_channels=2, probe_size=PROBE, every_n_epochs=1
    )
    umap = EmbeddingCallback(
        probe_size=40, layer=spec.embed[0], n_neighbors=5, full_epochs=20, warm_epochs=5, cv_folds=2,
        pixels=False, gif=False, projector=False,
    )  # fmt: skip
    callbacks = [
        FilterCallback(layers=filters),
        FeatureMapCallback(image_ids=IMAGE_IDS, layers=spec.convs, min_cell=28),
        DeadReluCallback(probe_size=PROBE, hist_samples=500),
        top,
        umap,
    ]
    trainer = pl.Trainer(
        accelerator="cpu",  # the ground truth is computed on the CPU: the same kernels, the same pixels
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=small_dm)
    said = [str(w.message) for w in record]
    ev = read_events(tmp_path)
    images, scalars = ev["images"], ev["scalars"]

    # warnings: a conv without an activation of its own, a conv applied twice, no ReLU at all: each once
    for conv, reason in spec.no_after.items():
        expected = f"FeatureMapCallback: no 'after' picture for {conv!r}: no activation after {conv!r}: {reason}"
        assert said.count(expected) == 1, (expected, said)
        assert not [t for t in images if t.startswith(f"feature_maps/{conv}/") and "/conv/" not in t]
    for text in spec.warnings:
        assert sum(text in s for s in said) == 1, (text, said)

    # filters: every conv module, at steps 0 and 1
    for conv in filters:
        assert [e.step for e in images[f"filters/{conv}"]] == [0, 1]

    # feature maps: the pictures equal ones drawn from tensors taken by plain module hooks
    x, _ = small_dm.images("test", IMAGE_IDS)
    sources = {src for _, src, *_ in spec.after.values()} | {c.split(":")[0] for c in spec.convs}
    for step, model in ((0, untrained), (1, module)):
        outs = module_outputs(model, sources, x)
        for conv in spec.convs:
            path, call = conv.split(":")[0], int(conv.split(":")[1]) if ":" in conv else 0
            for k, img_id in enumerate(IMAGE_IDS):
                before = viz.map_grid(outs[(path, call)][k], signed=True, min_cell=28)
                event = images[f"feature_maps/{conv}/conv/img{img_id}"][step]
                assert event.step == step and np.array_equal(pixels(event), png(before)), (conv, step)
                if conv in spec.after:
                    kind, src, src_call, act, signed = spec.after[conv]
                    after = viz.map_grid(act(outs[(src, src_call)][k]), signed=signed, min_cell=28)
                    event = images[f"feature_maps/{conv}/{kind}/img{img_id}"][step]
                    assert np.array_equal(pixels(event), png(after)), (conv, kind, step)
                    if kind != "relu":  # GELU/SiLU go negative: the diverging map, not viridis from 0
                        assert not np.array_equal(
                            pixels(event), png(viz.map_grid(act(outs[(src, src_call)][k]), signed=False, min_cell=28))
                        )

    # dead units: one scalar per application, equal to per-call counts, and "all" weighting every unit once
    dead_cb = next(c for c in callbacks if isinstance(c, DeadReluCallback))
    assert dead_cb.probe is not None  # the shared probe pass reads the stratified selection, not the first images
    probe_x, _ = small_dm.images("test", dead_cb.probe.ids[stratified_ids(dead_cb.probe.labels, PROBE)])
    logged = sorted(t.removeprefix("relu/dead_fraction/") for t in scalars if t.startswith("relu/dead_fraction/"))
    assert logged == sorted([*spec.relus, "all"] if spec.relus else []), logged
    for step, model in ((0, untrained), (1, module)):
        truth = dead_fractions(model, probe_x)
        assert len(truth) == len(spec.relus)
        for relu_name, value in zip(spec.relus, truth, strict=True):
            got = dict(scalars[f"relu/dead_fraction/{relu_name}"])[step]
            assert got == pytest.approx(value, abs=1e-6), (relu_name, step)

    # top patches: each box is the support of the unit's input gradient, and the cells are those crops
    images_28, _ = small_dm.images("test", range(PROBE))
    for path, call in spec.patches:
        boxes = top.last_boxes[node(path, call)]
        assert boxes and all(0 <= img_id < PROBE for _, _, img_id, _, _ in boxes)
        measured = measured_boxes(Padded(module.net, entry.input_size), path, call, [u for *_, u, _ in boxes])
        for (_, _, _, unit, box), support in zip(boxes, measured, strict=True):
            assert support == clipped(box, 28, 28), (path, unit, box, support)
        cells = torch.stack([crop_by_slicing(images_28[i], box) for _, _, i, _, box in boxes])
        if cells.shape[-1] > top.max_cell:
            cells = F.interpolate(cells, size=(top.max_cell, top.max_cell), mode="area")
        expected = viz.grid(viz.grey(cells), nrow=top.top_k, min_cell=top.min_cell)
        width = top.search.tops[node(path, call)].values.shape[1]
        shown = sorted({c for c, *_ in boxes})
        if shown != list(range(width)):  # a chosen subset: the picture names its channels under the grid
            expected = viz.caption(expected, f"rows, top to bottom: the {len(shown)} most variable of {width} channels")
            expected = viz.caption(expected, f"{shown}")
        assert np.array_equal(pixels(images[f"top_patches/{node(path, call)}"][-1]), png(expected)), path

    # UMAP of a named node: maps at both steps, from vectors of the node's width
    assert [e.step for e in images["umap/features"]] == [0, 1]
    assert umap._last_features is not None and umap._last_features.shape == (40, spec.embed[1])
    assert [s for s, _ in scalars["umap/knn_acc"]] == [0, 1]
