"""Merging N models of one architecture: plain average, task arithmetic, TIES and the HDRQ merge.

``merge(models, method=...)`` takes N >= 2 quantized models (the quantized-model contract: every quantized
layer a ``QuantLinear`` / ``QuantConv2d`` in the hard-quantized state, ``weight = step * integers``) or N
float models, and returns a new model of the same kind; the inputs are untouched.

What is merged, for every method:

* **Quantized layer weights** are merged from their integers ``q_i = layer.weight_integers()`` and step
  sizes ``s_i = layer.weight_quantizer.step_size()`` (per output channel or per tensor). The merged layer
  lies on the *averaged grid*: step ``S = sum_i w_i s_i`` and integers ``k`` clamped to the grid of the
  layer's bit width, and its float weight is set to ``S * k`` (the hard-quantized state again), so the
  result goes straight into ``hdrq.convert``.
* **Every quantizer step size** (weights' and activations') is the weighted mean ``sum_i w_i s_i`` of the
  models' step sizes, in every method: a task vector of step sizes has no meaning.
* **Other floating parameters** (biases, norm parameters, float layers) follow the method; **floating
  buffers** (BatchNorm running statistics) are averaged in every method (a task vector of a variance can
  turn it negative); non-floating buffers are taken from ``models[0]``.

``w_i`` are ``weights`` normalised to sum to 1 (uniform by default). All arithmetic on weights is done in
float64 and cast back once, so N copies of one model merge to exactly that model.

Methods (``θ_i`` below is model i's dequantized weight ``s_i q_i``, or its float tensor):

* ``"average"``: ``k = clamp(round(sum_i w_i θ_i / S))`` (round half to even); float tensors:
  ``sum_i w_i θ_i``.
* ``"task_arithmetic"`` (Ilharco et al. 2023): ``θ_src + lam * sum_i (θ_i - θ_src)``, then rounded onto the
  averaged grid. ``lam`` defaults to ``1/N``.
* ``"ties"`` (Yadav et al. 2023), per tensor: the deltas ``τ_i = θ_i - θ_src`` are trimmed to their
  ``ceil(k * numel)`` largest magnitudes (entries tied with the smallest kept magnitude are kept too), the
  sign of each element is elected as the sign of ``sum_i trimmed τ_i`` (an element whose sum is exactly 0
  takes the sign of the tensor's total sum, or + if that is 0 too), and the merged delta is the mean of the
  trimmed deltas that agree with the elected sign (0 where none does). Result ``θ_src + lam * delta``,
  ``lam`` defaulting to 1, then rounded onto the averaged grid.
  Both need ``source``: the pre-adaptation model. A float source contributes its float tensors; a quantized
  source contributes its dequantized weights ``s_src * q_src`` and its float tensors (its step sizes are
  not used). A source with unfolded BatchNorm where the models have folded it is rejected: fold it first
  with ``hdrq.quant.fold_batchnorm``.
* ``"hdrq"``: the HDRQ noise-sampling merge (Shin et al., ICML 2025) generalised to N models; see
  :func:`merge_weight`. Float tensors are averaged (they have no grid, so nothing is ambiguous).

Float models (no quantized layers) merge as floats: the FP baseline.

**Merge before converting.** Models already converted by ``hdrq.convert`` (``hdrq.nn.QLinear`` /
``QConv2d`` inside) are refused with a ``ValueError`` that says so: ``hdrq.convert(hdrq.merge(models))``.
A converted model is the deploy form: its integers are packed for one kernel, its step sizes and biases are
buffers rather than parameters (so the methods above could not tell them from running statistics), a
dynamic-input layer has dropped its calibrated input step size and an RTN-converted float layer never had
one. Merging it would take a second implementation of every method on a second representation, for inputs
that always exist in the merge-able form: ``convert`` returns a copy and leaves the fake-quant model
untouched, and a float model is merged as floats before it is converted by RTN.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import sys
import types
import warnings
from dataclasses import asdict, dataclass
from collections.abc import Iterable, Mapping
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops
from .nn import qlayers
from .quant.layers import PACKED, QUANT_LAYERS, float_state_dict, pack_integers, quant_layers
from .quant.quantizer import Quantizer
from .reference import mix_seed, qrange

__all__ = ["merge", "merge_weight", "MergeConfig", "WeightMerge", "filter_candidates", "candidate_noise",
           "ambiguous_mask", "ties_delta", "check_compatible", "METHODS", "RNGS"]

METHODS = ("average", "task_arithmetic", "ties", "hdrq")
RNGS = ("philox", "torch")

# Elements of the [candidates, ambiguous] work buffer of one chunk of candidates (fp32: 256 MiB). The chunk
# size only bounds memory: every candidate's noise comes from its own seed, so results do not depend on it.
CHUNK_ELEMENTS = 1 << 26


# ==================================================================================================
# Configuration
# ==================================================================================================


@dataclass(frozen=True)
class MergeConfig:
    """The options of :func:`merge` (recorded on the merged model as ``model.hdrq_merge["config"]``).

    method: one of ``METHODS``. weights: one per model, normalised to sum to 1 (None: uniform).
    seed: base seed of the HDRQ merge. candidates: noise candidates per layer (HDRQ; the first is always
    accepted). lam: task-arithmetic / TIES scaling (None: 1/N for task arithmetic, 1 for TIES).
    k: fraction of each delta TIES keeps, in (0, 1]. tol: an element is ambiguous when its averaged
    grid position is within ``tol`` steps of a midpoint between two grid points, in [0, 0.5).
    rng: ``"philox"`` (``hdrq.ops.uniform_noise``: the same numbers on every device and backend) or
    ``"torch"`` (a seeded ``torch.Generator`` on the layer's device: faster on CPU, but its numbers differ
    between CPU and CUDA).
    """

    method: str = "hdrq"
    weights: Optional[tuple] = None
    seed: int = 0
    candidates: int = 100
    lam: Optional[float] = None
    k: float = 0.2
    tol: float = 0.25
    rng: str = "philox"

    def validate(self, n_models: int) -> "MergeConfig":
        """Check every field; returns a copy with ``weights`` normalised (a tuple of N floats)."""
        if self.method not in METHODS:
            raise ValueError(f"merge: method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"merge: seed must be an int, got {type(self.seed).__name__}")
        if self.seed < 0:
            raise ValueError(f"merge: seed must be >= 0, got {self.seed}")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 1:
            raise ValueError(f"merge: candidates must be an int >= 1, got {self.candidates!r}")
        if self.lam is not None and not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam)):
            raise ValueError(f"merge: lam must be a finite number or None, got {self.lam!r}")
        if not (isinstance(self.k, (int, float)) and 0.0 < self.k <= 1.0):
            raise ValueError(f"merge: k (the fraction of each delta TIES keeps) must be in (0, 1], got {self.k!r}")
        if not (isinstance(self.tol, (int, float)) and 0.0 <= self.tol < 0.5):
            raise ValueError(f"merge: tol must be in [0, 0.5) (steps from the midpoint), got {self.tol!r}")
        if self.rng not in RNGS:
            raise ValueError(f"merge: rng must be one of {RNGS}, got {self.rng!r}")
        return MergeConfig(**{**asdict(self), "weights": normalise_weights(self.weights, n_models)})


def normalise_weights(weights: Optional[Sequence[float]], n: int) -> tuple:
    """``weights`` (one non-negative finite number per model, positive sum) divided by their sum."""
    if weights is None:
        return tuple([1.0 / n] * n)
    if isinstance(weights, (str, bytes)) or not all(isinstance(x, numbers.Real) and not isinstance(x, bool)
                                                    for x in weights):
        raise TypeError(f"merge: weights must be a list of numbers (one per model), got {weights!r}")
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"merge: weights must have one entry per model ({n}), got {len(w)}")
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"merge: weights must be finite, non-negative and not all zero, got {w}")
    total = math.fsum(w)
    return tuple(x / total for x in w)


# ==================================================================================================
# One weight tensor
# ==================================================================================================


@dataclass
class WeightMerge:
    """The merge of one quantized weight tensor.

    integers: int32, shaped like the weight, on the averaged grid. step: the averaged step size (shape of
    the inputs' steps). ambiguous: how many elements the HDRQ merge sampled (0 for other methods).
    accepted: the candidates the cosine filter accepted, in order (the last one won). cosines: ``[C, N]``
    float64 ``|cos(cand_c - Wq_i, avg - Wq_i)|`` of every candidate (None when nothing was sampled)."""

    integers: Tensor
    step: Tensor
    ambiguous: int = 0
    accepted: Optional[list] = None
    cosines: Optional[Tensor] = None


def _rows(steps: Sequence[Tensor], shape: torch.Size) -> int:
    """How many step sizes the weight has: 1 (per tensor) or ``shape[0]`` (per output channel)."""
    rows = steps[0].numel()
    if rows != 1 and (len(shape) == 0 or rows != shape[0]):
        raise ValueError(f"merge_weight: steps must be one per tensor or one per output channel (dim 0) of "
                         f"the weight {tuple(shape)}, got steps of shape {tuple(steps[0].shape)}")
    return rows


def ambiguous_mask(t: Tensor, tol: float) -> Tensor:
    """True where the grid position ``t`` lies within ``tol`` of a midpoint ``j + 1/2``.

    For two models with equal step sizes ``t = (q_1 + q_2) / 2`` exactly, so for any ``tol < 0.5`` this is
    the HDRQ authors' rule ``q_1 + q_2`` odd."""
    frac = t - torch.floor(t)
    return (frac - 0.5).abs() <= tol


def filter_candidates(cosines: Tensor) -> list:
    """The HDRQ cosine filter over a ``[C, N]`` table of ``|cos|`` per candidate and model.

    Candidate 0 is accepted; each later candidate replaces the current one only if its ``|cos|`` is strictly
    larger for *every* model. Returns the accepted candidates in order (the last one is the result)."""
    table = cosines.detach().to("cpu", torch.float64)
    if table.dim() != 2 or table.shape[0] == 0:
        raise ValueError(f"filter_candidates: expected a [C, N] table with C >= 1, got {tuple(table.shape)}")
    rows = table.tolist()
    accepted = [0]
    for c in range(1, len(rows)):
        best = rows[accepted[-1]]
        if all(x > y for x, y in zip(rows[c], best)):
            accepted.append(c)
    return accepted


def candidate_noise(layer_seed: int, candidate: int, n_models: int, count: int, device, rng: str = "philox") -> Tensor:
    """The noise ``u`` of one HDRQ candidate: fp32 ``[n_models, count]`` in [-0.5, 0.5), one row per model and
    one column per ambiguous element (in row-major order of the weight). Seed ``mix_seed(layer_seed, c)``."""
    seed = mix_seed(layer_seed, candidate)
    if rng == "philox":
        return ops.uniform_noise([n_models, count], seed, device)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.rand((n_models, count), generator=g, device=device).sub_(0.5)


@contextlib.contextmanager
def _ieee_fp32_matmul():
    """fp32 matmuls in full precision: TF32 would blur the small differences between candidates."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


@torch.no_grad()
def merge_weight(integers: Sequence[Tensor], steps: Sequence[Tensor], *, bits: int, weights=None,
                 method: str = "hdrq", seed: int = 0, candidates: int = 100, tol: float = 0.25,
                 rng: str = "philox", chunk_elements: int = CHUNK_ELEMENTS) -> WeightMerge:
    """Merge one quantized weight tensor of N models onto the averaged grid (``"average"`` or ``"hdrq"``).

    integers: N integer tensors of one shape (the signed ``bits``-bit grid); steps: N step-size tensors, one
    per tensor (shape ``[]`` or ``[1]``) or one per output channel (``[shape[0]]``). Runs on the device of
    ``integers[0]``.

    With ``S = sum_i w_i s_i`` (per channel) and the grid position ``t = sum_i w_i s_i q_i / S``:

    * ``"average"``: ``k = clamp(round(t))``.
    * ``"hdrq"``: elements with ``|frac(t) - 1/2| <= tol`` are *ambiguous*; elsewhere ``k = round(t)``.
      Candidate ``c`` draws ``u_i = candidate_noise(seed, c)[i]`` per model on the ambiguous elements, i.e.
      ``n_i = u_i * s_i``, and rounds ``mean_w(Wq_i - n_i) / S = t - nu`` with ``nu = sum_i (w_i s_i / S) u_i``:
      up to ``floor(t) + 1`` when ``nu < t - floor(t) - 1/2`` (fp32), else down to ``floor(t)``. Candidate 0 is
      accepted; a later one replaces the current one when ``|cos(S k_c - Wq_i, avg - Wq_i)|`` (whole
      flattened tensor, ``avg = sum_i w_i Wq_i``) is strictly larger for every model i
      (:func:`filter_candidates`). For N = 2 with equal step sizes this is the authors' merge.

    All candidates are scored in a batch: on ambiguous elements a candidate only chooses between two
    integers, so each model's dot product and squared norm are a fixed part plus ``b_c @ coeff`` for the
    candidate's 0/1 choice vector ``b_c``: chunks of candidates become one matmul, with one host sync per
    layer (to run the sequential filter on the ``[C, N]`` table)."""
    n = len(integers)
    if n < 2 or len(steps) != n:
        raise ValueError(f"merge_weight: need N >= 2 integer tensors and as many steps, got {n} and {len(steps)}")
    if method not in ("average", "hdrq"):
        raise ValueError(f"merge_weight: method must be 'average' or 'hdrq', got {method!r}")
    if rng not in RNGS:
        raise ValueError(f"merge_weight: rng must be one of {RNGS}, got {rng!r}")
    if not 0.0 <= tol < 0.5:
        raise ValueError(f"merge_weight: tol must be in [0, 0.5), got {tol!r}")
    ops._check_bits(bits)
    shape = integers[0].shape
    for i, (q, s) in enumerate(zip(integers, steps)):
        if q.shape != shape or s.shape != steps[0].shape:
            raise ValueError(f"merge_weight: model {i} has integers {tuple(q.shape)} and steps {tuple(s.shape)}, "
                             f"model 0 has {tuple(shape)} and {tuple(steps[0].shape)}")
    w = normalise_weights(weights, n)
    qmin, qmax = qrange(bits, True)
    device = integers[0].device
    rows = _rows(steps, shape)

    # Everything per element in float64: then q_1 + q_2 odd gives t exactly at a midpoint, and identical
    # models give t exactly integer and S exactly their step.
    s = [st.detach().reshape(rows, 1).to(device, torch.float64) for st in steps]  # [rows, 1] each
    q = [qi.detach().reshape(rows, -1).to(device, torch.float64) for qi in integers]  # [rows, K] each
    S = sum(wi * si for wi, si in zip(w, s))
    avg = sum(wi * si * qi for wi, si, qi in zip(w, s, q))  # the weighted average of the dequantized weights
    t = avg / S
    step_out = S.reshape(steps[0].shape).to(steps[0].dtype)

    def result(k: Tensor, **info) -> WeightMerge:
        return WeightMerge(k.clamp_(qmin, qmax).to(torch.int32).reshape(shape), step_out, **info)

    mask = ambiguous_mask(t, tol) if method == "hdrq" else None
    n_amb = int(mask.sum()) if mask is not None else 0  # host sync: sizes the candidate buffers
    if n_amb == 0:
        return result(torch.round(t))

    lo = torch.floor(t)
    k0 = torch.where(mask, lo, torch.round(t)).clamp_(qmin, qmax)  # every ambiguous element rounded down
    flat = mask.reshape(-1).nonzero().squeeze(1)
    row_of = flat // t.shape[1]
    S_amb = S.reshape(-1)[row_of]  # [A] float64
    # A candidate rounds element j up iff nu_j < theta_j; we accumulate nu - theta and test its sign.
    neg_theta = (0.5 - (t - lo).reshape(-1)[flat]).to(torch.float32)
    gamma = [(wi * si.reshape(-1) / S.reshape(-1))[row_of].to(torch.float32) for wi, si in zip(w, s)]

    # Per model i, with d0_i = S k0 - Wq_i and a_i = avg - Wq_i: the candidate that sets b (0/1) on the
    # ambiguous elements has dot_i = D0_i + b @ (S a_i) and |d_i|^2 = N0_i + b @ (S (2 d0_i + S)).
    D0, N0, A2 = [], [], []
    coeff = torch.empty((n_amb, 2 * n), dtype=torch.float32, device=device)
    for i in range(n):
        wq = s[i] * q[i]
        a = avg - wq
        d0 = S * k0 - wq
        D0.append((d0 * a).sum())
        N0.append((d0 * d0).sum())
        A2.append((a * a).sum())
        coeff[:, i] = S_amb * a.reshape(-1)[flat]
        coeff[:, n + i] = S_amb * (2.0 * d0.reshape(-1)[flat] + S_amb)
    del q, avg, a, d0, wq

    def choices(c: int, out: Tensor) -> Tensor:
        """Candidate c's 0/1 rounding choices written into ``out`` (fp32 [A])."""
        u = candidate_noise(seed, c, n, n_amb, device, rng)
        torch.addcmul(neg_theta, u[0], gamma[0], out=out)
        for i in range(1, n):
            out.addcmul_(u[i], gamma[i])
        return out.lt_(0)  # 1.0 where nu < theta: round up

    chunk = max(1, min(candidates, chunk_elements // n_amb))
    buf = torch.empty((chunk, n_amb), dtype=torch.float32, device=device)
    sums = torch.empty((candidates, 2 * n), dtype=torch.float32, device=device)
    with _ieee_fp32_matmul():
        for start in range(0, candidates, chunk):
            cc = min(chunk, candidates - start)
            for j in range(cc):
                choices(start + j, buf[j])
            torch.mm(buf[:cc], coeff, out=sums[start:start + cc])
    sums = sums.to("cpu", torch.float64)  # the one host sync of the candidate loop
    D0, N0, A2 = torch.stack(D0 + N0 + A2).cpu().reshape(3, n)
    dot = D0 + sums[:, :n]
    nrm = N0 + sums[:, n:]
    denom = (A2 * nrm.clamp_min(0)).sqrt()
    cos = torch.where(denom > 0, dot.abs() / denom.clamp_min(1e-300), torch.zeros_like(dot))
    accepted = filter_candidates(cos)

    k = k0.reshape(-1)
    k[flat] += choices(accepted[-1], buf[0]).to(torch.float64)
    return result(k, ambiguous=n_amb, accepted=accepted, cosines=cos)


# ==================================================================================================
# Float tensors: average, task arithmetic, TIES
# ==================================================================================================


def _weighted_mean(tensors: Sequence[Tensor], w: Sequence[float]) -> Tensor:
    return sum(wi * x.double() for wi, x in zip(w, tensors))


def ties_delta(deltas: Sequence[Tensor], k: float) -> Tensor:
    """TIES-merging of task vectors of one tensor (float64): trim, elect sign, disjoint mean.

    Each delta keeps its entries whose magnitude is at least its ``ceil(k * numel)``-th largest magnitude;
    the elected sign of an element is the sign of the sum of the trimmed deltas (the tensor's total sum
    breaks exact zeros, + if that is 0 too); the result is the mean of the trimmed entries that are nonzero
    and agree with the elected sign (0 where none does)."""
    trimmed = []
    for d in deltas:
        d = d.double()
        flat = d.reshape(-1).abs()
        keep = max(1, math.ceil(k * flat.numel()))
        if keep < flat.numel():
            thresh = torch.kthvalue(flat, flat.numel() - keep + 1).values
            d = torch.where(d.abs() >= thresh, d, torch.zeros_like(d))
        trimmed.append(d)
    stacked = torch.stack(trimmed)
    total = stacked.sum(0)
    sign = torch.sign(total)
    majority = 1.0 if float(total.sum()) >= 0 else -1.0
    sign = torch.where(sign == 0, torch.full_like(sign, majority), sign)
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0).clamp_min(1)
    return torch.where(agree, stacked, torch.zeros_like(stacked)).sum(0) / count


def _merge_float(tensors: Sequence[Tensor], cfg: MergeConfig, src: Optional[Tensor]) -> Tensor:
    """One float tensor of the N models under ``cfg.method`` (float64)."""
    if cfg.method in ("average", "hdrq") or src is None:
        return _weighted_mean(tensors, cfg.weights)
    src = src.double()
    deltas = [x.double() - src for x in tensors]
    if cfg.method == "task_arithmetic":
        lam = 1.0 / len(tensors) if cfg.lam is None else cfg.lam
        return src + lam * sum(deltas)
    lam = 1.0 if cfg.lam is None else cfg.lam
    return src + lam * ties_delta(deltas, cfg.k)


# ==================================================================================================
# Validation
# ==================================================================================================


def _quantizer_signature(q: Quantizer) -> dict:
    return {"bits": q.bits, "signed": q.signed, "axis": q.axis, "mode": q.mode}


def check_compatible(models: Sequence[nn.Module], *, what: str = "merge", require_hard: bool = True) -> None:
    """Raise naming the first difference between ``models[0]`` and another model: ``TypeError`` for a
    non-module, ``ValueError`` for fewer than 2 models, a converted (deploy) model (merge and compare the
    fake-quant models: see the module docstring), a different architecture (module names and types),
    quantizer bit widths / signedness / axes / modes, or state-dict names, shapes, dtypes and devices without
    values ("meta"). With ``require_hard``, every quantized layer must be in the hard-quantized state."""
    if len(models) < 2:
        raise ValueError(f"{what}: need at least 2 models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{what}: model {i} is a {type(m).__name__}, not an nn.Module")
    for i, m in enumerate(models):
        converted = next(qlayers(m), None)
        if converted is not None:
            raise ValueError(f"{what}: model {i} is already converted for deployment (layer {converted[0]!r} is a "
                             f"hdrq.nn.{type(converted[1]).__name__}); {what} takes the fake-quant models that "
                             f"hdrq.quantize returns: " + ("merge first, then convert: hdrq.convert(hdrq.merge("
                             "models))" if what == "merge" else "pass the models as they were before hdrq.convert"))
        meta = next((k for k, t in m.state_dict().items() if t.is_meta), None)
        if meta is not None:
            raise ValueError(f"{what}: model {i} has tensors on the meta device (e.g. {meta!r}), which hold no values")
    ref_modules = [(n, type(m)) for n, m in models[0].named_modules()]
    for i, m in enumerate(models[1:], 1):
        def fail(detail: str):
            raise ValueError(f"{what}: model {i} does not match model 0: {detail}")

        mods = [(n, type(x)) for n, x in m.named_modules()]
        if mods != ref_modules:
            for (n0, t0), (n1, t1) in zip(ref_modules, mods):
                if n0 != n1:
                    fail(f"a different architecture: module {n1!r} where model 0 has {n0!r} ({len(mods)} modules "
                         f"vs {len(ref_modules)})")
                if t0 is not t1:
                    fail(f"a different architecture: module {n0!r} is a {t1.__name__}, model 0's is a {t0.__name__}")
            extra = (mods if len(mods) > len(ref_modules) else ref_modules)[min(len(mods), len(ref_modules)):]
            more = f", and {len(extra) - 1} more after it" if len(extra) > 1 else ""
            fail(f"a different architecture: module {extra[0][0]!r} is in only one of them (a "
                 f"{extra[0][1].__name__}{more}): model {i} has {len(mods)} modules, model 0 {len(ref_modules)}")
        for (n0, m0), (_, m1) in zip(models[0].named_modules(), m.named_modules()):
            if isinstance(m0, Quantizer):
                a, b = _quantizer_signature(m0), _quantizer_signature(m1)
                for key in a:
                    if a[key] != b[key]:
                        fail(f"quantizer {n0!r} has {key}={b[key]!r}, model 0's has {key}={a[key]!r}")
        # compared as floats: a layer holding its integers packed (QuantLayer.compact) is the same model
        ref_sd, sd = float_state_dict(models[0]), float_state_dict(m)
        for key, v0 in ref_sd.items():
            if key not in sd:
                fail(f"it has no tensor {key!r}")
            v1 = sd[key]
            if v1.shape != v0.shape or v1.dtype != v0.dtype:
                fail(f"tensor {key!r} is {v1.dtype} {tuple(v1.shape)}, model 0's is {v0.dtype} {tuple(v0.shape)}")
        for key in sd:
            if key not in ref_sd:
                fail(f"it has a tensor {key!r} that model 0 lacks")
    if require_hard:
        for i, m in enumerate(models):
            for name, layer in quant_layers(m):
                wq = layer.weight_quantizer
                if wq.mode != "hard" or wq.rounding is not None:
                    raise ValueError(f"{what}: model {i} layer {name!r} is not in the hard-quantized state "
                                     f"(weight quantizer mode={wq.mode!r}, rounding hook "
                                     f"{'set' if wq.rounding is not None else 'None'}); finish calibration first")
                if wq.axis not in (0, None):
                    raise ValueError(f"{what}: layer {name!r} quantizes weights along axis {wq.axis}; "
                                     f"only per-output-channel (axis=0) or per-tensor (None) weights can merge")


def _check_source(source: nn.Module, model: nn.Module, method: str) -> dict:
    """The source's state dict, after checking it can serve as the task-vector origin of ``model``."""
    if not isinstance(source, nn.Module):
        raise TypeError(f"merge: source must be an nn.Module, got {type(source).__name__}")
    src_modules = dict(source.named_modules())
    for name, m in model.named_modules():
        sm = src_modules.get(name)
        if isinstance(m, nn.Identity) and isinstance(sm, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"merge: the source has BatchNorm {name!r} where the models have it folded; pass "
                             f"hdrq.quant.fold_batchnorm(source) as the source")
        if isinstance(m, QUANT_LAYERS) and not isinstance(sm, (nn.Linear, nn.Conv2d) + QUANT_LAYERS):
            raise ValueError(f"merge: {method} needs the source's layer {name!r} (a Linear or Conv2d, float or "
                             f"quantized), found {type(sm).__name__ if sm is not None else 'nothing'}")
    sd = float_state_dict(source)
    quantizers = {name for name, m in source.named_modules() if isinstance(m, Quantizer)}
    extra = sorted(k for k in set(sd) - set(float_state_dict(model)) if k.rpartition(".")[0] not in quantizers)
    if extra:
        raise ValueError(f"merge: the source is not the models' architecture: it has tensors the models lack "
                         f"{extra[:8]}")
    for name, layer in quant_layers(source):  # a quantized source contributes its dequantized weights
        sd[f"{name}.weight"] = (_bcast_step(layer.weight_quantizer.step_size().detach(), layer.weight)
                                * layer.weight_integers().to(layer.weight.dtype))
    return sd


def _bcast_step(step: Tensor, weight: Tensor) -> Tensor:
    return step.reshape(-1, *([1] * (weight.dim() - 1))) if step.numel() > 1 else step.reshape(())


# ==================================================================================================
# Models
# ==================================================================================================


@torch.no_grad()
def merge(models: Iterable[nn.Module], *, method: str = "hdrq", source: Optional[nn.Module] = None,
          weights: Optional[Sequence[float]] = None, seed: int = 0, candidates: int = 100,
          lam: Optional[float] = None, k: float = 0.2, tol: float = 0.25, rng: str = "philox",
          verbose: bool = True) -> nn.Module:
    """Merge N >= 2 models of one architecture into a new model (see the module docstring for what each
    method does to each tensor). Quantized models stay quantized (every quantized layer on the averaged
    grid, ``weight = step * integers``); float models merge as floats.

    method: ``"hdrq"`` (default), ``"average"``, ``"task_arithmetic"`` or ``"ties"``. source: the
    pre-adaptation model (required by task_arithmetic and ties). weights: per-model weights of the averages
    (uniform by default). seed, candidates, tol, rng: the HDRQ merge (:func:`merge_weight`); layer ``l`` (in
    ``quant_layers`` order) uses seed ``mix_seed(seed, l)``. lam, k: task arithmetic / TIES.

    The merged model carries ``hdrq_merge = {"config": ..., "layers": {name: {"ambiguous", "accepted"}}}``
    and, like a deep copy of ``models[0]``, its other attributes (e.g. ``hdrq_config``)."""
    models = _as_model_list(models)
    cfg = MergeConfig(method=method, weights=None if weights is None else tuple(weights), seed=seed,
                      candidates=candidates, lam=lam, k=k, tol=tol, rng=rng).validate(len(models))
    check_compatible(models)
    if method in ("task_arithmetic", "ties"):
        if source is None:
            raise ValueError(f"merge: method {method!r} needs source= (the pre-adaptation model the task vectors "
                             f"are taken against)")
        src_sd = _check_source(source, models[0], method)
    else:
        if source is not None:
            warnings.warn(f"merge: source is only used by task_arithmetic and ties; method {method!r} ignores it",
                          UserWarning, stacklevel=2)
        src_sd = {}

    merged = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    device = next((v.device for v in sds[0].values()), torch.device("cpu"))
    new_sd: dict = {}
    stats: dict = {}

    def put(key: str, value: Tensor) -> None:
        ref = sds[0][key]
        new_sd[key] = value.to(ref.device, ref.dtype).reshape(ref.shape)

    def gather(key: str) -> list:
        return [sd[key].to(device) for sd in sds]

    # 1. every quantizer's step size: the weighted mean of the models' step sizes
    quantizer_names = [n for n, m in models[0].named_modules() if isinstance(m, Quantizer)]
    for qname in quantizer_names:
        steps = [m.get_submodule(qname).step_size().detach().to(device) for m in models]
        put(f"{qname}.scale", _weighted_mean(steps, cfg.weights))

    # 2. quantized layer weights, onto the averaged grid
    layers = [name for name, _ in quant_layers(models[0])]
    for idx, name in enumerate(_progress(layers, verbose, f"merge ({method})")):
        mods = [m.get_submodule(name) for m in models]
        wq = mods[0].weight_quantizer
        ints = [m.weight_integers().to(device) for m in mods]
        steps = [m.weight_quantizer.step_size().detach().to(device) for m in mods]
        if method in ("average", "hdrq"):
            res = merge_weight(ints, steps, bits=wq.bits, weights=cfg.weights, method=method,
                               seed=mix_seed(cfg.seed, idx), candidates=cfg.candidates, tol=cfg.tol, rng=cfg.rng)
        else:
            src = src_sd.get(f"{name}.weight")
            if src is None or src.shape != ints[0].shape:
                raise ValueError(f"merge: the source's {name!r} weight is "
                                 f"{'missing' if src is None else tuple(src.shape)}, the models' is "
                                 f"{tuple(ints[0].shape)}")
            deq = [_bcast_step(st.double(), qi) * qi.double() for st, qi in zip(steps, ints)]
            target = _merge_float(deq, cfg, src.to(device))
            step = _weighted_mean(steps, cfg.weights)
            qmin, qmax = qrange(wq.bits, True)
            k_int = torch.round(target / _bcast_step(step, target)).clamp_(qmin, qmax)
            res = WeightMerge(k_int.to(torch.int32), step.to(steps[0].dtype).reshape(steps[0].shape))
        put(f"{name}.weight_quantizer.scale", res.step)
        if mods[0].is_compact:  # stored as packed integers, like the models
            put(f"{name}.{PACKED}", pack_integers(res.integers, mods[0]._packed_bits))
        else:
            step = _bcast_step(res.step.to(torch.float32), res.integers)
            put(f"{name}.weight", step * res.integers.to(torch.float32))
        stats[name] = {"ambiguous": res.ambiguous, "accepted": res.accepted}
        if getattr(mods[0], "smooth", None) is not None:
            # The integers of each model are those of W * smooth: they can only be merged on a common basis.
            if not all(m.smooth is not None and torch.equal(m.smooth, mods[0].smooth) for m in mods):
                raise ValueError(f"merge: layer {name!r} has different SmoothQuant factors in the models; build "
                                 f"every copy with the same ones: hdrq.quantize(..., smooth="
                                 f"hdrq.calib.smooth_factors(first_copy))")
            new_sd[f"{name}.smooth"] = sds[0][f"{name}.smooth"].clone()

    # A weight registered under a second name (an embedding tied to a quantized layer) takes that layer's value.
    merged_at = {sds[0][f"{n}.weight"].data_ptr(): f"{n}.weight" for n in layers if f"{n}.weight" in sds[0]}
    for key, v0 in sds[0].items():
        if key not in new_sd and v0.is_floating_point() and v0.data_ptr() in merged_at:
            other = merged_at[v0.data_ptr()]
            if sds[0][other].shape == v0.shape:
                new_sd[key] = new_sd[other]

    # 3. everything else: float parameters by the method, float buffers averaged, the rest from model 0
    params = {n for n, _ in models[0].named_parameters(remove_duplicate=False)}
    for key, v0 in sds[0].items():
        if key in new_sd:
            continue
        if not v0.is_floating_point():
            new_sd[key] = v0.clone()
            continue
        src = None
        if key in params and method in ("task_arithmetic", "ties"):
            src = src_sd.get(key)
            if src is None or src.shape != v0.shape:
                raise ValueError(f"merge: {method} needs the source's {key!r} {tuple(v0.shape)}, the source "
                                 f"{'lacks it' if src is None else f'has {tuple(src.shape)}'}")
            src = src.to(device)
        put(key, _merge_float(gather(key), cfg, src))

    merged.load_state_dict(new_sd)
    merged.hdrq_merge = {"config": asdict(cfg), "layers": stats}
    return merged


def _as_model_list(models) -> list:
    """``models`` (a list, tuple or other iterable of modules) as a list; a clear error for anything else."""
    if isinstance(models, nn.Module):
        raise TypeError(f"merge takes a list of models, got a single {type(models).__name__}: "
                        f"hdrq.merge([model_a, model_b, ...])")
    if isinstance(models, (str, bytes, Mapping)) or not isinstance(models, Iterable):
        raise TypeError(f"merge takes a list of models (nn.Module), got {type(models).__name__}"
                        + (": pass list(models.values())" if isinstance(models, Mapping) else ""))
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"merge: need at least 2 models, got {len(models)}")
    return models


def _progress(items: list, verbose: bool, desc: str):
    if not verbose or not items:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


class _CallableModule(types.ModuleType):
    """``hdrq.merge`` names both this module and its function :func:`merge` (DESIGN §4). Importing the
    submodule makes Python bind the package attribute ``hdrq.merge`` to the module, so the module forwards
    calls to the function: ``hdrq.merge(models, ...)`` works whichever of the two the name holds."""

    def __call__(self, *args, **kwargs):
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
