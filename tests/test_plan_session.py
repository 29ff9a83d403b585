"""One layer plan per model, one session per fit: the plan against the graph it was traced from (and hand-written
ground truth for the lecture's CNN), one trace per model in a real fit, and the UMAP vectors read from the shared
probe pass bit for bit."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cnnfeat.callbacks import DeadReluCallback, EmbeddingCallback
from cnnfeat.callbacks.base import VisualizationCallback, inference, share_session
from cnnfeat.callbacks.representations import RepresentationCallback
from cnnfeat.callbacks.session import AnalysisSession
from cnnfeat.graph import activation_after, conv_nodes, relu_family_nodes, trace_graph
from cnnfeat.models import SmallCNN
from cnnfeat.plan import LayerPlan
from cnnfeat.probe import ProbeSet, batches, probe_from_tensors
from cnnfeat.receptive_field import ReceptiveFieldError, graph_receptive_fields
from cnnfeat.run.train import build
from tests.helpers.zoo import zoo

SIZE = 120


@pytest.fixture
def probe() -> ProbeSet:
    g = torch.Generator().manual_seed(1)
    return probe_from_tensors(torch.rand(300, 1, 28, 28, generator=g), torch.arange(300) % 10)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


# -- the plan --------------------------------------------------------------------------------------------------
def test_the_plan_of_the_lectures_cnn_is_what_its_code_says(model: nn.Module) -> None:
    plan = LayerPlan.trace(model, torch.rand(1, 1, 28, 28))
    assert plan.convs == ["conv1", "conv2", "conv3"]
    assert plan.relus == ["relu1", "relu2", "relu3", "relu4", "relu5"]
    assert plan.of_kind("linear") == ["fc1", "fc2", "fc3"]
    assert plan.of_kind("pool") == ["pool1", "pool2"]
    assert {c: plan[c].activation for c in plan.convs} == {"conv1": "relu1", "conv2": "relu2", "conv3": "relu3"}
    assert {n: plan[n].activation for n in ("fc1", "fc2")} == {"fc1": "relu4", "fc2": "relu5"}
    assert plan["fc3"].activation is None and "not used by any later node" in plan["fc3"].activation_note
    assert [plan[n].units for n in ("conv1", "conv2", "conv3", "fc1", "fc2", "fc3")] == [6, 6, 16, 120, 100, 10]
    assert plan["conv3"].output_shape == (16, 14, 14) and plan["conv3"].spatial
    assert plan["conv1"].module == "conv1" and plan.weights("conv1", model) is model.conv1
    # 3x3 convs and 2x2 pools: conv1 3, conv2 5, pool1 6 (step 2), conv3 6 + 2*2 = 10
    assert [plan.field(c).size for c in plan.convs] == [(3, 3), (5, 5), (10, 10)]
    assert plan.field("conv3").jump == (2, 2)


@pytest.mark.parametrize("name", sorted(zoo()))
def test_the_plan_of_each_zoo_network_agrees_with_its_graph(name: str) -> None:
    spec = zoo()[name]
    net, x = spec.model(), spec.example_input()
    plan = LayerPlan.trace(net, x)
    graph = trace_graph(net, x)  # traced again, independently
    assert list(plan.layers) == graph.names
    assert plan.convs == conv_nodes(graph) and plan.relus == relu_family_nodes(graph)
    shapes: dict[str, tuple[int, ...]] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            shapes.setdefault(name, tuple(out.shape))

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net.eval()(x)
    for h in hooks:
        h.remove()
    for conv in plan.convs:
        layer = plan[conv]
        assert layer.activation == activation_after(graph, conv)[0], conv
        if layer.module is not None and ":" not in conv:  # a module's first call: its hook saw this output
            assert (layer.units, *layer.output_shape[1:]) == shapes[conv][1:], conv
        try:
            want = graph_receptive_fields(graph, [conv])[conv]
        except ReceptiveFieldError as e:
            with pytest.raises(ReceptiveFieldError, match=str(e).split(":")[0]):
                plan.field(conv)
        else:
            assert plan.field(conv) == want, conv


def test_a_name_the_plan_does_not_hold_lists_the_valid_ones(model: nn.Module) -> None:
    plan = LayerPlan.trace(model, torch.rand(1, 1, 28, 28))
    with pytest.raises(Exception, match=r"'conv9'.*conv1"):
        plan.resolve(["conv9"])
    with pytest.raises(Exception, match=r"conv layer.*'relu1'"):
        plan.resolve_convs(["relu1"])


# -- the session -------------------------------------------------------------------------------------------------
def test_sessions_are_per_trainer_and_never_global() -> None:
    a, b = DeadReluCallback(), DeadReluCallback()

    class Key:  # a stand-in Trainer (weakly referable)
        pass

    k1, k2 = Key(), Key()
    s1 = AnalysisSession.attach([a, b], k1)
    assert a.session is s1 and b.session is s1 and AnalysisSession.attach([b, a], k1) is s1
    s2 = AnalysisSession.attach([a, b], k2)
    assert s2 is not s1 and a.session is s2, "a new Trainer gets a new session"
    assert AnalysisSession.attach([a]) is not AnalysisSession.attach([a]), "no key: always fresh"


def test_a_fit_traces_each_model_once_and_shares_one_session(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    traced: list[str] = []
    real = LayerPlan.trace.__func__

    def counting(cls, model, example):
        traced.append(type(model).__name__)
        return real(cls, model, example)

    monkeypatch.setattr(LayerPlan, "trace", classmethod(counting))
    cfg = make_cfg(
        "callbacks=[none,filters,feature_maps,dead_relu,umap,top_patches]",
        "trainer.max_epochs=1",
        "callbacks.umap.probe_size=200",
        "callbacks.umap.full_epochs=20",
        "callbacks.umap.warm_epochs=10",
        "callbacks.dead_relu.probe_size=200",
        "callbacks.top_patches.probe_size=200",
    )
    dm, net, trainer = build(cfg)
    trainer.fit(net, datamodule=dm)
    pictures = [cb for cb in trainer.callbacks if isinstance(cb, VisualizationCallback)]
    sessions = {id(cb.session) for cb in pictures}
    assert len(pictures) == 5 and len(sessions) == 1
    assert traced == [type(net).__name__], f"one layer plan for the one model, got {traced}"
    umap = next(cb for cb in pictures if isinstance(cb, EmbeddingCallback))
    dead = next(cb for cb in pictures if isinstance(cb, DeadReluCallback))
    assert umap.source == ("fc3", "input"), "the UMAP vectors come from the shared pass"
    assert umap.probe_pass is dead.probe_pass and dead.probe_pass is not None
    assert dead.probe_pass.runs == 2, "steps 0 and 1: one pass each, UMAP included"
    assert torch.equal(dead.pass_ids, umap.probe_ids), "UMAP maps the images the other callbacks count"


# -- UMAP from the pass ------------------------------------------------------------------------------------------
def own_features(model: nn.Module, probe: ProbeSet, positions: torch.Tensor, batch: int) -> np.ndarray:
    """What the UMAP callback computed with a pass of its own before: ``features()`` batch by batch."""
    with inference(model):
        return torch.cat([model.features(probe.inputs[b]).float() for b in batches(positions, batch)]).numpy()


def test_umap_vectors_from_the_shared_pass_equal_its_own_pass_bit_for_bit(
    model: nn.Module, probe: ProbeSet, tmp_path: Path
) -> None:
    dead = DeadReluCallback(probe_size=SIZE, batch_size=32)
    rep = RepresentationCallback(probe_size=SIZE, block_size=40, batch_size=32, spill=False)
    umap = EmbeddingCallback(probe_size=SIZE, batch_size=32, pixels=False, full_epochs=20, warm_epochs=10, cv_folds=2)
    cbs = [dead, rep, umap]
    for cb in cbs:
        cb.prepare(model, probe)
    share_session(cbs)
    seen: list[np.ndarray] = []
    fit = umap._fit
    umap._fit = lambda x, previous: (seen.append(x.copy()), fit(x, previous))[1]  # type: ignore[method-assign]
    with inference(model):
        for cb in cbs:
            cb.render(model, probe, 0)
    assert umap.source == ("fc3", "input") and dead.probe_pass is umap.probe_pass
    assert dead.probe_pass is not None and dead.probe_pass.runs == 1
    assert dead.probe_pass.forward_calls == len(range(0, SIZE, 32)), "one forward pass for the three"
    positions = umap.positions(probe)
    assert torch.equal(probe.ids[positions], dead.pass_ids), "UMAP and dead-ReLU read other images"
    assert np.array_equal(seen[0], own_features(model, probe, positions, 32))


def test_umap_calls_features_itself_when_it_is_not_the_heads_input(
    probe: ProbeSet, caplog: pytest.LogCaptureFixture
) -> None:
    class Doubled(SmallCNN):  # features() is not what the head reads
        def features(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().features(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc3(super().features(x))

    torch.manual_seed(0)
    net = Doubled()
    umap = EmbeddingCallback(probe_size=SIZE, batch_size=32, pixels=False, full_epochs=20, warm_epochs=10, cv_folds=2)
    with caplog.at_level(logging.INFO, logger="cnnfeat"):
        umap.prepare(net, probe)
    assert umap.source is None
    assert "features(x) is not the input of the last Linear layer 'fc3'" in caplog.text
    seen: list[np.ndarray] = []
    fit = umap._fit
    umap._fit = lambda x, previous: (seen.append(x.copy()), fit(x, previous))[1]  # type: ignore[method-assign]
    with inference(net):
        umap.render(net, probe, 0)
    assert np.array_equal(seen[0], own_features(net, probe, umap.positions(probe), 32))


# -- defaults that fit a network and a data set they were not written for ------------------------------------------
def test_the_defaults_fit_a_resnet_and_a_small_split(caplog: pytest.LogCaptureFixture) -> None:
    """The lecture's layer names, image IDs and probe size are defaults; on a ResNet-18 and a 300-image split each
    becomes what fits (the first conv of each stage, the first image of each class, the whole split) and says so,
    while an explicit value that does not fit is still refused."""
    from cnnfeat.callbacks import FeatureMapCallback, FilterCallback, TopPatchesCallback

    spec = zoo()["resnet18"]
    net = spec.model()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 7
    probe = probe_from_tensors(torch.rand(300, 1, 28, 28, generator=g), labels)
    maps, tops, dead = FeatureMapCallback(), TopPatchesCallback(top_k=2), DeadReluCallback()
    with caplog.at_level(logging.INFO, logger="cnnfeat"):
        for cb in (maps, tops, dead):
            cb.prepare(net, probe)
    plan = LayerPlan.trace(net, probe.inputs[:1])
    sizes = [plan[c].output_shape[1:] for c in maps.layers]
    assert maps.layers[0] == plan.convs[0] and len(set(sizes)) == len(sizes) >= 3, "one conv per resolution"
    every = {plan[c].output_shape[1:] for c in plan.convs}
    assert set(sizes) == every, "every resolution (stem, layer1..layer4) has its conv: none dropped by the cap"
    assert all(
        plan.convs.index(c) <= plan.convs.index(next(d for d in plan.convs if plan[d].output_shape[1:] == s))
        for c, s in zip(maps.layers, sizes, strict=True)
    ), "the first conv of its stage"
    assert tops.layers and set(tops.layers) <= set(plan.convs)
    assert maps.image_ids == [int(probe.ids[(labels == k).nonzero()[0, 0]]) for k in range(6)]
    assert dead.probe_size == 300
    filters = FilterCallback()
    filters.prepare(net, None)
    assert filters.layers == [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)][:2]
    assert "the first conv of each stage" in caplog.text and "using all 300" in caplog.text
    with pytest.raises(Exception, match="probe_size=500 is larger"):
        DeadReluCallback(probe_size=500).prepare(net, probe)
    with pytest.raises(Exception, match="conv2"):
        FeatureMapCallback(layers=["conv1", "conv9"]).prepare(net, probe)


def test_the_lectures_images_stay_the_default_on_fashion_mnist(model: nn.Module) -> None:
    from cnnfeat.callbacks import FeatureMapCallback
    from cnnfeat.lecture import FASHION_MNIST_CLASSES, LECTURE_IMAGE_IDS

    g = torch.Generator().manual_seed(0)
    probe = probe_from_tensors(
        torch.rand(1100, 1, 28, 28, generator=g), torch.arange(1100) % 10, class_names=FASHION_MNIST_CLASSES
    )
    cb = FeatureMapCallback(image_ids=None)
    cb.prepare(model, probe)
    assert cb.image_ids == list(LECTURE_IMAGE_IDS) and cb.layers == ["conv1", "conv2"]


def test_the_lectures_test_ids_are_not_used_on_the_validation_split(model: nn.Module) -> None:
    """A DataModule that builds its test set only in setup("test") gives a validation probe: the lecture's numbers
    are test-set indices, so there they would name other images; the first image of each class is shown instead."""
    from cnnfeat.callbacks import AttributionCallback, FeatureMapCallback
    from cnnfeat.lecture import FASHION_MNIST_CLASSES

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(1100) % 10
    probe = probe_from_tensors(
        torch.rand(1100, 1, 28, 28, generator=g), labels, split="val", class_names=FASHION_MNIST_CLASSES
    )
    for cb in (FeatureMapCallback(image_ids=None), AttributionCallback()):
        cb.prepare(model, probe)
        assert cb.image_ids == probe.example_ids(6) == [int(torch.nonzero(labels == c)[0]) for c in range(6)]
