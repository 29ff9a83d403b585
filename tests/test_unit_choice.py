"""Which units a picture shows (issue 23 review): the atlas keeps each unit's recorded history attached to that unit
when a fit is resumed with another ``units`` setting, and the relevance callback draws the atlas's units (the most
variable ones of a wide layer), checked against brute-force spreads from forward hooks and the weights of the
checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from torch import nn

from cnnfeat import atlas
from cnnfeat.callbacks import AtlasCallback, RelevanceCallback
from cnnfeat.callbacks.base import inference, share_session
from cnnfeat.callbacks.session import build_probe
from cnnfeat.errors import ConfigError, DataError
from cnnfeat.graph import capture
from cnnfeat.models import SmallCNN
from cnnfeat.probe import ProbeSet, probe_from_tensors
from cnnfeat.probe_pass import shared_positions
from cnnfeat.run.train import build, train

MakeCfg = Callable[..., DictConfig]
PROBE = 64  #: alive probe images of the real runs (cheap on 2 cores)


def brute_spread(model: nn.Module, x: torch.Tensor, node: str) -> torch.Tensor:
    """Population std over images of each unit's per-image max at ``node``, from one capture of the whole batch."""
    with capture(model, [node]) as out, torch.no_grad():
        model(x)
    a = out[node].double()
    per_image = a.flatten(2).amax(dim=2) if a.ndim > 2 else a
    return per_image.std(dim=0, unbiased=False)


def brute_choice(spread: torch.Tensor, k: int) -> list[int]:
    """The ``k`` units of largest spread, ascending; refuses a near tie at the cut (the choice would be arbitrary)."""
    order = spread.argsort(descending=True)
    if k < len(spread):
        assert spread[order[k - 1]] - spread[order[k]] > 1e-9 * spread[order[0]], "a near tie at the cut"
    return sorted(order[:k].tolist())


# -- fix 1: a resumed atlas keeps each unit's history its own -----------------------------------------------------
ATLAS = [
    "callbacks=[none,atlas]",
    "callbacks.atlas.layers=[conv1,conv2]",
    "callbacks.atlas.featviz=false",
    f"callbacks.atlas.probe_size={PROBE}",
    f"callbacks.atlas.alive_probe_size={PROBE}",
    "callbacks.atlas.top_k=2",
    "callbacks.atlas.class_top=2",
    "callbacks.atlas.batch_size=64",
    "trainer.limit_train_batches=2",
]


def _weights(state: dict[str, torch.Tensor], layer: str) -> np.ndarray:
    return state[f"{layer}.weight"].float().numpy()


def test_a_resume_with_another_units_setting_keeps_each_units_history(make_cfg: MakeCfg, tmp_path: Path) -> None:
    """Reproduces the review finding: a run recording the 4 most variable of conv1's and conv2's 6 units, resumed with
    ``max_units=4`` (the first 4), relabelled the recorded history of units [a, b, c, d] as units [0, 1, 2, 3]. Every
    step file's weights must be those of the units the manifest names, at that step (seeded untrained weights, then
    each checkpoint's)."""
    cfg = make_cfg(*ATLAS, "callbacks.atlas.units=4")
    train(cfg)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    states = {1: torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]}
    _, model, _ = build(cfg)  # seeded as the run was: the untrained weights of step 0
    states[0] = {k: v.clone() for k, v in model.state_dict().items()}
    first = atlas.Atlas.load(tmp_path)
    assert first is not None
    chosen = {i.name: i.shown for i in first.layers}
    # ground truth of the choice: the spreads of the untrained network on the alive probe, by brute force
    dm, _, _ = build(cfg)
    dm.prepare_data()
    dm.setup("fit")
    probe = build_probe(dm, AtlasCallback().probe_spec, model)
    x = probe.inputs[shared_positions(probe, PROBE)]
    model.eval()
    for layer, relu in (("conv1", "relu1"), ("conv2", "relu2")):
        assert chosen[layer] == brute_choice(brute_spread(model, x, relu), 4), layer
    assert chosen["conv1"] != [0, 1, 2, 3] or chosen["conv2"] != [0, 1, 2, 3], "the two settings must differ"

    with pytest.warns(UserWarning, match="Keeping the recorded units") as warned:
        train(make_cfg(*ATLAS, "callbacks.atlas.max_units=4", "trainer.max_epochs=2", f"ckpt_path={ckpt}"))
    states[2] = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    a = atlas.Atlas.load(tmp_path)
    assert a is not None
    for info in a.layers:
        steps, data = a.step_data(info)
        assert steps == [0, 1, 2], info.name
        for s in steps:
            want = _weights(states[s], info.name)[info.shown]
            assert np.array_equal(data[s]["weights"], want), f"{info.name} step {s}: the weights of other units"
            assert data[s]["units"].tolist() == info.shown
        assert info.shown == chosen[info.name], "the recorded units are kept"
        for s in a.patch_steps(info):
            assert a.patches(info, s)["units"].tolist() == info.shown
    (text,) = [str(w.message) for w in warned if "Keeping the recorded units" in str(w.message)]
    assert "recorded with units=4, max_units=None; this run asks units='auto', max_units=4" in text, text
    for layer in ("conv1", "conv2"):
        assert f"{layer}: recorded {chosen[layer]}, asked [0, 1, 2, 3]" in text, text
    # the settings are this run's; each layer says how its units were chosen (the report's caption reads that)
    assert a.manifest["settings"]["units"] == "auto" and a.manifest["settings"]["max_units"] == 4
    assert sorted(a.manifest["settings"]["units_chosen_by_variability"]) == ["conv1", "conv2"]
    for info in a.layers:
        assert info.chosen_by == atlas.chosen_by(info, a.manifest["settings"]) == "variability", info.name


def test_an_atlas_file_of_other_units_than_the_manifest_is_refused(tmp_path: Path) -> None:
    """The step and patch files name their units: a file that does not hold the manifest's units of its layer is
    refused with a message naming it, never drawn under the wrong unit."""
    torch.manual_seed(0)
    net = SmallCNN().eval()
    probe = probe_from_tensors(torch.rand(8, 1, 28, 28), torch.arange(8) % 10)
    kw = {"probe_size": 8, "alive_probe_size": 8, "top_k": 2, "class_top": 2, "featviz": False}
    cb = AtlasCallback(layers=["conv1"], units=[1, 3], atlas_dir=str(tmp_path), **kw)
    cb.prepare(net, probe)
    with inference(net):
        cb.render(net, probe, 0)
    a = atlas.Atlas.load(tmp_path)
    assert a is not None and a.layers[0].shown == [1, 3] and a.layers[0].chosen_by == "list"
    a.layers[0].shown = [3, 1]  # what an older cnnfeat did: another setting's units under the old files
    with pytest.raises(DataError, match=r"step_000.npz holds units \[1, 3\] of conv1, the manifest shows \[3, 1\]"):
        a.step_data(a.layers[0])
    with pytest.raises(DataError, match=r"patches_000.npz holds units \[1, 3\] of conv1"):
        a.patches(a.layers[0], 0)


# -- fix 2: relevance draws the units the atlas shows -------------------------------------------------------------
class Wide(nn.Module):
    """conv1: 32 channels, the even ones never fire (the most variable 16 are not the first 16); conv2: 24."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 32, 3), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(32, 24, 3, stride=2), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(24, 10)
        with torch.no_grad():
            self.conv1.bias[::2] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


def wide_probe(n: int = 32) -> ProbeSet:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 1, 28, 28, generator=g) * torch.rand(n, 1, 1, 1, generator=g)  # brightness varies
    return probe_from_tensors(images, torch.arange(n) % 10)


REL = {"top_k": 2, "probe_size": 32, "batch_size": 8, "heatmaps": False, "path_check": False}
LAYERS = {"conv1": "relu1", "conv2": "relu2"}


@pytest.mark.parametrize("relevance_first", [False, True])
def test_relevance_draws_the_atlas_units_of_a_wide_layer(
    relevance_first: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    net, probe = Wide().eval(), wide_probe()
    x = probe.inputs[shared_positions(probe, 32)]
    want = {layer: brute_choice(brute_spread(net, x, node), 16) for layer, node in LAYERS.items()}
    assert want["conv1"] == list(range(1, 32, 2)) and want["conv2"] != list(range(16)), "not the first 16"
    at = AtlasCallback(
        layers=list(LAYERS), probe_size=32, alive_probe_size=32, top_k=2, class_top=2, batch_size=16, featviz=False
    )
    at.atlas_dir = tmp_path / "atlas"
    rel = RelevanceCallback(layers=list(LAYERS), **REL)
    for cb in (at, rel):
        cb.prepare(net, probe)
    share_session([at, rel])  # as a Trainer's callbacks share theirs
    with caplog.at_level(logging.INFO, logger="cnnfeat"), inference(net):
        for cb in (rel, at) if relevance_first else (at, rel):
            cb.render(net, probe, 0)
    assert rel.probe_pass is at.probe_pass and at.probe_pass.runs == 1, "one pass chose both callbacks' units"
    assert {i.name: i.shown for i in at.infos} == want
    assert rel.chosen == want, "relevance draws the atlas's units"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("RelevanceCallback: layers"))
    assert f"conv1 16 of 32 {want['conv1']}, conv2 16 of 24 {want['conv2']}" in line and "most variable" in line
    # kept for later renders and across a resume, whatever the network then prefers
    with torch.no_grad():
        net.conv2.weight.mul_(-1.5)
    with inference(net):
        rel.render(net, probe, 1)
    assert rel.chosen == want
    again = RelevanceCallback(layers=list(LAYERS), **REL)
    again.load_state_dict(rel.state_dict())
    again.prepare(net, probe)
    assert again.state_key == rel.state_key
    with inference(net):
        again.render(net, probe, 2)
    assert again.chosen == want and again.probe_pass is not None and again.probe_pass.runs == 0, "no new choice"


def test_relevance_units_all_a_list_or_fewer_and_smallcnn_keeps_every_unit(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    net, probe = Wide().eval(), wide_probe()
    x = probe.inputs[shared_positions(probe, 32)]
    with caplog.at_level(logging.INFO, logger="cnnfeat"):
        for units, want in (
            ("all", {"conv1": list(range(32)), "conv2": list(range(24))}),
            ([5, 2], {"conv1": [5, 2], "conv2": [5, 2]}),
            (4, {layer: brute_choice(brute_spread(net, x, node), 4) for layer, node in LAYERS.items()}),
        ):
            cb = RelevanceCallback(layers=list(LAYERS), units=units, **REL)
            cb.prepare(net, probe)
            with inference(net):
                pictures = cb.render(net, probe, 0)
            drawn = {cb._layer_of[n]: d for n, d in cb._drawn.items()}
            assert drawn == want, units
            assert cb.chosen == (want if units == 4 else {}), "only a choice by variability is kept"
            for layer, width in (("conv1", 32), ("conv2", 24)):
                table = pictures.texts[f"relevance/{layer}/table"]
                assert len(table.splitlines()) == 2 + width, "the table lists every unit, drawn or not"
    assert "conv1 2 of 32 [5, 2]" in caplog.text and "the listed units [5, 2]" in caplog.text
    with pytest.raises(ConfigError, match=r"units must be an integer >= 1, 'all' or a list of distinct unit"):
        RelevanceCallback(units=[1, 1])
    small = SmallCNN().eval()
    cb = RelevanceCallback(**{**REL, "probe_size": 16})
    cb.prepare(small, probe_from_tensors(torch.rand(16, 1, 28, 28), torch.arange(16) % 10))
    assert {cb._layer_of[n]: d for n, d in cb._drawn.items()} == {"conv1": list(range(6)), "conv2": list(range(6)),
                                                                   "conv3": list(range(16))}  # fmt: skip
    assert not cb._pending and cb.pass_request(small, cb.probe, 0) is None, "SmallCNN: nothing to choose, no pass"


def test_relevance_max_units_means_the_first_units_as_the_atlas_says() -> None:
    """``max_units=N`` is the atlas's "the first N units of each layer" in relevance too: the same setting on both
    callbacks must draw the same units (a review found relevance reading it as "the N most variable")."""
    torch.manual_seed(0)
    net, probe = Wide().eval(), wide_probe()
    at = AtlasCallback(layers=list(LAYERS), max_units=4, probe_size=32, alive_probe_size=32, top_k=2, featviz=False)
    rel = RelevanceCallback(layers=list(LAYERS), max_units=4, **REL)
    for cb in (at, rel):
        cb.prepare(net, probe)
    assert {i.name: i.shown for i in at.infos} == {"conv1": [0, 1, 2, 3], "conv2": [0, 1, 2, 3]}
    assert {rel._layer_of[n]: d for n, d in rel._drawn.items()} == {"conv1": [0, 1, 2, 3], "conv2": [0, 1, 2, 3]}
    assert not rel._pending, "nothing to choose by variability"
    with pytest.raises(ConfigError, match=r"give units \(8\) or max_units \(4\), not both"):
        RelevanceCallback(units=8, max_units=4)


def test_how_units_were_chosen_is_each_layers_record_else_an_older_atlass_settings() -> None:
    """The report's caption ("the most variable", "the listed units", ...) comes from the layer's own entry, so a
    resume that changes the settings and adds a layer describes each layer truly; an older atlas has only settings."""
    info = atlas.LayerInfo("conv2", "conv", 6, [1, 3], None, True, False)
    assert atlas.chosen_by(info, {"units": 4, "units_chosen_by_variability": ["conv2"]}) == "variability"
    assert atlas.chosen_by(info, {"units": [1, 3]}) == "list"
    assert atlas.chosen_by(info, {"units": "auto", "max_units": 2}) == "first"
    info.chosen_by = "list"
    assert atlas.chosen_by(info, {"max_units": 2, "units_chosen_by_variability": ["conv2"]}) == "list", "its own"
