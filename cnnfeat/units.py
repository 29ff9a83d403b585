"""Unit history: which ReLU units fire on the probe set at each epoch, when each first died, whether it revived.

The one definition of a dead unit, used by the dead-ReLU callback, the unit history and the atlas alike. A unit is a
channel of a conv activation (N, C, H, W) or a neuron of a fully connected one (N, F). An activation *fires* when it
is > 0 (``fires``; the ReLU's input or output give the same answer). NaN never fires, nor do 0, negative values and
-inf; +inf fires. A unit is *alive* at an epoch when it fires somewhere on some probe image, and *dead* otherwise: a
unit whose activations are all NaN (or NaN and <= 0) is dead. ``FiringAccumulator`` reduces one pass over the probe
set to one alive/dead vector per layer; ``UnitHistory`` keeps those vectors as a units x epochs raster per layer
(1 bit per unit and epoch held as bool: SmallCNN's 6+6+16+120+100 units x 16 epochs is 4 KB) and answers when each
unit died and revived.

Which units a picture shows on a wide layer (``choose_units``): all of a layer up to ``DEFAULT_UNITS`` wide, else the
most *variable* ones: largest population standard deviation, across the probe images, of the unit's largest
activation in each image (``SpreadAccumulator``), chosen once and kept so that pictures stay comparable across epochs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from cnnfeat.errors import ConfigError

#: ``tensor -> (world_size, *tensor.shape)``, e.g. ``trainer.strategy.all_gather``.
AllGather = Callable[[torch.Tensor], torch.Tensor]


def nonfinite_rows(t: torch.Tensor) -> torch.Tensor:
    """(N,) bool on the CPU: which items along dim 0 (probe images, filters) hold a NaN or infinite value.

    A row's sum is finite only when all its values are (NaN and infinity propagate into it), so the element-wise test
    runs only on the rows whose sum is not: those holding NaN or infinity, or finite values whose sum overflows
    (exactly the same answer, at the cost of one reduction for a network that has not diverged)."""
    flat = t.detach().reshape(len(t), -1)
    if not (flat.is_floating_point() or flat.is_complex()):
        return torch.zeros(len(t), dtype=torch.bool)  # integers are always finite
    bad = ~torch.isfinite(flat.sum(dim=1))
    if bad.any():
        rows = bad.nonzero().squeeze(1)
        bad[rows] = ~torch.isfinite(flat[rows]).all(dim=1)
    return bad.cpu()


def fires(acts: torch.Tensor) -> torch.Tensor:
    """Elementwise: whether each activation fires, i.e. is > 0. NaN, 0, negative values and -inf do not; +inf does."""
    return acts > 0


def unit_max(acts: torch.Tensor) -> torch.Tensor:
    """Largest activation of each unit (dim 1) over the batch and all positions, float32 on the CPU (what the atlas
    stores), so that ``fires(unit_max(a))`` says whether each unit fires anywhere in ``a``.

    NaN is skipped (a unit with nothing but NaN gets -inf); +-inf become the dtype's largest finite values. A float64
    activation below float32's smallest positive value (1.4e-45) rounds to 0 and does not fire.
    """
    a = acts.detach()
    dims = (0, *range(2, a.ndim))
    m = a.amax(dim=dims).cpu()
    if m.isnan().any():  # amax propagates NaN: only a diverged network pays for the copy
        return a.nan_to_num(nan=float("-inf")).amax(dim=dims).float().cpu()
    return m.nan_to_num().float()  # +-inf as nan_to_num before the max maps them (the max commutes with that map)


class FiringAccumulator:
    """Whether each unit fired during one pass over the probe set (``fires`` somewhere), fed minibatch by minibatch.

    ``update(acts)`` per minibatch, ``finish()`` at the end (``maxima()`` gives the largest activation per unit so
    far). Under DDP (each rank a shard of the probe set) pass ``all_gather`` to ``finish``: it is one collective, and
    every rank gets the same answer.
    """

    def __init__(self) -> None:
        self._max: dict[str, torch.Tensor] = {}

    def update(self, acts: Mapping[str, torch.Tensor]) -> None:
        """Add one minibatch of activations (B, C, ...) per layer."""
        for name, a in acts.items():
            m = unit_max(a)
            old = self._max.get(name)
            if old is not None and old.shape != m.shape:
                raise ValueError(f"layer {name!r}: {m.numel()} units, earlier {old.numel()}")
            self._max[name] = m if old is None else torch.maximum(old, m)

    def maxima(self, all_gather: AllGather | None = None) -> dict[str, torch.Tensor]:
        """``{layer: unit_max (units,)}`` over everything fed since the last ``finish``."""
        if all_gather is None:
            return dict(self._max)
        return {name: all_gather(m).amax(dim=0).cpu() for name, m in self._max.items()}

    def finish(self, all_gather: AllGather | None = None) -> dict[str, torch.Tensor]:
        """``{layer: alive (units,) bool}`` over everything fed since the last ``finish``."""
        out = {name: fires(m) for name, m in self.maxima(all_gather).items()}
        self._max = {}
        return out


@dataclass(frozen=True)
class EpochChange:
    """Units of one layer that changed between two recorded epochs."""

    epoch: int
    layer: str
    died: int  # alive before (or, at the first record, ever), dead now
    revived: int  # dead before, alive now
    dead: int  # dead now
    units: int


class UnitHistory:
    """Alive/dead status of every unit of every layer, per recorded epoch (epoch 0 = untrained).

    State is plain tensors and lists (``torch.load(weights_only=True)`` reads it back).
    """

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self._alive: dict[str, list[torch.Tensor]] = {}

    def add(self, epoch: int, alive: Mapping[str, torch.Tensor]) -> list[EpochChange]:
        """Record one epoch's ``{layer: alive (units,) bool}``; returns what changed since the previous record.

        Every record must name the same layers with the same unit counts; epochs must increase.
        """
        if self.epochs and epoch <= self.epochs[-1]:
            raise ValueError(f"epoch {epoch} is not after the last recorded epoch {self.epochs[-1]}")
        if self._alive and set(alive) != set(self._alive):
            raise ValueError(f"layers {sorted(alive)} differ from the recorded {sorted(self._alive)}")
        for name, a in alive.items():
            if self._alive and self._alive[name][0].shape != a.shape:
                raise ValueError(f"layer {name!r}: {a.numel()} units, recorded {self._alive[name][0].numel()}")
        for name, a in alive.items():
            self._alive.setdefault(name, []).append(torch.as_tensor(a).bool().cpu().flatten().clone())
        self.epochs.append(epoch)
        return self._changes(len(self.epochs) - 1)

    @property
    def layers(self) -> list[str]:
        """Recorded layer names, in the order first given."""
        return list(self._alive)

    def raster(self, layer: str) -> torch.Tensor:
        """(units, epochs) bool: True where the unit fired at that recorded epoch."""
        return torch.stack(self._alive[layer], dim=1)

    def _epoch_of(self, cols: torch.Tensor) -> torch.Tensor:
        """Recorded epoch of the first True column per row, -1 where none."""
        ep = torch.tensor(self.epochs)
        first = cols.int().argmax(dim=1)
        return torch.where(cols.any(dim=1), ep[first], torch.tensor(-1))

    def first_death(self, layer: str) -> torch.Tensor:
        """(units,) epoch each unit was first recorded dead (0 = dead from the start), -1 if it never was."""
        return self._epoch_of(~self.raster(layer))

    def first_revival(self, layer: str) -> torch.Tensor:
        """(units,) first recorded epoch a unit fired again after having been dead, -1 if it never did."""
        r = self.raster(layer)
        was_dead = torch.cummax((~r).int(), dim=1).values.bool()
        revived = torch.zeros_like(r)
        revived[:, 1:] = r[:, 1:] & was_dead[:, :-1]
        return self._epoch_of(revived)

    def _changes(self, i: int) -> list[EpochChange]:
        out = []
        for name, cols in self._alive.items():
            a = cols[i]
            before = cols[i - 1] if i else torch.ones_like(a)
            died, revived = int((before & ~a).sum()), int((~before & a).sum())
            out.append(EpochChange(self.epochs[i], name, died, revived, int((~a).sum()), a.numel()))
        return out

    def changes(self) -> list[EpochChange]:
        """Deaths and revivals of every layer at every recorded epoch (the first record counts dead units as died)."""
        return [c for i in range(len(self.epochs)) for c in self._changes(i)]

    def when(self, epoch: int) -> str:
        """The epochs a change recorded at ``epoch`` happened in: ``"3"`` when the epoch before it was recorded (or
        it is 0), ``"2..3"`` after a gap, ``"0..3"`` at a first record after 0 (dead then, since when unknown)."""
        i = self.epochs.index(epoch)
        since = self.epochs[i - 1] + 1 if i else 0
        return str(epoch) if since == epoch or epoch == 0 else f"{since}..{epoch}"

    def table(self) -> str:
        """Markdown table of deaths / revivals / dead units per epoch and layer (for a TensorBoard Text tab); after a
        gap in the recorded epochs the epoch cell names the span the changes happened in (``2..3``)."""
        lines = ["| epoch | layer | died | revived | dead / units |", "|---:|:---|---:|---:|---:|"]
        lines += [
            f"| {self.when(c.epoch)} | {c.layer} | {c.died} | {c.revived} | {c.dead} / {c.units} |"
            for c in self.changes()
        ]
        return "\n".join(lines)

    def state_dict(self) -> dict:
        """Recorded epochs and ``{layer: (epochs, units) bool}``."""
        return {"epochs": list(self.epochs), "alive": {k: torch.stack(v) for k, v in self._alive.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore from ``state_dict``."""
        epochs = [int(e) for e in state["epochs"]]
        alive = {k: [row.bool() for row in v] for k, v in state["alive"].items()}
        if any(len(v) != len(epochs) for v in alive.values()):
            raise ValueError("inconsistent UnitHistory state: one alive vector per layer and epoch is needed")
        self.epochs, self._alive = epochs, alive


# -- which units a picture shows ------------------------------------------------------------------------------
#: units per layer the pictures show by default on a network with a wider layer (SmallCNN's convs are <= 16 wide)
DEFAULT_UNITS = 16
ALL = "all"


def image_max(acts: torch.Tensor) -> torch.Tensor:
    """(B, C) float64: each unit's largest activation in each image, over its positions ((B, C) stays as it is).
    NaN positions are skipped, as in the top-k search; a map of nothing but NaN gives -inf (then the unit's
    variability is NaN and it ranks last)."""
    a = acts.detach()
    flat = a.flatten(2) if a.ndim > 2 else a.unsqueeze(2)
    return flat.double().nan_to_num(nan=-torch.inf, posinf=torch.inf).amax(dim=2)


class SpreadAccumulator:
    """Each unit's *variability*, streamed minibatch by minibatch: the population standard deviation, across the
    images fed, of the unit's largest activation in each image (``image_max``). A unit with a non-finite maximum on
    any image gets NaN (``most_variable`` ranks it last). Memory: three float64 numbers per unit."""

    def __init__(self) -> None:
        self._n = 0
        self._shift: torch.Tensor | None = None  # the first batch's mean: sums of shifted values stay accurate
        self._sum: torch.Tensor | None = None
        self._sq: torch.Tensor | None = None
        self._finite: torch.Tensor | None = None

    def update(self, acts: torch.Tensor) -> None:
        """Add one minibatch of activations (B, C, ...) of one layer."""
        self.update_max(image_max(acts))

    def update_max(self, maxima: torch.Tensor) -> None:
        """Add one minibatch of per-image maxima (B, C) (``image_max``, or what a top-k search computed)."""
        m = maxima.detach().double().cpu()
        finite = torch.isfinite(m).all(dim=0)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        if self._shift is None:
            self._shift = m.mean(dim=0)
            self._sum, self._sq, self._finite = torch.zeros_like(self._shift), torch.zeros_like(self._shift), finite
        assert self._sum is not None and self._sq is not None and self._finite is not None
        if m.shape[1] != len(self._shift):
            raise ValueError(f"{m.shape[1]} units, earlier {len(self._shift)}")
        d = m - self._shift
        self._sum += d.sum(dim=0)
        self._sq += (d * d).sum(dim=0)
        self._finite &= finite
        self._n += len(m)

    def finish(self) -> torch.Tensor:
        """(C,) float64: each unit's variability (NaN where not finite); empty before any image."""
        if self._n == 0 or self._sum is None or self._sq is None or self._finite is None:
            return torch.empty(0, dtype=torch.float64)
        mean = self._sum / self._n
        var = (self._sq / self._n - mean * mean).clamp(min=0)
        return torch.where(self._finite, var.sqrt(), torch.full_like(var, torch.nan))


def most_variable(spread: torch.Tensor, k: int) -> list[int]:
    """The ``k`` units of largest ``spread`` (``SpreadAccumulator``), NaN last, ties to the lower index; returned in
    ascending unit order (pictures list units by number)."""
    s = spread.double().nan_to_num(nan=-torch.inf)
    order = sorted(range(len(s)), key=lambda u: (-float(s[u]), u))
    return sorted(order[:k])


def dump_chosen(chosen: Mapping[str, Sequence[int]]) -> str:
    """Units chosen per layer (``{layer: [units]}``) as a checkpoint's string."""
    return json.dumps({str(k): [int(u) for u in v] for k, v in chosen.items()})


def load_chosen(text: object) -> dict[str, list[int]]:
    """:func:`dump_chosen`'s string back as ``{layer: [units]}``; ``{}`` for anything else (another version's state)."""
    try:
        return {str(k): [int(u) for u in v] for k, v in dict(json.loads(text)).items()}  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return {}


def check_units(name: str, value: object) -> int | str | list[int]:
    """A units-per-layer setting: an integer >= 1 (that many most variable units of a wider layer), ``"all"``, or a
    non-empty list of distinct unit indices >= 0 (their upper bound is the layer's, checked by ``choose_units``)."""
    if isinstance(value, str):
        if value != ALL:
            raise ConfigError(f"{name} must be an integer >= 1, {ALL!r} or a list of unit indices, got {value!r}")
        return ALL
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, {ALL!r} or a list of unit indices, got {value}")
        return value
    if isinstance(value, Sequence) and value:
        units = list(value)
        if all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in units) and len(set(units)) == len(
            units
        ):
            return units
    raise ConfigError(f"{name} must be an integer >= 1, {ALL!r} or a list of distinct unit indices >= 0, got {value!r}")


def needs_spread(setting: int | str | list[int], units: int) -> bool:
    """Whether ``choose_units`` needs the layer's variability: a count smaller than the layer."""
    return isinstance(setting, int) and units > setting


def choose_units(
    setting: int | str | list[int], units: int, layer: str, spread: torch.Tensor | None = None
) -> list[int]:
    """The units of a ``units``-wide layer a picture shows: every one (``"all"``, or a count >= the width), the
    ``setting`` most variable (``most_variable`` of ``spread``, one value per unit), or the listed ones (each must
    exist: a ``ConfigError`` names the layer and the valid range)."""
    if isinstance(setting, list):
        bad = [u for u in setting if u >= units]
        if bad:
            raise ConfigError(f"units {bad} out of range for {layer} ({units} units: valid 0..{units - 1})")
        return list(setting)
    if not needs_spread(setting, units):
        return list(range(units))
    assert isinstance(setting, int)
    if spread is None or len(spread) != units:
        raise ValueError(f"{layer}: choosing {setting} of {units} units needs one variability per unit")
    return most_variable(spread, setting)
