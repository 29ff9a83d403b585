"""Issue 24's callbacks in a real Trainer: Grad-CAM / Integrated Gradients pictures and unit ablation scalars.

The pictures and numbers read back from the event files are checked against the core recomputed on the same weights
(the untrained network rebuilt from the seed, the trained one from ``last.ckpt``), and the ablation's largest
accuracy drop against removing each unit by hand with a forward hook.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from cnnfeat import attribution, importance, tags, viz
from cnnfeat.callbacks import AttributionCallback, ImportanceCallback
from cnnfeat.callbacks.attribution import CELL, GAP, cam_cells
from cnnfeat.callbacks.session import build_probe
from cnnfeat.errors import ConfigError
from cnnfeat.plan import LayerPlan
from cnnfeat.probe_pass import shared_positions
from cnnfeat.run.train import build, train
from tests.conftest import read_events

MakeCfg = Callable[..., DictConfig]
IDS = [22, 193]
PROBE = 200
CONVS = ("conv1", "conv2", "conv3")


def _decode(event: object) -> torch.Tensor:
    """A TensorBoard image event -> (3, H, W) float in [0, 1]."""
    arr = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def _hand_acc_drop(model: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy drop of each channel of ``module``'s output, zeroed by a forward hook, one channel at a time."""
    model.eval()
    with torch.no_grad():
        out: dict[str, torch.Size] = {}
        handle = module.register_forward_hook(lambda m, a, o: out.update(shape=o.shape))
        base = (model(x).argmax(1) == y).float().mean()
        handle.remove()
        drops = []
        for c in range(out["shape"][1]):

            def zero(m: torch.nn.Module, a: tuple, o: torch.Tensor, c: int = c) -> torch.Tensor:
                o = o.clone()
                o[:, c] = 0
                return o

            handle = module.register_forward_hook(zero)
            drops.append(base - (model(x).argmax(1) == y).float().mean())
            handle.remove()
    return torch.stack(drops)


def test_attribution_and_importance_in_a_real_run(make_cfg: MakeCfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "callbacks=[none,attribution,importance]",
        "trainer.max_epochs=2",
        "save_png=true",
        f"callbacks.attribution.image_ids=[{','.join(map(str, IDS))}]",
        f"callbacks.importance.probe_size={PROBE}",
        "callbacks.importance.every_n_epochs=1",
    )
    train(cfg)
    ev = read_events(tmp_path)
    images, scalars, texts = ev["images"], ev["scalars"], ev["tensors"]

    ours = {"AttributionCallback", "ImportanceCallback"}
    for kind, logged in (("image", images), ("scalar", scalars), ("text", texts)):
        for tag in logged:
            if tag.startswith(("attribution/", "importance/")):
                found = tags.family(tag, kind)
                assert found is not None and found.writer in ours and found.axis is tags.Axis.EPOCHS, tag
    assert len({(e.width, e.height) for e in images[tags.ATTRIBUTION.format(image=IDS[0])]}) == 1
    status = (tmp_path / "status.json").read_text()  # per-unit series go to the loggers, not the run's summary
    assert "importance/acc_drop_max/conv1" in status and "/unit0/" not in status

    datamodule, model, _ = build(cfg)  # seeded as the run was: the untrained weights of step 0
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    datamodule.prepare_data()
    datamodule.setup("fit")
    probe = build_probe(datamodule, AttributionCallback().probe_spec, model)
    positions = probe.positions(IDS)
    x, y = probe.inputs[positions], probe.labels[positions]

    for img, k in zip(IDS, range(len(IDS)), strict=True):
        tag = tags.ATTRIBUTION.format(image=img)
        assert [e.step for e in images[tag]] == [0, 1, 2], "step 0 = untrained, then one per epoch"
        assert (tmp_path / "images" / tag / "step_002.png").is_file()
        gap_tag = tags.ATTRIBUTION_IG_GAP.format(image=img)
        assert [s for s, _ in scalars[gap_tag]] == [0, 1, 2]
        assert all(math.isfinite(v) and v >= 0 for _, v in scalars[gap_tag])
        row_width = 5 * CELL + 4 * GAP
        for step, weights in ((0, untrained), (2, trained)):
            event = next(e for e in images[tag] if e.step == step)
            assert event.width >= row_width and event.height > CELL
            model.load_state_dict(weights)
            model.eval()
            with torch.no_grad():
                predicted = model(x).argmax(1)
            cams = [attribution.grad_cam(model, x[k : k + 1], t[k : k + 1], "relu3")[0] for t in (predicted, y)]
            if step == 2:
                assert float(cams[0].max()) > 0, "a trained network's Grad-CAM is not all zero"
            picture = _decode(event)
            left = (event.width - row_width) // 2  # the caption may be wider than the row: the row is centred
            for j, cell in enumerate(cam_cells(*cams, (28, 28)), start=1):
                expected = viz.upscale(cell.unsqueeze(0), CELL)[0]
                shown = picture[:, :CELL, left + j * (CELL + GAP) : left + j * (CELL + GAP) + CELL]
                assert (shown - expected).abs().max() <= 1.5 / 255, f"{tag} step {step}: Grad-CAM panel {j}"
            input_panel = picture[:, :CELL, left : left + CELL]
            assert (
                input_panel - viz.upscale(probe.images[positions[k] : positions[k] + 1], CELL)[0]
            ).abs().max() < 2 / 255

    layers = [*CONVS, "relu5"]
    rows = shared_positions(probe, PROBE)
    xs, ys = probe.inputs[rows], probe.labels[rows]
    model.load_state_dict(trained)
    by_hand = importance.ablation_importance(
        model,
        xs,
        ys,
        LayerPlan.trace(model, xs[:2]).graph,
        {"relu1": None, "relu2": None, "relu3": None, "relu5": None},
    )
    relu_of = {"conv1": "relu1", "conv2": "relu2", "conv3": "relu3", "relu5": "relu5"}
    for layer in layers:
        imp = by_hand[relu_of[layer]]
        roles = importance.classify(imp)
        for t, expected in (
            (tags.IMPORTANCE_ACC_DROP_MAX, float(imp.acc_drop.max())),
            (tags.IMPORTANCE_BUSY_IDLE, float(roles.busy_idle.sum())),
            (tags.IMPORTANCE_RARE_VITAL, float(roles.rare_vital.sum())),
        ):
            logged = scalars[t.format(layer=layer)]
            assert [s for s, _ in logged] == [0, 1, 2]
            assert logged[-1][1] == pytest.approx(expected, abs=1e-6), t.format(layer=layer)
        assert [e.step for e in texts[tags.IMPORTANCE_TABLE.logged(layer=layer)]] == [0, 1, 2]
        for u, unit in enumerate(imp.units.tolist()):  # each unit's importance over the epochs, as scalars
            acc = scalars[tags.IMPORTANCE_UNIT_ACC_DROP.format(layer=layer, unit=unit)]
            logit = scalars[tags.IMPORTANCE_UNIT_LOGIT_DROP.format(layer=layer, unit=unit)]
            assert [s for s, _ in acc] == [s for s, _ in logit] == [0, 1, 2]
            assert acc[-1][1] == pytest.approx(float(imp.acc_drop[u]), abs=1e-6)
            assert logit[-1][1] == pytest.approx(float(imp.logit_drop[u]), abs=1e-5)
    # arguments checked against the model and the probe, with the name at fault
    for cb, message in (
        (AttributionCallback(layer="fc1"), "Grad-CAM needs a layer with spatial maps"),
        (AttributionCallback(layer="nope"), "nope"),
        (AttributionCallback(image_ids=[10**6]), "1000000"),
        (ImportanceCallback(layers=["conv1", "nope"]), "nope"),
        (ImportanceCallback(probe_size=10**6), "1000000"),
    ):
        with pytest.raises(ConfigError, match=message):
            cb.prepare(model, probe)
    # the largest accuracy drop of conv3's units, by hand: zero each channel of relu3's output with a hook
    hand = _hand_acc_drop(model, model.relu3, xs, ys)
    assert scalars[tags.IMPORTANCE_ACC_DROP_MAX.format(layer="conv3")][-1][1] == pytest.approx(
        float(hand.max()), abs=1e-6
    )
    for unit, drop in enumerate(hand.tolist()):
        assert scalars[tags.IMPORTANCE_UNIT_ACC_DROP.format(layer="conv3", unit=unit)][-1][1] == pytest.approx(
            drop, abs=1e-6
        )
    # a diverged network's maps are not drawn as data: no picture, no gap, a warning naming the layer
    cb = AttributionCallback(image_ids=IDS)
    cb.prepare(model, probe)
    with torch.no_grad():
        model.fc3.bias.fill_(float("nan"))  # NaN logits: gradients stay finite, the gaps do not
    with pytest.warns(UserWarning, match="layer relu3: attributions are NaN or infinite for all 2 chosen images"):
        drawn = cb.render(model, probe, step=3)
    assert not drawn.images and not drawn.scalars


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AttributionCallback(ig_steps=1), "ig_steps must be an integer >= 2"),
        (lambda: AttributionCallback(ig_steps=64, ig_max_steps=32), "ig_steps (64) must be <= ig_max_steps (32)"),
        (lambda: AttributionCallback(layer=""), "layer must be a graph node name"),
        (lambda: ImportanceCallback(budget=1), "budget must be a finite number > 1"),
        (lambda: ImportanceCallback(layers="conv1"), "layers must be a list of names"),
    ],
)
def test_bad_arguments_are_refused_with_their_name(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.nn.functional.max_pool2d(h, 2).flatten(1))


def test_the_baseline_is_a_black_picture_after_a_normalize(monkeypatch: pytest.MonkeyPatch) -> None:
    """With normalised inputs the input 0 is a grey picture: Integrated Gradients and the relevance heatmaps start
    from the input of a black one (-mean / std), so black pixels carry no attribution and the completeness
    difference is S(x) - S(black); inputs that are no per-channel affine map of the pictures keep 0 and warn."""
    from cnnfeat import atlas
    from cnnfeat.callbacks import RelevanceCallback
    from cnnfeat.probe import probe_from_tensors

    torch.manual_seed(0)
    mean, std = 0.286, 0.353
    images = torch.rand(40, 1, 12, 12)
    images[:, :, :4] = 0  # black rows at the top of every image
    probe = probe_from_tensors(images, torch.arange(40) % 4, inputs=(images - mean) / std)
    black = atlas.black_input(probe.images, probe.inputs)
    assert black is not None and black.shape == (1, 1, 12, 12)
    torch.testing.assert_close(black, torch.full((1, 1, 12, 12), -mean / std), atol=1e-5, rtol=0)
    assert torch.equal(atlas.black_input(images, images), torch.zeros(1, 1, 12, 12))  # the pictures themselves
    assert atlas.black_input(images, images**2) is None

    model = _Net().eval()
    seen: list[attribution.Explanation] = []
    explain = attribution.explain
    monkeypatch.setattr(attribution, "explain", lambda *a, **k: seen.append(explain(*a, **k)) or seen[-1])
    cb = AttributionCallback(image_ids=[0, 1, 2])
    cb.prepare(model, probe)
    cb.render(model, probe, 0)
    ex = seen[0]
    x = probe.inputs[:3]
    with torch.no_grad():
        expected = (
            model(x).gather(1, ex.predicted[:, None])[:, 0]
            - model(black).expand(3, -1).gather(1, ex.predicted[:, None])[:, 0]
        )
    torch.testing.assert_close(ex.ig_predicted.difference, expected, atol=1e-5, rtol=1e-4)
    scale = ex.ig_predicted.attributions.abs().max()
    assert ex.ig_predicted.attributions[:, :, :4].abs().max() <= 1e-5 * scale  # black pixels: nothing
    assert ex.ig_predicted.attributions[:, :, 4:].abs().max() > 0.01 * scale

    rel = RelevanceCallback(layers=["conv2"], path_check=False, probe_size=40)
    rel.prepare(model, probe)
    assert torch.equal(rel.baseline, black)
    heat = attribution.conditional_heatmaps(model, x, "relu:1", [0, 1, 2], baselines=rel.baseline)
    assert heat[:, :, :4].abs().max() <= 1e-5 * heat.abs().max()

    odd = probe_from_tensors(images, torch.arange(40) % 4, inputs=images**2)
    with pytest.warns(UserWarning, match="all-zero input"):
        AttributionCallback(image_ids=[0]).prepare(model, odd)
