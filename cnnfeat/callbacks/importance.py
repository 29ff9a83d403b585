"""Which units matter, epoch by epoch: each unit removed in turn on the probe (``cnnfeat.importance``, issue 24)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from typing_extensions import override

from cnnfeat import importance, tags
from cnnfeat.callbacks.base import (
    DEFAULT_PROBE_SIZE,
    CallbackOptions,
    Pictures,
    VisualizationCallback,
    check_names,
    check_number,
    device_of,
)
from cnnfeat.errors import ConfigError, check_int
from cnnfeat.graph import Graph
from cnnfeat.plan import LayerPlan
from cnnfeat.probe import ProbeSet
from cnnfeat.probe_pass import shared_positions

log = logging.getLogger("cnnfeat")


def default_layers(plan: LayerPlan) -> list[str]:
    """Every conv and the last hidden layer: the node the last ``Linear`` reads (when it has (N, F) or maps)."""
    layers = list(plan.convs)
    linears = plan.of_kind("linear")
    if linears:
        parents = plan.graph[linears[-1]].parents
        if parents and parents[0] in plan and len(plan.graph[parents[0]].output_shape) in (2, 4):
            layers.append(parents[0])
    return list(dict.fromkeys(layers))


def ablated_node(plan: LayerPlan, layer: str) -> str:
    """The node zeroed to remove a unit of ``layer``: the activation after a conv or linear, else ``layer``."""
    return importance.ablation_node(plan.graph, layer) if plan[layer].kind in ("conv", "linear") else layer


def table(imp: importance.UnitImportance, roles: importance.UnitRoles) -> str:
    """A markdown table of one layer's units, most important first."""
    columns = tags.IMPORTANCE_TABLE_COLUMNS
    rows = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}"]
    for rank, i in enumerate(imp.ranking().tolist(), start=1):
        role = tags.ROLE_BUSY_IDLE if roles.busy_idle[i] else tags.ROLE_RARE_VITAL if roles.rare_vital[i] else ""
        rows.append(
            f"| {rank} | {int(imp.units[i])} | {float(imp.acc_drop[i]):.4f} | {float(imp.logit_drop[i]):.4f} "
            f"| {float(imp.firing[i]):.3f} | {role} |"
        )
    return "\n".join(rows)


class ImportanceCallback(VisualizationCallback):
    """Removes each unit of each layer in turn on the probe and logs what the network loses (``ablation_importance``).

    ``layers`` (``cnnfeat.plan`` names; ``None``: every conv and the input of the last ``Linear``): a conv's or linear's
    units are removed at the activation after it (``importance.ablation_node``), any other node's at its output.
    At most ``budget`` forward passes per probe image are spent (``importance.bounded_units``: a seeded sample of the
    same share of every layer's units; ``null``: all). Per layer, on the ``probe_size`` stratified probe images every
    pass consumer shares: ``importance/acc_drop_max/<layer>`` (the largest accuracy drop of one unit),
    ``importance/busy_idle/<layer>`` and ``importance/rare_vital/<layer>`` (how many units ``importance.classify``
    calls out) and the text ``importance/<layer>/table`` (every unit, most important first). Runs the model itself:
    ablation needs forward passes with units removed, which the shared probe pass cannot give. Default
    ``every_n_epochs=5`` (plus step 0 and the last epoch): ablation costs a few forward passes per probe image.
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        probe_size: int = DEFAULT_PROBE_SIZE,
        budget: float | None = importance.DEFAULT_BUDGET,
        batch_size: int = 100,
        split: str = "test",
        every_n_epochs: int = 5,
        log_untrained: bool = True,
        save_png: bool = False,
        during_training: bool = True,
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
        self.layers = check_names("layers", layers, allow_none=True)
        check_int("probe_size", probe_size)
        check_int("batch_size", batch_size)
        if budget is not None:
            check_number("budget", budget, minimum=1, above=True)
        self.probe_size, self.budget, self.batch_size = probe_size, budget, batch_size
        self._units: dict[str, torch.Tensor] = {}  # ablated node -> units removed (chosen in check)
        self._layer_of: dict[str, str] = {}  # ablated node -> layer name in the tags

    @override
    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        assert probe is not None
        plan = self.layer_plan(pl_module)
        if self.layers is None:
            self.layers = default_layers(plan)
            log.info("%s: layers=%s", type(self).__name__, self.layers)
        self.layers = [layer.name for layer in plan.resolve(self.layers)]
        graph: Graph = plan.graph
        nodes = {}
        for layer in self.layers:
            node = ablated_node(plan, layer)
            if node in nodes:
                raise ConfigError(f"layers {nodes[node]!r} and {layer!r} remove units at the same node {node!r}")
            importance.units_of(graph, node)  # units need (N, C, h, w) or (N, F): an error naming the node
            nodes[node] = layer
        self._layer_of = nodes
        self._units = importance.bounded_units(graph, list(nodes), self.budget)
        sampled = {nodes[n]: len(u) for n, u in self._units.items() if len(u) < importance.units_of(graph, n)}
        if sampled:
            log.info(
                "%s: budget %s passes per image: removing only %s units", type(self).__name__, self.budget, sampled
            )
        self.probe_size = self.fit_probe_size(probe, self.probe_size, DEFAULT_PROBE_SIZE)

    @override
    def should_render(self, writer: object) -> bool:
        return True  # scalars go to every logger

    @override
    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        assert probe is not None
        positions = shared_positions(probe, self.probe_size)
        graph = self.layer_plan(pl_module).graph
        x = probe.inputs[positions].to(device_of(pl_module))
        results = importance.ablation_importance(
            pl_module, x, probe.labels[positions], graph, self._units, batch_size=self.batch_size
        )
        pictures = Pictures()
        for node, imp in results.items():
            layer = self._layer_of[node]
            roles = importance.classify(imp)
            pictures.scalars[tags.IMPORTANCE_ACC_DROP_MAX.format(layer=layer)] = float(imp.acc_drop.max())
            pictures.scalars[tags.IMPORTANCE_BUSY_IDLE.format(layer=layer)] = float(roles.busy_idle.sum())
            pictures.scalars[tags.IMPORTANCE_RARE_VITAL.format(layer=layer)] = float(roles.rare_vital.sum())
            pictures.texts[tags.IMPORTANCE_TABLE.format(layer=layer)] = table(imp, roles)
            drops = zip(imp.units.tolist(), imp.acc_drop.tolist(), imp.logit_drop.tolist(), strict=True)
            for unit, acc, logit in drops:
                pictures.detail[tags.IMPORTANCE_UNIT_ACC_DROP.format(layer=layer, unit=unit)] = acc
                pictures.detail[tags.IMPORTANCE_UNIT_LOGIT_DROP.format(layer=layer, unit=unit)] = logit
        return pictures
