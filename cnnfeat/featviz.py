"""Feature visualisation by optimisation: an input that maximises a unit, with Lucid-style regularisers.

Core module (no Lightning; tensors in, tensors out). A layer is a ``LayerFn``: any callable mapping display-space
images (N,C,H,W) in [0, 1] to the layer's output, (N,K,h,w) for conv channels or (N,K) for FC units. Preprocessing
(standardisation, ImageNet normalisation) belongs inside it, so the regularisers act on the picture that is shown.
``module_output(model, name)`` builds one; any closure works.

The units of a layer are optimised together, one image per unit in a batch, as in Lucid/Lucent: a Fourier
parametrisation with a 1/frequency spectrum (plus ImageNet colour decorrelation for RGB), clipped into [0, 1] with
Lucid's redirected gradient (or a sigmoid); random translation, scale and rotation at each step (transformation
robustness) except in the last ``settle`` fraction of the steps, which see the image as it is shown and measured;
an optional total-variation penalty. ReLU gradients are redirected while an image's are all zero (dead starts).
Deterministic for a seed on one device. Only the image gets gradients (the model's ``.grad`` is never touched);
it runs inside ``torch.no_grad()`` and ``inference_mode`` too.

**Fidelity** compares like with like, the unit's best *single position*: ``activation`` is the maximum over the
positions of the unit's channel on the final, untransformed optimised image; the reference is the maximum over
positions and over real images (``real_best``: the top-1 of a top-patches search on the same layer output).
``fidelity = activation / reference``, NaN when the reference is missing or <= 0 (a unit that never fires on real
data); a unit is ``flagged`` when its fidelity is below 1 or NaN. For (N,K) outputs the statistic is the value.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

LayerFn = Callable[[torch.Tensor], torch.Tensor]

OBJECTIVES = ("channel", "neuron")
PARAMETRIZATIONS = ("fft", "pixel")
SQUASHES = ("sigmoid", "clamp")

#: Square root of ImageNet's colour correlation (Lucid), columns normalised to a largest norm of 1.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_CORRELATION = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


class FeatVizError(ValueError):
    """Bad feature-visualisation arguments."""


@dataclass(frozen=True)
class FeatVizSettings:
    """How inputs are optimised (defaults: Lucid's recipe, with the clip, settle and step size tuned on SmallCNN).

    ``objective``: ``"neuron"`` maximises the unit's value at one position (the centre unless ``visualise`` gets
    ``positions``); ``"channel"`` its mean over positions (Lucid's channel objective: textures, whose peak rarely
    reaches the best real patch). ``steps`` of Adam at ``lr`` on the image parameters. ``parametrization``: ``"fft"``
    (spectrum scaled by 1/frequency**``decay_power``) or ``"pixel"``, starting at grey plus noise of std ``init_std``.
    ``decorrelate``: ImageNet colour decorrelation (RGB only). ``squash`` into [0, 1]: ``"clamp"`` (0.5 + x clipped; its
    gradient still flows where it points back into range) or ``"sigmoid"``. ``redirect_relu``: while all of an image's
    ReLU gradients are zero, pass gradients through ReLUs where they raise the input (forward values unchanged).
    ``tv_weight``: total-variation penalty (mean |difference| of neighbouring pixels) per unit of activation.
    Transformation robustness, one draw per step shared by the batch: a shift of up to ``jitter`` pixels (``None``:
    ``round(side / 28)``, so 1 at 28x28 and 8 at 224x224), a scale from ``scales`` and a rotation in degrees from
    ``angles``; uncovered pixels are ``fill``. The last ``settle`` fraction of the steps is untransformed.
    ``batch_size`` units at a time. ``threads``: torch CPU threads meanwhile, restored after (``None`` leaves them): one
    thread ran these many small ops about as fast as two, and 3-20x faster than two while other jobs shared the 2 cores.
    ``seed``: the start and the transforms.
    """

    objective: str = "neuron"
    steps: int = 256
    lr: float = 0.02
    parametrization: str = "fft"
    decay_power: float = 1.0
    init_std: float = 0.01
    decorrelate: bool = True
    squash: str = "clamp"
    redirect_relu: bool = True
    tv_weight: float = 0.0
    jitter: int | None = None
    scales: tuple[float, ...] = (0.95, 0.975, 1.0, 1.025, 1.05)
    angles: tuple[float, ...] = (-5.0, -2.5, 0.0, 2.5, 5.0)
    fill: float = 0.5
    settle: float = 0.5
    batch_size: int = 64
    threads: int | None = 1
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            f"objective must be one of {OBJECTIVES}, got {self.objective!r}": self.objective in OBJECTIVES,
            f"parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}": (
                self.parametrization in PARAMETRIZATIONS
            ),
            f"squash must be one of {SQUASHES}, got {self.squash!r}": self.squash in SQUASHES,
            f"steps must be >= 1, got {self.steps}": self.steps >= 1,
            f"lr must be > 0, got {self.lr}": self.lr > 0,
            f"tv_weight must be >= 0, got {self.tv_weight}": self.tv_weight >= 0,
            f"jitter must be >= 0 or None, got {self.jitter}": self.jitter is None or self.jitter >= 0,
            f"scales must be non-empty and > 0, got {self.scales}": bool(self.scales) and min(self.scales) > 0,
            f"angles must be non-empty, got {self.angles}": bool(self.angles),
            f"settle must be in [0, 1], got {self.settle}": 0 <= self.settle <= 1,
            f"batch_size must be >= 1, got {self.batch_size}": self.batch_size >= 1,
            f"threads must be >= 1 or None, got {self.threads}": self.threads is None or self.threads >= 1,
            f"fill must be in [0, 1], got {self.fill}": 0 <= self.fill <= 1,
        }
        bad = [msg for msg, ok in checks.items() if not ok]
        if bad:
            raise FeatVizError("; ".join(bad))

    def jitter_for(self, size: int) -> int:
        """The translation range in pixels for images of side ``size``."""
        return max(1, round(size / 28)) if self.jitter is None else self.jitter

    def to_dict(self) -> dict[str, object]:
        """Primitives only (for reports and logs)."""
        return asdict(self)


@dataclass
class FeatVizResult:
    """Optimised inputs for units of one layer; tensors are on the CPU, one row per unit."""

    layer: str
    units: torch.Tensor  #: (N,) channel (or FC unit) indices
    images: torch.Tensor  #: (N,C,H,W) in [0, 1]
    activation: torch.Tensor  #: (N,) max over positions of the unit on its untransformed image
    positions: torch.Tensor  #: (N, 2) where that max is (row, col of the layer's output), to crop its field
    reference: torch.Tensor | None  #: (N,) the best real activation (max over positions and data), if given
    fidelity: torch.Tensor  #: (N,) activation / reference; NaN where undefined
    flagged: torch.Tensor  #: (N,) bool: fidelity < 1 or undefined
    objective_value: torch.Tensor  #: (N,) the objective (mean, or value at the target) on the untransformed image
    targets: torch.Tensor  #: (N, 2) where the neuron objective read each unit; (-1, -1) for the channel objective
    settings: FeatVizSettings
    seconds: float  #: wall time of the optimisation (with ``Workers``: each batch's own, summed)

    @property
    def share_reaching_real(self) -> float:
        """Fraction of units whose optimised input reaches their best real input (fidelity >= 1)."""
        return float((~self.flagged).float().mean()) if len(self.flagged) else float("nan")

    @property
    def seconds_per_unit(self) -> float:
        return self.seconds / max(1, len(self.units))


def module_output(model: nn.Module, name: str) -> LayerFn:
    """A ``LayerFn`` for the output of ``model``'s submodule ``name``; the forward pass stops there.

    The caller keeps ``model`` in eval mode and on the images' device; only the input receives gradients.
    """
    modules = dict(model.named_modules())
    if name not in modules or not name:
        valid = [n for n in modules if n]
        raise FeatVizError(f"Unknown layer name {name!r} for {type(model).__name__}; valid names: {valid}")
    module = modules[name]

    def layer_fn(x: torch.Tensor) -> torch.Tensor:
        out = output_of_call(model, module, 0, x)
        if out is None:
            raise FeatVizError(f"Layer {name!r} did not run in {type(model).__name__}'s forward pass")
        return out

    return layer_fn


class _Stop(Exception):
    """Raised by ``output_of_call``'s hook to end the forward pass at the layer."""


_CALLS = threading.local()  # per thread: the ``output_of_call`` whose pass the thread is running, if any


def output_of_call(runner: nn.Module, module: nn.Module, call: int, x: torch.Tensor) -> torch.Tensor | None:
    """Run ``runner(x)`` until ``module`` (a submodule) has produced its ``call``-th output (0 = first); return it,
    contiguous and with its graph, or None when it was not called that often. The rest of the pass is skipped.
    Another ``output_of_call`` running in another thread on the same model (``Workers``) is neither counted nor
    stopped; threads the model starts itself are part of this call's pass."""
    box: list[torch.Tensor] = []
    seen = [0]
    token = object()

    def grab(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
        running = getattr(_CALLS, "token", None)
        if running is not None and running is not token:  # another output_of_call's pass through the same model
            return
        if seen[0] == call:
            box.append(out)
            raise _Stop
        seen[0] += 1

    handle = module.register_forward_hook(grab)
    outer = getattr(_CALLS, "token", None)
    _CALLS.token = token
    try:
        runner(x)
    except _Stop:
        pass
    finally:
        _CALLS.token = outer
        handle.remove()
    return box[0].contiguous() if box else None


def unit_statistic(
    out: torch.Tensor, units: torch.Tensor, how: str, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Row i's unit ``units[i]`` of a layer output (N,K,h,w): ``"max"`` or ``"mean"`` over positions, or its value
    ``"at"`` ``positions[i]`` = (row, col) (default: the centre, (h // 2, w // 2)). (N,K) outputs: the value."""
    rows = torch.arange(len(out), device=out.device)
    sel = out[rows, units.to(out.device)]
    if sel.dim() == 1:
        return sel
    if how == "max":
        return sel.flatten(1).amax(dim=1)
    if how == "mean":
        return sel.flatten(1).mean(dim=1)
    if how == "at":
        if positions is None:
            return sel[:, sel.shape[1] // 2, sel.shape[2] // 2]
        positions = positions.to(out.device)
        return sel[rows, positions[:, 0], positions[:, 1]]
    raise FeatVizError(f"Unknown statistic {how!r}; choose 'max', 'mean' or 'at'")


@dataclass
class RealBest:
    """Each unit's best activation on real images (the top-1 of a top-patches search) and where it occurs."""

    values: torch.Tensor  #: (K,) the maximum over positions and images
    image_ids: torch.Tensor  #: (K,) index of that image
    positions: torch.Tensor  #: (K, 2) its (row, col) in the layer's output; (0, 0) for (N,K) layers


@torch.no_grad()
def real_best(layer_fn: LayerFn, images: torch.Tensor, batch_size: int = 1000) -> RealBest:
    """Each unit's best activation on real ``images`` (N,C,H,W): the maximum over positions and images."""
    values = ids = flat = None
    width = 1
    for start in range(0, len(images), batch_size):
        out = layer_fn(images[start : start + batch_size]).float()
        maps = out.flatten(2) if out.dim() == 4 else out.unsqueeze(2)
        width = out.shape[-1] if out.dim() == 4 else 1
        per_image, where = maps.max(dim=2)  # (B, K)
        top, img = per_image.max(dim=0)
        pos = where.gather(0, img.unsqueeze(0)).squeeze(0)
        if values is None:
            values, ids, flat = top, img + start, pos
        else:
            better = top > values
            values = torch.where(better, top, values)
            ids, flat = torch.where(better, img + start, ids), torch.where(better, pos, flat)
    if values is None:
        raise FeatVizError("real_best needs at least one image")
    return RealBest(values.cpu(), ids.cpu(), torch.stack([flat // width, flat % width], dim=1).cpu())


def _freqs(h: int, w: int) -> torch.Tensor:
    return (torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.rfftfreq(w)[None, :] ** 2).sqrt()


class _Image(nn.Module):
    """N images (C,H,W) in [0, 1] from a Fourier- or pixel-parametrised, optionally colour-decorrelated field."""

    def __init__(self, noise: torch.Tensor, shape: tuple[int, int, int], s: FeatVizSettings) -> None:
        super().__init__()
        c, h, w = shape
        self.shape, self.fft, self.decorrelate = shape, s.parametrization == "fft", s.decorrelate and c == 3
        self.clamp = s.squash == "clamp"
        self.param = nn.Parameter(noise)
        if self.fft:
            scale = 1.0 / _freqs(h, w).clamp(min=1.0 / max(h, w)) ** s.decay_power
            self.register_buffer("scale", scale[None, None, :, :, None].to(noise.device))

    @staticmethod
    def param_shape(shape: tuple[int, int, int], s: FeatVizSettings) -> tuple[int, ...]:
        c, h, w = shape
        return (c, h, w // 2 + 1, 2) if s.parametrization == "fft" else (c, h, w)

    def forward(self) -> torch.Tensor:
        x = self.param
        if self.fft:
            spectrum = torch.view_as_complex((self.scale * x).contiguous())
            x = torch.fft.irfft2(spectrum, s=self.shape[1:], norm="ortho") / 4.0  # Lucid's scale
        if self.decorrelate:
            x = torch.einsum("nchw,dc->ndhw", x, COLOR_CORRELATION.to(x.device))
        return _RedirectedClamp.apply(x + 0.5) if self.clamp else torch.sigmoid(x)


class _RedirectedClamp(torch.autograd.Function):
    """Clamp to [0, 1] whose gradient still flows outside the range when it points back into it (Lucid's trick)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        outward = torch.where(grad > 0, x < 0, x > 1)  # descent (x - grad) would leave [0, 1] further
        return grad.masked_fill(outward, 0.0)


class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose backward, for an image whose ordinary ReLU gradient is zero everywhere (a dead start), lets the
    gradient through negative inputs where it would raise them (Lucid's ``redirected_relu_grad``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        relu_grad = grad * (x > 0)
        if x.dim() < 2:
            return relu_grad
        alive = relu_grad.flatten(1).abs().amax(dim=1) > 1e-7
        if x.device.type == "cpu" and bool(alive.all()):  # every image alive: what the where below returns
            return relu_grad
        redirected = grad * ~((x < 0) & (grad > 0))
        return torch.where(alive.view(-1, *[1] * (x.dim() - 1)), relu_grad, redirected)


_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class _RedirectReLUs(TorchFunctionMode):
    """Route every ReLU call (``nn.ReLU``, ``F.relu``, ``torch.relu``, in place or not) to ``_RedirectedReLU``.

    The forward value is unchanged; an in-place ReLU returns a new tensor instead of overwriting its input.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELUS:
            return _RedirectedReLU.apply(args[0])
        return func(*args, **(kwargs or {}))


def _warp(x: torch.Tensor, angle: float, scale: float, tx: int, ty: int, fill: float) -> torch.Tensor:
    """Rotate by ``angle`` degrees, scale and translate by (tx, ty) pixels about the centre; outside is ``fill``."""
    _, _, h, w = x.shape
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    theta = torch.tensor(
        [[cos, -sin * h / w, -2.0 * tx / w], [sin * w / h, cos, -2.0 * ty / h]], dtype=x.dtype, device=x.device
    )
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per image (N,): mean |difference| between vertical plus horizontal neighbours."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(dim=1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(dim=1)
    return dx + dy


def _init_noise(units: torch.Tensor, shape: tuple[int, ...], s: FeatVizSettings) -> torch.Tensor:
    """Start noise drawn per unit from (seed, unit), so a unit's image does not depend on the others requested."""
    rows = []
    for u in units.tolist():
        g = torch.Generator().manual_seed(s.seed * 1_000_003 + int(u))
        rows.append(torch.randn(shape, generator=g) * s.init_std)
    return torch.stack(rows)


def _objective_statistic(s: FeatVizSettings) -> str:
    return "mean" if s.objective == "channel" else "at"


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op CPU threads (None: unchanged), restoring the previous number afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _optimise(
    layer_fn: LayerFn,
    units: torch.Tensor,
    targets: torch.Tensor | None,
    shape: tuple[int, int, int],
    s: FeatVizSettings,
    device: torch.device,
) -> torch.Tensor:
    image = _Image(_init_noise(units, _Image.param_shape(shape, s), s).to(device), shape, s)
    opt = torch.optim.Adam([image.param], lr=s.lr)
    g = torch.Generator().manual_seed(s.seed)  # the transform sequence: same for every batch
    jitter, how = s.jitter_for(max(shape[1:])), _objective_statistic(s)
    transformed_steps = s.steps - round(s.steps * s.settle)
    units = units.to(device).clone()  # normal tensors even if the caller runs in inference mode
    targets = targets.to(device).clone() if targets is not None else None
    for step in range(s.steps):
        angle_i, scale_i = (int(torch.randint(len(v), (1,), generator=g)) for v in (s.angles, s.scales))
        tx, ty = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g))
        x = xt = image()
        if step < transformed_steps and (tx or ty or s.angles[angle_i] or s.scales[scale_i] != 1):
            xt = _warp(x, s.angles[angle_i], s.scales[scale_i], tx, ty, s.fill)
        with _RedirectReLUs() if s.redirect_relu else nullcontext():
            out = layer_fn(xt)
        loss = -unit_statistic(out, units, how, targets).sum()
        if s.tv_weight:
            loss = loss + s.tv_weight * total_variation(x).sum()
        (grad,) = torch.autograd.grad(loss, [image.param])  # never touches the model's .grad
        image.param.grad = grad
        opt.step()
    with torch.no_grad():
        return image().detach()


def _check_request(
    units: Sequence[int] | torch.Tensor | int,
    image_shape: tuple[int, int, int],
    reference: torch.Tensor | None,
    positions: torch.Tensor | None,
) -> torch.Tensor:
    """``units`` as a long vector, after checking the arguments of :func:`visualise`."""
    units = torch.arange(units) if isinstance(units, int) else torch.as_tensor(units, dtype=torch.long).flatten()
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise FeatVizError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    if len(units) == 0 or units.min() < 0:
        raise FeatVizError(f"units must be non-empty and >= 0, got {units.tolist()}")
    if reference is not None and (reference.dim() != 1 or units.max() >= len(reference)):
        raise FeatVizError(
            f"reference must be a vector with one value per unit of the layer, got shape {tuple(reference.shape)} "
            f"for units up to {int(units.max())}"
        )
    if positions is not None and (positions.dim() != 2 or positions.shape[1] != 2 or units.max() >= len(positions)):
        raise FeatVizError(
            f"positions must be (K, 2) rows of (row, col), one per unit of the layer, got shape "
            f"{tuple(positions.shape)} for units up to {int(units.max())}"
        )
    return units


Submit = Callable[[Callable[[], tuple[torch.Tensor, float]]], "Future[tuple[torch.Tensor, float]]"]


def _run_now(job: Callable[[], tuple[torch.Tensor, float]]) -> Future[tuple[torch.Tensor, float]]:
    """A ``Submit`` that runs the job at once, in the calling thread."""
    done: Future[tuple[torch.Tensor, float]] = Future()
    done.set_result(job())
    return done


@dataclass
class PendingVisualisation:
    """The optimisations :func:`start_visualise` submitted (one per batch of units); ``finish`` measures the images."""

    futures: list[Future[tuple[torch.Tensor, float]]]
    _measure: Callable[[torch.Tensor, float], FeatVizResult]

    def wait(self) -> None:
        """Block until every optimisation is done (re-raising its error)."""
        for f in self.futures:
            f.result()

    def finish(self) -> FeatVizResult:
        """The result: the optimised images measured in the calling thread, under its thread count and grad mode."""
        parts = [f.result() for f in self.futures]
        return self._measure(torch.cat([images for images, _ in parts]), sum(seconds for _, seconds in parts))


def start_visualise(
    layer_fn: LayerFn,
    units: Sequence[int] | torch.Tensor | int,
    image_shape: tuple[int, int, int],
    settings: FeatVizSettings | None = None,
    reference: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    layer: str = "",
    device: torch.device | str = "cpu",
    submit: Submit | None = None,
) -> PendingVisualisation:
    """:func:`visualise` in two halves: the optimisation of each batch of ``settings.batch_size`` units is handed to
    ``submit`` (a :class:`Workers` pool's; None: at once), ``finish()`` measures the images. Each batch is
    independent (its own start noise and transform sequence), so the images do not depend on where or in which order
    the batches ran. The caller sets the thread count (``cpu_threads``); with workers, ``layer_fn`` must be safe to
    call from several threads (``output_of_call`` is; a forward that stores state on the model is not)."""
    s = settings or FeatVizSettings()
    units = _check_request(units, image_shape, reference, positions)
    device = torch.device(device)
    image_shape = tuple(int(v) for v in image_shape)
    targets = positions.long().cpu()[units] if positions is not None and s.objective == "neuron" else None

    def job(batch: torch.Tensor, batch_targets: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            images = _optimise(layer_fn, batch, batch_targets, image_shape, s, device)
        return images, time.perf_counter() - start

    submit = submit or _run_now
    futures = [
        submit(
            partial(job, units[i : i + s.batch_size], targets[i : i + s.batch_size] if targets is not None else None)
        )
        for i in range(0, len(units), s.batch_size)
    ]
    return PendingVisualisation(futures, partial(_measure, layer_fn, units, targets, reference, layer, s, device))


def visualise(
    layer_fn: LayerFn,
    units: Sequence[int] | torch.Tensor | int,
    image_shape: tuple[int, int, int],
    settings: FeatVizSettings | None = None,
    reference: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    layer: str = "",
    device: torch.device | str = "cpu",
) -> FeatVizResult:
    """Optimise one input (``image_shape`` = (C,H,W), display space) per unit of a layer and measure fidelity.

    ``units``: channel indices, or an int ``K`` for all of 0..K-1. ``reference`` (K,): the units' best real
    activations (``real_best(...).values`` of the same ``layer_fn``), indexed by unit. ``positions`` (K, 2): where
    the ``"neuron"`` objective reads each unit (row, col of the layer's output; default the centre), e.g.
    ``real_best(...).positions``, so that a unit whose best real patch leans on the zero padding at the border is
    optimised where it can reach it.
    """
    s = settings or FeatVizSettings()
    with cpu_threads(s.threads):
        pending = start_visualise(layer_fn, units, image_shape, s, reference, positions, layer, device)
    return pending.finish()


def _measure(
    layer_fn: LayerFn,
    units: torch.Tensor,
    targets: torch.Tensor | None,
    reference: torch.Tensor | None,
    layer: str,
    s: FeatVizSettings,
    device: torch.device,
    images: torch.Tensor,
    seconds: float,
) -> FeatVizResult:
    """Each unit's activation, peak and fidelity on its final, untransformed optimised image."""
    with torch.no_grad():
        out = layer_fn(images.to(device)).float()
        activation = unit_statistic(out, units, "max").cpu()
        objective_value = unit_statistic(out, units, _objective_statistic(s), targets).cpu()
        sel = out[torch.arange(len(out), device=out.device), units.to(out.device)]
        peaks, read = torch.zeros(len(units), 2, dtype=torch.long), torch.full((len(units), 2), -1)
        if sel.dim() == 3:
            flat = sel.flatten(1).argmax(dim=1).cpu()
            peaks = torch.stack([flat // sel.shape[2], flat % sel.shape[2]], dim=1)
            if s.objective == "neuron":
                read = (
                    targets
                    if targets is not None
                    else torch.tensor([sel.shape[1] // 2, sel.shape[2] // 2]).repeat(len(units), 1)
                )
    ref = reference.detach().float().cpu()[units] if reference is not None else None
    fidelity = (
        torch.where(ref > 0, activation / ref, torch.nan) if ref is not None else torch.full_like(activation, torch.nan)
    )
    return FeatVizResult(
        layer=layer,
        units=units,
        images=images.cpu(),
        activation=activation,
        positions=peaks,
        reference=ref,
        fidelity=fidelity,
        flagged=~(fidelity >= 1.0),
        objective_value=objective_value,
        targets=read,
        settings=s,
        seconds=seconds,
    )


AUTO_WORKERS = "auto"


def check_workers(name: str, value: object) -> None:
    """``value`` is a number of workers >= 1 or ``"auto"`` (a ``ConfigError`` naming ``name`` otherwise)."""
    from cnnfeat.errors import ConfigError

    if value != AUTO_WORKERS and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{name} must be an integer >= 1 or 'auto', got {value!r}")


def workers_for(model: nn.Module, device: torch.device, workers: int | str) -> int:
    """How many optimisations run side by side: 1 off the CPU (one device runs one after the other anyway); a number
    as given; ``"auto"``: 2 for cnnfeat's own models (``cnnfeat.models``: a forward that keeps no state and draws no
    random numbers in eval mode), 1 for any other model, whose forward might store tensors on ``self`` or draw
    random numbers (MC dropout): two optimisations at once would then give other images than one after the other."""
    if device.type != "cpu":
        return 1
    if workers == AUTO_WORKERS:
        return 2 if type(model).__module__.startswith("cnnfeat.models") else 1
    return int(workers)


class Workers:
    """Threads that run independent optimisations side by side (``with Workers(2, threads=1) as pool``).

    Inside the ``with`` block torch uses ``threads`` intra-op threads (``None``: unchanged) and ``pool.submit`` runs
    jobs on ``workers`` threads (1: in the calling thread, at once); leaving it waits for every job and restores the
    thread count. Optimising inputs is many small ops: one thread each, two optimisations at once ran 1.45x faster
    than one after the other on a 2-core CPU, with the same images (each job is independent and deterministic).
    """

    def __init__(self, workers: int = 1, threads: int | None = 1) -> None:
        if workers < 1:
            raise FeatVizError(f"workers must be >= 1, got {workers}")
        self.workers, self.threads = workers, threads
        self._pool: ThreadPoolExecutor | None = None
        self._stack = ExitStack()

    def __enter__(self) -> Workers:
        self._stack.enter_context(cpu_threads(self.threads))
        if self.workers > 1:
            self._pool = self._stack.enter_context(
                ThreadPoolExecutor(self.workers, thread_name_prefix="cnnfeat-featviz")
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None and exc[0] is not None:  # an error in the caller: drop what has not started
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        self._stack.close()  # waits for the running jobs, then restores the thread count

    def submit(self, job: Callable[[], tuple[torch.Tensor, float]]) -> Future[tuple[torch.Tensor, float]]:
        return _run_now(job) if self._pool is None else self._pool.submit(job)


class Waitable(Protocol):
    def wait(self) -> None: ...


P = TypeVar("P", bound=Waitable)


def side_by_side(
    starts: Mapping[str, Callable[[Submit], P | None]],
    workers: int,
    threads: int | None,
    done: Callable[[str], None] | None = None,
) -> dict[str, P | None]:
    """Hand each start (by name; ``None`` from a start: nothing to optimise) the ``submit`` of a :class:`Workers`
    pool, the last first (the deepest layers, the costliest), and wait for all, calling ``done(name)`` as each is
    through. Returns them in the order of ``starts``, after the thread count is restored: the caller measures them
    (``finish()``) as one after the other would."""
    with Workers(workers, threads) as pool:
        pending = {name: start(pool.submit) for name, start in reversed(list(starts.items()))}
        for name, p in pending.items():
            if p is not None:
                p.wait()
            if done is not None:
                done(name)
    return {name: pending[name] for name in starts}


def best_of(results: Sequence[FeatVizResult]) -> FeatVizResult:
    """Per unit, the run whose image reaches the highest ``activation`` (multi-start optimisation: e.g. other seeds or
    ``positions``); ``settings`` are the first run's, ``seconds`` the total. All runs must cover the same units of
    the same layer."""
    if not results:
        raise FeatVizError("best_of needs at least one result")
    first = results[0]
    if any(r.layer != first.layer or not torch.equal(r.units, first.units) for r in results):
        raise FeatVizError("best_of needs results for the same units of the same layer")
    pick = torch.stack([r.activation for r in results]).argmax(dim=0)  # first run wins ties
    rows = torch.arange(len(first.units))

    def take(field: str) -> torch.Tensor:
        return torch.stack([getattr(r, field) for r in results])[pick, rows]

    return FeatVizResult(
        layer=first.layer,
        units=first.units,
        images=take("images"),
        activation=take("activation"),
        positions=take("positions"),
        reference=first.reference,
        fidelity=take("fidelity"),
        flagged=take("flagged"),
        objective_value=take("objective_value"),
        targets=take("targets"),
        settings=first.settings,
        seconds=sum(r.seconds for r in results),
    )


def fidelity_report(
    model: nn.Module,
    layers: Sequence[str],
    images: torch.Tensor,
    settings: FeatVizSettings | Mapping[str, FeatVizSettings] | None = None,
    at_real_best: bool = True,
    batch_size: int = 1000,
) -> dict[str, FeatVizResult]:
    """Visualise every channel of each named layer of ``model`` and measure fidelity against real ``images``.

    ``images`` (N,C,H,W) in [0, 1] on the model's device, e.g. the 10k test images. ``at_real_best``: the
    ``"neuron"`` objective runs twice, at the centre and where the unit's best real patch is (it may lean on the
    zero padding at the border), and each unit keeps the image that reaches more (``best_of``). The model runs in
    eval mode and every submodule's own mode is restored afterwards. ``settings`` may differ per layer (a mapping).
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        results = {}
        for name in layers:
            s = settings.get(name) if isinstance(settings, Mapping) else settings
            fn = module_output(model, name)
            best = real_best(fn, images, batch_size)
            run = partial(visualise, fn, len(best.values), tuple(images.shape[1:]), s, best.values, layer=name)
            results[name] = run(device=images.device)
            if at_real_best and results[name].settings.objective == "neuron":
                results[name] = best_of([results[name], run(positions=best.positions, device=images.device)])
        return results
    finally:
        for m, mode in modes.items():
            m.training = mode
