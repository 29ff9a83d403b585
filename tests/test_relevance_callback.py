"""Issue 24's relevance references in a real Trainer: the pictures and overlaps read back from the event files are
checked against a brute-force computation on the same weights (the untrained network rebuilt from the seed, the
trained one from ``last.ckpt``): activation x gradient of the predicted class at each unit's output, taken with
forward hooks and autograd on the whole probe at once, max over positions per image, top-k over images."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from cnnfeat import tags, viz
from cnnfeat.atlas import Atlas
from cnnfeat.callbacks import RelevanceCallback
from cnnfeat.callbacks.relevance import GAP
from cnnfeat.callbacks.session import build_probe
from cnnfeat.errors import ConfigError
from cnnfeat.plan import LayerPlan
from cnnfeat.probe import ProbeSet
from cnnfeat.probe_pass import shared_positions
from cnnfeat.receptive_field import crop
from cnnfeat.run.train import build, train
from cnnfeat.topk import search_patches
from tests.conftest import read_events

MakeCfg = Callable[..., DictConfig]
PROBE = 300
K = 8
UNITS = 6  #: units drawn per layer: all of conv1/conv2 (6 wide), the 6 most variable of conv3's 16
PATH_UNITS = 2  #: units per layer whose optimised input's path is checked
RELU_OF = {"conv1": "relu1", "conv2": "relu2", "conv3": "relu3"}


def _decode(event: object) -> torch.Tensor:
    """A TensorBoard image event -> (3, H, W) float in [0, 1]."""
    arr = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def _brute_force(model: torch.nn.Module, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Per ReLU module: (N, C) max over positions of the activation and of activation x d(predicted logit)/d
    activation, and the flat position of each maximum."""
    outs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            out.retain_grad()
            outs[name] = out

        return hook

    handles = [getattr(model, n).register_forward_hook(keep(n)) for n in RELU_OF.values()]
    model.eval()
    try:
        logits = model(x)
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad()
    found = {}
    for name, a in outs.items():
        rel = (a * a.grad).detach().flatten(2)
        act = a.detach().flatten(2)
        found[name] = {"rel": rel.max(2).values, "rel_pos": rel.argmax(2), "act": act.max(2).values}
        found[name]["act_pos"] = act.argmax(2)
    return found


def _top(values: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-K over images per unit: (K, C) probe IDs and positions, and (C,) whether the order is unambiguous (the
    K+1 best values of the unit are distinct beyond float noise)."""
    v, order = values.topk(K + 1, dim=0)
    gaps = (v[:-1] - v[1:]).min(dim=0).values
    clear = gaps > 1e-4 * v[0].abs().clamp(min=1e-12)
    return ids[order[:K]], pos.gather(0, order[:K]), clear


def _block(cells: torch.Tensor, text: str) -> torch.Tensor:
    """One unit's block of a refs picture: the cells (2K, C, h, w) as a K-wide grid, captioned."""
    return viz.caption(viz.grid(viz.grey(cells), nrow=K, min_cell=40), text)


def _spread_choice(acts: torch.Tensor, k: int) -> list[int]:
    """The ``k`` units of largest population std over images of their per-image max ``acts`` (N, C), ascending."""
    spread = acts.double().std(dim=0, unbiased=False)
    order = spread.argsort(descending=True)
    if k < len(spread):
        assert spread[order[k - 1]] - spread[order[k]] > 1e-9 * spread[order[0]], "a near tie at the cut"
    return sorted(order[:k].tolist())


def test_relevance_references_in_a_real_run(make_cfg: MakeCfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "callbacks=[none,relevance,atlas]",
        "save_png=true",
        f"callbacks.relevance.probe_size={PROBE}",
        f"callbacks.relevance.units={UNITS}",
        "callbacks.relevance.path_settings.steps=8",
        f"callbacks.relevance.path_units={PATH_UNITS}",
        "callbacks.relevance.path_arbitrary=16",
        # the atlas beside it, on the same probe images: it must show the same units of the layers both record
        "callbacks.atlas.layers=[conv1,conv2,conv3]",
        f"callbacks.atlas.units={UNITS}",
        f"callbacks.atlas.alive_probe_size={PROBE}",
        f"callbacks.atlas.probe_size={PROBE}",
        "callbacks.atlas.featviz=false",
        "callbacks.atlas.top_k=2",
        "callbacks.atlas.class_top=2",
    )
    train(cfg)
    ev = read_events(tmp_path)
    images, scalars, texts = ev["images"], ev["scalars"], ev["tensors"]
    for kind, logged in (("image", images), ("scalar", scalars), ("text", texts)):
        for tag in logged:
            if tag.startswith("relevance/"):
                found = tags.family(tag, kind)
                assert found is not None and found.writer == "RelevanceCallback", tag

    datamodule, model, _ = build(cfg)  # seeded as the run was: the untrained weights of step 0
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    datamodule.prepare_data()
    datamodule.setup("fit")
    probe = build_probe(datamodule, RelevanceCallback().probe_spec, model)
    rows = shared_positions(probe, PROBE)
    x, ids = probe.inputs[rows], probe.ids[rows]
    sub = ProbeSet(probe.images[rows], x, probe.labels[rows], probe.class_names, ids, probe.split, probe.split_size)
    plan = LayerPlan.trace(model, x[:2])
    checked = 0
    drawn: dict[str, list[int]] = {}
    for step, weights in ((0, untrained), (1, trained)):
        model.load_state_dict(weights)
        brute = _brute_force(model, x)
        if step == 0:  # chosen at the first render (the untrained network) and kept
            drawn = {layer: _spread_choice(brute[node]["act"], UNITS) for layer, node in RELU_OF.items()}
            assert drawn["conv1"] == drawn["conv2"] == list(range(UNITS)) and drawn["conv3"] != list(range(UNITS))
        model.eval()
        with torch.no_grad():
            search = search_patches(model, sub, list(RELU_OF.values()), K, PROBE, 128)
        for layer, node in RELU_OF.items():
            b = brute[node]
            rel_ids, rel_pos, rel_clear = _top(b["rel"], b["rel_pos"], ids)
            act_ids, act_pos, act_clear = _top(b["act"], b["act_pos"], ids)
            clear = rel_clear & act_clear
            assert clear.sum() >= len(clear) // 2, f"{layer} step {step}: too few units without ties to check"
            # the activation references are the top patches' search (topk.search_patches)
            top = search.tops[node]
            assert torch.equal(top.ids[:, act_clear], act_ids[:, act_clear])
            assert torch.equal(top.positions[:, act_clear], act_pos[:, act_clear])
            # the overlap: the shared images of the two sets, counted by hand, in the table and the mean
            # (references are images with a positive value; a unit without any has no overlap: NaN, "—" in the table)
            rel_v, act_v = b["rel"].topk(K, dim=0).values, b["act"].topk(K, dim=0).values
            hand = []
            for u in range(len(clear)):
                by_rel = set(rel_ids[:, u][rel_v[:, u] > 0].tolist())
                by_act = set(act_ids[:, u][act_v[:, u] > 0].tolist())
                hand.append(len(by_rel & by_act) / len(by_rel) if by_rel and by_act else float("nan"))
            hand = torch.tensor(hand)
            text = next(e for e in texts[tags.RELEVANCE_TABLE.logged(layer=layer)] if e.step == step)
            table = text.tensor_proto.string_val[0].decode()
            cells = re.findall(r"^\| \d+ \| ([^|]+?) \|", table, re.M)
            shown = torch.tensor([float("nan") if c.startswith("—") else float(c) for c in cells])
            assert len(shown) == len(clear), "the table lists every unit"
            assert torch.allclose(shown[clear], hand[clear], atol=1e-3, equal_nan=True)
            logged = [v for s, v in scalars.get(tags.RELEVANCE_OVERLAP.format(layer=layer), []) if s == step]
            if shown.isnan().all():
                assert not logged, "no overlap scalar for a layer without references"
            else:
                assert logged[0] == pytest.approx(float(shown.nanmean()), abs=1e-3)
                if clear.all():
                    assert logged[0] == pytest.approx(float(hand.nanmean()), abs=1e-6)
            # the picture: per unit, the activation row above the relevance row, cut by the unit's receptive field
            event = next(e for e in images[tags.RELEVANCE_REFS.format(layer=layer)] if e.step == step)
            picture = _decode(event)
            field = plan.field(node)
            y = 0
            for u in drawn[layer]:
                cells = []
                for refs, pos in ((act_ids, act_pos), (rel_ids, rel_pos)):
                    for r in range(K):
                        row, col = divmod(int(pos[r, u]), field.output_shape[1])
                        image = probe.images[probe.positions([int(refs[r, u])])[0]]
                        cells.append(crop(image, field.box(row, col)))
                shared = round(float(hand[u]) * K)
                text = f"unit {u}: top {K} by activation (above), by relevance (below); {shared}/{K} shared"
                expected = _block(torch.stack(cells), text)
                h, w = expected.shape[1:]
                if clear[u]:
                    left = (picture.shape[2] - w) // 2
                    assert (picture[:, y : y + h, left : left + w] - expected).abs().max() <= 1.5 / 255, (
                        f"{layer} step {step} unit {u}"
                    )
                    checked += 1
                y += h + GAP
            assert y - GAP == picture.shape[1]
            # the heatmaps: drawn, not blank (coloured pixels), one block per unit
            heat = _decode(next(e for e in images[tags.RELEVANCE_HEATMAPS.format(layer=layer)] if e.step == step))
            coloured = (heat.max(0).values - heat.min(0).values) > 0.2
            assert coloured.float().mean() > 0.01, f"{layer} step {step}: the heatmaps are blank"
    assert checked >= 20
    # the atlas beside it shows the same units; both choices are in the checkpoint
    states = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    (rel_state,) = [v for k, v in states.items() if k.startswith("RelevanceCallback")]
    assert json.loads(rel_state["chosen"]) == {"conv3": drawn["conv3"]}, "a choice only where the layer is wider"
    recorded = Atlas.load(tmp_path)
    assert recorded is not None and {i.name: i.shown for i in recorded.layers} == drawn
    # the refs PNG holds patches, not a blank canvas
    png = torch.from_numpy(np.asarray(Image.open(tmp_path / "images" / "relevance/refs/conv3" / "step_001.png")))
    assert png.float().std() > 20
    # the path check runs once, at the last epoch: its count is the table's flagged rows
    for layer in RELU_OF:
        logged = scalars[tags.RELEVANCE_PATH_FLAGGED.format(layer=layer)]
        assert [s for s, _ in logged] == [1]
        (text,) = texts[tags.RELEVANCE_PATH_TABLE.logged(layer=layer)]
        table = text.tensor_proto.string_val[0].decode()
        assert len(table.splitlines()) == 2 + PATH_UNITS, "the first path_units drawn units are checked"
        assert logged[0][1] == table.count("**flagged**")
    # arguments checked against the model and the probe, with the name at fault
    for cb, message in (
        (RelevanceCallback(layers=["conv1", "nope"]), "nope"),
        (RelevanceCallback(probe_size=10**6), "1000000"),
        (RelevanceCallback(units=[7]), r"units \[7\] out of range for 'conv1', which has 6"),
        (RelevanceCallback(layers=["conv1", "relu1"]), "are read at the same node 'relu1'"),
    ):
        with pytest.raises(ConfigError, match=message):
            cb.prepare(model, probe)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RelevanceCallback(top_k=0), "top_k must be an integer >= 1"),
        (lambda: RelevanceCallback(top_k=1), "path_check compares each unit with its top real images"),
        (lambda: RelevanceCallback(path_settings={"stepz": 3}), "unknown feature-visualisation setting"),
        (lambda: RelevanceCallback(heatmaps="yes"), "heatmaps"),
        (lambda: RelevanceCallback(layers="conv1"), "layers must be a list of names"),
    ],
)
def test_bad_arguments_are_refused_with_their_name(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()
