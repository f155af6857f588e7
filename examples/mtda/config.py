"""``MTDAConfig``: everything one run of the benchmark depends on, and its three protocols.

* ``"quick"``: a smoke run of every stage (one seed, small data, a few iterations; the tests use it).
* ``"default"``: sized for a 2-core CPU (``make demo``): the authors' protocol (``hdrq.QuantConfig.authors``:
  one calibration image per iteration, the method presets, the authors' activation placement) with fewer
  reconstruction iterations per block, fewer merge seeds and fewer images.
* ``"full"``: the authors' protocol as published: 20,000 iterations per block, 32 merge seeds, all data
  (a GPU job).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = ["MTDAConfig", "METHODS", "QUANT_METHODS", "MERGES", "PROTOCOLS", "DATA", "STAGES", "resolve_device"]

METHODS = ("fp32", "rtn", "brecq", "qdrop", "hdrq")
QUANT_METHODS = ("rtn", "brecq", "qdrop", "hdrq")
MERGES = ("average", "hdrq")
PROTOCOLS = ("quick", "default", "full")
DATA = ("real", "synthetic", "folders")
# The random stages of one seed; MTDAConfig.vary says which of them follow the seed (the others use seed 0).
STAGES = ("source", "adapt", "calib", "merge")
DEFAULT_REAL_TARGETS = ("uci", "impulse_noise", "spatter")
# Model, source training and adaptation of the small data families (the synthetic digits' settings were
# chosen on their validation splits); the real digits use the field defaults.
FAMILY_DEFAULTS = {
    "synthetic": dict(targets=None, stem_stride=1, source_epochs=12, adapt_epochs=4, adapt_lr=1e-2),
    "folders": dict(targets=None, stem_stride=1, source_epochs=12, adapt_epochs=4, adapt_lr=1e-2, image_size=32),
}
# Candidates of the noise-sampling merge per method, as the authors merge them (BRECQ with 30).
MERGE_CANDIDATES = {"rtn": 100, "brecq": 30, "qdrop": 100, "hdrq": 100}


@dataclass
class MTDAConfig:
    """One run of the benchmark. Build one with :meth:`preset` and override fields.

    ``calib_iters=None`` keeps each method's published iterations (the full protocol); an int sets the
    reconstruction iterations per block of every method (BRECQ's activation stage keeps its published
    1:4 ratio to them)."""

    protocol: str = "default"
    # data
    data: str = "real"
    targets: Optional[tuple[str, ...]] = DEFAULT_REAL_TARGETS   # folders: None = every other domain
    data_dir: Optional[str] = None            # real: where MNIST and the corrupted images are cached
    severity: int = 3                         # real: ImageNet-C severity of the corruption targets
    source_train: Optional[int] = 20000       # real: MNIST train images the source trains on (None: 50k)
    source_test: Optional[int] = 2000         # real: MNIST test images the source is scored on
    target_train: int = 2000                  # real: unlabeled images per corruption target
    target_test: int = 1000                   # real: test images per corruption target
    root: Optional[str] = None                # folders: root/<domain>/<class>/<image>
    source: Optional[str] = None              # folders: the source domain's directory name
    image_size: int = 16                      # synthetic and folders (real data is 32x32)
    max_images: Optional[int] = None          # synthetic: keep this many of the 1,797 digits
    max_per_class: Optional[int] = None       # folders: cap images per class and domain
    eval_split: str = "test"                  # "val": score on 20% carved from each train split (tuning)
    # model and source training (Adam, one-cycle schedule, label smoothing 0.1 as SHOT's source stage)
    widths: tuple[int, ...] = (16, 32, 64)
    stem_stride: int = 2
    source_epochs: int = 2
    source_lr: float = 1e-2
    batch_size: int = 64
    # SHOT-IM adaptation (SGD + Nesterov momentum, as SHOT)
    adapt_epochs: int = 1
    adapt_lr: float = 2e-3
    pseudo_label_weight: float = 0.0          # SHOT's beta (0.3 in SHOT; 0 = SHOT-IM)
    # calibration: hdrq.QuantConfig.authors(method, ...) with these on top
    bits: tuple[int, ...] = (4, 6)            # W{b}A{b}
    methods: tuple[str, ...] = METHODS
    calib_samples: int = 32
    calib_iters: Optional[int] = 200
    quant_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"hdrq": {"lambda_dist": 0.0}}
    # merging: every quantized method under every merge; the noise-sampling merge over several seeds
    merge_seeds: int = 4
    # analysis, on the first two targets: error barrier and Hessian trace
    barrier_steps: int = 6
    barrier_samples: int = 256                # test images per domain for the barrier's loss
    hessian_samples: int = 8                  # Hutchinson vectors
    hessian_images: int = 128                 # calibration-domain images per model for the Hessian
    # run
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    vary: tuple[str, ...] = STAGES            # the stages whose randomness follows the seed
    device: str = "auto"
    threads: Optional[int] = None             # CPU threads in all (None: one per worker process)
    workers: Optional[int] = None             # processes running seeds in parallel (None: one per core)
    backend: Optional[str] = None             # hdrq.set_backend for the run (None: leave as it is)
    out: str = "mtda-out"
    version: int = 2

    @classmethod
    def preset(cls, protocol: str = "default", **overrides) -> "MTDAConfig":
        """The ``"quick"``, ``"default"`` or ``"full"`` protocol, with ``overrides`` applied on top."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        base: dict[str, Any] = {"protocol": protocol}
        if protocol == "quick":
            base.update(source_train=3000, source_test=500, target_train=300, target_test=300, widths=(8, 16, 16),
                        source_epochs=2, calib_iters=4, calib_samples=8, merge_seeds=2, barrier_steps=3,
                        barrier_samples=32, hessian_samples=2, hessian_images=16, seeds=(0,))
        elif protocol == "full":
            base.update(source_train=None, source_test=None, target_train=10000, target_test=10000,
                        source_epochs=5, calib_iters=None, merge_seeds=32, barrier_steps=11,
                        barrier_samples=1000, hessian_samples=32, hessian_images=512, seeds=tuple(range(8)))
        base.update(FAMILY_DEFAULTS.get(overrides.get("data", "real"), {}))
        base.update(overrides)
        return cls(**base).validated()

    def validated(self) -> "MTDAConfig":
        """Raise ``ValueError`` naming the first bad field; return self."""
        checks = [
            (self.protocol in PROTOCOLS, f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}"),
            (self.data in DATA, f"data must be one of {DATA}, got {self.data!r}"),
            (self.eval_split in ("test", "val"), f"eval_split must be 'test' or 'val', got {self.eval_split!r}"),
            (self.data != "folders" or (self.root and self.source),
             f"data 'folders' needs root and source, got root={self.root!r}, source={self.source!r}"),
            (bool(self.methods) and all(m in METHODS for m in self.methods),
             f"methods must be a non-empty subset of {METHODS}, got {list(self.methods)}"),
            (all(m in QUANT_METHODS for m in self.quant_overrides),
             f"quant_overrides keys must be in {QUANT_METHODS}, got {list(self.quant_overrides)}"),
            (bool(self.bits) and all(isinstance(b, int) and 2 <= b <= 8 for b in self.bits),
             f"bits must be a non-empty list of ints from 2 to 8, got {list(self.bits)}"),
            (bool(self.seeds), "seeds must not be empty"),
            (all(s in STAGES for s in self.vary), f"vary must be a subset of {STAGES}, got {list(self.vary)}"),
            (self.targets is None or len(self.targets) >= 2,
             f"merging needs at least two targets, got {list(self.targets or [])}"),
            (self.calib_iters is None or self.calib_iters >= 0, f"calib_iters must be >= 0, got {self.calib_iters}"),
            (self.severity in (1, 2, 3, 4, 5), f"severity must be from 1 to 5, got {self.severity}"),
        ]
        for name in ("calib_samples", "merge_seeds", "hessian_samples", "hessian_images", "barrier_samples",
                     "target_train", "target_test", "source_epochs", "batch_size", "stem_stride"):
            v = getattr(self, name)
            checks.append((isinstance(v, int) and v >= 1, f"{name} must be an int >= 1, got {v!r}"))
        checks.append((self.barrier_steps >= 2, f"barrier_steps must be >= 2, got {self.barrier_steps}"))
        checks.append((self.adapt_epochs >= 0, f"adapt_epochs must be >= 0, got {self.adapt_epochs}"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.targets is not None and self.data != "folders":
            known = _known_targets(self.data)
            unknown = [t for t in self.targets if t not in known]
            if unknown or len(set(self.targets)) != len(self.targets):
                raise ValueError(f"targets for data {self.data!r} must be distinct names from {list(known)}, got "
                                 f"{list(self.targets)}")
        if self.quant_overrides:
            self.quant_configs(4)  # unknown QuantConfig fields and bad values fail here, before any work
        return self

    def stage_seed(self, stage: str, seed: int) -> int:
        """The seed of ``stage`` in run seed ``seed``: the seed itself if the stage varies, else 0."""
        return seed if stage in self.vary else 0

    def quant_config(self, method: str, bits: int, seed: int = 0, device: Optional[str] = None):
        """The ``hdrq.QuantConfig`` of ``method`` at W{bits}A{bits}: the authors' protocol
        (``QuantConfig.authors``), ``calib_iters`` iterations per block, then ``quant_overrides``."""
        import hdrq
        from hdrq.calib.config import PRESETS

        kw: dict[str, Any] = dict(w_bits=bits, a_bits=bits, seed=seed, device=device, verbose=False)
        if self.calib_iters is not None and method != "rtn":  # RTN has no iterations
            kw["iters"] = self.calib_iters
            if method == "brecq":
                p = PRESETS["brecq"]
                kw["act_iters"] = max(1, round(self.calib_iters * p["act_iters"] / p["iters"]))
        kw.update(self.quant_overrides.get(method, {}))
        return hdrq.QuantConfig.authors(method, **kw)

    def quant_configs(self, bits: int) -> dict:
        """``{method: QuantConfig}`` for every quantized method of the run (raises on a bad override)."""
        out = {}
        for m in (m for m in self.methods if m != "fp32"):
            try:
                out[m] = self.quant_config(m, bits)
            except TypeError as e:  # an unknown field
                raise ValueError(f"quant_overrides for {m!r}: {e}") from e
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _known_targets(data: str) -> tuple[str, ...]:
    if data == "real":
        from .real import REAL_TARGETS

        return REAL_TARGETS
    from .synthetic import DIGIT_SHIFTS

    return tuple(DIGIT_SHIFTS)


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU. Raises ``ValueError`` for an unknown or absent
    device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return dev
