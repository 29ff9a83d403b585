"""Linear CKA between representations of one probe set: across epochs, across layers, across models.

CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the linear Gram matrices K = X Xᵀ, L = Y Yᵀ of two
representations (rows = the same n probe images). ``unbiased=True`` (the default) uses Song et al.'s (2012)
unbiased HSIC, as Nguyen, Raghu & Kornblith (2021) do; ``unbiased=False`` the biased tr(KHLH) / (n-1)².

How it is computed
  * Both HSICs are inner products of centred Grams: the unbiased one of *U-centred* Grams (Székely & Rizzo
    2014: <Û(K), Û(L)> / (n(n-3)) equals Song et al.'s formula), the biased one of double-centred Grams. So
    every representation is reduced once to a **signature**: its centred Gram's upper triangle (diagonal too,
    for the biased one), flattened and scaled to unit norm. CKA of two representations is then the dot
    product of their signatures: one pass over 2 M numbers (n = 2,000), whatever the layer's width.
  * Features are shifted by their mean before the float32 Gram product (both centrings are exactly invariant
    to any shift, and it keeps the product accurate); row sums and dot products are accumulated in float64.
    Against a float64 implementation of the formulas, CKA of real SmallCNN activations agrees to 5e-8.
  * At n >= 512 the Gram multiplies 3 of its 4 half-blocks (it is symmetric), and the triangle is packed
    as two (n/2, n/2) squares without a mask.
  * ``block_size=None`` (default): one Gram over all n probe images, the exact full-probe estimator.
    ``block_size=b``: Nguyen et al.'s minibatch CKA over fixed blocks of ~b consecutive probe positions
    (sum of the blocks' HSICs in numerator and denominator); it costs n·b·D instead of n²·D multiply-adds
    and the signature holds n(b-1)/2 numbers instead of n(n-1)/2. Blocks are fixed by probe position, not
    by how rows arrive, so both modes give the same value however the activations are fed.

Accumulation (``SignatureAccumulator``): minibatches of several layers' activations arrive with their probe
positions; rows are written into the buffer of their block, and a block is reduced to its part of the
signature (and its rows freed) as soon as it is complete. Buffered rows are one block per layer: in exact
mode all n rows, n·D·4 bytes (102 MB for SmallCNN's relu1..fc3 at n = 2,000, +6 MB for the pixels), plus
one n x n Gram (16 MB) at a time. ``keep=True`` also keeps, per layer, the smaller of its features and (exact
mode) its Gram for ``cnnfeat.probes.linear_probe``: 50 MB for SmallCNN's layers in exact mode, 102 MB in
block mode (features only).
Under DDP pass ``all_gather`` (``trainer.strategy.all_gather``): every ``update`` then gathers the
minibatches of all ranks (so it is a collective: all ranks must call it equally often, as a
``DistributedSampler`` ensures; repeated padding rows simply overwrite themselves), and every rank computes
and holds the same signatures. A probe set run whole on every rank needs no ``all_gather`` at all.

Storage (``CKAHistory``): per (layer, epoch) one float32 signature: 8.0 MB at n = 2,000 in exact mode,
2.0 MB with ``block_size=500``, 1.0 MB with 250 (``signature_length``). Held in memory, or, with
``spill_dir``, written to disk and memory-mapped back when compared, so resident memory no longer grows with
layers x epochs. Measured peak memory above the inputs of a simulated 16-evaluation SmallCNN run (6 layers
+ pixels, n = 2,000, with probes and unit history): exact in memory 1,018 MB (776 MB of signatures: too
much), exact with ``spill_dir`` 205 MB (+776 MB on disk), ``block_size=500`` 428 MB, 250: 299 MB,
250 with ``pool=4``: 148 MB.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from cnnfeat.errors import ConfigError

#: ``tensor -> (world_size, *tensor.shape)``, e.g. ``trainer.strategy.all_gather``.
AllGather = Callable[[torch.Tensor], torch.Tensor]

_CHUNK = 1 << 16  # elements per float32 partial dot product; partial sums are added in float64


def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear Gram matrix X Xᵀ (n, n) of rows flattened to vectors, in float64."""
    x = x.flatten(1).double()
    return x @ x.T


def hsic(kx: torch.Tensor, ky: torch.Tensor, unbiased: bool = True) -> float:
    """HSIC of two (n, n) Gram matrices: Song et al.'s unbiased estimator, or the biased tr(KHLH)/(n-1)²."""
    n = len(kx)
    if unbiased:
        return float((u_centre(kx) * u_centre(ky)).sum()) / (n * (n - 3))
    return float((double_centre(kx) * double_centre(ky)).sum()) / (n - 1) ** 2


def u_centre(k: torch.Tensor) -> torch.Tensor:
    """U-centred Gram (zero diagonal): <u_centre(K), u_centre(L)> / (n(n-3)) is the unbiased HSIC."""
    n = len(k)
    if n < 4:
        raise ConfigError(f"the unbiased HSIC needs at least 4 samples, got {n}")
    k = k.double()
    r = k.sum(dim=1) - k.diagonal()  # row sums of K with its diagonal zeroed
    u = k - (r[:, None] + r[None, :]) / (n - 2) + r.sum() / ((n - 1) * (n - 2))
    return u.fill_diagonal_(0.0)


def double_centre(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11ᵀ/n (the centring of the biased HSIC)."""
    k = k.double()
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


def cka(x: torch.Tensor, y: torch.Tensor, unbiased: bool = True, block_size: int | None = None) -> float:
    """Linear CKA of two representations (n, ...) of the same n inputs (see ``signature`` for ``block_size``).

    Signatures are kept in float64 here (one-off values); the arithmetic follows the inputs' dtype.
    """
    f64 = torch.float64
    return similarity(signature(x, unbiased, block_size, f64), signature(y, unbiased, block_size, f64))


def block_starts(n: int, block_size: int | None) -> list[int]:
    """Start positions of the probe blocks, plus n: ``n // block_size`` blocks whose sizes differ by at most 1."""
    min_size = 4 if block_size is not None else 1
    if block_size is not None and block_size < min_size:
        raise ConfigError(f"block_size must be >= 4 (or None for one block), got {block_size}")
    count = 1 if block_size is None else max(1, n // block_size)
    q, r = divmod(n, count)
    return [i * q + min(i, r) for i in range(count + 1)]


@cache
def _triu_mask(n: int, diagonal: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_(diagonal)


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """Gram (n, n) of rows shifted by their mean, in x's float dtype (both centrings are exact for any shift,
    and the shift keeps a float32 product accurate)."""
    x = x.flatten(1)
    if not x.is_floating_point():
        x = x.float()
    x = x - x.mean(dim=0)
    n = len(x)
    if n < 512:
        return x @ x.T
    k = n // 2  # symmetric: 3 of the 4 half-blocks are multiplied (-21% time at n = 2,000)
    g = x.new_empty(n, n)
    torch.mm(x[:k], x[:k].T, out=g[:k, :k])
    torch.mm(x[:k], x[k:].T, out=g[:k, k:])
    torch.mm(x[k:], x[k:].T, out=g[k:, k:])
    g[k:, :k] = g[:k, k:].T
    return g


def _pack(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The strict upper triangle of ``g - a 1ᵀ - 1 aᵀ`` (symmetric g), flattened.

    For even n, as two (n/2, n/2) squares: the off-diagonal block, and the two diagonal blocks' triangles
    folded into one (n/2 zeros on its diagonal, which no dot product notices); cheaper than a masked select.
    """
    n = len(g)
    if n % 2:
        return (g - a[:, None] - a[None, :])[_triu_mask(n, 1, g.device)]
    k = n // 2
    a1, a2 = a[:k], a[k:]
    out = torch.empty(2, k, k, dtype=g.dtype, device=g.device)
    torch.sub(g[:k, k:], a1[:, None], out=out[0]).sub_(a2[None, :])
    torch.sub(g[:k, :k], a1[:, None], out=out[1]).sub_(a1[None, :]).triu_(1)
    out[1] += (g[k:, k:] - a2[:, None] - a2[None, :]).triu_(1).T
    return out.flatten()


def block_vector(g: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """One block's part of a signature from its (b, b) Gram: the centred Gram's upper triangle, scaled so that
    the sum over blocks of products of parts is the sum of the blocks' HSICs.

    The centring runs in g's dtype: after the mean shift of ``centred_gram`` its corrections are small, so
    float32 loses nothing the float32 Gram product had not already lost (the tests check 1e-6).
    """
    n = len(g)
    if unbiased:
        if n < 4:
            raise ConfigError(f"the unbiased HSIC needs at least 4 samples, got {n}")
        r = (g.sum(dim=1) - g.diagonal()).double()  # row sums with the diagonal zeroed
        a = (r / (n - 2) - r.sum() / (2 * (n - 1) * (n - 2))).to(g.dtype)
        return _pack(g, a).mul_((2 / (n * (n - 3))) ** 0.5)
    m = g.mean(dim=1).double()
    a = (m - m.mean() / 2).to(g.dtype)
    diag = g.diagonal() - 2 * a
    return torch.cat([_pack(g, a).mul_(2**0.5), diag]).div_(n - 1)  # off-diagonal pairs count twice


def _finish(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    v = torch.cat(parts) if len(parts) > 1 else parts[0]
    norm = similarity(v, v) ** 0.5
    if not math.isfinite(norm) or norm == 0:  # a constant or diverged representation: no direction
        return torch.full(v.shape, float("nan"), dtype=dtype)
    return (v / norm).to(dtype).cpu()


def signature(
    x: torch.Tensor, unbiased: bool = True, block_size: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unit vector of a representation x (n, ...) such that CKA(x, y) = ``similarity(signature(x), signature(y))``.

    ``block_size=None``: the full-probe estimator; otherwise Nguyen et al.'s minibatch CKA over fixed blocks
    of ~``block_size`` consecutive rows. All NaN for a constant (or non-finite) representation.
    """
    starts = block_starts(len(x), block_size)
    if len(x) < 4 and unbiased:
        raise ConfigError(f"the unbiased HSIC needs at least 4 samples, got {len(x)}")
    parts = [block_vector(centred_gram(x[a:b]), unbiased) for a, b in itertools.pairwise(starts)]
    return _finish(parts, dtype)


def signature_length(n: int, block_size: int | None = None, unbiased: bool = True) -> int:
    """Numbers in one signature (4 bytes each in float32), to size memory before a run."""
    starts = block_starts(n, block_size)
    sizes = [b - a for a, b in itertools.pairwise(starts)]
    tri = sum(m * m // 2 if m % 2 == 0 else m * (m - 1) // 2 for m in sizes)
    return tri if unbiased else tri + n


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """CKA from two signatures: float32 partial dot products of 65,536 numbers, summed in float64."""
    if a.shape != b.shape:
        raise ValueError(
            f"signatures of different shapes {tuple(a.shape)} and {tuple(b.shape)}: they must come from the "
            "same probe size, block_size and estimator"
        )
    total = 0.0
    for s in range(0, len(a), _CHUNK):
        total += float(a[s : s + _CHUNK] @ b[s : s + _CHUNK])
    return total


def cka_matrix(rows: Mapping[str, torch.Tensor], cols: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """CKA between every pair of signatures: layer x layer (``cols=None``), or model A's x model B's layers."""
    square = cols is None
    col_sigs = list((rows if cols is None else cols).values())
    out = torch.empty(len(rows), len(col_sigs), dtype=torch.float64)
    for i, a in enumerate(rows.values()):
        for j, b in enumerate(col_sigs):
            if square and j < i:
                out[i, j] = out[j, i]
            else:
                out[i, j] = similarity(a, b)
    return out


def _gather(x: torch.Tensor, count: torch.Tensor, all_gather: AllGather) -> torch.Tensor:
    """Rows of every rank, concatenated in rank order (shards of unequal length are padded for the collective)."""
    counts = all_gather(count).flatten().tolist()
    pad = max(counts) - len(x)
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    g = all_gather(x)
    return torch.cat([g[r, :c] for r, c in enumerate(counts)])


@dataclass
class LayerData:
    """What ``SignatureAccumulator(keep=True)`` keeps of one layer for a linear probe, whichever is smaller:
    the features (n, D) in probe order, or (exact mode only) their Gram (n, n) after a mean shift."""

    features: torch.Tensor | None = None
    gram: torch.Tensor | None = None


class SignatureAccumulator:
    """Turns one pass over the probe set (several layers' activations, in minibatches) into CKA signatures.

    Call ``update(acts, ids)`` per minibatch (``ids``: probe positions 0..n-1; default: continuing from the
    previous call), then ``finish()``. 4-D activations are average-pooled by ``pool`` (1 = as they are) and
    flattened. With ``keep=True``, ``kept[layer]`` holds the data a linear probe needs afterwards.
    """

    def __init__(
        self,
        n: int,
        unbiased: bool = True,
        block_size: int | None = None,
        pool: int = 1,
        keep: bool = False,
        all_gather: AllGather | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if n < 4:
            raise ConfigError(f"the probe set needs at least 4 images, got n={n}")
        if pool < 1:
            raise ConfigError(f"pool must be an integer >= 1, got {pool}")
        self.n, self.unbiased, self.pool, self.keep, self.dtype = n, unbiased, pool, keep, dtype
        self.block_size, self.all_gather = block_size, all_gather
        self.starts = torch.tensor(block_starts(n, block_size))
        self._reset()

    def _reset(self) -> None:
        self._next = 0
        self._rows: dict[str, dict[int, torch.Tensor]] = {}  # layer -> block -> (size, D) rows
        self._filled: dict[str, dict[int, torch.Tensor]] = {}
        self._parts: dict[str, dict[int, torch.Tensor]] = {}
        self._features: dict[str, torch.Tensor] = {}
        self.kept: dict[str, LayerData] = {}

    def _flat(self, a: torch.Tensor) -> torch.Tensor:
        a = a.detach()
        if self.pool > 1 and a.ndim == 4:
            a = F.avg_pool2d(a.float(), self.pool, ceil_mode=True)
        return a.flatten(1)

    def update(self, acts: Mapping[str, torch.Tensor], ids: torch.Tensor | None = None) -> None:
        """Add one minibatch: ``acts[layer]`` (B, ...) for the probe positions ``ids`` (B,)."""
        if not acts:
            raise ValueError("update() needs at least one layer's activations")
        if ids is None:
            if self.all_gather is not None:
                raise ValueError("with all_gather, update() needs the probe ids of each rank's rows")
            ids = torch.arange(self._next, self._next + len(next(iter(acts.values()))))
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
        self._next = int(ids.max()) + 1 if len(ids) else self._next
        flat = {name: self._flat(a) for name, a in acts.items()}
        for name, a in flat.items():
            if len(a) != len(ids):
                raise ValueError(f"layer {name!r}: {len(a)} rows for {len(ids)} probe ids")
        if self.all_gather is not None:
            count = torch.tensor([len(ids)], device=next(iter(flat.values())).device)
            ids = _gather(ids.to(count.device), count, self.all_gather).cpu()
            flat = {name: _gather(a, count, self.all_gather) for name, a in flat.items()}
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n):
            bad = ids[(ids < 0) | (ids >= self.n)].tolist()
            raise IndexError(f"probe ids must be in [0, {self.n - 1}], got {bad}")
        blocks = torch.searchsorted(self.starts, ids, right=True) - 1
        for name, a in flat.items():
            for blk in blocks.unique().tolist():
                sel = blocks == blk
                self._add_rows(name, blk, ids[sel] - int(self.starts[blk]), a[sel.to(a.device)])

    def _add_rows(self, name: str, blk: int, pos: torch.Tensor, rows: torch.Tensor) -> None:
        if blk in self._parts.get(name, {}):
            return  # a repeat of rows already reduced
        size = int(self.starts[blk + 1] - self.starts[blk])
        buf = self._rows.setdefault(name, {})
        filled = self._filled.setdefault(name, {})
        if blk not in buf:
            dtype = rows.dtype if rows.is_floating_point() else torch.float32
            buf[blk] = rows.new_zeros(size, rows.shape[1], dtype=dtype)
            filled[blk] = torch.zeros(size, dtype=torch.bool)
        elif buf[blk].shape[1] != rows.shape[1]:
            raise ValueError(f"layer {name!r}: {rows.shape[1]} features per image, earlier {buf[blk].shape[1]}")
        buf[blk][pos.to(rows.device)] = rows.to(buf[blk].dtype)
        filled[blk][pos] = True
        if bool(filled[blk].all()):
            x = buf.pop(blk)
            del filled[blk]
            g = centred_gram(x)
            self._parts.setdefault(name, {})[blk] = block_vector(g, self.unbiased)
            if self.keep:
                self._keep(name, blk, x, g)

    def _keep(self, name: str, blk: int, x: torch.Tensor, g: torch.Tensor) -> None:
        if len(self.starts) == 2 and x.shape[1] > self.n:  # exact mode, wide layer: the Gram is smaller
            self.kept[name] = LayerData(gram=g.cpu())
            return
        f = self._features.setdefault(name, x.new_empty(self.n, x.shape[1]))
        f[int(self.starts[blk]) : int(self.starts[blk + 1])] = x
        self.kept[name] = LayerData(features=f)

    def finish(self) -> dict[str, torch.Tensor]:
        """Signatures of all layers fed since the last ``finish``; raises if some probe rows never arrived."""
        missing = {name: sum(int((~f).sum()) for f in blocks.values()) for name, blocks in self._filled.items()}
        if any(missing.values()):
            raise ValueError(f"incomplete probe pass: rows missing per layer {missing} (of n={self.n})")
        out = {}
        for name, parts in self._parts.items():
            if len(parts) != len(self.starts) - 1:
                blocks = len(self.starts) - 1
                raise ValueError(f"incomplete probe pass: layer {name!r} got {len(parts)} of {blocks} blocks")
            out[name] = _finish([parts[i] for i in range(len(parts))], self.dtype)
        kept = self.kept
        self._reset()
        self.kept = kept
        return out


class CKAHistory:
    """Epoch x epoch CKA per layer, filled as epochs arrive (epoch 0 = untrained).

    ``add(epoch, signatures)`` compares each layer's new signature with all its stored earlier ones (one
    float64 matrix per layer, which is all ``matrix``, ``to_previous`` and ``to_final`` read). With
    ``spill_dir`` the signatures are written there (``<layer>/epoch_<k>.pt``) and memory-mapped back when
    compared; under DDP give each rank its own directory. State is plain tensors and lists.
    """

    def __init__(self, spill_dir: str | Path | None = None) -> None:
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.epochs: dict[str, list[int]] = {}
        self.cka: dict[str, torch.Tensor] = {}
        self._sigs: dict[str, list[torch.Tensor | str]] = {}

    def _file(self, layer: str, epoch: int) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / layer.replace("/", "_") / f"epoch_{epoch}.pt"

    def _load(self, layer: str, i: int) -> torch.Tensor:
        s = self._sigs[layer][i]
        if isinstance(s, torch.Tensor):
            return s
        path = Path(s)
        if not path.is_file():
            raise FileNotFoundError(f"CKA signature of layer {layer!r} is missing: {path} (spill_dir deleted?)")
        return torch.load(path, mmap=True, weights_only=True)

    def signature(self, layer: str, epoch: int | None = None) -> torch.Tensor:
        """The stored signature of ``layer`` at ``epoch`` (default: the latest)."""
        i = -1 if epoch is None else self.epochs[layer].index(epoch)
        return self._load(layer, i if i >= 0 else len(self.epochs[layer]) - 1)

    def add(self, epoch: int, signatures: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Store one epoch's signatures; returns ``{layer: CKA to the previous stored epoch}`` (where there is one)."""
        for layer in signatures:
            if self.epochs.get(layer) and epoch <= self.epochs[layer][-1]:
                raise ValueError(f"epoch {epoch} of layer {layer!r} is not after the stored {self.epochs[layer][-1]}")
        out = {}
        for layer, sig in signatures.items():
            e = len(self.epochs.get(layer, []))
            row = torch.tensor([similarity(self._load(layer, i), sig) for i in range(e)], dtype=torch.float64)
            m = torch.full((e + 1, e + 1), float("nan"), dtype=torch.float64)
            if e:
                m[:e, :e] = self.cka[layer]
                m[e, :e] = m[:e, e] = row
                out[layer] = float(row[-1])
            m[e, e] = 1.0 if bool(torch.isfinite(sig).all()) else float("nan")
            self.cka[layer] = m
            self.epochs.setdefault(layer, []).append(epoch)
            if self.spill_dir is None:
                self._sigs.setdefault(layer, []).append(sig.detach().cpu().clone())
            else:
                path = self._file(layer, epoch)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(sig.detach().cpu().clone(), path)
                self._sigs.setdefault(layer, []).append(str(path))
        return out

    def matrix(self, layer: str) -> torch.Tensor:
        """(E, E) float64 CKA between the stored epochs ``self.epochs[layer]`` of one layer."""
        return self.cka[layer].clone()

    def to_previous(self, layer: str) -> list[tuple[int, float]]:
        """(epoch, CKA with epoch - 1) for every stored epoch whose previous epoch is stored too (none across a gap)."""
        m, ep = self.cka[layer], self.epochs[layer]
        return [(ep[i], float(m[i, i - 1])) for i in range(1, len(ep)) if ep[i - 1] == ep[i] - 1]

    def to_final(self, layer: str) -> list[tuple[int, float]]:
        """(epoch, CKA with the latest stored epoch) for every stored epoch: which layers settle first."""
        m, ep = self.cka[layer], self.epochs[layer]
        return [(ep[i], float(m[-1, i])) for i in range(len(ep))]

    @property
    def nbytes(self) -> int:
        """Bytes of signatures held in memory (spilled ones count 0)."""
        held = [s for sigs in self._sigs.values() for s in sigs if isinstance(s, torch.Tensor)]
        return sum(s.numel() * s.element_size() for s in held)

    def state_dict(self) -> dict:
        """Epochs, CKA matrices and the signatures (tensors in memory, file paths when spilled)."""
        return {
            "epochs": {k: list(v) for k, v in self.epochs.items()},
            "cka": dict(self.cka),
            "signatures": {k: list(v) for k, v in self._sigs.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore from ``state_dict``; checks that every layer has one signature per epoch."""
        epochs, cka, sigs = state["epochs"], state["cka"], state["signatures"]
        for layer, ep in epochs.items():
            if len(sigs.get(layer, [])) != len(ep) or tuple(cka[layer].shape) != (len(ep), len(ep)):
                raise ValueError(f"inconsistent CKAHistory state for layer {layer!r}")
        self.epochs = {k: [int(e) for e in v] for k, v in epochs.items()}
        self.cka = {k: v.double() for k, v in cka.items()}
        self._sigs = {k: list(v) for k, v in sigs.items()}
