"""Defaults that fit the network (issue 23): on a ResNet-18 the atlas and the top patches show a bounded number of
units per layer, the most variable ones, chosen once; crops whose fields differ are padded, never stretched; CKA and
probes measure stage outputs. SmallCNN keeps every unit and its layers. Each choice is checked against a brute force
computation from forward hooks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cnnfeat import atlas, viz
from cnnfeat.callbacks import AtlasCallback, TopPatchesCallback
from cnnfeat.callbacks.base import inference
from cnnfeat.callbacks.representations import RepresentationCallback, default_layers, penultimate, stage_outputs
from cnnfeat.errors import ConfigError
from cnnfeat.graph import capture
from cnnfeat.models import SmallCNN
from cnnfeat.plan import LayerPlan
from cnnfeat.probe import ProbeSet, probe_from_tensors
from cnnfeat.receptive_field import crop
from cnnfeat.topk import centre_pad
from cnnfeat.units import SpreadAccumulator, check_units, choose_units, most_variable
from tests.helpers.zoo import DynamicNet

N = 16  # probe images: enough for a spread per channel, cheap on 2 CPU cores


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def rgb_probe(n: int = N) -> ProbeSet:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, 32, 32, generator=g) * torch.rand(n, 1, 1, 1, generator=g)  # brightness varies
    return probe_from_tensors(images, torch.arange(n) % 10)


def brute_spread(model: nn.Module, x: torch.Tensor, node: str) -> torch.Tensor:
    """Population std over images of each channel's per-image max, from a plain capture of the whole batch."""
    with capture(model, [node]) as out, torch.no_grad():
        model(x)
    per_image = out[node].flatten(2).amax(dim=2).double() if out[node].ndim > 2 else out[node].double()
    return per_image.std(dim=0, unbiased=False)


def brute_choice(spread: torch.Tensor, k: int) -> list[int]:
    return sorted(spread.topk(k).indices.tolist())


# -- the helper -------------------------------------------------------------------------------------------
def test_streamed_spread_and_choice_equal_a_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(50, 40, 5, 5, generator=g) * torch.linspace(0.1, 3, 40).view(1, 40, 1, 1) + 100.0
    acc = SpreadAccumulator()
    for part in acts.split(7):
        acc.update(part)
    want = acts.flatten(2).amax(dim=2).double().std(dim=0, unbiased=False)
    assert torch.allclose(acc.finish(), want, rtol=1e-9, atol=1e-9), "offset 100: shifted sums stay accurate"
    assert most_variable(acc.finish(), 16) == brute_choice(want, 16)
    acts[3, 7, 0, 0] = torch.nan
    acc = SpreadAccumulator()
    acc.update(acts)
    assert torch.allclose(acc.finish()[7], acts[:, 7].nan_to_num(-1e9).flatten(1).amax(1).double().std(unbiased=False))
    acts[3, 7] = torch.nan
    acc = SpreadAccumulator()
    acc.update(acts)
    assert acc.finish()[7].isnan() and 7 not in most_variable(acc.finish(), 39), "a unit with a NaN map ranks last"
    assert most_variable(torch.tensor([1.0, 2.0, 2.0, 0.5]), 2) == [1, 2], "ties go to the lower index"
    assert choose_units("all", 5, "x") == [0, 1, 2, 3, 4] and choose_units(16, 5, "x") == [0, 1, 2, 3, 4]
    assert choose_units([4, 1], 5, "x") == [4, 1]
    with pytest.raises(ConfigError, match=r"units \[7\] out of range for conv9 \(5 units: valid 0..4\)"):
        choose_units([1, 7], 5, "conv9")
    for bad in (0, "some", [1, 1], [], True):
        with pytest.raises(ConfigError, match="units must be an integer >= 1, 'all' or a list"):
            check_units("units", bad)


# -- ResNet-18: bounded, most variable, kept ---------------------------------------------------------------
def test_resnet18_top_patches_show_the_16_most_variable_channels(caplog: pytest.LogCaptureFixture) -> None:
    net, probe = resnet18(), rgb_probe()
    cb = TopPatchesCallback(top_k=2, batch_size=16)
    with caplog.at_level(logging.INFO, logger="cnnfeat"):
        cb.prepare(net, probe)
        with inference(net):
            cb.render(net, probe, 0)
    assert cb.layers and all(LayerPlan.trace(net, probe.inputs[:1])[n].units > 16 for n in cb.layers)
    for name in cb.layers:
        # conv -> BatchNorm -> ReLU: units are ranked (and their spread taken) after the BatchNorm and ReLU, where a
        # negative BatchNorm scale cannot turn the order around; a block's conv1 feeds its ReLU's first call
        assert name.endswith("conv1"), name
        ranked = name[: -len("conv1")] + "relu"
        assert cb.search.ranked_at[name] == ranked
        want = brute_choice(brute_spread(net, probe.inputs, ranked), 16)
        assert cb.chosen[name] == want, name
        assert sorted({c for c, *_ in cb.last_boxes[name]}) == want, "the drawn rows are the chosen channels"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("TopPatchesCallback: channels"))
    assert f"{cb.layers[0]} 16 of 64 {cb.chosen[cb.layers[0]]}" in line and "most variable" in line
    before = dict(cb.chosen)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(-1.5)  # another network: its own spreads would pick other channels
    with inference(net):
        cb.render(net, probe, 1)
    assert cb.chosen == before and {c for c, *_ in cb.last_boxes[cb.layers[0]]} == set(before[cb.layers[0]])
    again = TopPatchesCallback(top_k=2)
    again.load_state_dict(cb.state_dict())
    assert again.chosen == before, "a resumed fit keeps the choice"
    # the picture names its rows: which channels, chosen how
    name = cb.layers[0]
    shown = cb.render(net, probe, 2).images[f"top_patches/{name}"]
    grid = viz.grid(viz.grey(torch.zeros(16 * 2, 3, 8, 8)), nrow=2, min_cell=cb.min_cell)
    captioned = viz.caption(
        viz.caption(grid, "rows, top to bottom: the 16 most variable of 64 channels"), f"{before[name]}"
    )
    strips = captioned.shape[1] - grid.shape[1]  # the two caption strips, wider than the 2-cell grid
    assert shown.shape[2] == captioned.shape[2] and torch.equal(shown[:, -strips:], captioned[:, -strips:])
    # a resume with another max_channels chooses again (the saved 16 no longer answer max_channels=4)
    fewer = TopPatchesCallback(top_k=2, max_channels=4, layers=[name], batch_size=16)
    fewer.load_state_dict(cb.state_dict())
    fewer.prepare(net, probe)
    with inference(net):
        fewer.render(net, probe, 3)
    assert fewer.chosen[name] == brute_choice(brute_spread(net, probe.inputs, fewer.search.ranked_at[name]), 4)


def test_two_top_patches_callbacks_in_one_trainer_and_a_wrong_channels_word() -> None:
    from cnnfeat.run import lightning_api as pl

    a, b = TopPatchesCallback(layers=["conv1"]), TopPatchesCallback(layers=["conv2"], split="train")
    assert a.state_key != b.state_key
    pl.Trainer(callbacks=[a, b], logger=False, enable_checkpointing=False)  # stateful callbacks need unique keys
    with pytest.raises(ConfigError, match="channels must be 'all', null or a list"):
        TopPatchesCallback(channels="ALL")


@pytest.mark.slow  # every one of ResNet-18's 20 convs (~17 s on 2 cores); the default suite checks two of them
def test_resnet18_atlas_records_the_16_most_variable_units_per_layer(tmp_path: Path) -> None:
    net, probe = resnet18(), rgb_probe()
    cb = AtlasCallback(
        probe_size=N, alive_probe_size=N, top_k=2, class_top=2, batch_size=16, featviz=False, atlas_dir=str(tmp_path)
    )
    cb.prepare(net, probe)
    assert all(i.shown == [] for i in cb.infos), "undecided until the first render"
    with inference(net):
        cb.render(net, probe, 0)
    plan = LayerPlan.trace(net, probe.inputs[:1])
    assert [i.name for i in cb.infos] == plan.convs, "every conv of ResNet-18 (no hidden Linear layer)"
    x = probe.inputs[probe.positions(cb.pass_ids)]
    for info in cb.infos:
        want = brute_choice(brute_spread(net, x, info.activation or info.name), 16)  # what says alive, as recorded
        assert info.shown == want and info.featviz_units == [], info.name
    a = atlas.Atlas.load(tmp_path)
    assert a is not None and [len(i.shown) for i in a.layers] == [16] * len(plan.convs)
    assert a.patches(a.layers[1], 0)["crops"].shape[:2] == (16, 2)
    assert a.step_data(a.layers[1])[1][0]["weights"].shape[0] == 16


def test_atlas_default_and_units_setting_on_resnet18(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    net, probe = resnet18(), rgb_probe(8)
    kw = {"probe_size": 8, "alive_probe_size": 8, "batch_size": 8, "featviz": False, "atlas_dir": str(tmp_path)}
    layers = ["conv1", "layer3.0.conv1"]
    cb = AtlasCallback(layers=layers, top_k=2, class_top=2, **{**kw, "featviz": True, "featviz_max_units": 4})
    with caplog.at_level(logging.INFO, logger="cnnfeat"):
        cb.prepare(net, probe)
        assert all(i.shown == [] for i in cb.infos), "undecided until the first render"
        with inference(net):
            cb.render(net, probe, 0)
    x = probe.inputs[probe.positions(cb.pass_ids)]
    for info in cb.infos:
        want = brute_choice(brute_spread(net, x, info.activation or info.name), 16)  # what says alive, as recorded
        assert info.shown == want and info.featviz_units == want[:4], info.name
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("AtlasCallback: units"))
    assert f"conv1 16 of 64 {cb.infos[0].shown}, layer3.0.conv1 16 of 256" in line and "most variable" in line
    a = atlas.Atlas.load(tmp_path)
    assert a is not None and [i.shown for i in a.layers] == [i.shown for i in cb.infos]
    assert a.patches(a.layers[1], 0)["crops"].shape[:2] == (16, 2)
    assert a.step_data(a.layers[1])[1][0]["weights"].shape[0] == 16
    shown = {i.name: list(i.shown) for i in cb.infos}
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(-1.5)  # another network: its own spreads would pick other units
    with inference(net):
        cb.render(net, probe, 1)
    assert {i.name: i.shown for i in cb.infos} == shown, "kept across epochs"
    again = AtlasCallback(layers=layers, **kw)
    again.load_state_dict(cb.state_dict())
    again.prepare(net, probe)
    assert {i.name: i.shown for i in again.infos} == shown, "a resumed fit keeps the choice"

    cb = AtlasCallback(layers=layers, units={"conv1": "all", "layer3.0.conv1": [5, 2]}, **kw)
    cb.prepare(net, probe)
    assert [i.shown for i in cb.infos] == [list(range(64)), [5, 2]]
    with pytest.raises(ConfigError, match=r"units names \['layer9'\], which the atlas does not record"):
        AtlasCallback(layers=layers, units={"layer9": 2}, **kw).prepare(net, probe)
    with pytest.raises(ConfigError, match=r"units \[70\] out of range for conv1 \(64 units"):
        AtlasCallback(layers=layers, units=[70], **kw).prepare(net, probe)
    with pytest.raises(ConfigError, match=r"give units .* or max_units .*, not both"):
        AtlasCallback(units=4, max_units=4)


def test_smallcnn_keeps_every_unit_and_its_layers() -> None:
    net = SmallCNN().eval()
    probe = probe_from_tensors(torch.rand(16, 1, 28, 28), torch.arange(16) % 10)
    cb, top = AtlasCallback(featviz=False, probe_size=16, alive_probe_size=16), TopPatchesCallback(probe_size=16)
    cb.prepare(net, probe)
    top.prepare(net, probe)
    assert {i.name: i.shown for i in cb.infos} == {i.name: list(range(i.units)) for i in cb.infos}
    assert [i.units for i in cb.infos] == [6, 6, 16, 100], "fc2's 100 neurons too"
    assert not cb._pending and not top.chosen
    assert default_layers(LayerPlan.trace(net, probe.inputs[:1]).graph) == [
        "relu1",
        "relu2",
        "relu3",
        "relu4",
        "relu5",
        "fc3",
    ]


# -- pad, don't stretch ------------------------------------------------------------------------------------
def bright_and_dark_probe() -> ProbeSet:
    """Two batches of 4: bright images take DynamicNet's 3x3 branch, dark ones its 5x5 branch (fields differ)."""
    g = torch.Generator().manual_seed(0)
    bright = 0.5 + 0.5 * torch.rand(4, 1, 28, 28, generator=g)
    dark = 0.2 * torch.rand(4, 1, 28, 28, generator=g)
    return probe_from_tensors(torch.cat([bright, dark]), torch.arange(8) % 2)


def test_top_patches_of_differing_fields_are_centred_unchanged_on_one_canvas() -> None:
    torch.manual_seed(0)
    net, probe = DynamicNet().eval(), bright_and_dark_probe()
    cb = TopPatchesCallback(layers=["shared:1"], top_k=4, batch_size=4, channels="all", max_cell=96)
    cb.prepare(net, probe)
    with inference(net):
        pictures = cb.render(net, probe, 0)
    boxes = cb.last_boxes["shared:1"]
    crops = [crop(probe.images[i], box) for _, _, i, _, box in boxes]
    sizes = {tuple(c.shape[-2:]) for c in crops}
    assert len(sizes) == 2, f"the fields really differ between the batches: {sizes}"
    side = max(max(s) for s in sizes)
    canvas = np.zeros((len(crops), 1, side, side), dtype=np.float32)  # by hand: centred, unchanged
    for k, c in enumerate(crops):
        h, w = c.shape[-2:]
        canvas[k, :, (side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = c.numpy()
    expected = viz.grid(viz.grey(torch.from_numpy(canvas)), nrow=4, min_cell=cb.min_cell)
    assert torch.equal(pictures.images["top_patches/shared:1"], expected)
    assert torch.equal(centre_pad(crops), torch.from_numpy(canvas))


def test_atlas_crops_of_differing_fields_are_centred_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, probe = DynamicNet().eval(), bright_and_dark_probe()
    cb = AtlasCallback(
        layers=["shared:1"], top_k=4, class_top=4, batch_size=4, featviz=False, atlas_dir=str(tmp_path), max_cell=96
    )
    cb.prepare(net, probe)
    with inference(net):
        cb.render(net, probe, 0)
    a = atlas.Atlas.load(tmp_path)
    assert a is not None
    p = a.patches(a.layers[0], 0)
    crops, boxes, ids = p["crops"], p["boxes"], p["ids"]
    sizes, side = set(), crops.shape[-1]
    for u in range(crops.shape[0]):
        for r in range(crops.shape[1]):
            c = atlas.to_uint8(crop(probe.images[int(ids[u, r])], tuple(int(v) for v in boxes[u, r]))[None])[0]
            h, w = c.shape[-2:]
            sizes.add((h, w))
            top, left = (side - h) // 2, (side - w) // 2
            cell = crops[u, r]
            assert np.array_equal(cell[:, top : top + h, left : left + w], c), (u, r)
            rest = cell.copy()
            rest[:, top : top + h, left : left + w] = 0
            assert not rest.any(), "zeros around the crop"
    assert len(sizes) == 2, f"the fields really differ between the batches: {sizes}"


# -- CKA and probes on stage outputs -----------------------------------------------------------------------
def test_representations_measure_stage_outputs_of_resnet18(caplog: pytest.LogCaptureFixture) -> None:
    net, probe = resnet18(), rgb_probe(8)
    graph = LayerPlan.trace(net, probe.inputs[:1]).graph
    assert stage_outputs(graph) == ["layer1", "layer2", "layer3", "layer4"]
    assert default_layers(graph) == ["layer1", "layer2", "layer3", "layer4", "flatten", "fc"]
    cb = RepresentationCallback(probe_size=8, block_size=None)
    with caplog.at_level(logging.INFO, logger="cnnfeat"):
        cb.prepare(net, probe)
    assert cb.names == ["pixels", "layer1", "layer2", "layer3", "layer4", "flatten", "fc"]
    assert cb.unit_layers == ["layer1", "layer2", "layer3", "layer4"], "each stage ends in a ReLU"
    assert "each stage's output, the penultimate features and the logits" in caplog.text
    seen: dict[str, torch.Tensor] = {}  # ground truth: forward hooks on the stage modules and the head's input
    hooks = [getattr(net, f"layer{k}").register_forward_hook(lambda m, i, o, k=k: seen.update({f"layer{k}": o}))
             for k in range(1, 5)]  # fmt: skip
    hooks.append(net.fc.register_forward_pre_hook(lambda m, i: seen.update({"flatten": i[0], "fc_in": i[0]})))
    with capture(net, cb.nodes) as out, torch.no_grad():
        logits = net(probe.inputs)
    for h in hooks:
        h.remove()
    for name in ("layer1", "layer2", "layer3", "layer4", "flatten"):
        assert torch.equal(out[name], seen[name]), name
    assert torch.equal(out["fc"], logits)


def test_stage_outputs_inside_cnnfeats_wrapped_net() -> None:
    """``model=torchvision`` wraps the network as ``net`` (whose output is the logits, not a map): the stages are found
    inside it, as deep as needed (a DenseNet's blocks sit in ``net.features``)."""
    from cnnfeat.models import TorchvisionClassifier

    x = torch.zeros(1, 1, 28, 28)
    for arch, stages, head in (
        ("resnet18", [f"net.layer{k}" for k in range(1, 5)], ["net.flatten", "net.fc"]),
        ("densenet121", [f"net.features.denseblock{k}" for k in range(1, 5)], ["net.flatten", "net.classifier"]),
    ):
        net = TorchvisionClassifier(arch=arch, weights="none", num_classes=10, in_channels=1, image_size=28)
        graph = LayerPlan.trace(net, x).graph
        assert stage_outputs(graph) == stages, arch
        assert default_layers(graph) == [*stages, *head], arch
    # the penultimate features are the vector a Dropout hands on, not the Dropout (MobileNetV2: classifier.0)
    net = TorchvisionClassifier(arch="mobilenet_v2", weights="none", num_classes=10, in_channels=1, image_size=28)
    graph = LayerPlan.trace(net.eval(), x).graph
    assert graph.nodes["net.classifier.0"].op == "Dropout" and penultimate(graph) == "net.flatten"


def test_a_half_dead_wide_layer_reports_its_dead_units(tmp_path: Path) -> None:
    """The most variable units are never dead (a dead unit's variability is 0): the atlas records the whole layer's dead
    count at every step, and the report says how the shown units were chosen (review finding: "0 of 16" dead and
    "max_units" for a layer with 16 dead of 32 and no max_units)."""
    from cnnfeat.report import write_report

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.relu1 = nn.Conv2d(1, 32, 3), nn.ReLU()
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)
            with torch.no_grad():
                self.conv1.bias[::2] = -100.0  # the even channels never fire

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(self.relu1(self.conv1(x))).flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    probe = probe_from_tensors(torch.rand(32, 1, 28, 28) * torch.rand(32, 1, 1, 1), torch.arange(32) % 10)
    out = tmp_path / "atlas"
    kw = {"probe_size": 32, "alive_probe_size": 32, "top_k": 2, "class_top": 2, "batch_size": 32, "featviz": False}
    cb = AtlasCallback(**kw, atlas_dir=str(out))
    cb.prepare(net, probe)
    with inference(net):
        cb.render(net, probe, 0)
    a = atlas.Atlas.load(out)
    layer = a.layers[0]
    with torch.no_grad():
        truth = int((net.relu1(net.conv1(probe.inputs)).amax(dim=(0, 2, 3)) <= 0).sum())  # by hand: 16
    assert truth == 16 and all(u % 2 == 1 for u in layer.shown), "the shown units are the live ones"
    steps, data = a.step_data(layer)
    assert int(data[steps[-1]]["layer_dead"]) == truth
    page = (write_report(tmp_path).parent / "conv1.html").read_text()
    assert "16 shown: the most variable, chosen at the first render" in page and "dead at the end: 16 of 32" in page


def test_squeeze_excitation_networks_get_real_stages_and_an_atlas() -> None:
    """MobileNetV3's squeeze-excitation gates run 1x1 convs on a pooled vector: they are no stage of the network (the
    default picked them, and lost the real 1x1 stage at 28 px), and the atlas's default leaves out, with a warning,
    the convs after a gate, whose units see the whole image (it refused the whole network)."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    probe = rgb_probe(24)
    plan = LayerPlan.trace(net, probe.inputs[:1])
    stages = plan.stage_convs()
    assert not [n for n in stages if ".fc" in n], stages
    sizes = [tuple(plan[n].output_shape[-2:]) for n in stages]
    assert sizes == sorted(set(sizes), reverse=True) and sizes[-1] == (1, 1), "every resolution once, the 1x1 stage too"
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 1))
    assert LayerPlan.trace(tiny, torch.rand(1, 3, 2, 2)).stage_convs() == ["0", "3"], "a strided pool to 1x1: a stage"
    cb = AtlasCallback(probe_size=24, alive_probe_size=24, featviz=False, max_units=2)
    with pytest.warns(UserWarning, match=r"left out \d+ conv\(s\) without a receptive field .*squeeze-excitation"):
        cb.prepare(net, probe)
    names = [i.name for i in cb.infos]
    assert "features.0.0" in names and all(plan.field(i.name) is not None for i in cb.infos if i.kind == "conv")
    assert "features.1.block.2.0" not in names  # after the first gate: no local box
