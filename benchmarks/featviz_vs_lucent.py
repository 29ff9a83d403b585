"""cnnfeat's feature visualisation against Lucent's ``render_vis`` on the same units, side by side, one torch thread.

SmallCNN (seed 0, untrained), conv3 channels 0, 3, 7, 12, the neuron objective (the unit's value at the centre of its
map), 128 steps each, grey 28x28 Fourier-parametrised images. cnnfeat: ``featviz.visualise`` (all units in one batch,
its default jitter/scale/rotation); Lucent 0.1.8: one ``render_vis`` per unit with ``objectives.neuron``,
``param.image(28, channels=1, fft=True, decorrelate=False)`` and transforms scaled to 28 px (pad 1 and jitter 2, so
the model sees 28 px as cnnfeat's does; scale 0.95-1.05; rotate -5..5 degrees), ``preprocess=False``. Both images
are measured the same way: a forward hook reads the unit's centre activation on the returned image.

Lucent is not a dependency: ``pip install --no-deps --target /tmp/lucent torch-lucent kornia==0.5.11 decorator`` and a
stub ``IPython/display.py`` (Lucent imports it to show images), then ``PYTHONPATH=/tmp/lucent python
benchmarks/featviz_vs_lucent.py`` -> ``benchmarks/results/featviz_vs_lucent.md``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from cnnfeat import featviz
from cnnfeat.models.small_cnn import SmallCNN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_markdown

UNITS, STEPS = [0, 3, 7, 12], 128


def main() -> None:
    from lucent.optvis import objectives, param, render, transform

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SmallCNN().eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def centre(img: torch.Tensor, unit: int) -> float:
        with torch.no_grad():
            out = featviz.output_of_call(model, model.conv3, 0, img)
        assert out is not None
        return float(out[0, unit, out.shape[2] // 2, out.shape[3] // 2])

    start = time.perf_counter()
    fn = featviz.module_output(model, "conv3")
    res = featviz.visualise(fn, UNITS, (1, 28, 28), featviz.FeatVizSettings(steps=STEPS), layer="conv3")
    ours = time.perf_counter() - start
    ours_act = [centre(res.images[i : i + 1], u) for i, u in enumerate(UNITS)]
    tfs = [
        transform.pad(1),
        transform.jitter(2),
        transform.random_scale([0.95, 0.975, 1.0, 1.025, 1.05]),
        transform.random_rotate(list(range(-5, 6))),
    ]
    start, theirs_act = time.perf_counter(), []
    for u in UNITS:
        torch.manual_seed(u)
        images = render.render_vis(
            model,
            objectives.neuron("conv3", u),
            param_f=lambda: param.image(28, channels=1, fft=True, decorrelate=False),
            transforms=tfs,
            thresholds=(STEPS,),
            preprocess=False,
            progress=False,
            show_image=False,
        )
        theirs_act.append(centre(torch.from_numpy(np.asarray(images[-1])).permute(0, 3, 1, 2).float(), u))
    theirs = time.perf_counter() - start
    higher = sum(a > b for a, b in zip(ours_act, theirs_act, strict=True))
    lines = [
        "# Feature visualisation: cnnfeat against Lucent 0.1.8 (same units, same measurement)",
        "",
        f"SmallCNN (seed 0, untrained) conv3 units {UNITS}, neuron objective at the centre, {STEPS} steps, 1 thread.",
        "",
        "| tool | seconds | per unit | centre activation reached, per unit |",
        "|---|---:|---:|---|",
        f"| cnnfeat | {ours:.2f} | {ours / len(UNITS):.3f} | {', '.join(f'{v:.3f}' for v in ours_act)} |",
        f"| Lucent | {theirs:.2f} | {theirs / len(UNITS):.3f} | {', '.join(f'{v:.3f}' for v in theirs_act)} |",
        "",
        f"cnnfeat {theirs / ours:.1f}x faster; higher activation for {higher} of {len(UNITS)} units.",
    ]
    write_markdown("featviz_vs_lucent", lines)


if __name__ == "__main__":
    main()
