"""Where the network looks: Grad-CAM at any node, Integrated Gradients at the input, and relevance at a unit.

Core module (no Lightning; tensors in, tensors out). Every function here runs the model itself, with gradients on
(also inside ``torch.no_grad()`` or ``inference_mode``), in eval mode, and restores each submodule's own train/eval
mode afterwards; gradients are taken with ``torch.autograd.grad``, so the model's ``.grad`` is never touched.

- **Grad-CAM** (Selvaraju et al. 2017) at a node's output ``A`` (N, C, h, w) for a class score ``S`` (its logit):
  ``ReLU(sum_c mean_ij(dS/dA_cij) * A_c)``, (N, h, w). Computed here for any graph node (module calls, repeated
  calls such as ``layer1.0.relu:1``, functional ``F.relu``): the node's output is tapped during the forward pass
  (``intervene``) and differentiated with autograd. On module nodes it equals Captum's ``LayerGradCam`` with
  ``relu_attributions=True`` (tested to 1e-5); Captum itself needs a module and cannot hook ``F.relu``.
  ``last_conv_stage`` picks the default node: the activation after the last convolution.
- **Integrated Gradients** (Sundararajan et al. 2017) at the input, by Captum's ``IntegratedGradients``
  (Gauss-Legendre); ``integrated_gradients`` adds steps where the completeness gap ``|sum(attr) - (S(x) - S(b))|``
  is above ``tolerance`` of ``|S(x) - S(b)|`` and reports the gap per row.
- **Relevance at a unit**: ``A * dS/dA`` at each position of each channel (gradient x activation, what LRP-0 gives
  for a ReLU network without biases), for the predicted class; a unit's **conditional heatmap** is the input
  relevance that flows through that unit alone: ``x * d/dx sum_ij A_uij(x) * g_uij`` with ``g = dS/dA`` held fixed
  (Concept Relevance Propagation with the gradient x input rule).

``intervene`` is the mechanism underneath (and under ``cnnfeat.importance``'s ablations): it replaces named node
outputs during forward passes, with ``cnnfeat.graph``'s node names and call numbering.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnfeat import lecture
from cnnfeat.errors import ConfigError
from cnnfeat.graph import (
    INPUT,
    Graph,
    LayerError,
    _quiet,
    _Recorder,
    activation_after,
    conv_nodes,
    split_call,
    unknown_names,
)
from cnnfeat.graph import device_of as device_of  # relevance imports it from here

#: Test-set images the lecture looks at (Fashion-MNIST test IDs).
LECTURE_IMAGE_IDS = lecture.LECTURE_IMAGE_IDS

IG, LRP = "integrated_gradients", "lrp"
#: the pixel-level methods ``explain`` and the attribution callback offer
PIXEL_METHODS = (IG, LRP)

#: ``edit(output, inplace) -> new output`` of one node; ``inplace``: the node is a function that modified its first
#: argument in place (``x.relu_()``), whose caller may keep using that tensor and ignore the returned one.
Edit = Callable[[torch.Tensor, bool], torch.Tensor]


class InplaceNodeError(LayerError):
    """An edit that must replace a node's output met a function node that works in place (``x.relu_()``)."""


# -- editing node outputs ---------------------------------------------------------------------------------
class _Editor(_Recorder):
    """Module hooks and (for functional nodes) a function mode that pass each named node's output through its edit."""

    def __init__(self, model: nn.Module, edits: Mapping[str, Edit], functions: bool) -> None:
        super().__init__(model, functions)
        self.edits = dict(edits)
        self.done: set[str] = set()
        self.seen: list[str] = []
        self._hit: str | None = None

    def begin_pass(self, args: tuple, kwargs: dict) -> None:
        self.done.clear()
        self.seen.clear()

    def end_pass(self, aborted: bool) -> None:
        missing = [n for n in self.edits if n not in self.done]
        if missing and self.root_pass and not aborted:
            raise LayerError(
                f"Unknown layer name(s) {missing} for {type(self.model).__name__}: this forward pass produced no such "
                f"node; valid names: {self.seen}"
            )

    def _apply(self, name: str, out: object, inplace: bool) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise LayerError(f"node {name!r} outputs {type(out).__name__}, not one tensor: it cannot be edited")
        with _quiet():  # the edit's own ops are no nodes (call numbering stays the model's)
            new = self.edits[name](out, inplace)
        self.done.add(name)
        return new

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        frame = self.stack[-1] if self.stack and self.stack[-1].module is module else None
        super()._post(module, args, kwargs, output)
        if frame is None or not frame.name:
            return None
        self.seen.append(frame.name)
        if frame.name in self.edits and output is not None:
            return self._apply(frame.name, output, False)
        return None

    def called(
        self, name: str, op: str, scope: str, args: tuple, kwargs: dict, outputs: list[torch.Tensor], state: object
    ) -> None:
        self.seen.append(name)
        if name in self.edits:
            self._hit = name

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> object:
        self._hit = None
        out = super().__torch_function__(func, types, args, kwargs)
        name, self._hit = self._hit, None
        if name is None:
            return out
        inplace = bool(args) and out is args[0] and isinstance(out, torch.Tensor)
        new = self._apply(name, out, inplace)
        if inplace and new is not out:
            raise InplaceNodeError(
                f"node {name!r} of {type(self.model).__name__} is computed in place ({_op_of(func)}_); its output can "
                "be read and changed in place, not replaced"
            )
        return new


def _op_of(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__).strip("_")


def _module_paths(model: nn.Module) -> set[str]:
    return {p for p, _ in model.named_modules() if p}


@contextmanager
def intervene(model: nn.Module, edits: Mapping[str, Edit]) -> Iterator[None]:
    """During forward passes of ``model``, replace each named node's output by ``edit(output, inplace)``.

    Names are ``cnnfeat.graph`` node names (module calls, ``name:k`` calls, functional ops, container outputs). Only
    module hooks are used unless a name is a functional op. The edits run with torch functions invisible to the
    graph (so call numbering stays the model's). A pass of the model that does not produce every name raises
    ``LayerError`` listing the names it did produce. Hooks and the function mode are removed on exit.
    """
    names = list(edits)
    bad = [n for n in names if not n or split_call(n)[0] == INPUT]
    paths = _module_paths(model)
    if bad:
        raise unknown_names(bad, sorted(paths), type(model).__name__)
    functions = any(split_call(n)[0] not in paths for n in names)
    editor = _Editor(model, edits, functions)
    with editor.installed():
        yield


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode with gradients enabled (also under ``no_grad``/``inference_mode``); each submodule's mode restored."""
    modes = {m: m.training for m in model.modules()}
    try:
        if any(modes.values()):
            model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def forward_with_taps(
    model: nn.Module, x: torch.Tensor, nodes: Sequence[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``model(x)`` (logits (N, K)) and each named node's output, kept in the autograd graph (differentiate the
    logits with respect to them). Call under ``evaluating``; ``x`` is made to require gradients, so that frozen
    models get a graph too. A node computed in place by a later op is kept before that op changes it."""
    taps: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Edit:
        def edit(t: torch.Tensor, inplace: bool) -> torch.Tensor:
            taps[name] = t
            return t if inplace else t.clone()  # a later in-place op changes the clone, not the tapped tensor

        return edit

    x = x.detach().clone().requires_grad_(True)
    with intervene(model, {n: keep(n) for n in nodes}):
        logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"{type(model).__name__} must return class scores (N, K) for attribution, got {shape}")
    return logits, taps


def pick(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logits[i, targets[i]]`` per row."""
    return logits.gather(1, targets.to(logits.device).long().view(-1, 1).clone()).squeeze(1)


def check_targets(targets: torch.Tensor, n: int, classes: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(targets).long().flatten()
    if len(t) != n:
        raise ConfigError(f"targets: {len(t)} classes for {n} inputs")
    if classes is not None and len(t) and (t.min() < 0 or t.max() >= classes):
        raise ConfigError(f"targets {t.tolist()} out of range: the model has {classes} classes")
    return t


# -- which node ---------------------------------------------------------------------------------------------
def last_conv_stage(graph: Graph) -> str:
    """Grad-CAM's default node: the activation after the last convolution; where none follows it directly (a
    residual block), the last node with a spatial output (N, C, h, w) larger than 1x1."""
    convs = conv_nodes(graph)
    if convs:
        act, _ = activation_after(graph, convs[-1])
        if act is not None:
            return act
    spatial = [
        n.name
        for n in graph
        if n.kind != INPUT
        and n.depends_on_input
        and len(n.output_shape) == 4
        and n.output_shape[2] * n.output_shape[3] > 1
    ]
    if not convs or not spatial:
        raise ConfigError(f"{graph.owner} has no convolution with a spatial output: name the Grad-CAM node")
    return spatial[-1]


# -- Grad-CAM -------------------------------------------------------------------------------------------------
def grad_cam(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, node: str, relu: bool = True
) -> torch.Tensor:
    """Grad-CAM of class ``targets[i]`` for ``inputs[i]`` at ``node`` (see the module docstring): (N, h, w) at the
    node's resolution, on the CPU (``upsample`` maps it onto the input). ``relu=False`` keeps negative evidence."""
    if len(inputs) == 0:
        raise ConfigError("grad_cam needs at least one input")
    with evaluating(model):
        x = inputs.to(device_of(model))
        logits, taps = forward_with_taps(model, x, [node])
        targets = check_targets(targets, len(x), logits.shape[1])
        act = taps[node]
        if act.ndim != 4:
            raise ConfigError(
                f"Grad-CAM needs a node with spatial maps (N, C, h, w); {node!r} gives {tuple(act.shape)}"
            )
        (grad,) = torch.autograd.grad(pick(logits, targets).sum(), [act])
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = (weights * act).sum(dim=1).detach()
    return (cam.clamp(min=0) if relu else cam).float().cpu()


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (N, h, w) -> (N, H, W), bilinear (what Captum's ``LayerAttribution.interpolate`` does)."""
    return F.interpolate(maps.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)


# -- Integrated Gradients -------------------------------------------------------------------------------------
@dataclass
class IGResult:
    """Integrated Gradients of one class per input row."""

    attributions: torch.Tensor  #: like the inputs
    delta: torch.Tensor  #: (N,) completeness gap: sum(attributions) - (S(x) - S(baseline))
    difference: torch.Tensor  #: (N,) S(x) - S(baseline)
    steps: torch.Tensor  #: (N,) integration steps each row needed

    @property
    def relative_gap(self) -> torch.Tensor:
        """|delta| / |S(x) - S(baseline)| per row (0 where both are 0)."""
        d = self.difference.abs()
        return torch.where(d > 0, self.delta.abs() / d.clamp(min=1e-30), self.delta.abs())


@dataclass
class LRPResult:
    """LRP of one class per input row (``cnnfeat.lrp.lrp``)."""

    relevance: torch.Tensor  #: like the inputs: each input value's relevance for the class
    logit: torch.Tensor  #: (N,) the class's logit (the relevance put in at the output)

    @property
    def conserved(self) -> torch.Tensor:
        """(N,) the input relevance's sum / the logit (1 = all of it reached the input; 0 where the logit is 0)."""
        total = self.relevance.flatten(1).double().sum(1).float()
        return torch.where(self.logit != 0, total / self.logit.where(self.logit != 0, torch.ones_like(self.logit)), 0.0)


def integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    baselines: torch.Tensor | float = 0.0,
    steps: int | torch.Tensor = 32,
    max_steps: int = 512,
    tolerance: float = 0.01,
    atol: float = 1e-3,
    internal_batch_size: int | None = None,
) -> IGResult:
    """Integrated Gradients by Captum (Gauss-Legendre, ``steps`` points), in the model's input space; rows whose
    completeness gap is above ``tolerance`` x |S(x) - S(baseline)| and above ``atol`` (logit units: an untrained
    network's differences are tiny) are redone with twice the steps, up to ``max_steps`` (``IGResult.steps`` says how
    many each needed; a row may stay above at ``max_steps``). ``steps`` may be one count per row, e.g. what each
    image needed at the previous epoch, so that rows start where they are likely to pass.
    ``baselines``: a number or a tensor like the inputs (default: all zero, a black image for inputs in [0, 1])."""
    from captum.attr import IntegratedGradients

    if len(inputs) == 0:
        raise ConfigError("integrated_gradients needs at least one input")
    start = torch.as_tensor(steps, dtype=torch.long).flatten()
    if len(start) not in (1, len(inputs)):
        raise ConfigError(f"steps: give one count or one per input row, got {len(start)} for {len(inputs)} rows")
    if start.min() < 2 or start.max() > max_steps:
        raise ConfigError(f"need 2 <= steps <= max_steps, got steps={start.unique().tolist()}, max_steps={max_steps}")
    with evaluating(model):
        start = start.expand(len(inputs)).clone()  # made here: a normal tensor under a caller's inference_mode
        device = device_of(model)
        x = inputs.to(device).float().clone()  # a normal tensor even if made under inference_mode
        base = (
            baselines.to(device).float().clone()
            if isinstance(baselines, torch.Tensor)
            else torch.full_like(x, baselines)
        )
        if base.shape != x.shape:
            base = base.expand_as(x).contiguous()
        with torch.no_grad():
            classes = model(x[:1]).shape[1]
        targets = check_targets(targets, len(x), classes)
        diff = torch.zeros(len(x))  # S(x) - S(baseline) = sum(attributions) - delta, from Captum's own passes
        attr = torch.zeros_like(x)
        delta = torch.full((len(x),), torch.inf)
        used = torch.zeros(len(x), dtype=torch.long)
        ig, n_of = IntegratedGradients(model), start
        todo = torch.arange(len(x))
        while len(todo):
            for n in n_of[todo].unique().tolist():  # one Captum call per step count
                rows = todo[n_of[todo] == n]
                a, d = ig.attribute(
                    x[rows],
                    baselines=base[rows],
                    target=targets[rows].tolist(),
                    n_steps=n,
                    method="gausslegendre",
                    internal_batch_size=internal_batch_size,
                    return_convergence_delta=True,
                )
                attr[rows.to(device)] = a.detach().to(attr.dtype)
                delta[rows] = d.detach().float().cpu()
                diff[rows] = a.detach().flatten(1).double().sum(1).float().cpu() - delta[rows]
                used[rows] = n
            gap = delta[todo].abs() > torch.clamp(tolerance * diff[todo].abs(), min=atol)
            todo = todo[gap & (used[todo] * 2 <= max_steps)]
            n_of[todo] = used[todo] * 2
    return IGResult(attr.cpu(), delta, diff, used)


# -- both maps for the lecture's images --------------------------------------------------------------------------
@dataclass
class Explanation:
    """Grad-CAM and a pixel-level map (Integrated Gradients or LRP) of a few images for their predicted and their
    true class; the pixel-level method's results are set (``ig_*`` or ``lrp_*``), the other's are ``None``."""

    node: str  #: where Grad-CAM was taken
    labels: torch.Tensor  #: (N,) true classes
    predicted: torch.Tensor  #: (N,) argmax of the logits
    probabilities: torch.Tensor  #: (N, K) softmax of the logits
    cam_predicted: torch.Tensor  #: (N, h, w) Grad-CAM (ReLU) at ``node``
    cam_true: torch.Tensor  #: (N, h, w)
    ig_predicted: IGResult | None = None  #: attributions like the inputs
    ig_true: IGResult | None = None
    lrp_predicted: LRPResult | None = None  #: relevance like the inputs
    lrp_true: LRPResult | None = None

    def ig_steps(self) -> torch.Tensor:
        """(N,) the steps each image needed (the larger of its two classes): a start for the next epoch."""
        assert self.ig_predicted is not None and self.ig_true is not None, "not an Integrated Gradients explanation"
        return torch.maximum(self.ig_predicted.steps, self.ig_true.steps)

    def pixel_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixel-level maps (like the inputs) for the predicted and the true class."""
        if self.lrp_predicted is not None and self.lrp_true is not None:
            return self.lrp_predicted.relevance, self.lrp_true.relevance
        assert self.ig_predicted is not None and self.ig_true is not None
        return self.ig_predicted.attributions, self.ig_true.attributions


def explain(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    node: str,
    ig_steps: int | torch.Tensor = 32,
    ig_max_steps: int = 512,
    ig_tolerance: float = 0.01,
    ig_atol: float = 1e-3,
    baselines: torch.Tensor | float = 0.0,
    pixel_method: str = IG,
    graph: Graph | None = None,
) -> Explanation:
    """Grad-CAM at ``node`` and a pixel-level map for each image's predicted and true class (each distinct (image,
    class) pair is computed once: a correct prediction costs one map of each kind). ``pixel_method``:
    ``"integrated_gradients"`` (``ig_steps``: where they start, one count or one per image, e.g.
    ``Explanation.ig_steps()`` of the previous epoch; ``baselines``: a number, one input (1, ...) or one per image)
    or ``"lrp"`` (``cnnfeat.lrp.lrp`` on the model's ``graph``, traced here when ``None``)."""
    if pixel_method not in PIXEL_METHODS:
        raise ConfigError(f"pixel_method must be one of {list(PIXEL_METHODS)}, got {pixel_method!r}")
    labels = check_targets(labels, len(inputs))
    with evaluating(model), torch.no_grad():
        logits = model(inputs.to(device_of(model))).float()
    predicted = logits.argmax(dim=1).cpu()
    n = len(inputs)
    # (image, class) rows: every image with its predicted class, then those whose true class differs
    wrong = torch.nonzero(predicted != labels).squeeze(1)
    rows_in = torch.cat([torch.arange(n), wrong])
    rows_t = torch.cat([predicted, labels[wrong]])
    cams = grad_cam(model, inputs[rows_in], rows_t, node)
    pred_rows = torch.arange(n)
    true_rows = pred_rows.clone()
    true_rows[wrong] = torch.arange(n, n + len(wrong))
    ex = Explanation(
        node=node,
        labels=labels,
        predicted=predicted,
        probabilities=logits.softmax(dim=1).cpu(),
        cam_predicted=cams[pred_rows],
        cam_true=cams[true_rows],
    )
    if pixel_method == LRP:
        from cnnfeat.lrp import lrp  # lrp builds on this module

        r = lrp(model, inputs[rows_in], rows_t, graph)
        ex.lrp_predicted = LRPResult(r.relevance[pred_rows], r.logit[pred_rows])
        ex.lrp_true = LRPResult(r.relevance[true_rows], r.logit[true_rows])
        return ex
    steps = torch.as_tensor(ig_steps)
    steps = steps[rows_in.to(steps.device)] if steps.numel() > 1 else ig_steps  # per image: also its true-class row
    if isinstance(baselines, torch.Tensor) and baselines.ndim == inputs.ndim and len(baselines) == n > 1:
        baselines = baselines[rows_in.to(baselines.device)]  # one per image: its true-class row too
    ig = integrated_gradients(model, inputs[rows_in], rows_t, baselines, steps, ig_max_steps, ig_tolerance, ig_atol)

    def sub(r: IGResult, rows_: torch.Tensor) -> IGResult:
        return IGResult(r.attributions[rows_], r.delta[rows_], r.difference[rows_], r.steps[rows_])

    ex.ig_predicted, ex.ig_true = sub(ig, pred_rows), sub(ig, true_rows)
    return ex


# -- relevance at units -----------------------------------------------------------------------------------------
def unit_relevance(
    model: nn.Module, inputs: torch.Tensor, nodes: Sequence[str], targets: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Per node: relevance ``A * dS/dA`` (like the node's output: (N, C, h, w) or (N, F)) for class ``targets``
    (default: each image's predicted class), the activations ``A``, and the classes used. One forward and one
    backward pass for all nodes."""
    with evaluating(model):
        logits, taps = forward_with_taps(model, inputs.to(device_of(model)), nodes)
        t = logits.argmax(dim=1) if targets is None else check_targets(targets, len(inputs), logits.shape[1])
        acts = [taps[n] for n in nodes]
        grads = torch.autograd.grad(pick(logits, t).sum(), acts, allow_unused=True)
        rel = {
            n: (a * g).detach() if g is not None else torch.zeros_like(a).detach()
            for n, a, g in zip(nodes, acts, grads, strict=True)
        }
        return rel, {n: a.detach() for n, a in zip(nodes, acts, strict=True)}, t.detach().cpu()


def conditional_heatmaps(
    model: nn.Module,
    inputs: torch.Tensor,
    node: str,
    units: Sequence[int] | torch.Tensor,
    targets: torch.Tensor | None = None,
    baselines: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Row i: where in ``inputs[i]`` the relevance of unit ``units[i]`` of ``node`` comes from (module docstring),
    ``(x - baseline) * d/dx sum A_u(x) * g_u`` with ``g = dS/dA`` for class ``targets[i]`` (default: predicted)
    held fixed. Like the inputs; for a ReLU network without biases it sums to the unit's relevance."""
    units = torch.as_tensor(units, dtype=torch.long).flatten()
    if len(units) != len(inputs):
        raise ConfigError(f"conditional_heatmaps: {len(units)} units for {len(inputs)} inputs (one unit per row)")
    with evaluating(model):
        device = device_of(model)
        x = inputs.to(device).detach().clone().requires_grad_(True)
        taps: dict[str, torch.Tensor] = {}

        def keep(t: torch.Tensor, inplace: bool) -> torch.Tensor:
            taps[node] = t
            return t if inplace else t.clone()

        with intervene(model, {node: keep}):
            logits = model(x)
        t = logits.argmax(dim=1) if targets is None else check_targets(targets, len(x), logits.shape[1])
        act = taps[node]
        if units.min() < 0 or units.max() >= act.shape[1]:
            raise ConfigError(f"units {units.tolist()} out of range for {node!r} ({act.shape[1]} units)")
        (g,) = torch.autograd.grad(pick(logits, t).sum(), [act], retain_graph=True)
        mask = torch.zeros_like(g)
        mask[torch.arange(len(x), device=device), units.to(device)] = 1
        (gx,) = torch.autograd.grad(act, [x], grad_outputs=(g * mask).detach())
        base = baselines.to(device) if isinstance(baselines, torch.Tensor) else baselines
        return ((x.detach() - base) * gx).detach().cpu()
