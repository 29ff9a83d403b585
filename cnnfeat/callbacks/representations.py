"""How the layers learn, measured per epoch: CKA across epochs and layers, linear probes per layer, unit deaths.

``RepresentationCallback`` runs one forward pass over a fixed stratified probe per epoch (the UMAP callback's
2,000 test images), captures the chosen layers with ``cnnfeat.graph.capture`` and feeds that one pass to all three
analyses (``cnnfeat.similarity``, ``cnnfeat.probes``, ``cnnfeat.units``). ``CrossModelCKACallback`` compares the
model's layers with another network's (a module it is given; the config loads it from a checkpoint) on the same
images, once: the transfer experiment's frozen AlexNet against a trained SmallCNN.

Every number is a scalar at step = epochs trained (0 = untrained): ``cka/to_previous/<layer>``,
``cka/to_untrained/<layer>``, ``probe/acc/<layer>``, ``units/dead/<layer>``, ``units/died/<layer>``,
``units/revived/<layer>`` every epoch (the values named after the previous epoch, ``to_previous``, ``died`` and
``revived``, only at a step whose previous step was recorded; ``to_untrained`` only when step 0 was);
``cka/layers/<a>/<b>`` at 0 and at the end; at the end of fit ``cka/to_final/<layer>`` at every recorded step.
Pictures (labelled heatmaps with a colour bar): ``cka/epochs/<layer>``, ``cka/layers``, ``cka/to_final``,
``probe/acc_vs_depth``, ``units/raster/<layer>`` and the Text table ``units/deaths``; ``representations.json`` in
the run directory holds every matrix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from cnnfeat import plots, tags
from cnnfeat.callbacks.base import (
    DEFAULT_PROBE_SIZE,
    CallbackOptions,
    Pictures,
    VisualizationCallback,
    check_bool,
    check_names,
    device_of,
    follows_recorded,
    inference,
)
from cnnfeat.embedding import stratified_ids
from cnnfeat.errors import ConfigError, check_int
from cnnfeat.graph import (
    Graph,
    Node,
    activation_after,
    capture,
    conv_nodes,
    relu_family_nodes,
    unknown_names,
)
from cnnfeat.probe import ProbeSet, batches
from cnnfeat.probe_pass import PassBatch, PassRequest
from cnnfeat.probes import linear_probe, probe_split
from cnnfeat.run import lightning_api as pl
from cnnfeat.similarity import CKAHistory, SignatureAccumulator, cka_matrix
from cnnfeat.units import FiringAccumulator, UnitHistory

log = logging.getLogger("cnnfeat")

#: The model's input as it receives it, flattened: a layer name accepted beside the graph's node names.
PIXELS = "pixels"
_STATE_VERSION = 1


def stage_outputs(graph: Graph) -> list[str]:
    """The output of each stage of a network built of stages, in execution order; ``[]`` for one that is not.

    A stage is a top-level child module that is a container holding convolutions (torchvision ResNet's
    ``layer1``..``layer4``) with a spatial output (N, C, H, W); where one container holds them all (cnnfeat's wrapped
    ``net``; DenseNet's and MobileNet's ``features``), the containers inside it, as deep as needed. Of consecutive
    stages with one output resolution only the last is kept: a stage ends where the resolution changes, the notion
    of ``LayerPlan.stage_convs``. A network of single layers (SmallCNN, AlexNet, VGG's ``features``) has none.
    """
    convs = conv_nodes(graph)

    def holders(prefix: str) -> list[Node]:  # child containers (below ``prefix``) holding convolutions
        return [
            n
            for n in graph
            if n.kind == "module"
            and n.alias
            and n.name.startswith(prefix)
            and "." not in n.name[len(prefix) :]
            and any(c.startswith(f"{n.name}.") for c in convs)
        ]

    def stages(prefix: str) -> list[Node]:  # those with a spatial output computed from the input
        return [n for n in holders(prefix) if n.depends_on_input and len(n.output_shape) == 4]

    prefix = ""
    candidates = stages(prefix)
    while len(candidates) <= 1:  # one container holds the stages (cnnfeat's ``net``, DenseNet's ``features``): look in
        inside = holders(prefix)
        if len(inside) != 1:
            break
        prefix = f"{inside[0].name}."
        candidates = stages(prefix)
    kept: list[str] = []
    for i, node in enumerate(candidates):
        after = candidates[i + 1] if i + 1 < len(candidates) else None
        if after is None or after.output_shape[2:] != node.output_shape[2:]:
            kept.append(node.name)
    return kept if len(kept) >= 2 else []


#: ops that hand their input on unchanged in evaluation (what a probe pass runs), skipped to name the penultimate layer
_PASS_THROUGH = ("Dropout", "Identity", "dropout")


def penultimate(graph: Graph) -> str | None:
    """The features the last layer reads: the node feeding the output node (ResNet's ``flatten``), if one."""
    produced = [n for n in graph if n.kind != "input" and not n.alias and n.depends_on_input]
    if not produced:
        return None
    parents = [p for p in produced[-1].parents if graph.nodes[p].kind != "input"]
    if len(parents) != 1:
        return None
    node = graph.nodes[parents[0]]
    while node.op in _PASS_THROUGH and len(node.parents) == 1:  # not "classifier.0": the vector the Dropout passes on
        node = graph.nodes[node.parents[0]]
    return node.name if node.kind != "input" else None


def default_layers(graph: Graph) -> list[str]:
    """The layers measured by default, in execution order.

    On a network built of stages (``stage_outputs``: torchvision ResNet-18 gives ``layer1``..``layer4``): each
    stage's output, the penultimate features (``penultimate``) and the output node (the logits). Otherwise each
    conv's activation (the conv itself when none follows it), every other ReLU-family application (fully connected
    layers), and the output node; for SmallCNN: ``relu1 relu2 relu3 relu4 relu5 fc3``.
    """
    produced = [n for n in graph if n.kind != "input" and not n.alias and n.depends_on_input]
    stages = stage_outputs(graph)
    if stages:
        extra = [penultimate(graph), produced[-1].name if produced else None]
        return list(dict.fromkeys([*stages, *(n for n in extra if n is not None and n not in stages)]))
    chosen = set(relu_family_nodes(graph))
    for conv in conv_nodes(graph):
        act, _ = activation_after(graph, conv)
        chosen.add(act or conv)
    produced = [n for n in graph if n.kind != "input" and not n.alias and n.depends_on_input]
    if produced:
        chosen.add(produced[-1].name)
    return [n for n in graph.names if n in chosen]


def _produced_by(graph: Graph, name: str) -> str:
    """The node that computed ``name``'s tensor: itself, or for a container's output (``layer1``) the node inside."""
    node = graph.nodes[name]
    while node.alias and node.parents:
        node = graph.nodes[node.parents[0]]
    return node.name


def _check_cka_cost(pool: Any, block_size: Any, probe_size: int) -> None:
    """The cost settings of a non-exact CKA: a pooling factor >= 1, and a block size (or None) within the probe."""
    check_int("pool", pool, 1)
    if block_size is not None:
        check_int("block_size", block_size, 4)
        if block_size > probe_size:
            raise ConfigError(f"block_size={block_size} is larger than probe_size={probe_size}")


def _resolve_layers(
    model: nn.Module, graph: Graph, layers: Sequence[str] | None, pixels: bool, caller: str = "representations"
) -> tuple[list[str], list[str]]:
    """(all layer names in order with ``pixels`` first if wanted, the graph nodes among them); unknown names list
    the valid ones."""
    if layers is None:
        nodes = default_layers(graph)
        how = (
            "each stage's output, the penultimate features and the logits"
            if stage_outputs(graph)
            else ("every conv and fully connected activation and the output")
        )
        log.info("%s: layers=%s (%s of %s)", caller, nodes, how, type(model).__name__)
        return ([PIXELS] if pixels else []) + nodes, nodes
    names = list(dict.fromkeys(layers))
    if not names:
        raise ConfigError("layers is empty: give node names, or null for the default layers")
    nodes = [n for n in names if n != PIXELS]
    bad = [n for n in nodes if n not in graph or graph.nodes[n].kind == "input"]
    if bad:
        raise unknown_names(bad, [PIXELS, *graph.names], type(model).__name__)
    if not nodes:
        raise ConfigError(f"layers={names} names no layer of {type(model).__name__}; valid names: {graph.names}")
    return names, nodes


def _is_number(value: Any) -> bool:
    """A finite real number, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _slug(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


class _Measurement:
    """The representation callback's accumulator for one pass: CKA signatures (and the probes' data) and firing."""

    def __init__(
        self,
        nodes: list[str],
        unit_layers: list[str],
        acc: SignatureAccumulator | None,
        fire: FiringAccumulator | None,
    ) -> None:
        self.nodes, self.unit_layers, self.acc, self.fire = nodes, unit_layers, acc, fire

    def update(self, batch: PassBatch) -> None:
        out = batch.outputs
        if self.acc is not None:
            self.acc.update(
                {name: out[name] for name in self.nodes}, torch.arange(batch.start, batch.start + len(batch.positions))
            )
        if self.fire is not None:
            self.fire.update({name: out[name] for name in self.unit_layers})


class RepresentationCallback(VisualizationCallback):
    """CKA across epochs and layers, linear probes and unit history from one probe pass per epoch.

    The callback runs no model over its probe: it reads the pass shared with the other consumers
    (``cnnfeat.probe_pass``), which captures its layers beside theirs.

    Args:
        layers: node names (``cnnfeat.graph``) and/or ``"pixels"`` (the model's input); ``None``: ``pixels`` plus
            ``default_layers`` (SmallCNN: every conv and FC activation and the logits; a network of stages, e.g.
            ResNet-18: each stage's output, the penultimate features and the logits). The log says which.
        probe_size: stratified images from the probe split (the UMAP callback's sample for the same size and seed).
        seed: draws the stratified sample and the probes' train/test split.
        cka, linear_probes, unit_history: which analyses run (all share the one forward pass).
        exact: the issue's measurement untouched: full-probe unbiased CKA and linear probes on unpooled activations
            every epoch (``block_size``, ``pool`` and ``probe_every_n_epochs`` are then ignored); ~4x the cost.
        block_size: Nguyen et al.'s minibatch CKA over fixed blocks of this many probe images (``None``: one block).
        pool: conv maps are average-pooled ``pool x pool`` before CKA and probes (1 = as they are).
        unbiased: Song et al.'s unbiased HSIC (else the biased one).
        probe_l2, probe_train_fraction: the probes' L2 penalty and the share of the probe they are fitted on.
        probe_every_n_epochs: during training, fit the probes at step 0, every N epochs and after the last epoch
            (``cnnfeat-explore`` fits them for every checkpoint).
        images_every_n_epochs: also draw the growing pictures every N epochs during training (0: at the end of fit
            only; the untrained layer x layer heatmap is always drawn at step 0).
        spill: write CKA signatures under ``<run dir>/representations/`` (memory-mapped back when compared), so
            that memory and checkpoints do not grow with layers x epochs; ``False`` keeps them in memory.
        batch_size: images per forward pass.
    """

    uses_probe_pass = True

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        probe_size: int = DEFAULT_PROBE_SIZE,
        seed: int = 0,
        cka: bool = True,
        linear_probes: bool = True,
        unit_history: bool = True,
        exact: bool = False,
        block_size: int | None = 250,
        pool: int = 4,
        unbiased: bool = True,
        probe_l2: float = 1e-3,
        probe_train_fraction: float = 0.5,
        probe_every_n_epochs: int = 4,
        images_every_n_epochs: int = 0,
        spill: bool = True,
        batch_size: int = 250,
        every_n_epochs: int = 1,
        log_untrained: bool = True,
        save_png: bool = False,
        split: str = "test",
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            CallbackOptions(
                every_n_epochs=every_n_epochs,
                log_untrained=log_untrained,
                save_png=save_png,
                during_training=True,
                split=split,
                mean=mean,
                std=std,
                class_names=class_names,
            )
        )
        check_int("probe_size", probe_size, 4)
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, 0)
        check_int("images_every_n_epochs", images_every_n_epochs, 0)
        check_int("probe_every_n_epochs", probe_every_n_epochs, 1)
        for name, flag in (
            ("cka", cka),
            ("linear_probes", linear_probes),
            ("unit_history", unit_history),
            ("exact", exact),
            ("unbiased", unbiased),
            ("spill", spill),
        ):
            check_bool(name, flag)
        check_names("layers", layers, allow_none=True)
        if not exact:
            _check_cka_cost(pool, block_size, probe_size)
        if not (_is_number(probe_l2) and probe_l2 > 0):
            raise ConfigError(f"probe_l2 must be a positive number, got {probe_l2!r}")
        if not (_is_number(probe_train_fraction) and 0 < probe_train_fraction < 1):
            raise ConfigError(f"probe_train_fraction must be in (0, 1), got {probe_train_fraction!r}")
        if not (cka or linear_probes or unit_history):
            raise ConfigError("cka, linear_probes and unit_history are all false: nothing to measure")
        self.layers = list(layers) if layers is not None else None
        self.probe_size, self.seed, self.batch_size = probe_size, seed, batch_size
        self.cka, self.linear_probes, self.unit_history = cka, linear_probes, unit_history
        self.exact, self.unbiased = exact, unbiased
        self.block_size = None if exact else block_size
        self.pool = 1 if exact else pool
        self.probe_l2, self.probe_train_fraction = probe_l2, probe_train_fraction
        self.probe_every_n_epochs = 1 if exact else probe_every_n_epochs
        self.images_every_n_epochs, self.spill = images_every_n_epochs, spill
        #: set in ``check``: every layer in order, the graph nodes among them, the ReLU-family ones (unit history)
        self.names: list[str] = []
        self.nodes: list[str] = []
        self.unit_layers: list[str] = []
        self.probe_ids: torch.Tensor | None = None
        self.history = CKAHistory()
        self.units = UnitHistory()
        self.probe_acc: dict[int, dict[str, float]] = {}  # step -> layer -> test accuracy
        self.layer_cka: dict[int, torch.Tensor] = {}  # step -> layer x layer CKA (step 0 and the end)
        self._pixels: dict[str, Any] | None = None  # the pixels' signature and probe accuracy (constant)
        self._split: Any = None
        self._images_at: set[int] = set()
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._fitting = False  # inside Trainer.fit: probes follow probe_every_n_epochs (explore probes every step)
        self._max_epochs: int | None = None  # the fit's max_epochs: probes are also fitted after the last epoch
        #: probe IDs of the images the last render measured, in order
        self.pass_ids: torch.Tensor | None = None
        #: seconds of each render by part (pass = forward, capture and signatures), for benchmarks
        self.timings: list[dict[str, float]] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(split=self.split, layers=self.layers, probe_size=self.probe_size)

    def _settings(self) -> dict[str, Any]:
        """What the recorded numbers depend on; a saved history from other settings is not continued."""
        return {
            "block_size": self.block_size,
            "pool": self.pool,
            "unbiased": self.unbiased,
            "probe_l2": self.probe_l2,
            "probe_train_fraction": self.probe_train_fraction,
            "seed": self.seed,
        }

    # -- setup -----------------------------------------------------------------------------------------
    @override
    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        assert probe is not None
        self.probe_size = self.fit_probe_size(probe, self.probe_size, DEFAULT_PROBE_SIZE)
        plan = self.layer_plan(pl_module)
        self.names, self.nodes = _resolve_layers(pl_module, plan.graph, self.layers, True, type(self).__name__)
        relu = set(plan.relus)
        self.unit_layers = [n for n in self.nodes if _produced_by(plan.graph, n) in relu] if self.unit_history else []
        if self.unit_history and not self.unit_layers:
            self.warn_once(
                "no-relu", f"none of the layers {self.nodes} is a ReLU-family activation: no unit history is recorded"
            )
        if self.history.spill_dir is None and self.spill:
            self.history.spill_dir = self._spill_dir()

    def _spill_dir(self) -> Path:
        if self._run_dir is not None:
            return (self._run_dir / "representations" / _slug(self.state_key)).absolute()
        self._tmp = tempfile.TemporaryDirectory(prefix="cnnfeat-cka-")  # explore: no run directory of ours
        return Path(self._tmp.name)

    @override
    def should_render(self, writer: object) -> bool:
        return True  # scalars go to every logger

    def positions(self, probe: ProbeSet) -> torch.Tensor:
        """Probe positions of the stratified sample (drawn once and kept as dataset IDs, as the UMAP callback does)."""
        if self.probe_ids is None:
            self.probe_ids = probe.ids[stratified_ids(probe.labels, self.probe_size, self.seed)]
        return probe.positions(self.probe_ids)

    # -- one pass ----------------------------------------------------------------------------------------
    def pass_request(self, model: nn.Module, probe: ProbeSet, step: int) -> PassRequest:
        """The chosen layers' outputs on the stratified probe (``cnnfeat.probe_pass``), into CKA signatures (with the
        probes' data when they are fitted at ``step``) and firing counts."""
        pos = self.positions(probe)
        keep = self._probes_now(step) and self.linear_probes
        acc = None
        if self.cka or keep:
            acc = SignatureAccumulator(len(pos), self.unbiased, self.block_size, self.pool, keep=keep)
        fire = FiringAccumulator() if self.unit_layers else None
        if self._pixels is None and acc is not None:  # the input does not change: measured once per run
            self._pixels = self._measure_pixels(probe, pos)
        return PassRequest(pos, self.batch_size, _Measurement(self.nodes, self.unit_layers, acc, fire), self.nodes)

    def measure(
        self, pl_module: nn.Module, probe: ProbeSet, step: int = 0
    ) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """The probe pass's results at ``step``: (CKA signatures, data for the probes, alive units) per layer."""
        result = self.pass_result(pl_module, probe, step)
        assert result is not None
        self.pass_ids = result.ids
        m: _Measurement = result.accumulator
        sigs = m.acc.finish() if m.acc is not None else {}
        kept = m.acc.kept if m.acc is not None else {}
        return sigs, kept, m.fire.finish() if m.fire is not None else {}

    def _measure_pixels(self, probe: ProbeSet, pos: torch.Tensor) -> dict[str, Any]:
        if PIXELS not in self.names:
            return {}
        x = probe.inputs[pos].flatten(1)  # never pooled: measured once, so the full input costs nothing per epoch
        acc = SignatureAccumulator(len(x), self.unbiased, self.block_size, self.pool, keep=self.linear_probes)
        acc.update({PIXELS: x})
        sig = acc.finish()[PIXELS]
        result: dict[str, Any] = {"signature": sig}
        if self.linear_probes:
            result["acc"] = linear_probe(acc.kept[PIXELS], self._labels(probe), self._probe_split(probe), self.probe_l2)
        return result

    def _labels(self, probe: ProbeSet) -> torch.Tensor:
        return probe.labels[self.positions(probe)]

    def _probe_split(self, probe: ProbeSet) -> Any:
        if self._split is None:
            self._split = probe_split(self._labels(probe), self.probe_train_fraction, self.seed)
        return self._split

    def _probes_now(self, step: int) -> bool:
        """Whether the linear probes are fitted at ``step``: always outside fit, else every ``probe_every_n_epochs``
        and after the last epoch."""
        last = self._max_epochs is not None and step >= self._max_epochs
        return self.linear_probes and (not self._fitting or step % self.probe_every_n_epochs == 0 or last)

    # -- render: the numbers of one step ------------------------------------------------------------------
    @override
    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        assert probe is not None
        pictures = Pictures()
        clock = [time.perf_counter()]
        timing: dict[str, float] = {"step": float(step)}

        def lap(what: str) -> None:
            clock.append(time.perf_counter())
            timing[what] = clock[-1] - clock[-2]

        probes_now = self._probes_now(step)
        sigs, kept, alive = self.measure(pl_module, probe, step)
        lap("pass")
        if self.cka and sigs:
            layer_sigs = {k: v for k, v in sigs.items() if k != PIXELS}
            if self.history.epochs and step <= max(max(e) for e in self.history.epochs.values()):
                self.warn_once("order", f"step {step} is not after the recorded steps: CKA history restarted")
                self.history = CKAHistory(self.history.spill_dir)
            self.history.add(step, layer_sigs)
            for layer in layer_sigs:
                m, epochs = self.history.cka[layer], self.history.epochs[layer]
                if len(epochs) > 1 and follows_recorded(step, epochs[:-1]):
                    pictures.scalars[tags.CKA_TO_PREVIOUS.format(layer=layer)] = float(m[-1, -2])
                if len(epochs) > 1 and epochs[0] == 0:  # only when the untrained network was recorded
                    pictures.scalars[tags.CKA_TO_UNTRAINED.format(layer=layer)] = float(m[-1, 0])
            if step == 0:
                pictures.scalars.update(self._layer_cka(0))
        lap("cka")
        if probes_now and kept:
            labels, split = self._labels(probe), self._probe_split(probe)
            accs = {}
            for layer in self.names:
                if layer == PIXELS:
                    accs[layer] = self._pixels["acc"].test_acc
                elif layer in kept:
                    accs[layer] = linear_probe(kept[layer], labels, split, self.probe_l2).test_acc
            self.probe_acc[step] = accs
            pictures.scalars.update({tags.PROBE_ACC.format(layer=k): v for k, v in accs.items()})
        lap("probes")
        if alive:
            if self.units.epochs and step <= self.units.epochs[-1]:
                self.warn_once("order-units", f"step {step} is not after the recorded steps: unit history restarted")
                self.units = UnitHistory()
            before = list(self.units.epochs)
            for c in self.units.add(step, alive):
                pictures.scalars[tags.UNITS_DEAD.format(layer=c.layer)] = float(c.dead)
                if step == 0 or follows_recorded(step, before):  # changes since the previous epoch, not over a gap
                    pictures.scalars[tags.UNITS_DIED.format(layer=c.layer)] = float(c.died)
                    pictures.scalars[tags.UNITS_REVIVED.format(layer=c.layer)] = float(c.revived)
        if step == 0 and 0 in self.layer_cka:
            pictures.images[tags.CKA_LAYERS_HEATMAP.name] = self._layer_heatmap(0)
            self._images_at.add(0)
        if self.images_every_n_epochs and step > 0 and step % self.images_every_n_epochs == 0:
            pictures = self._merge(pictures, self.pictures(step))
        lap("units+images")
        self.timings.append(timing)
        return pictures

    def _layer_cka(self, step: int) -> dict[str, float]:
        """Layer x layer CKA of the latest recorded signatures (stored for ``step``); their scalars."""
        layers = [n for n in self.names if n == PIXELS or n in self.history.epochs]
        sigs = {}
        for n in layers:
            sigs[n] = self._pixels["signature"] if n == PIXELS else self.history.signature(n)
        m = cka_matrix(sigs)
        self.layer_cka[step] = m
        return {
            tags.CKA_LAYERS.format(a=a, b=b): float(m[i, j])
            for i, a in enumerate(layers)
            for j, b in enumerate(layers)
            if j > i
        }

    def _layer_heatmap(self, step: int) -> torch.Tensor:
        layers = [n for n in self.names if n == PIXELS or n in self.history.epochs]
        when = "the untrained network" if step == 0 else f"after {step} epoch{'s' * (step != 1)}"
        return plots.heatmap(
            self.layer_cka[step],
            layers,
            layers,
            title=f"CKA between layers, {when}",
            xlabel="layer",
            ylabel="layer",
        )

    @staticmethod
    def _merge(a: Pictures, b: Pictures) -> Pictures:
        for field in ("images", "scalars", "histograms", "texts"):
            getattr(a, field).update(getattr(b, field))
        return a

    # -- pictures of the history so far -------------------------------------------------------------------
    def pictures(self, step: int) -> Pictures:
        """The growing pictures at ``step``: epoch x epoch CKA per layer, accuracy by depth, unit rasters, deaths."""
        out = Pictures()
        self._images_at.add(step)
        for layer, epochs in self.history.epochs.items():
            out.images[tags.CKA_EPOCHS.format(layer=layer)] = plots.heatmap(
                self.history.matrix(layer),
                epochs,
                epochs,
                title=f"{layer}: CKA between epochs",
                xlabel="epoch (0 = untrained)",
                ylabel="epoch (0 = untrained)",
            )
        if self.probe_acc:
            chance = 1.0 / len(self.probe.class_names) if self.probe is not None and self.probe.class_names else None
            accs = {s: [a.get(n, math.nan) for n in self.names] for s, a in sorted(self.probe_acc.items())}
            out.images[tags.PROBE_ACC_VS_DEPTH.name] = plots.accuracy_vs_depth(accs, self.names, chance)
        for layer in self.units.layers:
            raster = plots.unit_raster(self.units.raster(layer), self.units.epochs, layer)
            out.images[tags.UNITS_RASTER.format(layer=layer)] = raster
        if self.units.epochs:
            out.texts[tags.UNITS_DEATHS.name] = self.units.table()
        return out

    def summary(self) -> dict[int, Pictures]:
        """What the end of fit (or of ``cnnfeat-explore``) adds, by step: ``cka/to_final/<layer>`` at every recorded
        step, and at the last step the layer x layer CKA and every picture of the whole history."""
        out: dict[int, Pictures] = {}
        last = max(
            [*self.units.epochs, *self.probe_acc, *(e for v in self.history.epochs.values() for e in v)], default=None
        )
        if last is None:
            return out
        for layer in self.history.epochs:
            for e, value in self.history.to_final(layer):
                out.setdefault(e, Pictures()).scalars[tags.CKA_TO_FINAL.format(layer=layer)] = value
        final = out.setdefault(last, Pictures())
        if self.history.epochs:
            final.scalars.update(self._layer_cka(last))
            final.images[tags.CKA_LAYERS_HEATMAP.name] = self._layer_heatmap(last)
            curves = {layer: [v for _, v in self.history.to_final(layer)] for layer in self.history.epochs}
            steps = next(iter(self.history.epochs.values()))
            if all(self.history.epochs[k] == steps for k in curves):
                final.images[tags.CKA_TO_FINAL_CHART.name] = plots.line_chart(
                    steps,
                    curves,
                    title="CKA of each epoch with the final representation",
                    xlabel="epoch (0 = untrained)",
                    ylabel="CKA with the final epoch",
                    ylim=(0.0, 1.02),
                    legend_title="layer",
                )
        if last not in self._images_at:
            self._merge(final, self.pictures(last))
        return dict(sorted(out.items()))

    def as_dict(self) -> dict[str, Any]:
        """Every recorded number, JSON-ready (``representations.json``)."""
        return {
            "layers": self.names,
            "settings": self._settings(),
            "probe_size": self.probe_size,
            "cka_epochs": {
                k: {"epochs": self.history.epochs[k], "cka": self.history.matrix(k).tolist()}
                for k in self.history.epochs
            },
            "cka_layers": {str(s): m.tolist() for s, m in self.layer_cka.items()},
            "probe_acc": {str(s): a for s, a in self.probe_acc.items()},
            "units": {
                layer: {
                    "epochs": self.units.epochs,
                    "first_death": self.units.first_death(layer).tolist(),
                    "first_revival": self.units.first_revival(layer).tolist(),
                }
                for layer in self.units.layers
            },
        }

    def save_json(self, path: Path) -> Path:
        """Write ``as_dict`` to ``path`` (NaN as null)."""
        text = json.dumps(self.as_dict(), indent=1, default=float)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("NaN", "null"))
        return path

    # -- Lightning hooks ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":  # known before any consumer of the shared pass asks at an epoch end
            self._max_epochs = trainer.max_epochs

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitting = True
        # Lightning restores the epoch and step counters only after on_fit_start: a resumed fit (ckpt_path) would
        # look untrained here and record its restored weights as step 0
        if trainer.ckpt_path is None:
            super().on_fit_start(trainer, pl_module)

    @override
    def finish(self, out_dir: Path | None) -> dict[int, Pictures]:
        """The end-of-run summary (see ``summary``); ``representations.json`` goes to ``out_dir``."""
        summary = self.summary()
        if summary and out_dir is not None:
            self.save_json(out_dir / "representations.json")
        return summary

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitting = False
        super().on_fit_end(trainer, pl_module)

    # -- checkpointing --------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "settings": self._settings(),
            "probe_ids": self.probe_ids,
            "names": list(self.names),
            "cka": self.history.state_dict(),
            "units": self.units.state_dict(),
            "probe_acc": {int(s): dict(a) for s, a in self.probe_acc.items()},
            "layer_cka": {int(s): m for s, m in self.layer_cka.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved history; a state from other settings, another probe or missing files is ignored
        (all of it, or only the CKA part) with a warning instead of mixing incomparable numbers."""
        ids = state_dict.get("probe_ids")
        if state_dict.get("version") != _STATE_VERSION or state_dict.get("settings") != self._settings():
            self.warn_once("state", "the saved state was recorded with other settings: the history starts afresh")
            return
        if ids is not None and len(ids) != self.probe_size:
            self.warn_once("state", f"the saved state holds {len(ids)} probe images, not {self.probe_size}: ignored")
            return
        try:
            units = UnitHistory()
            units.load_state_dict(state_dict["units"])
            cka = CKAHistory(self.history.spill_dir)
            cka.load_state_dict(state_dict["cka"])
        except (KeyError, ValueError, TypeError) as e:
            self.warn_once("state", f"the saved state is inconsistent ({e}): the history starts afresh")
            return
        missing = [s for sigs in cka._sigs.values() for s in sigs if isinstance(s, str) and not Path(s).is_file()]
        if missing:
            self.warn_once(
                "state",
                f"{len(missing)} saved CKA signature file(s) are gone (e.g. {missing[0]}): the CKA history starts "
                "afresh; probe accuracies and unit history continue",
            )
            cka = CKAHistory(self.history.spill_dir)
        self.probe_ids, self.units, self.history = ids, units, cka
        self.probe_acc = {int(s): dict(a) for s, a in state_dict.get("probe_acc", {}).items()}
        self.layer_cka = {int(s): m for s, m in state_dict.get("layer_cka", {}).items()}


class CrossModelCKACallback(VisualizationCallback):
    """CKA between another network's layers (``reference``, e.g. a trained SmallCNN) and the model's layers.

    Both networks see the same stratified probe images (each as its own input; the transfer model resizes them
    itself). Drawn once before training by default (``during_training=False``: the transfer experiment's AlexNet
    part is frozen): the heatmap ``cka/cross/<reference class>`` (rows: the reference's layers, columns: the
    model's) and the scalars ``cka/cross/<reference layer>/<layer>``. ``reference=None`` disables it.

    The callback receives the reference as a module and opens no file: ``conf/callbacks/cross_cka.yaml`` loads
    ``reference_ckpt`` with ``cnnfeat.run.checkpoints.reference_model`` and passes both; ``reference_ckpt`` only names
    the file in the heatmap's title. The reference is run in eval mode under ``torch.no_grad()`` on the model's
    device and gets its own device and train/eval mode back afterwards.
    """

    def __init__(
        self,
        reference: nn.Module | None = None,
        reference_ckpt: str | None = None,
        layers: Sequence[str] | None = None,
        reference_layers: Sequence[str] | None = None,
        probe_size: int = DEFAULT_PROBE_SIZE,
        seed: int = 0,
        exact: bool = False,
        block_size: int | None = 250,
        pool: int = 4,
        unbiased: bool = True,
        batch_size: int = 100,
        during_training: bool = False,
        every_n_epochs: int = 1,
        log_untrained: bool = True,
        save_png: bool = False,
        split: str = "test",
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            CallbackOptions(
                every_n_epochs=every_n_epochs,
                log_untrained=log_untrained,
                save_png=save_png,
                during_training=during_training,
                split=split,
                mean=mean,
                std=std,
                class_names=class_names,
            )
        )
        check_int("probe_size", probe_size, 4)
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, 0)
        check_bool("exact", exact)
        check_bool("unbiased", unbiased)
        check_names("layers", layers, allow_none=True)
        check_names("reference_layers", reference_layers, allow_none=True)
        if not exact:
            _check_cka_cost(pool, block_size, probe_size)
        if reference is not None and not isinstance(reference, nn.Module):
            raise ConfigError(
                f"reference must be a network (an nn.Module) or null, got {type(reference).__name__} {reference!r}; "
                "load a checkpoint with cnnfeat.run.checkpoints.reference_model(path) (the config does it for "
                "callbacks.cross_cka.reference_ckpt=...)"
            )
        self.reference_ckpt = None if reference_ckpt in (None, "", "null") else str(reference_ckpt)
        if reference is None and self.reference_ckpt is not None:
            raise ConfigError(
                f"reference_ckpt={self.reference_ckpt} only names the reference's file; give the network itself as "
                "reference= (cnnfeat.run.checkpoints.reference_model(path) loads it)"
            )
        self.reference: nn.Module | None = reference
        self.layers = list(layers) if layers is not None else None
        self.reference_layers = list(reference_layers) if reference_layers is not None else None
        self.probe_size, self.seed, self.batch_size, self.unbiased = probe_size, seed, batch_size, unbiased
        self.block_size = None if exact else block_size
        self.pool = 1 if exact else pool
        self.names: list[str] = []
        self.nodes: list[str] = []
        self.ref_names: list[str] = []
        self.ref_nodes: list[str] = []
        self.matrix: torch.Tensor | None = None

    @override
    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        if self.reference is None:
            if "off" not in self._warned:
                self._warned.add("off")
                log.info("%s: no reference_ckpt given, so there is nothing to compare with", type(self).__name__)
            return
        assert probe is not None
        self.probe_size = self.fit_probe_size(probe, self.probe_size, DEFAULT_PROBE_SIZE)
        graph = self.layer_plan(pl_module).graph
        self.names, self.nodes = _resolve_layers(pl_module, graph, self.layers, False, type(self).__name__)
        ref_graph = self.layer_plan(self.reference).graph  # the session traces each model once
        self.ref_names, self.ref_nodes = _resolve_layers(
            self.reference, ref_graph, self.reference_layers, True, type(self).__name__
        )

    @override
    def should_render(self, writer: object) -> bool:
        return self.reference is not None

    def _signatures(self, model: nn.Module, nodes: list[str], probe: ProbeSet, pos: torch.Tensor) -> dict:
        device = device_of(model)
        acc = SignatureAccumulator(len(pos), self.unbiased, self.block_size, self.pool)
        start = 0
        with capture(model, nodes) as out:
            for b in batches(pos, self.batch_size):
                model(probe.inputs[b].to(device))
                acc.update({n: out[n] for n in nodes}, torch.arange(start, start + len(b)))
                start += len(b)
        return acc.finish()

    @override
    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        pictures = Pictures()
        if self.reference is None or probe is None:
            return pictures
        pos = probe.positions(probe.ids[stratified_ids(probe.labels, self.probe_size, self.seed)])
        mine = self._signatures(pl_module, self.nodes, probe, pos)
        home = device_of(self.reference)
        try:
            with inference(self.reference):
                theirs = self._signatures(self.reference.to(device_of(pl_module)), self.ref_nodes, probe, pos)
        finally:
            self.reference.to(home)
        if PIXELS in self.ref_names:
            acc = SignatureAccumulator(len(pos), self.unbiased, self.block_size, self.pool)
            acc.update({PIXELS: probe.inputs[pos].flatten(1)})
            theirs[PIXELS] = acc.finish()[PIXELS]
        rows = {n: theirs[n] for n in self.ref_names}
        cols = {n: mine[n] for n in self.names}
        self.matrix = cka_matrix(rows, cols)
        ref, model = type(self.reference).__name__, type(pl_module).__name__
        source = f" ({Path(self.reference_ckpt).name})" if self.reference_ckpt else ""
        pictures.images[tags.CKA_CROSS_HEATMAP.format(reference=ref)] = plots.heatmap(
            self.matrix,
            self.ref_names,
            self.names,
            title=f"CKA: {ref}{source} vs {model}",
            xlabel=f"{model} layer",
            ylabel=f"{ref} layer",
        )
        for i, a in enumerate(self.ref_names):
            for j, b in enumerate(self.names):
                pictures.scalars[tags.CKA_CROSS.format(a=a, b=b)] = float(self.matrix[i, j])
        return pictures


__all__ = [
    "PIXELS",
    "CrossModelCKACallback",
    "RepresentationCallback",
    "default_layers",
    "penultimate",
    "stage_outputs",
]
