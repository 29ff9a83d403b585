"""What the picture callbacks of one fit share: the probe sets, the probe passes and the layer plans.

One ``AnalysisSession`` per fit (per ``Trainer``) or per ``cnnfeat-explore`` run is handed to every picture callback
in ``setup`` (``attach``): the first callback that needs a probe builds it from the DataModule and the others get the
same object; pass consumers of one probe share one ``ProbePass``; the layer plan of a model is traced once, on the
first probe image, and read by every callback. Nothing is kept in module-global state: a new fit gets a new session,
and a callback used on its own gets a session of its own.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from weakref import ref

import torch
from torch import nn

from cnnfeat.errors import ConfigError
from cnnfeat.graph import device_of
from cnnfeat.plan import LayerPlan
from cnnfeat.probe import ProbeSet, ProbeSpec, check_batch_inputs, probe_from_datamodule
from cnnfeat.probe_pass import ProbePass
from cnnfeat.run.lightning_api import rank_zero_warn
from cnnfeat.topk import PatchSearch, search_patches

log = logging.getLogger("cnnfeat")


@contextmanager
def inference(module: nn.Module) -> Iterator[None]:
    """``torch.no_grad`` and eval mode inside; afterwards every submodule gets its own mode back.

    Restoring each submodule (not just calling ``train()``) keeps frozen backbones in eval mode.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def build_probe(datamodule: Any, spec: ProbeSpec, model: nn.Module | None = None) -> ProbeSet:
    """The probe of ``datamodule`` for ``spec`` (``cnnfeat.probe``); says once what it had to decide (e.g. validation
    images instead of test) and, given the model, checks that the DataModule's batch inputs agree with its forward."""
    if datamodule is None:
        raise ConfigError("the picture callbacks read their probe images from a DataModule: pass one to the Trainer")
    probe = probe_from_datamodule(datamodule, spec)
    if probe.note:
        rank_zero_warn(f"{type(datamodule).__name__}: {probe.note}")
    if model is not None:
        with inference(model):
            check_batch_inputs(model, probe)
    return probe


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> bytes:
    """A digest of ``model``'s parameters and buffers (names, dtypes, shapes and bytes: BLAKE2b, 16 bytes): two
    states of the weights share it only if they are equal bit for bit, however they were written (an optimizer step,
    a fused optimizer that does not count its writes, ``.data``, a loaded state dict)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        t = t.detach()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


@dataclass
class _HeldSearch:
    model: ref[nn.Module]
    probe: ref[ProbeSet]
    step: int
    fingerprint: bytes
    search: PatchSearch

    def serves(self, model: nn.Module, probe: ProbeSet, step: int, layers: Sequence[str]) -> bool:
        """Whether this search is the one ``model`` would give now at ``step`` for ``layers`` of ``probe``."""
        if self.model() is not model or self.probe() is not probe or self.step != step:
            return False
        return set(layers) <= set(self.search.tops) and weights_fingerprint(model) == self.fingerprint


class AnalysisSession:
    """Probes (one per DataModule and spec), probe passes (one per spec), layer plans (one per model) and the last
    top-k patch search of each probe and setting."""

    def __init__(self, key: Any = None) -> None:
        self._key = ref(key) if key is not None else None  # the Trainer this session serves (weakly)
        self._probes: dict[tuple[int, ProbeSpec], tuple[Any, ProbeSet]] = {}
        self._passes: dict[ProbeSpec, ProbePass] = {}
        self._plans: dict[int, tuple[ref[nn.Module], LayerPlan]] = {}
        self._searches: dict[tuple[int, int, int, int, int], _HeldSearch] = {}
        #: layer plans traced by this session (for tests and benchmarks: one per model)
        self.traces = 0
        #: top-k patch searches run (for tests and benchmarks)
        self.searches = 0

    def serves(self, key: Any) -> bool:
        """Whether this session was attached for ``key`` (a Trainer) and that object is still alive."""
        return self._key is not None and self._key() is key

    @classmethod
    def attach(cls, callbacks: Iterable[Any], key: Any = None) -> AnalysisSession:
        """The session of ``callbacks`` for ``key`` (the Trainer; None: a fresh one): the one a callback already
        holds for the same key, else a new one, given to every callback that has a ``session`` attribute."""
        callbacks = [cb for cb in callbacks if hasattr(cb, "session")]
        found = next((cb.session for cb in callbacks if cb.session is not None and cb.session.serves(key)), None)
        session = found if found is not None and key is not None else cls(key)
        for cb in callbacks:
            cb.session = session
        return session

    def probe(self, datamodule: Any, spec: ProbeSpec, model: nn.Module | None = None) -> ProbeSet:
        """The probe of ``datamodule`` for ``spec``: built once (``build_probe``), then the same object."""
        key = (id(datamodule), spec)
        held = self._probes.get(key)
        if held is None or held[0] is not datamodule:
            self._probes[key] = (datamodule, build_probe(datamodule, spec, model))
        return self._probes[key][1]

    def probe_pass(self, spec: ProbeSpec) -> ProbePass:
        """The one pass of the probe ``spec`` that its consumers share."""
        return self._passes.setdefault(spec, ProbePass())

    def traced_plan(self, model: nn.Module) -> LayerPlan | None:
        """The plan of ``model`` if it was traced already (no forward pass), else None."""
        held = self._plans.get(id(model))
        return held[1] if held is not None and held[0]() is model else None

    def plan(self, model: nn.Module, probe: ProbeSet) -> LayerPlan:
        """The layer plan of ``model``, traced once on the first probe image (then the same object)."""
        held = self._plans.get(id(model))
        if held is None or held[0]() is not model:
            plan = LayerPlan.trace(model, probe.inputs[:1].to(device_of(model)))  # eval mode, no grad
            self._plans[id(model)] = (ref(model), plan)
            self.traces += 1
            log.debug("layer plan of %s: %s", type(model).__name__, plan.summary())
        return self._plans[id(model)][1]

    def patch_search(
        self,
        model: nn.Module,
        probe: ProbeSet,
        step: int,
        layers: Sequence[str],
        k: int,
        n: int,
        batch_size: int,
        image_bytes: int = 0,
    ) -> PatchSearch:
        """``cnnfeat.topk.search_patches`` over the first ``n`` probe images, run once per step for every callback
        that asks with the same probe, ``k``, ``n`` and batch: the top-patches picture and the atlas search the same
        10k test images at the same epochs. A request for layers the held search covers gets it (its tops and fields
        per layer are what a search of those layers alone gives; the caller reads only its own layers); at another
        step, for another model or probe, or after the weights changed (``weights_fingerprint``), the search runs anew
        and is held instead."""
        key = (id(probe), k, n, batch_size, image_bytes)
        held = self._searches.get(key)
        if held is not None and held.serves(model, probe, step, layers):
            return held.search
        search = search_patches(model, probe, layers, k, n, batch_size, image_bytes)
        self.searches += 1
        held = _HeldSearch(ref(model), ref(probe), step, weights_fingerprint(model), search)
        self._searches = {key: held}  # the latest only: an old search is not kept
        return search
