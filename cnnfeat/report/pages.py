"""One run's report: the overview, a page per layer (``_Writer``) and, when the run logged their tags, the attribution
and importance pages (issue 24), written into a safe folder (``write_report``)."""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from cnnfeat import tags
from cnnfeat.atlas import LayerInfo, anchor, chosen_by, slug
from cnnfeat.errors import ConfigError
from cnnfeat.lecture import LECTURE_LOG
from cnnfeat.report.data import (
    _IMAGE_ERRORS,
    _KNN_ACC,
    _TEST_ACC,
    _TRAIN_ACC,
    _TRAIN_LOSS,
    _VAL_ACC,
    _VAL_LOSS,
    RunData,
    UnitImportance,
    _number,
    _ranges,
)
from cnnfeat.report.draw import _grid, _save, crop_image, image_cell, kernel_cell, labelled, row_labelled
from cnnfeat.report.files import REPORT_DIR
from cnnfeat.report.html import PALETTE, esc, fmt, img_tag, page, pct, svg_chart, table, thumb_row
from cnnfeat.report.output import _build, report_folder
from cnnfeat.units import fires

log = logging.getLogger("cnnfeat")

#: the metrics of status.json shown first on the overview, in this order
_STATUS_METRICS = (_VAL_ACC, _TEST_ACC, _TRAIN_ACC, _TRAIN_LOSS, _VAL_LOSS)
#: the pages of the attribution and importance callbacks (issue 24), when the run logged their tags
ATTRIBUTION_PAGE, IMPORTANCE_PAGE = "attribution.html", "importance.html"
_PIXEL_NAMES = {"IG": "Integrated Gradients", "LRP": "LRP"}
_SCORE_TAGS = {"IG": tags.ATTRIBUTION_IG_GAP, "LRP": tags.ATTRIBUTION_LRP_CONSERVED}
_SCORE_NAMES = {"IG": "IG gap", "LRP": "LRP conserved"}
_STEPS_AXIS = "epochs trained (0 = untrained)"
#: units of a layer drawn in the importance-across-epochs chart (the most important at the last kept step)
_CHART_UNITS = 8
#: rows of a ranking table shown before the rest folds away
_TOP_ROWS = 10


def _step_name(step: int) -> str:
    return "untrained" if step == 0 else f"epoch {step}"


def _role(row: UnitImportance) -> str:
    if row.busy_idle:
        return "fires a lot but does not matter"
    return "rarely fires but matters" if row.rare_vital else ""


def alive_words(info: LayerInfo) -> tuple[str, str]:
    """What a unit that fired / never fired is called: alive / dead at an activation; without one (a conv feeding a
    residual add, a layer whose output branches) the layer's own output is read, where never positive is not dead."""
    return ("alive", "dead") if info.activation else ("positive", "never positive")


def read_at(info: LayerInfo) -> str:
    if info.activation:
        return f"alive/dead read at {esc(info.activation)}"
    return f"no activation after it: read on its own output ({esc(info.name)}), never positive is not a dead ReLU unit"


class _Writer:
    """Builds one report folder (assets referenced relative to the page)."""

    def __init__(self, data: RunData, out: Path) -> None:
        self.data, self.out = data, out
        self.assets = out / "assets"
        self.files: list[Path] = []
        #: per layer, its units' optimised inputs: (anchor, src, (h, w), flagged), for the overview
        self.thumbs: dict[str, list[tuple[str, str, tuple[int, int], bool]]] = {}

    def asset(self, rel: str) -> Path:
        p = self.assets / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(p)
        return p

    def png(self, arr: np.ndarray, rel: str) -> tuple[str, tuple[int, int]]:
        _save(arr, self.asset(rel))
        return f"assets/{rel}", arr.shape[:2]

    # -- pages --
    def nav(self, current: str = "") -> str:
        links = ['<a href="index.html">overview</a>']
        for name, label in ((ATTRIBUTION_PAGE, "attribution"), (IMPORTANCE_PAGE, "importance")):
            if self.has_page(name):
                links.append(f'<a href="{name}">{f"<b>{label}</b>" if name == current else label}</a>')
        if self.data.atlas:
            for info in self.data.atlas.layers:
                name = f"<b>{esc(info.name)}</b>" if info.name == current else esc(info.name)
                links.append(f'<a href="{esc(info.slug)}.html">{name}</a>')
        return " ".join(links)

    def write(self) -> list[Path]:
        pages = {}
        if self.data.atlas:
            for info in self.data.atlas.layers:
                pages[f"{info.slug}.html"] = self.layer_page(info)
        if self.has_page(ATTRIBUTION_PAGE):
            pages[ATTRIBUTION_PAGE] = self.attribution_page()
        if self.has_page(IMPORTANCE_PAGE):
            pages[IMPORTANCE_PAGE] = self.importance_page()
        pages["index.html"] = self.overview()  # after the layers: it shows their optimised inputs
        for name, text in pages.items():
            (self.out / name).write_text(text, encoding="utf-8")
        return [self.out / n for n in pages]

    def overview(self) -> str:
        d = self.data
        parts = [self.status_section(), self.layers_section(), self.curves_section()]
        if d.experiment == "seed":
            parts.append(self.lecture_section())
        parts += [self.umap_section(), self.dead_relu_section(), self.representation_section()]
        parts.append(self.attribution_importance_section())
        parts.append(self.config_section())
        if d.notes:
            parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in d.notes) + "</ul>")
        return page(f"cnnfeat report · {d.run_dir.name}", "".join(p for p in parts if p), self.nav())

    def explored_line(self) -> str:
        """Which epochs ``cnnfeat-explore`` drew and which it could not (no checkpoint); empty without explored.json."""
        e = self.data.explored
        return f"<p class='explored'>{e.describe()}</p>" if e is not None else ""

    def status_section(self) -> str:
        st = self.data.status or {}
        rows = [("run directory", esc(self.data.run_dir.resolve()))]
        if st:
            rows.append(("status", f"<b>{esc(st.get('status'))}</b> ({esc(st.get('time', ''))})"))
            for key in ("epoch", "step", "error", "resumed_from"):
                if st.get(key) not in (None, ""):
                    rows.append((key, esc(st[key])))
        else:
            rows.append(("status", "no status.json (not written by cnnfeat-train)"))
        if self.data.experiment:
            rows.append(("experiment", esc(self.data.experiment)))
        if self.data.overrides:
            rows.append(("overrides", esc(" ".join(self.data.overrides))))
        metrics = st.get("metrics") or {}
        keys = [k for k in _STATUS_METRICS if k in metrics]
        keys += sorted(k for k in metrics if k.startswith((_KNN_ACC, tags.DEAD_FRACTION_ALL.name)))
        for k in keys:
            v = _number(metrics[k])
            rows.append((esc(k), pct(v) if "acc" in k else fmt(v)))
        e = self.data.explored
        if e is not None and e.checkpoints:
            ckpts = table(["epoch", "checkpoint"], [(k, esc(v)) for k, v in sorted(e.checkpoints.items())])
            rows.append(("checkpoints", f"<details><summary>{len(e.checkpoints)} explored</summary>{ckpts}</details>"))
        return "<h2>Run</h2>" + self.explored_line() + table(None, rows, left=2)

    def curves_section(self) -> str:
        d = self.data
        loss = {t: sorted(d.per_epoch(t).items()) for t in (_TRAIN_LOSS, _VAL_LOSS) if t in d.scalars}
        acc = {t: sorted(d.per_epoch(t).items()) for t in (_TRAIN_ACC, _VAL_ACC) if t in d.scalars}
        if _TEST_ACC in d.scalars and acc:
            last = max(x for s in acc.values() for x, _ in s)
            acc[f"{_TEST_ACC} (final)"] = [(last, d.scalars[_TEST_ACC][-1][1])]
        lr = {tags.LR.name: sorted(d.per_epoch(tags.LR.name).items())} if tags.LR.name in d.scalars else {}
        if not (loss or acc):
            return "<h2>Training curves</h2><p class='muted'>No train/val scalars in the event files.</p>"
        figs = [svg_chart(loss, "Loss", "epoch", "cross-entropy"), svg_chart(acc, "Accuracy", "epoch", "accuracy")]
        if lr:
            figs.append(svg_chart(lr, "Learning rate", "epoch", "lr"))
        return "<h2>Training curves</h2><div class='figs'>" + "".join(figs) + "</div>"

    def lecture_section(self) -> str:
        d = self.data
        tr_acc, tr_loss, va_acc = d.per_epoch(_TRAIN_ACC), d.per_epoch(_TRAIN_LOSS), d.per_epoch(_VAL_ACC)
        if not tr_acc:
            return ""
        rows = []
        for e in sorted({*range(1, len(LECTURE_LOG) + 1), *tr_acc}):  # every epoch the run has, not a range to it
            lt, ll, lv = LECTURE_LOG[e - 1] if e <= len(LECTURE_LOG) else (float("nan"),) * 3
            rows.append(
                (
                    e,
                    pct(tr_acc.get(e)),
                    f"{lt:.2f}%" if math.isfinite(lt) else "&ndash;",
                    fmt(tr_loss.get(e)),
                    f"{ll:.4f}" if math.isfinite(ll) else "&ndash;",
                    pct(va_acc.get(e)),
                    f"{lv:.2f}%" if math.isfinite(lv) else "&ndash;",
                )
            )
        head = ["epoch", "train acc", "lecture", "train avgLoss", "lecture", "valid (=test) acc", "lecture"]
        return (
            "<h2>The lecture's table beside this run</h2><p class='muted'>experiment=seed validates on the official "
            '10k test set, as the lecture\'s "valid" column does.</p>' + table(head, rows)
        )

    def umap_section(self) -> str:
        d = self.data
        umap = {t: v for t, v in d.scalars.items() if t.startswith(tags.UMAP_NAMESPACE)}
        if not umap and d.gif is None:
            return ""
        parts = ["<h2>UMAP of the last-layer features</h2>"]
        if d.gif_data is not None and d.gif_size is not None:
            self.asset("umap_embedding.gif").write_bytes(d.gif_data)  # the bytes read and checked, not the path again
            w, h = d.gif_size
            parts.append(img_tag("assets/umap_embedding.gif", "UMAP animation, epoch by epoch", (h, w), "smooth"))
        metrics = tags.UMAP_METRICS
        rows = []
        pixel = [umap.get(tags.UMAP_PIXEL_QUALITY.format(metric=m)) for m in metrics]
        if any(pixel):
            rows.append(["raw pixels"] + [fmt(p[-1][1]) if p else "&ndash;" for p in pixel])
        feature = [tags.UMAP_QUALITY.format(metric=m) for m in metrics]
        steps = sorted({s for t in feature for s, _ in umap.get(t, [])})
        every = list(rows)
        for s in steps:
            vals = [dict(umap.get(t, [])).get(s) for t in feature]
            row = [("untrained network" if s == 0 else f"after epoch {s}")] + [fmt(v) for v in vals]
            every.append(row)
            if s in (0, 1, steps[-1]) or s % 5 == 0:
                rows.append(row)
        head = ["", "k-NN acc (features)", "k-NN acc (2-D map)", "trustworthiness", "silhouette"]
        if rows:
            parts.append(table(head, rows))
        if len(every) > len(rows):
            parts.append(f"<details><summary>every epoch</summary>{table(head, every)}</details>")
        return "".join(parts)

    def dead_relu_section(self) -> str:
        prefix = tags.DEAD_FRACTION.prefix  # relu/dead_fraction/<node> and .../all
        series = {t.removeprefix(prefix): v for t, v in self.data.scalars.items() if t.startswith(prefix)}
        if not series:
            return ""
        chart = svg_chart(series, "Dead ReLU units", "epochs trained (0 = untrained)", "dead fraction", (0.0, 1.0))
        final = [(esc(k), pct(v[-1][1]), esc(v[-1][0])) for k, v in series.items()]
        return (
            "<h2>Dying ReLU</h2><div class='figs'>"
            + chart
            + table(["ReLU", "dead at the end", "step"], final)
            + "</div>"
        )

    def tb_figures(self, images: Mapping[str, tuple[int, bytes]]) -> str:
        """TensorBoard pictures (tag -> (step, PNG bytes)) copied to the assets, as captioned figures in tag order."""
        figs = []
        for tag, (step, png) in sorted(images.items()):
            try:
                with Image.open(io.BytesIO(png)) as im:
                    (w, h), kind = im.size, im.format
            except _IMAGE_ERRORS:
                kind = None
            if kind != "PNG":
                self.data.note(f"TensorBoard picture {tag} (step {step}): not a PNG image; skipped")
                continue
            self.asset(f"tb/{slug(tag)}.png").write_bytes(png)
            figs.append(
                f"<figure>{img_tag(f'assets/tb/{slug(tag)}.png', tag, (h, w), 'smooth', 0.75)}"
                f"<figcaption>{esc(tag)} (step {step})</figcaption></figure>"
            )
        return "".join(figs)

    def representation_section(self) -> str:
        d = self.data
        parts = []
        cka = {t: v for t, v in d.images.items() if t.startswith(tags.CKA_NAMESPACE)}
        if cka:
            parts.append("<h3>CKA</h3><div class='figs'>" + self.tb_figures(cka) + "</div>")
        probe_acc = tags.PROBE_ACC.prefix
        probe = {t.removeprefix(probe_acc): v for t, v in d.scalars.items() if t.startswith(probe_acc)}
        if probe:
            steps = sorted({s for v in probe.values() for s, _ in v})
            rows = [[esc(layer)] + [pct(dict(v).get(s)) for s in steps] for layer, v in probe.items()]
            parts.append(
                "<h3>Linear probe accuracy per layer</h3>" + table(["layer"] + [f"step {s}" for s in steps], rows)
            )
        others = {t: v for t, v in d.images.items() if t.startswith((tags.PROBE_NAMESPACE, tags.UNITS_RASTER.prefix))}
        if others:
            parts.append("<div class='figs'>" + self.tb_figures(others) + "</div>")
        if not parts:
            return ""
        return "<h2>Representations (CKA, linear probes)</h2>" + "".join(parts)

    # -- attribution and importance (issue 24) --
    def has_page(self, name: str) -> bool:
        """Whether the run logged what the page ``name`` shows (a run without those callbacks has no such page)."""
        if name == ATTRIBUTION_PAGE:
            return bool(self.attribution_images())
        if name == IMPORTANCE_PAGE:
            return bool(self.importance_layers())
        return False

    def attribution_images(self) -> dict[str, list[tuple[int, bytes]]]:
        """Image ID -> its ``attribution/img<ID>`` pictures by step."""
        out = {}
        for tag, steps in self.data.image_series.items():
            if (m := tags.ATTRIBUTION.match(tag)) is not None:
                out[m["image"]] = steps
        return dict(sorted(out.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0)))

    def attribution_scores(self, family: tags.Tag) -> dict[str, dict[int, float]]:
        """Image ID -> its ``family`` scalar by step (``ATTRIBUTION_IG_GAP`` or ``ATTRIBUTION_LRP_CONSERVED``)."""
        out = {}
        for tag, values in self.data.scalars.items():
            if (m := family.match(tag)) is not None:
                out[m["image"]] = dict(values)
        return out

    def pixel_methods(self) -> list[str]:
        """Which pixel-level maps the run's attribution pictures hold ("IG", "LRP", or both when a resumed run changed
        ``pixel_method``), from the scalars logged beside them; a run without either scalar: IG, the default."""
        return [m for m in ("IG", "LRP") if self.attribution_scores(_SCORE_TAGS[m])] or ["IG"]

    def importance_scalars(self, layer: str) -> dict[str, dict[int, float]]:
        """A layer's importance scalars by step: ``acc_drop_max``, ``busy_idle``, ``rare_vital``."""
        families = {
            "acc_drop_max": tags.IMPORTANCE_ACC_DROP_MAX,
            "busy_idle": tags.IMPORTANCE_BUSY_IDLE,
            "rare_vital": tags.IMPORTANCE_RARE_VITAL,
        }
        return {k: dict(self.data.scalars.get(t.format(layer=layer), [])) for k, t in families.items()}

    def importance_layers(self) -> list[str]:
        """The layers with importance tables or scalars, tables' order first."""
        layers = list(self.data.importance)
        for tag in self.data.scalars:
            for family in (tags.IMPORTANCE_ACC_DROP_MAX, tags.IMPORTANCE_BUSY_IDLE, tags.IMPORTANCE_RARE_VITAL):
                if (m := family.match(tag)) is not None and m["layer"] not in layers:
                    layers.append(m["layer"])
        return layers

    def logged_png(self, tag: str, step: int, png: bytes, rel: str) -> tuple[str, tuple[int, int]] | None:
        """A logged picture copied as it is to ``assets/rel`` (its src and (h, w)); None, with a note, if not a PNG."""
        try:
            with Image.open(io.BytesIO(png)) as im:
                (w, h), kind = im.size, im.format
        except _IMAGE_ERRORS:
            kind = None
        if kind != "PNG":
            self.data.note(f"TensorBoard picture {tag} (step {step}): not a PNG image; skipped")
            return None
        self.asset(rel).write_bytes(png)
        return f"assets/{rel}", (h, w)

    def attribution_importance_section(self) -> str:
        """On the overview: links to the attribution and importance pages, with a line of what each holds."""
        items = []
        if self.has_page(ATTRIBUTION_PAGE):
            images = self.attribution_images()
            steps = sorted({s for v in images.values() for s, _ in v})
            items.append(
                f"<li><a href='{ATTRIBUTION_PAGE}'>Where the network looks</a>: Grad-CAM and "
                f"{' and '.join(_PIXEL_NAMES[m] for m in self.pixel_methods())} of {len(images)} image(s) at steps "
                f"{_ranges(steps)}</li>"
            )
        if self.has_page(IMPORTANCE_PAGE):
            rows = []
            for layer in self.importance_layers():
                sc = self.importance_scalars(layer)
                drop = sc["acc_drop_max"]
                last = max(drop) if drop else None
                rows.append(
                    [
                        f"<a href='{IMPORTANCE_PAGE}#{esc(slug(layer))}'>{esc(layer)}</a>",
                        esc(last) if last is not None else "&ndash;",
                        pct(drop.get(last)) if last is not None else "&ndash;",
                        fmt(sc["busy_idle"].get(last)) if last is not None else "&ndash;",
                        fmt(sc["rare_vital"].get(last)) if last is not None else "&ndash;",
                    ]
                )
            head = ["layer", "step", "largest accuracy drop", "fire a lot, do not matter", "rarely fire, matter"]
            items.append(
                f"<li><a href='{IMPORTANCE_PAGE}'>Which units matter</a>: each unit removed in turn on the probe"
                f"{table(head, rows)}</li>"
            )
        if not items:
            return ""
        return "<h2>Attribution and unit importance</h2><ul>" + "".join(items) + "</ul>"

    def attribution_page(self) -> str:
        """Per image, its attribution picture at every step (as logged) with the pixel-level method's check of the
        step (IG's completeness gap or LRP's conserved share); each step's method is read from which check it has."""
        images, methods = self.attribution_images(), self.pixel_methods()
        scores = {m: self.attribution_scores(_SCORE_TAGS[m]) for m in methods}
        texts = {
            "IG": (
                "<b>Integrated Gradients</b> for the predicted and the true class (summed over channels; red = pixels "
                "that are evidence for the class, blue = against it, white = none). The <b>IG gap</b> is how far the "
                "attributions' sum misses the logit difference to the black baseline (relative, the larger of the two "
                "classes): near 0 means the IG map accounts for the whole score."
            ),
            "LRP": (
                "<b>LRP</b> (layer-wise relevance propagation, zennit's epsilon-plus-flat rules) for the predicted and "
                "the true class: the class's logit handed back layer by layer to the pixels (summed over channels; red "
                "= pixels that are evidence for the class, blue = against it, white = none). <b>LRP conserved</b> is "
                "the input relevance's sum over the logit (the class farther from 1): 1 means all of it reached the "
                "pixels, the rest was absorbed by the biases."
            ),
        }
        both = len(methods) > 1
        pixel = " and ".join(texts[m] for m in methods)
        parts = [
            "<p>Each row is the picture the attribution callback logged at that step (0 = untrained, then epochs "
            "trained): <b>the input</b>, <b>Grad-CAM</b> at the last conv stage for the <b>predicted</b> and the "
            "<b>true</b> class (viridis, both on one scale: bright = the region that raises the class score), and "
            f"{pixel} When the prediction is right, the two Grad-CAMs (and the two pixel maps) are the same."
            + (" This run drew both methods (its setting changed on a resume): each row names its own." if both else "")
            + "</p>",
            self.explored_line(),
        ]
        charts = {
            "IG": ("IG completeness gap", "relative gap"),
            "LRP": ("LRP: relevance conserved", "relevance / logit"),
        }
        figs = [
            svg_chart(
                {f"img{k}": sorted(v.items()) for k, v in scores[m].items()}, charts[m][0], _STEPS_AXIS, charts[m][1]
            )
            for m in methods
            if scores[m]
        ]
        if figs:
            parts.append("<div class='figs'>" + "".join(figs) + "</div>")
        links = " ".join(f"<a href='#img{esc(k)}'>img{esc(k)}</a>" for k in images)
        parts.append(f"<p>Images: {links}</p>")
        for image, steps in images.items():
            rows = []
            for step, png in steps:
                tag = tags.ATTRIBUTION.format(image=image)
                got = self.logged_png(tag, step, png, f"attribution/img{slug(image)}_step{step:03d}.png")
                if got is None:
                    continue
                src, size = got
                at = next((m for m in methods if step in scores[m].get(image, {})), None)
                value = scores[at][image][step] if at is not None else None
                rows.append(
                    [
                        f"{step} <span class='muted'>({_step_name(step)}{', ' + at if both and at else ''})</span>",
                        img_tag(src, f"{tag} at step {step}", size, "smooth", 0.75),
                        fmt(value) if at == "LRP" else pct(value),
                    ]
                )
            maps = " or ".join(methods)
            head = [
                "step",
                f"input · Grad-CAM pred, true · {maps} pred, true",
                " / ".join(_SCORE_NAMES[m] for m in methods),
            ]
            parts.append(f"<h2 id='img{esc(image)}'>Image {esc(image)}</h2>" + table(head, rows))
        return page(f"Attribution · {self.data.run_dir.name}", "".join(parts), self.nav(ATTRIBUTION_PAGE))

    def importance_page(self) -> str:
        """Per layer: the ranking at the last kept step, the units called out, each unit's importance over steps."""
        parts = [
            "<p>Each unit is removed in turn (zeroed at its output, at the activation after a conv or linear layer) "
            "on the probe images; the <b>accuracy drop</b> is how much probe accuracy falls without it, the <b>logit "
            "drop</b> how much the true class's logit falls, the <b>firing rate</b> how often the unit is above 0. "
            "<b>Fires a lot but does not matter</b>: a busy unit whose removal costs nothing; <b>rarely fires but "
            "matters</b>: a quiet unit the decision still needs. Steps: 0 = untrained, then epochs trained (the "
            "kept epochs of the importance callback).</p>",
            self.explored_line(),
        ]
        layers = self.importance_layers()
        parts.append("<p>Layers: " + " ".join(f"<a href='#{esc(slug(x))}'>{esc(x)}</a>" for x in layers) + "</p>")
        for layer in layers:
            parts.append(self.importance_layer(layer))
        return page(f"Importance · {self.data.run_dir.name}", "".join(parts), self.nav(IMPORTANCE_PAGE))

    def importance_layer(self, layer: str) -> str:
        """One layer's section of the importance page."""
        sc = self.importance_scalars(layer)
        by_step = self.data.importance.get(layer, {})
        out = [f"<h2 id='{esc(slug(layer))}'>{esc(layer)}</h2>"]
        summary = [
            [esc(s), pct(sc["acc_drop_max"].get(s)), fmt(sc["busy_idle"].get(s)), fmt(sc["rare_vital"].get(s))]
            for s in sorted({s for v in sc.values() for s in v})
        ]
        head = ["step", "largest accuracy drop", "fire a lot, do not matter", "rarely fire, matter"]
        if summary:
            out.append("<h3>Per kept step (the logged scalars)</h3>" + table(head, summary))
        if not by_step:
            out.append(f"<p class='muted'>No table importance/{esc(layer)}/table in the event files.</p>")
            return "".join(out)
        last = max(by_step)
        ranking = by_step[last]
        for what, pick in (
            ("Fires a lot but does not matter", lambda r: r.busy_idle),
            ("Rarely fires but matters", lambda r: r.rare_vital),
        ):
            units = [r for r in ranking if pick(r)]
            listed = ", ".join(
                f"unit {r.unit} (accuracy drop {r.acc_drop:.4f}, firing rate {r.firing:.3f})" for r in units
            )
            out.append(f"<p class='callout'><b>{what}</b> (step {last}): {listed or 'none'}</p>")

        def row(r: UnitImportance) -> list[str]:
            return [
                str(r.rank),
                str(r.unit),
                f"{r.acc_drop:.4f}",
                f"{r.logit_drop:.4f}",
                f"{r.firing:.3f}",
                esc(_role(r)),
            ]

        head = ["rank", "unit", "accuracy drop", "logit drop", "firing rate", "role"]
        out.append(
            f"<h3>Ranking at step {last} ({_step_name(last)}), most important first (by logit drop, then accuracy "
            "drop)</h3>"
        )
        out.append(table(head, [row(r) for r in ranking[:_TOP_ROWS]], left=0))
        if len(ranking) > _TOP_ROWS:
            rest = table(head, [row(r) for r in ranking[_TOP_ROWS:]], left=0)
            out.append(f"<details><summary>the other {len(ranking) - _TOP_ROWS} units</summary>{rest}</details>")
        steps = sorted(by_step)
        units = {s: {r.unit: r for r in rows} for s, rows in by_step.items()}
        top = [r.unit for r in ranking[:_CHART_UNITS]]
        series = {f"unit {u}": [(s, units[s][u].logit_drop) for s in steps if u in units[s]] for u in top}
        out.append(
            "<div class='figs'>"
            + svg_chart(series, f"{layer}: its top units' logit drop", "epochs trained", "true-class logit drop")
            + "</div>"
        )

        def cell(s: int, u: int) -> str:
            r = units[s].get(u)
            return f"{r.acc_drop:.4f} / {r.logit_drop:.4f}" if r is not None else "&ndash;"

        grid = [[str(r.unit)] + [cell(s, r.unit) for s in steps] for r in ranking]
        out.append(
            "<details><summary>every unit's accuracy drop / logit drop at each kept step</summary>"
            + table(["unit"] + [f"step {s}" for s in steps], grid)
            + "</details>"
        )
        return "".join(out)

    def card_importance(self, info: LayerInfo) -> tuple[str, dict[int, list[tuple[int, UnitImportance]]]]:
        """The importance layer of an atlas layer (logged under the layer's name or its activation's) and, per unit,
        its rows by kept step; ``("", {})`` when the run has none."""
        layer = next((n for n in (info.name, info.activation) if n and n in self.data.importance), "")
        out: dict[int, list[tuple[int, UnitImportance]]] = {}
        for step, rows in sorted(self.data.importance.get(layer, {}).items()):
            for r in rows:
                out.setdefault(r.unit, []).append((step, r))
        return layer, out

    def card_importance_part(self, layer: str, history: list[tuple[int, UnitImportance]], badges: list[str]) -> str:
        """A unit card's importance per kept epoch (and a badge when the last kept step calls the unit out)."""
        role = _role(history[-1][1])
        if role:
            badges.append(f'<span class="badge flag" title="step {history[-1][0]}">{esc(role)}</span>')
        rows = [(s, f"{r.acc_drop:.4f}", f"{r.logit_drop:.4f}", f"{r.firing:.3f}", r.rank) for s, r in history]
        return (
            f"<div class='muted imp'>importance when removed, per kept epoch (<a href='{IMPORTANCE_PAGE}#"
            f"{esc(slug(layer))}'>{esc(layer)} ranking</a>)</div>"
            + table(["step", "accuracy drop", "logit drop", "firing rate", "rank"], rows, left=0)
        )

    def layers_section(self) -> str:
        a = self.data.atlas
        if a is None:
            return (
                "<h2>Units</h2><p class='muted'>No atlas in this run (add the atlas callback: "
                "<code>callbacks=[default,atlas]</code>), so there are no unit pages.</p>"
            )
        rows = []
        for info in a.layers:
            s = self.layer_summary(info)
            rows.append(
                [
                    f'<a href="{esc(info.slug)}.html">{esc(info.name)}</a>',
                    esc(info.kind),
                    f"{len(info.shown)} of {info.units}" if len(info.shown) < info.units else str(info.units),
                    "&times;".join(map(str, info.rf_size)) if info.rf_size else "whole image",
                    s["dead"],
                    s["fidelity"],
                    *(["frozen: recorded once" if info.frozen else ""] if any(i.frozen for i in a.layers) else []),
                ]
            )
        fv = (a.manifest.get("settings") or {}).get("featviz_settings") or {}
        fc = (a.manifest.get("settings") or {}).get("featviz_fc_settings") or {}
        diff = {k: v for k, v in fc.items() if fv.get(k) != v}
        fc_note = ""
        if diff and any(i.kind == "fc" for i in a.layers):
            fc_note = "; fully connected units: " + ", ".join(f"{esc(k)} {esc(v)}" for k, v in diff.items())
        note = (
            f"<p class='muted'>Optimised inputs: objective <b>{esc(fv.get('objective', '?'))}</b>, "
            f"{esc(fv.get('steps', '?'))} steps, {esc(fv.get('parametrization', '?'))} parametrisation, seed "
            f"{esc(fv.get('seed', '?'))}{fc_note}. Fidelity = the unit's activation on its optimised input / on its "
            f"best real patch ({esc((a.manifest.get('probe') or {}).get('describe', ''))}); below 1.0 is flagged on "
            "the card.</p>"
        )
        head = ["layer", "kind", "units", "receptive field", "dead at the end", "fidelity ≥ 1"]
        head += [""] if any(i.frozen for i in a.layers) else []
        rows_fv = "".join(
            f"<h3><a href='{esc(info.slug)}.html'>{esc(info.name)}</a></h3>"
            + thumb_row(self.thumbs[info.name][:32], f"{info.slug}.html", info.name, 40)
            for info in a.layers
            if self.thumbs.get(info.name)
        )
        fv_title = "<h2>Optimised inputs (click one for its unit card; ⚑ outlined: fidelity below 1)</h2>"
        return "<h2>Units (the atlas)</h2>" + table(head, rows) + note + (fv_title + rows_fv if rows_fv else "")

    def field_figures(
        self,
        info: LayerInfo,
        fv: dict[str, np.ndarray],
        i: int,
        patches: dict[int, dict[str, np.ndarray]],
        j: int,
        base: str,
        aid: str,
    ) -> str:
        """The optimised input cut to the unit's receptive field where the objective read it, beside the unit's best
        real patch at the same scale: what fidelity compares."""
        if info.box(0, 0) is None:  # no receptive field (a fully connected unit sees the whole image)
            return ""
        row, col = (int(v) for v in fv["targets"][i])
        if row < 0:  # the channel objective: where the activation peaks
            row, col = (int(v) for v in fv["peaks"][i])
        box = info.box(row, col)
        if box is None:
            return ""
        cut = crop_image(fv["images"][i], box)
        side = max(56, cut.shape[-1])
        src, size = self.png(image_cell(cut, side), f"{base}_featviz_field.png")
        figs = [
            f"<figure>{img_tag(src, f'optimised input of {info.name} {aid} at its receptive field', size)}"
            f"<figcaption>its field at {row},{col}</figcaption></figure>"
        ]
        if patches:
            best = patches[max(patches)]["crops"][j][0]
            src, size = self.png(image_cell(best, max(side, best.shape[-1])), f"{base}_best_real.png")
            figs.append(
                f"<figure>{img_tag(src, f'best real patch of {info.name} {aid}', size)}"
                "<figcaption>best real</figcaption></figure>"
            )
        return "".join(figs)

    def shown_how(self, info: LayerInfo) -> str:
        """How the shown units of a layer were chosen (its manifest entry, or an older atlas's settings)."""
        a = self.data.atlas
        assert a is not None
        return {
            "variability": "the most variable, chosen at the first render",
            "list": "the listed units",
            "first": "the first ones (max_units)",
            "all": "every unit",
        }[chosen_by(info, a.manifest.get("settings") or {})]

    def layer_summary(self, info: LayerInfo) -> dict[str, str]:
        a = self.data.atlas
        assert a is not None
        steps, data = a.step_data(info)
        dead = "&ndash;"
        if steps:
            last = data[steps[-1]]
            m = last["unit_max"]
            if "layer_dead" in last:  # the whole layer's count (a most-variable choice never shows a dead unit)
                dead = f"{int(last['layer_dead'])} of {info.units}"
            elif len(m) < info.units:
                dead = f"{int((~fires(m)).sum())} of the {len(m)} shown"
            else:
                dead = f"{int((~fires(m)).sum())} of {len(m)}"
        if steps and info.activation is None:
            dead += " never positive"  # no activation after the layer: not dead ReLU units
        fv = a.featviz(info)
        fid = "&ndash;"
        if fv is not None:
            fid = f"{int((~fv['flagged']).sum())} of {len(fv['units'])}"
        return {"dead": dead, "fidelity": fid}

    def config_section(self) -> str:
        d = self.data
        if not d.config_text:
            return "<h2>Config</h2><p class='muted'>No config recorded.</p>"
        return (
            f"<h2>Config</h2><details><summary>{esc(d.config_source)}</summary><pre>{esc(d.config_text)}</pre>"
            "</details>"
        )

    # -- a layer page --
    def layer_page(self, info: LayerInfo) -> str:
        a = self.data.atlas
        assert a is not None
        names = a.class_names
        steps, data = a.step_data(info)
        patch_steps = a.patch_steps(info)
        patches = {s: a.patches(info, s) for s in patch_steps}
        classes, fv = a.classes(info), a.featviz(info)
        fv_row = {int(u): i for i, u in enumerate(fv["units"])} if fv is not None else {}
        maxima = np.stack([data[s]["unit_max"] for s in steps]) if steps else None  # (S, U)
        fired = fires(maxima) if maxima is not None else None  # (S, U): alive at each step
        weights = [data[s]["weights"] for s in steps if "weights" in data[s]]
        w_steps = [s for s in steps if "weights" in data[s]]
        imp_layer, imp = self.card_importance(info)
        on_word, off_word = alive_words(info)
        cards, thumbs = [], []
        for j, unit in enumerate(info.shown):
            aid = anchor(info.kind, unit)
            base = f"{info.slug}/{aid}"
            parts: list[str] = []
            badges = []
            if fired is not None:
                alive = fired[:, j]
                if alive[-1]:
                    badges.append(f'<span class="badge ok">{on_word}</span>')
                else:
                    died = next((steps[i] for i in range(len(steps)) if not alive[i:].any()), steps[-1])
                    badges.append(f'<span class="badge dead">{off_word} since step {died}</span>')
            fig_fv = ""
            if unit in fv_row:
                i = fv_row[unit]
                fid, act, ref = float(fv["fidelity"][i]), float(fv["activation"][i]), float(fv["reference"][i])
                flagged = bool(fv["flagged"][i])
                if flagged:
                    why = "never fires on real images" if not math.isfinite(fid) else "below its best real patch"
                    badges.append(f'<span class="badge flag" title="{esc(why)}">fidelity {fmt(fid, 3)} ⚑</span>')
                else:
                    badges.append(f'<span class="badge ok">fidelity {fmt(fid, 3)}</span>')
                src, size = self.png(image_cell(fv["images"][i], 112), f"{base}_featviz.png")
                thumbs.append((aid, src, size, flagged))
                fig_fv = (
                    f"<div class='row'><figure>{img_tag(src, f'optimised input of {info.name} {aid}', size)}"
                    f"<figcaption>optimised input</figcaption></figure>"
                    f"{self.field_figures(info, fv, i, patches, j, base, aid)}</div>"
                    f"<div class='muted'>activation {fmt(act, 3)} on it / {fmt(ref, 3)} on its best real patch: "
                    f"fidelity <b>{fmt(fid, 3)}</b>{' (flagged: below 1)' if flagged else ''}</div>"
                )
            elif info.featviz_units or fv is not None:
                fig_fv = "<p class='muted'>not optimised (beyond featviz_max_units)</p>"
            fig_w = ""
            if weights:
                ws = [w[j] for w in weights]
                scale = max(float(np.abs(w).max()) for w in ws) or 1.0
                cells = [kernel_cell(w, scale) for w in ws]
                per_row = 8 if cells[0].shape[1] <= 60 else 4
                src, size = self.png(labelled(cells, [f"ep {s}" for s in w_steps], per_row), f"{base}_filters.png")
                what = "filter" if info.kind == "conv" else "incoming weights (row by row)"
                fig_w = (
                    f"<figure>{img_tag(src, f'{what} of {info.name} {aid} across epochs', size)}<figcaption>{what} "
                    f"across epochs (blue &lt; 0 &lt; red, one scale ±{fmt(scale, 3)})"
                    f"{' — frozen' if info.frozen else ''}</figcaption></figure>"
                )
            parts.append(fig_fv + fig_w)
            if patches:
                rows, labels = [], []
                for s in patch_steps:
                    crops = patches[s]["crops"][j]  # (k, C, s, s)
                    cell_side = max(36, crops.shape[-1])
                    rows.append(_grid([image_cell(c, cell_side) for c in crops], len(crops), gap=2, fill=255))
                    labels.append(f"ep {s}")
                src, size = self.png(row_labelled(rows, labels), f"{base}_patches.png")
                last = patches[patch_steps[-1]]
                labels_of = last["labels"][j] if "labels" in last else np.full(len(last["ids"][j]), -1)
                top = ", ".join(
                    f"#{int(i)}{' ' + esc(names[int(lab)]) if 0 <= lab < len(names) else ''} ({fmt(float(v), 3)})"
                    for i, v, lab in zip(last["ids"][j][:3], last["values"][j][:3], labels_of[:3], strict=True)
                    if i >= 0
                )
                what = (
                    f"receptive field {'&times;'.join(map(str, info.rf_size))} px" if info.rf_size else "whole images"
                )
                parts.append(
                    f"<figure>{img_tag(src, f'top patches of {info.name} {aid}', size)}<figcaption>top "
                    f"{patches[patch_steps[-1]]['crops'].shape[1]} probe patches per kept epoch ({what})"
                    f"{'; best: ' + top if top else ''}</figcaption></figure>"
                )
            if classes is not None and names:
                counts = classes["counts"][j]
                total = int(counts.sum()) or 1
                bars = "".join(
                    f"<div class='bar'><span class='n'>{esc(n)}</span><span class='b' style='width:"
                    f"{180 * c / total:.0f}px;background:{PALETTE[k % len(PALETTE)]}'></span><span class='c'>{c}"
                    "</span></div>"
                    for k, (n, c) in enumerate(zip(names, counts.tolist(), strict=False))
                )
                parts.append(
                    f"<div class='bars'><span class='muted'>classes of its top {total} activations (step "
                    f"{int(classes['step'])})</span>{bars}</div>"
                )
            if maxima is not None and fired is not None:
                cells = "".join(
                    f"<span class='{'a' if on else 'd'}' title='epoch {s}: {on_word if on else off_word}, max "
                    f"{fmt(float(m), 3)}'></span>"
                    for s, m, on in zip(steps, maxima[:, j].tolist(), fired[:, j].tolist(), strict=True)
                )
                when = f"epochs {steps[0]}&ndash;{steps[-1]}" if len(steps) > 1 else f"epoch {steps[0]}"
                parts.append(
                    f"<div class='muted'>{on_word}/{off_word}, {when}"
                    f"{' (frozen: recorded once)' if info.frozen else ''} "
                    f"(green = fired on "
                    f"{esc((a.manifest.get('probe') or {}).get('alive_images', '?'))} probe images)</div>"
                    f"<div class='tl'>{cells}</div>"
                )
            if unit in imp:
                parts.append(self.card_importance_part(imp_layer, imp[unit], badges))
            cards.append(
                f"<section class='card' id='{aid}'><h3><a href='#{aid}'>{esc(info.name)} · {aid}</a>"
                f"{''.join(badges)}</h3>{''.join(parts)}</section>"
            )
        s = self.layer_summary(info)
        intro = (
            f"<p>{esc(info.kind)} layer, {info.units} units"
            f"{f' ({len(info.shown)} shown: {self.shown_how(info)})' if len(info.shown) < info.units else ''}; "
            f"{read_at(info)}; "
            f"receptive field {'&times;'.join(map(str, info.rf_size)) + ' px' if info.rf_size else 'the whole image'}"
            f"{' of ' + esc(info.frame) + ' output' if info.frame else ''}; {off_word} at the end: "
            f"{s['dead'].removesuffix(' never positive')}; optimised "
            f"inputs reaching their best real patch: {s['fidelity']}{'; frozen (recorded once)' if info.frozen else ''}"
            ".</p>"
        )
        self.thumbs[info.name] = thumbs
        thumbs_html = f"<h2>Optimised inputs</h2>{thumb_row(thumbs, '', info.name, 56)}" if thumbs else ""
        body = (
            intro + self.explored_line() + thumbs_html + "<h2>Units</h2><div class='cards'>" + "".join(cards) + "</div>"
        )
        return page(f"{info.name} · {self.data.run_dir.name}", body, self.nav(info.name))


def write_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write ``<run dir>/report/index.html`` (or ``out/index.html``) and its pages and assets; returns index.html.

    ``out`` must be new, empty, or a previous report (see ``report_folder``); a ``ConfigError`` says why not."""
    start = time.perf_counter()
    dest = Path(out) if out is not None else Path(run_dir) / REPORT_DIR
    target = report_folder(dest)
    data = RunData.read(run_dir)
    if not data.has_anything():
        raise ConfigError(
            f"{run_dir}: nothing to report (no status.json, config, TensorBoard events or atlas); is it a cnnfeat run "
            "directory?"
        )
    _build(target, lambda tmp: _Writer(data, tmp).write())
    log.info("Report: %s (%.1f s)", dest / "index.html", time.perf_counter() - start)
    return dest / "index.html"
