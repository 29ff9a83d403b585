"""One probe pass per step: the dead-ReLU, representation and atlas callbacks read one forward pass over the same
stratified probe images (``cnnfeat.probe_pass``), and get bit for bit what each computed with its own pass before.

The ``old_*`` functions below are the per-callback loops the pass replaces, run here on the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cnnfeat.callbacks import AtlasCallback, DeadReluCallback, TopPatchesCallback
from cnnfeat.callbacks.base import inference, share_session
from cnnfeat.callbacks.representations import RepresentationCallback
from cnnfeat.graph import capture
from cnnfeat.models import SmallCNN
from cnnfeat.probe import ProbeSet, batches, probe_from_tensors
from cnnfeat.probe_pass import ProbePass, shared_positions
from cnnfeat.run.train import build
from cnnfeat.similarity import SignatureAccumulator
from cnnfeat.units import FiringAccumulator, fires

SIZE = 120  # stratified probe images every consumer reads


@pytest.fixture
def probe() -> ProbeSet:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(300, 1, 28, 28, generator=g)
    labels = torch.arange(300) % 10
    return probe_from_tensors(images, labels)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


def callbacks(tmp_path: Path) -> tuple[DeadReluCallback, RepresentationCallback, AtlasCallback]:
    dead = DeadReluCallback(probe_size=SIZE, batch_size=32, hist_samples=500)
    rep = RepresentationCallback(probe_size=SIZE, block_size=40, batch_size=50, spill=False)
    atlas = AtlasCallback(alive_probe_size=SIZE, batch_size=64, featviz=False, atlas_dir=str(tmp_path / "atlas"))
    return dead, rep, atlas


class Forwards:
    """Counts calls of the model's forward (a hook on the root module)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, *_: object) -> None:
        self.calls += 1


# -- the per-callback computations the pass replaces ---------------------------------------------------------------
def old_dead_relu(cb: DeadReluCallback, model: nn.Module, probe: ProbeSet, pos: torch.Tensor, batch: int) -> dict:
    names, firing = cb.names, FiringAccumulator()
    zeros, total, samples = dict.fromkeys(names, 0), dict.fromkeys(names, 0), {n: [] for n in names}
    gen = torch.Generator().manual_seed(0)
    per_batch = max(1, cb.hist_samples * batch // len(pos))
    with capture(model, names, inputs=True) as pre:
        for ids in batches(pos, batch):
            model(probe.inputs[ids])
            firing.update({n: pre[n] for n in names})
            for n in names:
                a = pre[n]
                zeros[n] += a.numel() - int(torch.count_nonzero(fires(a)))
                total[n] += a.numel()
                flat = a.flatten()
                idx = torch.randint(len(flat), (min(per_batch, len(flat)),), generator=gen)
                samples[n].append(flat[idx])
    alive = firing.finish()
    out = {f"relu/dead_fraction/{n}": float((~alive[n]).float().mean()) for n in names}
    out |= {f"relu/zero_fraction/{n}": zeros[n] / total[n] for n in names}
    dead = sum(int((~alive[n]).sum()) for n in names)
    out["relu/dead_fraction/all"] = dead / sum(alive[n].numel() for n in names)
    return {"scalars": out, "histograms": {f"relu/preact/{n}": torch.cat(samples[n]) for n in names}}


def old_representations(cb: RepresentationCallback, model: nn.Module, probe: ProbeSet, pos: torch.Tensor) -> tuple:
    acc = SignatureAccumulator(len(pos), cb.unbiased, cb.block_size, cb.pool, keep=True)
    fire, start = FiringAccumulator(), 0
    with capture(model, cb.nodes) as out:
        for b in batches(pos, cb.batch_size):
            model(probe.inputs[b])
            acc.update({n: out[n] for n in cb.nodes}, torch.arange(start, start + len(b)))
            fire.update({n: out[n] for n in cb.unit_layers})
            start += len(b)
    return acc.finish(), acc.kept, fire.finish()


def old_atlas_unit_max(cb: AtlasCallback, model: nn.Module, probe: ProbeSet, pos: torch.Tensor, batch: int) -> dict:
    nodes = {i.name: i.activation or i.name for i in cb.infos}
    firing = FiringAccumulator()
    with capture(model, set(nodes.values())) as acts:
        for ids in batches(pos, batch):
            model(probe.inputs[ids])
            firing.update({name: acts[node] for name, node in nodes.items()})
    return firing.maxima()


def atlas_unit_max(tmp_path: Path, layer: str, step: int) -> np.ndarray:
    return np.load(tmp_path / "atlas" / layer / f"step_{step:03d}.npz")["unit_max"]


# -- tests ---------------------------------------------------------------------------------------------------------
def test_one_pass_feeds_every_callback_what_its_own_pass_gave(
    model: nn.Module, probe: ProbeSet, tmp_path: Path
) -> None:
    dead, rep, atlas = cbs = callbacks(tmp_path)
    for cb in cbs:
        cb.prepare(model, probe)
    share_session(cbs)
    shared = dead.probe_pass
    assert shared is not None and rep.probe_pass is shared and atlas.probe_pass is shared
    pos = shared_positions(probe, SIZE)
    batch = min(dead.batch_size, rep.batch_size, atlas.batch_size)
    counter = Forwards(model)
    with inference(model):
        sigs, kept, alive = rep.measure(model, probe, 0)  # the first to ask runs the pass for all three
        dead_pictures = dead.render(model, probe, 0)
        assert counter.calls == len(range(0, SIZE, batch)), "one forward pass over the probe for all three"
        atlas.render(model, probe, 0)  # its alive test reads the pass; its top-k search (step 0) runs on its own
    assert shared.runs == 1 and shared.forward_calls == len(range(0, SIZE, batch))
    counter.handle.remove()
    with inference(model):
        want_dead = old_dead_relu(dead, model, probe, pos, batch)
        want_sigs, want_kept, want_alive = old_representations(rep, model, probe, pos)
        want_max = old_atlas_unit_max(atlas, model, probe, pos, batch)
    assert dead_pictures.scalars == want_dead["scalars"]
    assert dead_pictures.histograms.keys() == want_dead["histograms"].keys()
    for tag, values in want_dead["histograms"].items():
        assert torch.equal(dead_pictures.histograms[tag], values), tag
    assert sigs.keys() == want_sigs.keys() and kept.keys() == want_kept.keys() and alive.keys() == want_alive.keys()
    for name in want_sigs:
        assert torch.equal(sigs[name], want_sigs[name]), name
    for name in want_kept:
        for field in ("features", "gram"):
            got, want = getattr(kept[name], field), getattr(want_kept[name], field)
            assert got is want is None or torch.equal(got, want), (name, field)
    for name in want_alive:
        assert torch.equal(alive[name], want_alive[name]), name
    for info in atlas.infos:
        assert np.array_equal(atlas_unit_max(tmp_path, info.name, 0), want_max[info.name][info.shown].numpy())


def test_the_pass_served_callbacks_see_the_same_images(model: nn.Module, probe: ProbeSet, tmp_path: Path) -> None:
    dead, rep, atlas = cbs = callbacks(tmp_path)
    for cb in cbs:
        cb.prepare(model, probe)
    share_session(cbs)
    with inference(model):
        for step in (0, 1):
            for cb in cbs:
                cb.render(model, probe, step)
    assert dead.pass_ids is not None and len(dead.pass_ids) == SIZE
    assert torch.equal(dead.pass_ids, rep.pass_ids), "dead-ReLU and representations read other images"
    assert torch.equal(dead.pass_ids, atlas.pass_ids), "dead-ReLU and the atlas read other images"
    assert torch.equal(rep.pass_ids, probe.ids[rep.positions(probe)])
    assert len(set(probe.labels[probe.positions(dead.pass_ids)].tolist())) == 10, "stratified, not the first images"
    assert dead.probe_pass is not None and dead.probe_pass.runs == 2, "one pass per step"


@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_callback_alone_gets_a_pass_of_its_own(which: int, model: nn.Module, probe: ProbeSet, tmp_path: Path) -> None:
    cb = callbacks(tmp_path)[which]
    cb.prepare(model, probe)
    counter = Forwards(model)
    with inference(model):
        pictures = cb.render(model, probe, 0)
    if not isinstance(cb, AtlasCallback):  # the atlas's top-k search runs the model too at step 0
        assert counter.calls == len(range(0, SIZE, cb.batch_size))
    assert cb.probe_pass is not None and cb.probe_pass.forward_calls == len(range(0, SIZE, cb.batch_size))
    assert cb.probe_pass is not None and cb.probe_pass.members == [cb]
    assert torch.equal(cb.pass_ids, probe.ids[shared_positions(probe, SIZE)])
    if isinstance(cb, DeadReluCallback):
        with inference(model):
            want = old_dead_relu(cb, model, probe, shared_positions(probe, SIZE), cb.batch_size)
        assert pictures.scalars == want["scalars"]
    elif isinstance(cb, RepresentationCallback):
        assert "units/dead/relu1" in pictures.scalars and "probe/acc/fc3" in pictures.scalars
    else:
        assert (tmp_path / "atlas" / "conv1" / "step_000.npz").is_file()


def test_other_selections_get_their_own_pass(model: nn.Module, probe: ProbeSet, tmp_path: Path) -> None:
    """A consumer reading other images (another probe_size) is not fed the shared ones."""
    dead = DeadReluCallback(probe_size=60, batch_size=32)
    rep = RepresentationCallback(probe_size=SIZE, block_size=40, batch_size=50, spill=False)
    for cb in (dead, rep):
        cb.prepare(model, probe)
    share_session([dead, rep])
    with inference(model):
        dead.render(model, probe, 0)
        rep.render(model, probe, 0)
    assert dead.pass_ids is not None and len(dead.pass_ids) == 60 and len(rep.pass_ids) == SIZE
    assert dead.probe_pass is not None and dead.probe_pass.runs == 1
    assert dead.probe_pass.forward_calls == len(range(0, 60, 32)) + len(range(0, SIZE, 50)), "each its own batches"


def test_one_forward_pass_per_epoch_in_a_real_fit(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "callbacks=[none,dead_relu,representations,atlas]",
        "trainer.max_epochs=2",
        "callbacks.dead_relu.probe_size=200",
        "callbacks.representations.probe_size=200",
        "callbacks.representations.block_size=50",
        "callbacks.atlas.alive_probe_size=200",
        "callbacks.atlas.probe_size=300",
        "callbacks.atlas.featviz=false",
        "callbacks.atlas.patches_every_n_epochs=100",
    )
    dm, model, trainer = build(cfg)
    kinds = DeadReluCallback | RepresentationCallback | AtlasCallback
    served = [cb for cb in trainer.callbacks if isinstance(cb, kinds)]
    assert len(served) == 3
    starts: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        if not torch.is_grad_enabled() and not module.training:
            starts.append(args[0])  # no tensor op here: the graph is traced through this hook too

    model.register_forward_hook(hook)
    trainer.fit(model, datamodule=dm)
    shared = served[0].probe_pass
    assert isinstance(shared, ProbePass) and all(cb.probe_pass is shared for cb in served)
    assert shared.runs == 3, "steps 0, 1 and 2: one pass each"
    ids = [cb.pass_ids for cb in served]
    assert all(i is not None and torch.equal(i, ids[0]) for i in ids)
    probe = served[0].probe
    assert probe is not None
    first = probe.inputs[probe.positions(ids[0][:1])]
    pass_starts = sum(torch.equal(s[:1], first) for s in starts)
    assert pass_starts == 3, f"the probe's first image went through the model {pass_starts} times, not once a step"


def test_batches_of_big_images_are_cut_to_the_capture_budget(
    model: nn.Module, probe: ProbeSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch holds at most ``CAPTURE_BUDGET`` bytes of captured values (ResNet-18 at 224 px held 5 GB at batch 256):
    with the budget at two images' worth the pass runs in batches of two, and the numbers stay the same."""
    import cnnfeat.probe as probe_module
    from cnnfeat.topk import search_patches

    dead = DeadReluCallback(probe_size=SIZE, batch_size=32, hist_samples=500)
    dead.prepare(model, probe)
    plan = dead.layer_plan(model)
    relus = [n for n, layer in plan.layers.items() if layer.kind == "relu"]
    per_image = plan.image_bytes(relus)
    with torch.no_grad():  # the plan's sizes are the captured tensors' sizes
        with capture(model, relus) as out:
            model(probe.inputs[:3])
        assert per_image * 3 == sum(t.numel() * t.element_size() for t in out.values())
    with inference(model):
        whole = dead.render(model, probe, 0).scalars
        monkeypatch.setattr(probe_module, "CAPTURE_BUDGET", 2 * per_image)
        counter = Forwards(model)
        cut = DeadReluCallback(probe_size=SIZE, batch_size=32, hist_samples=500)
        cut.prepare(model, probe)
        cut.layer_plan(model)  # traced before the pass, as in a fit (setup)
        counter.calls = 0
        assert cut.render(model, probe, 0).scalars == whole
        assert counter.calls == SIZE // 2, "batches of two images"
        every = plan.image_bytes()
        monkeypatch.setattr(probe_module, "CAPTURE_BUDGET", 5 * every)
        counter.calls = 0
        found = search_patches(model, probe, ["conv1"], 2, 20, 16, every)
        assert counter.calls == 1 + 4, "one image traced for the ranking nodes, then batches of 5 images each"
        again = search_patches(model, probe, ["conv1"], 2, 20, 16)
    assert torch.equal(found.tops["conv1"].ids, again.tops["conv1"].ids)


# -- the top-k patch search the top-patches picture and the atlas share ----------------------------------------------
def patch_callbacks(tmp_path: Path, name: str) -> tuple[TopPatchesCallback, AtlasCallback]:
    top = TopPatchesCallback(layers=["conv1", "conv2", "conv3"], probe_size=200, batch_size=64, top_k=4)
    atlas = AtlasCallback(
        layers=["conv1", "conv2", "conv3"],
        probe_size=200,
        alive_probe_size=SIZE,
        batch_size=64,
        top_k=4,
        featviz=False,
        atlas_dir=str(tmp_path / name),
    )
    return top, atlas


def test_top_patches_and_the_atlas_share_one_search_per_step_and_get_what_their_own_gave(
    model: nn.Module, probe: ProbeSet, tmp_path: Path
) -> None:
    top, atlas = patch_callbacks(tmp_path, "shared")
    for cb in (top, atlas):
        cb.prepare(model, probe)
    session = share_session([top, atlas])
    alone_top, alone_atlas = patch_callbacks(tmp_path, "alone")
    for cb in (alone_top, alone_atlas):
        cb.prepare(model, probe)  # each a session of its own
    counter = Forwards(model)
    with inference(model):
        shared_top = top.render(model, probe, 0)
        calls = counter.calls
        atlas.render(model, probe, 0)
        assert session.searches == 1, "the atlas read the top-patches search of step 0"
        assert counter.calls - calls == len(range(0, SIZE, 64)), "the atlas ran only the shared probe pass"
        own_top = alone_top.render(model, probe, 0)
        alone_atlas.render(model, probe, 0)
    counter.handle.remove()
    for tag, picture in own_top.images.items():
        assert torch.equal(shared_top.images[tag], picture), tag
    for layer in ("conv1", "conv2", "conv3"):
        with (
            np.load(tmp_path / "shared" / layer / "patches_000.npz") as a,
            np.load(tmp_path / "alone" / layer / "patches_000.npz") as b,
        ):
            assert set(a.files) == set(b.files)
            for key in a.files:
                assert np.array_equal(a[key], b[key]), (layer, key)


def test_a_held_search_is_not_reused_once_the_weights_change(model: nn.Module, probe: ProbeSet, tmp_path: Path) -> None:
    """The same step after the weights changed without an optimizer's write counter (``.data``, as fused optimizers
    write), even to weights with the same sums (two filters swapped): the search runs again; another step or fewer
    images never read the held one either."""
    top, atlas = patch_callbacks(tmp_path, "changed")
    for cb in (top, atlas):
        cb.prepare(model, probe)
    session = share_session([top, atlas])
    with inference(model):
        first = top.collect(model, probe, 0)
        again = atlas.patch_search(model, probe, 0, ["conv2"], 4, 200, 64)
        assert session.searches == 1 and again is top.search, "a subset of the held layers: the held search"
        model.conv1.weight.data[[0, 1]] = model.conv1.weight.data[[1, 0]].clone()  # the same sum, other weights
        model.conv1.bias.data[[0, 1]] = model.conv1.bias.data[[1, 0]].clone()
        swapped = atlas.patch_search(model, probe, 0, ["conv1"], 4, 200, 64)
        assert session.searches == 2 and swapped is not again
        model.conv1.weight.data.mul_(-1.0)
        changed = atlas.patch_search(model, probe, 0, ["conv1"], 4, 200, 64)
        assert session.searches == 3
        alone = TopPatchesCallback(layers=["conv1"], probe_size=200, batch_size=64, top_k=4)
        alone.prepare(model, probe)
        assert torch.equal(changed.tops["conv1"].ids, alone.collect(model, probe)["conv1"].ids)
        assert not torch.equal(changed.tops["conv1"].ids, first["conv1"].ids), "other weights, other winners"
        atlas.patch_search(model, probe, 1, ["conv1"], 4, 200, 64)
        atlas.patch_search(model, probe, 1, ["conv1"], 4, 100, 64)
        atlas.patch_search(model, probe, 1, ["pool1", "conv1"], 4, 100, 64)
    assert session.searches == 6, "another step, other images, another layer: a search each"


def test_top_patches_draws_only_its_layers_from_a_search_that_holds_more(
    model: nn.Module, probe: ProbeSet, tmp_path: Path
) -> None:
    """The atlas searched conv1-3 first; top patches asks for conv1 only: it is served conv1 from that search and
    draws, chooses and remembers conv1 alone, as on its own."""
    atlas = patch_callbacks(tmp_path, "more")[1]
    top = TopPatchesCallback(layers=["conv1"], probe_size=200, batch_size=64, top_k=4, max_channels=4)
    alone = TopPatchesCallback(layers=["conv1"], probe_size=200, batch_size=64, top_k=4, max_channels=4)
    for cb in (atlas, top, alone):
        cb.prepare(model, probe)
    session = share_session([atlas, top])
    with inference(model):
        atlas.render(model, probe, 0)
        shared = top.render(model, probe, 0)
        own = alone.render(model, probe, 0)
    assert session.searches == 1, "conv1 came from the atlas's search"
    assert list(shared.images) == list(own.images) == ["top_patches/conv1"]
    assert torch.equal(shared.images["top_patches/conv1"], own.images["top_patches/conv1"])
    assert top.state_dict() == alone.state_dict() and list(top.chosen) == ["conv1"]


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(h)).amax(dim=(2, 3)))


def test_a_conv_before_batchnorm_is_ranked_after_it_so_a_negative_scale_changes_nothing() -> None:
    """The same function with one channel's conv kernel, bias, BatchNorm scale and running mean negated (a negative
    BatchNorm scale): the unit's best windows must stay its best windows. Ranked by the raw conv output they became
    the windows where the unit is switched off. A conv straight into its ReLU is still ranked at the conv."""
    from cnnfeat.topk import search_patches

    torch.manual_seed(0)
    model = _ConvBN().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
    probe = probe_from_tensors(torch.rand(60, 1, 12, 12), torch.arange(60) % 3)
    with torch.no_grad():
        before, logits = search_patches(model, probe, ["conv1", "conv2"], 4, 60, 16), model(probe.inputs)
        for t in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.running_mean):
            t[2].neg_()
        torch.testing.assert_close(model(probe.inputs), logits)  # the same function
        after = search_patches(model, probe, ["conv1", "conv2"], 4, 60, 16)
        with capture(model, ["bn1"]) as out:
            model(probe.inputs)
    # F.relu is no module (feature visualisation optimises modules): ranked by the BatchNorm, the ReLU's order
    assert before.ranked_at == after.ranked_at == {"conv1": "bn1", "conv2": "conv2"}
    for name in ("conv1", "conv2"):
        a, b = before.tops[name], after.tops[name]
        assert torch.equal(a.ids, b.ids) and torch.equal(a.positions, b.positions), name
        torch.testing.assert_close(a.values, b.values, atol=1e-6, rtol=0)
    best = out["bn1"][:, 2].flatten(1).amax(dim=1)  # brute force: each image's best value of the flipped unit
    torch.testing.assert_close(after.tops["conv1"].values[:, 2], best.topk(4).values)


def test_a_linear_before_batchnorm_is_ranked_after_it_too() -> None:
    """The atlas's fully connected units (one whole image each) follow the same rule: Linear -> BatchNorm1d with a
    negative scale -> ReLU ranks its best images by the ReLU, not by the raw Linear output."""
    from cnnfeat.topk import search_vectors

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([1.0, 0.5, -2.0, 1.5, -1.0, 2.0]))
        model[2].bias.fill_(3.0)  # mostly on: the order among the best images is the BatchNorm's, reversed where < 0
    probe = probe_from_tensors(torch.rand(40, 1, 12, 12), torch.arange(40) % 3)
    with torch.no_grad():
        found = search_vectors(model, probe, ["1"], 4, 40, 16)["1"]
        with capture(model, ["3"]) as out:
            model(probe.inputs)
    best = out["3"].topk(4, dim=0)
    torch.testing.assert_close(found.values, best.values)
    assert bool((best.values[-1] > 0).all()), "no ties at zero: the images are determined"
    assert torch.equal(found.ids, probe.ids[best.indices])
