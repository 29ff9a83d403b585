"""One forward pass over the shared probe per step, streamed to every analysis that asked for it (no Lightning).

An analysis (a *consumer*: the dead-ReLU callback, the representation callback) does not run the model. For a step
it hands the pass a :class:`PassRequest`: which probe positions it reads (the stratified selection everyone shares,
``shared_positions``), the graph nodes whose outputs and inputs it needs, its batch size and an accumulator. The
:class:`ProbePass` runs the model once over the positions with the union of every consumer's nodes captured
(``cnnfeat.graph.capture``: tensors cloned when produced) and gives each batch to every accumulator as a
:class:`PassBatch` holding just that consumer's nodes. Consumers that read other positions (a non-default
``probe_size`` or ``seed``) get a pass of their own; with the defaults there is one. Batches are the smallest
batch size asked for, so a lone consumer sees exactly its own batches.

:class:`ProbePass` keeps the step it last ran: the first consumer that asks at a step runs the pass for all members,
the others collect their accumulators. Nothing here runs a collective.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol
from weakref import ref

import torch
from torch import nn

from cnnfeat.embedding import stratified_ids
from cnnfeat.graph import capture, device_of
from cnnfeat.probe import ProbeSet, batches, fitting_batch

#: the seed of the shared stratified selection (the UMAP and representation callbacks' default)
SHARED_SEED = 0


def shared_positions(probe: ProbeSet, size: int, seed: int = SHARED_SEED) -> torch.Tensor:
    """Probe positions of the stratified selection of ``size`` images every pass consumer reads."""
    return probe.positions(probe.ids[stratified_ids(probe.labels, size, seed)])


@dataclass(frozen=True)
class PassBatch:
    """One batch of the pass as one consumer sees it."""

    start: int  # offset of these rows in the consumer's positions
    batch_size: int  # the pass's batch size (the last batch may be shorter)
    positions: torch.Tensor  # (B,) probe positions of the rows
    outputs: Mapping[str, torch.Tensor]  # node -> its output (cloned)
    inputs: Mapping[str, torch.Tensor]  # node -> its first input (cloned before the node ran)


class PassAccumulator(Protocol):
    """What a consumer feeds with the pass's batches (it finishes it itself)."""

    def update(self, batch: PassBatch) -> None: ...


@dataclass
class PassRequest:
    """What one consumer needs from the pass at one step."""

    positions: torch.Tensor
    batch_size: int
    accumulator: PassAccumulator
    outputs: Sequence[str] = ()
    inputs: Sequence[str] = ()


class PassConsumer(Protocol):
    """An analysis that reads the shared pass."""

    def pass_request(self, model: nn.Module, probe: ProbeSet, step: int) -> PassRequest | None: ...


def run_pass(
    model: nn.Module, probe: ProbeSet, requests: Sequence[PassRequest], image_bytes: Sequence[int] | None = None
) -> int:
    """Run ``model`` over the requests' positions (once per distinct selection), feeding every accumulator; returns
    the number of forward calls. Call under ``torch.no_grad()`` and the mode you want (``inference``).
    ``image_bytes``: per request, what one image's captured values take; a selection's batches are cut to
    ``cnnfeat.probe.CAPTURE_BUDGET`` (``fitting_batch``) so big images do not hold gigabytes at once."""
    per_request = dict(zip(map(id, requests), image_bytes or [0] * len(requests), strict=True))
    groups: list[list[PassRequest]] = []
    for r in requests:
        group = next((g for g in groups if torch.equal(g[0].positions, r.positions)), None)
        groups.append([r]) if group is None else group.append(r)
    device = device_of(model)
    calls = 0
    for group in groups:
        positions = group[0].positions
        outs = list(dict.fromkeys(n for r in group for n in r.outputs))
        ins = list(dict.fromkeys(n for r in group for n in r.inputs))
        size = fitting_batch(min(r.batch_size for r in group), sum(per_request[id(r)] for r in group))
        with ExitStack() as stack:
            out = stack.enter_context(capture(model, outs)) if outs else {}
            pre = stack.enter_context(capture(model, ins, inputs=True)) if ins else {}
            start = 0
            for b in batches(positions, size):
                model(probe.inputs[b].to(device))
                calls += 1
                for r in group:
                    batch = PassBatch(start, size, b, {n: out[n] for n in r.outputs}, {n: pre[n] for n in r.inputs})
                    r.accumulator.update(batch)
                start += len(b)
    return calls


def _image_bytes(consumer: PassConsumer, model: nn.Module, request: PassRequest) -> int:
    """What one image of ``request`` captures, from the consumer's traced layer plan (0, no cut, without one: the
    pass never traces the model itself, so it stays one forward pass per batch)."""
    plan_of = getattr(consumer, "traced_plan", None)
    plan = plan_of(model) if callable(plan_of) else None
    return 0 if plan is None else plan.image_bytes(request.outputs, request.inputs)


@dataclass
class PassResult:
    """A consumer's accumulator after the pass, and the probe IDs of the images it saw (in order)."""

    accumulator: Any
    ids: torch.Tensor


@dataclass
class ProbePass:
    """The one pass per step shared by its ``members`` (see the module docstring)."""

    members: list[PassConsumer] = field(default_factory=list)
    #: forward calls of the model made by this pass so far (for tests and benchmarks)
    forward_calls: int = 0
    #: passes run (one per step and selection with the defaults)
    runs: int = 0
    _model: Any = field(default=None, repr=False)  # weak reference to the model of the last run
    _step: int | None = field(default=None, repr=False)
    _results: dict[int, PassResult] = field(default_factory=dict, repr=False)

    def join(self, consumer: PassConsumer) -> None:
        if all(m is not consumer for m in self.members):
            self.members.append(consumer)

    def collect(self, consumer: PassConsumer, model: nn.Module, probe: ProbeSet, step: int) -> PassResult | None:
        """``consumer``'s fed accumulator at ``step``: the first member to ask runs the pass for all members."""
        if self._step != step or self._model is None or self._model() is not model:
            self._model, self._step, self._results = ref(model), step, {}
            extra = [] if any(m is consumer for m in self.members) else [consumer]
            self._run([*self.members, *extra], model, probe, step)
        elif id(consumer) not in self._results:  # asked again, or not a member: a pass of its own
            self._run([consumer], model, probe, step)
        return self._results.pop(id(consumer), None)

    def _run(self, consumers: Sequence[PassConsumer], model: nn.Module, probe: ProbeSet, step: int) -> None:
        wanted = [(c, c.pass_request(model, probe, step)) for c in consumers]
        wanted = [(c, r) for c, r in wanted if r is not None]
        if not wanted:
            return
        sizes = [_image_bytes(c, model, r) for c, r in wanted]
        self.forward_calls += run_pass(model, probe, [r for _, r in wanted], sizes)
        self.runs += 1
        for c, r in wanted:
            self._results[id(c)] = PassResult(r.accumulator, probe.ids[r.positions])
