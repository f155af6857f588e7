"""``QuantConfig``: every knob of one calibration run, with per-method presets carrying published defaults.

Method-dependent fields default to ``None`` and are filled from the method's preset in ``__post_init__``,
so ``QuantConfig(method="qdrop")``, ``QuantConfig.preset("qdrop")`` and
``QuantConfig(**asdict(QuantConfig(method="qdrop")))`` are the same config, and any field given
explicitly overrides the preset. Where the defaults come from:

* BRECQ (Li et al. 2021) and QDrop (Wei et al. 2022) reference code: AdaRound with the rectified sigmoid
  (zeta 1.1, gamma -0.1), rounding regulariser weight 0.01 with beta annealed 20 -> 2 after a 20 % warm-up,
  Adam at its default lr 1e-3 for the rounding variables, 20,000 iterations per block; BRECQ learns
  activation step sizes in a second stage (5,000 iterations, LSQ with Adam 4e-4 and an Lp reconstruction
  loss with p = 2.4); QDrop learns them jointly (LSQ, Adam 4e-5, cosine decay) and drops quantization with
  probability 0.5.
* HDRQ (Shin et al., ICML 2025) reference code: continuous weights and weight step sizes learned with Adam
  lr 1e-4, linear warm-up over the first 20 % (from 1e-3 x lr) then cosine; noise quantization for the
  first 80 % of iterations (noise drawn from the 256-bin histogram of the actual rounding errors), then
  hard rounding; distance term 5e-2 x sum of Frobenius norms to the source weights; per-tensor weight
  step sizes; QDrop's drop probability 0.5.

Every method quantizes activations where the authors' code (QDrop's convention) does: ``act_placement =
"output"``, see :class:`QuantConfig`. The presets use batch 32 per iteration (QDrop's and BRECQ's papers);
:meth:`QuantConfig.authors` gives the HDRQ authors' protocol on top of a preset: one calibration sample per
iteration and per-tensor weight step sizes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

METHODS = ("rtn", "brecq", "qdrop", "hdrq")
GRANULARITIES = ("tensor", "channel")
ACT_GRANULARITIES = ("tensor", "token")
NOISE_MODES = ("uniform", "histogram")
ACT_PLACEMENTS = ("output", "input")
CONFIG_VERSION = 1
# Default cap on the calibration samples taken from ``calib_data`` (an endless iterable stops there).
MAX_CALIB_SAMPLES = 4096

# Per-method values of the fields that default to None.
PRESETS: dict[str, dict[str, Any]] = {
    "rtn": dict(iters=0, act_iters=0, w_lr=0.0, a_lr=0.0, drop_prob=0.0, noise_fraction=0.0, lambda_dist=0.0),
    "brecq": dict(iters=20000, act_iters=5000, w_lr=1e-3, a_lr=4e-4, act_loss_p=2.4, drop_prob=0.0,
                  noise_fraction=0.0, lambda_dist=0.0),
    "qdrop": dict(iters=20000, act_iters=0, w_lr=1e-3, a_lr=4e-5, drop_prob=0.5, noise_fraction=0.0,
                  lambda_dist=0.0),
    "hdrq": dict(iters=20000, act_iters=0, w_lr=1e-4, a_lr=4e-5, drop_prob=0.5, noise_fraction=0.8,
                 lambda_dist=5e-2),
}
# Fields every method shares unless set: the authors' activation placement, the plain squared error.
COMMON_DEFAULTS: dict[str, Any] = dict(act_placement="output", act_loss_p=2.0)
# The HDRQ authors' protocol on top of a method preset (QuantConfig.authors): one image per reconstruction
# iteration (batch 1 out of the calibration samples) and one weight step size per layer.
AUTHORS_SETTINGS: dict[str, Any] = dict(calib_batch_size=1, granularity="tensor", act_placement="output",
                                        first_last_bits=8)
# Transformers (QuantConfig.transformer): what W8A8 / W6A6 deployments of transformers run. One weight step size
# per output channel; each token's activations quantized with its own step size at run time (per-token dynamic,
# as ``hdrq.convert`` deploys them); every layer at the same width (no 8-bit first / last layer); the
# per-channel outlier scales of each linear layer's input migrated into its weight (SmoothQuant, alpha 0.5).
TRANSFORMER_SETTINGS: dict[str, Any] = dict(granularity="channel", act_granularity="token", first_last_bits=None,
                                            smooth_alpha=0.5)


@dataclass
class QuantConfig:
    """Configuration of :func:`hdrq.quantize`.

    Fields left ``None`` take the method's published default (see the module docstring and ``PRESETS``).

    Attributes:
        method: "rtn" (observers only), "brecq", "qdrop" or "hdrq".
        w_bits / a_bits: weight and activation bits (2 to 8); ``a_bits=None`` leaves activations float.
        granularity: weight step sizes "tensor" (one per layer, as the HDRQ authors' code) or "channel"
            (one per output channel).
        act_granularity: input step sizes of ``nn.Linear`` layers: "tensor" (one calibrated step size per
            layer, learned by LSQ in brecq / qdrop / hdrq) or "token" (each token, i.e. each row of the last
            dimension, takes ``absmax / qmax`` at run time on the symmetric signed grid: the per-token dynamic
            quantization ``hdrq.convert`` deploys, simulated exactly during calibration; nothing to learn).
            ``nn.Conv2d`` layers and block boundaries always use "tensor".
        smooth_alpha: None, or SmoothQuant's migration strength in [0, 1]: each ``nn.Linear`` divides its
            input by ``m = max|x_j|^alpha / max|W_j|^(1 - alpha)`` per input channel ``j`` (the maxima over the
            calibration data and over the weight column) and multiplies its weight columns by ``m``: the same
            function, with activation outliers moved into the weight, where per-channel steps absorb them.
        first_last_bits: weight and input-activation bits of the first and the last quantized layer (in
            execution order); None means the same as the others.
        iters: reconstruction iterations per block (for brecq: the weight-rounding stage).
        act_iters: brecq only: iterations of the second stage, which learns activation step sizes.
        calib_batch_size: samples per iteration (and per forward pass while caching).
        w_lr: Adam lr of the weight variables (AdaRound's rounding variables; HDRQ's weights and weight
            step sizes). a_lr: Adam lr of the activation step sizes (cosine decay to 0).
        warmup: share of iterations before AdaRound's rounding regulariser starts, and of HDRQ's linear lr
            warm-up.
        round_reg_weight / round_beta: AdaRound's regulariser weight and the (start, end) of its annealed
            exponent.
        drop_prob: QDrop's probability of keeping an activation element (and a block-input element) full
            precision during reconstruction; 0 disables dropping.
        noise_mode: "uniform" or "histogram" noise for HDRQ's noise quantization.
        act_placement: where activations are quantized. ``"output"`` (the authors' and QDrop's convention):
            each activation once, where it is produced: the output of a layer after its activation function
            (as the input of the layer that consumes it), and each residual block's output after the add, so
            the residual stream itself is quantized (the block's ``block_output_quantizer``; a block whose input
            is not a quantized block output also gets a ``block_input_quantizer``); the network's input is not
            quantized, and a layer reading a quantized block boundary takes that quantizer's grid (its own
            input quantizer mirrors it). Transformer blocks keep one input quantizer per layer, as the authors
            quantize transformer layers. ``"input"``: every layer quantizes its own input, the shortcut stays
            float and the network input is quantized: an easier problem than the paper's.
        act_loss_p: brecq only: the p of the Lp reconstruction loss in the activation stage (BRECQ: 2.4);
            every other stage minimises the squared error.
        noise_fraction: share of HDRQ's iterations with noise quantization (the first
            ``round(noise_fraction * iters)``); the rest use hard rounding with the straight-through estimator.
        lambda_dist: weight of HDRQ's distance term ``sum_l ||W_l - W_l_source||_F``.
        observer_p: the p of the Lp-error (MSE) observers that set the initial step sizes.
        blocks: module names to reconstruct as blocks (overrides the automatic detection; layers outside
            them become single-layer blocks).
        seed: seeds batch sampling, drop masks and the per-layer quantizer noise streams.
        device: where calibration runs (None: the model's device). Checked when the config is made (a
            device string torch knows, not "meta") and again when ``hdrq.quantize`` starts (present on this
            machine), so a config written on a GPU machine can still be read on one without.
        cache_device: where cached block inputs/targets live: None (the device when they fit in half its
            free memory, else CPU, streamed per batch), or an explicit device such as "cpu".
        max_calib_samples: at most this many calibration samples are taken from ``calib_data`` (the
            first ones; a warning says when there were more); None takes them all, which never ends on an
            endless iterable.
        verbose: progress bars (tqdm) for every pass of :func:`hdrq.quantize`: the observation pass, each
            block's caching passes and its reconstruction (showing the loss); False silences them all.
        stream: stream the model through the calibration device block by block (``hdrq.calib.stream``):
            None (default) streams models whose blocks form a chain and calibrates any other model whole;
            True streams or says why it cannot (a warning) and calibrates whole; False never streams. The
            result is the same either way.
    """

    method: str = "hdrq"
    w_bits: int = 4
    a_bits: Optional[int] = 4
    granularity: str = "tensor"
    act_granularity: str = "tensor"
    smooth_alpha: Optional[float] = None
    first_last_bits: Optional[int] = 8
    iters: Optional[int] = None
    act_iters: Optional[int] = None
    calib_batch_size: int = 32
    w_lr: Optional[float] = None
    a_lr: Optional[float] = None
    warmup: float = 0.2
    round_reg_weight: float = 0.01
    round_beta: tuple[float, float] = (20.0, 2.0)
    drop_prob: Optional[float] = None
    noise_mode: str = "histogram"
    act_placement: Optional[str] = None
    act_loss_p: Optional[float] = None
    noise_fraction: Optional[float] = None
    lambda_dist: Optional[float] = None
    observer_p: float = 2.4
    blocks: Optional[list[str]] = None
    seed: int = 0
    device: Optional[str] = None
    cache_device: Optional[str] = None
    max_calib_samples: Optional[int] = MAX_CALIB_SAMPLES
    verbose: bool = True
    stream: Optional[bool] = None
    version: int = CONFIG_VERSION

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, method: str, **overrides) -> "QuantConfig":
        """The published defaults of ``method``, with ``overrides`` applied (any field)."""
        return cls(method=method, **overrides)

    @classmethod
    def authors(cls, method: str, **overrides) -> "QuantConfig":
        """The HDRQ authors' protocol for ``method`` (their code runs every method this way): the method's
        preset with one calibration sample per iteration, per-tensor weight step sizes, the "output"
        activation placement and 8-bit first and last layers; ``overrides`` on top."""
        return cls(method=method, **{**AUTHORS_SETTINGS, **overrides})

    @classmethod
    def transformer(cls, method: str, **overrides) -> "QuantConfig":
        """``method``'s preset with the settings transformer deployments use (``TRANSFORMER_SETTINGS``):
        per-output-channel weight steps, per-token dynamic activations, SmoothQuant (alpha 0.5), every layer
        at ``w_bits`` / ``a_bits``; ``overrides`` on top."""
        return cls(method=method, **{**TRANSFORMER_SETTINGS, **overrides})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig: method must be one of {METHODS}, got {self.method!r}")
        for name, value in {**COMMON_DEFAULTS, **PRESETS[self.method]}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if isinstance(self.blocks, str):
            raise TypeError(f"QuantConfig: blocks must be a list of module names, got the string {self.blocks!r} "
                            f"(write blocks=[{self.blocks!r}])")
        if self.blocks is not None and not isinstance(self.blocks, (list, tuple)):
            raise TypeError(f"QuantConfig: blocks must be a list of module names or None, got {self.blocks!r}")
        if self.blocks is not None:
            self.blocks = list(self.blocks)
        if not isinstance(self.round_beta, (tuple, list)) or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.round_beta):
            raise ValueError(f"QuantConfig: round_beta must be two positive numbers (start, end), "
                             f"got {self.round_beta!r}")
        self.round_beta = tuple(float(b) for b in self.round_beta)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if self.version != CONFIG_VERSION:
            raise ValueError(f"QuantConfig: version {self.version!r} is not supported (this is version "
                             f"{CONFIG_VERSION})")
        _bits("w_bits", self.w_bits)
        if self.a_bits is not None:
            _bits("a_bits", self.a_bits)
        if self.first_last_bits is not None:
            _bits("first_last_bits", self.first_last_bits)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantConfig: granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"QuantConfig: act_granularity must be one of {ACT_GRANULARITIES}, got "
                             f"{self.act_granularity!r}")
        if self.smooth_alpha is not None and (isinstance(self.smooth_alpha, bool)
                                              or not isinstance(self.smooth_alpha, (int, float))
                                              or not 0.0 <= self.smooth_alpha <= 1.0):
            raise ValueError(f"QuantConfig: smooth_alpha must be None or in [0, 1], got {self.smooth_alpha!r}")
        if self.act_placement not in ACT_PLACEMENTS:
            raise ValueError(f"QuantConfig: act_placement must be one of {ACT_PLACEMENTS}, got {self.act_placement!r}")
        if isinstance(self.act_loss_p, bool) or not isinstance(self.act_loss_p, (int, float)) \
                or not 0 < self.act_loss_p < math.inf:
            raise ValueError(f"QuantConfig: act_loss_p must be a finite number > 0, got {self.act_loss_p!r}")
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"QuantConfig: noise_mode must be one of {NOISE_MODES}, got {self.noise_mode!r}")
        for name in ("iters", "act_iters", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"QuantConfig: {name} must be a non-negative int, got {v!r}")
        if isinstance(self.calib_batch_size, bool) or not isinstance(self.calib_batch_size, int) \
                or self.calib_batch_size < 1:
            raise ValueError(f"QuantConfig: calib_batch_size must be a positive int, got {self.calib_batch_size!r}")
        for name in ("w_lr", "a_lr", "lambda_dist", "round_reg_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"QuantConfig: {name} must be a number >= 0, got {v!r}")
        for name in ("warmup", "drop_prob", "noise_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"QuantConfig: {name} must be in [0, 1], got {v!r}")
        if isinstance(self.observer_p, bool) or not isinstance(self.observer_p, (int, float)) \
                or not 0 < self.observer_p < math.inf:
            raise ValueError(f"QuantConfig: observer_p must be > 0, got {self.observer_p!r}")
        if len(self.round_beta) != 2 or not all(b > 0 for b in self.round_beta):
            raise ValueError(f"QuantConfig: round_beta must be two positive numbers (start, end), "
                             f"got {self.round_beta!r}")
        if self.method != "hdrq" and self.noise_fraction > 0:
            raise ValueError(f"QuantConfig: noise_fraction applies to method 'hdrq' only, got "
                             f"noise_fraction={self.noise_fraction} with method {self.method!r}")
        if self.method != "hdrq" and self.lambda_dist > 0:
            raise ValueError(f"QuantConfig: lambda_dist applies to method 'hdrq' only, got "
                             f"lambda_dist={self.lambda_dist} with method {self.method!r}")
        if self.stream not in (None, True, False):
            raise ValueError(f"QuantConfig: stream must be None, True or False, got {self.stream!r}")
        if self.blocks is not None and not all(isinstance(b, str) and b for b in self.blocks):
            raise ValueError(f"QuantConfig: blocks must be a list of non-empty module names, got {self.blocks!r}")
        for name in ("w_lr", "a_lr", "lambda_dist", "round_reg_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"QuantConfig: {name} must be finite, got {getattr(self, name)!r}")
        if not isinstance(self.verbose, bool):
            raise TypeError(f"QuantConfig: verbose must be True or False, got {self.verbose!r}")
        m = self.max_calib_samples
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"QuantConfig: max_calib_samples must be a positive int or None, got {m!r}")
        for name in ("device", "cache_device"):
            if getattr(self, name) is not None:
                setattr(self, name, str(check_device(getattr(self, name), what=f"QuantConfig: {name}",
                                                     available=False)))

    def to_dict(self) -> dict:
        """The fields as a plain dict (what ``model.hdrq_config`` holds); ``QuantConfig(**d)`` rebuilds it."""
        return dataclasses.asdict(self)


def check_device(device: Union[str, torch.device], *, what: str = "device",
                 available: bool = True) -> torch.device:
    """``device`` (a string such as ``"cuda:1"``, or a ``torch.device``) as a ``torch.device``, checked.

    Raises ``TypeError`` for anything else and ``ValueError`` (the message starts with ``what``) for a
    string torch does not parse or ``"meta"`` (no values to calibrate on or load into); with ``available``,
    also for a device this machine does not have: a backend torch was not built with or cannot reach (CUDA
    on a CPU-only build or without a visible GPU), or an index beyond the devices present."""
    if isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"{what} must name a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r} "
                             f"({e})") from None
    elif isinstance(device, torch.device):
        dev = device
    else:
        raise TypeError(f"{what} must be a device string such as 'cuda:0' or a torch.device, got "
                        f"{type(device).__name__} {device!r}")
    if dev.type == "meta":
        raise ValueError(f"{what} is 'meta', which holds no values; use a real device such as 'cpu' or 'cuda'")
    if not available or dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available):
        raise ValueError(f"{what} is {str(dev)!r}, a device type this torch cannot use here")
    if not is_available():
        why = ""
        if dev.type == "cuda":
            why = (f": this torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
                   else ": torch.cuda.is_available() is False (no GPU visible, or no driver)")
        raise ValueError(f"{what} is {str(dev)!r} but {dev.type} is not available on this machine{why}; use "
                         f"'cpu' (or leave the device unset to use the model's)")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ValueError(f"{what} is {str(dev)!r} but this machine has {count()} {dev.type} device(s)")
    return dev


def _bits(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
        raise ValueError(f"QuantConfig: {name} must be an int from 2 to 8, got {v!r}")
