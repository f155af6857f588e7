"""``hdrq demo``: offline multi-target domain adaptation of merged low-bit models, end to end.

What one run does, for every seed (DESIGN §1, issue 6):

1. **Data**: a :class:`hdrq.data.DomainSuite`, the synthetic digits domains by default (``hdrq.data``) or
   Office-Home-style image folders.
2. **Source model**: a small ResNet-style CNN (:class:`SmallResNet`: BatchNorm, torchvision-style residual
   blocks) trained on the labelled source train split.
3. **Adaptation** (SHOT-IM, Liang et al. 2020, as the paper's Office-Home setup): one copy per target, the
   classifier head frozen, the feature extractor trained on the *unlabeled* target train split to minimise
   the mean prediction entropy while keeping the batch-mean prediction diverse; optionally SHOT's
   clustering pseudo-labels.
4. **Quantize and merge**, per bit setting and method: every adapted target model is calibrated
   (``hdrq.quantize``) with ``calib_samples`` unlabeled images of its own domain (HDRQ's distance term is
   taken against the source model); the target models are merged (``hdrq.merge``: the HDRQ merge for
   "hdrq", the plain average for the other methods; a float average of the BN-folded adapted models for
   "fp32"); the merged model is evaluated on every target's test split (accuracy per domain and their
   harmonic mean), and each quantized model alone on its own domain.
5. **Error barriers** (``hdrq.error_barrier``) between the first two target models: the quantized barrier
   (uniform noise at the step sizes) for the methods in ``barrier_methods``, the float one for fp32.

It writes ``results.json``, PNG plots and prints a markdown table; mean and standard deviation are over
the seeds. Nothing is cached across runs. The demo never selects a setting by looking at a test split.

Protocols (:meth:`DemoConfig.preset`): ``"default"`` is a reduced protocol: 100 reconstruction iterations
per block for every method (the authors use 20,000), everything else at the published presets; 3 seeds in
5.6 minutes on a 2-core CPU. ``"full"`` is the authors' protocol (the method presets of
``hdrq.QuantConfig``: 20,000 iterations per block and so on; a GPU job). ``"quick"`` is a smoke run that still
runs every stage (one seed, 2 targets, 4 iterations; ~10 s; used by the test suite).

Settings of the data, training and adaptation (source lr, adaptation epochs, SHOT-IM without pseudo-labels)
were chosen on validation splits carved from the train splits (``eval_split="val"``), never on a test split.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DEFAULT_DIGIT_TARGETS, DomainData, DomainSuite, ImageFolderDomains, make_digits_domains

__all__ = ["DemoConfig", "SmallResNet", "BasicBlock", "train_source", "adapt_shot", "evaluate",
           "harmonic_mean", "build_domains", "run_demo", "format_tables", "METHODS", "QUANT_METHODS"]

METHODS = ("fp32", "rtn", "brecq", "qdrop", "hdrq")
QUANT_METHODS = ("rtn", "brecq", "qdrop", "hdrq")
PROTOCOLS = ("quick", "default", "full")


# ================================================================================================
# Configuration
# ================================================================================================


@dataclass
class DemoConfig:
    """Everything one ``hdrq demo`` run depends on. Build one with :meth:`preset` and override fields.

    ``calib_iters=None`` keeps each method's published preset (the full protocol); an int overrides the
    iterations per block for every method (the reduced protocols)."""

    protocol: str = "default"
    # data
    data: str = "digits"                      # "digits" or "folders"
    root: Optional[str] = None                # folders: root/<domain>/<class>/<image>
    source: Optional[str] = None              # folders: the source domain's directory name
    targets: Optional[tuple[str, ...]] = DEFAULT_DIGIT_TARGETS   # folders: None = every other domain
    image_size: int = 16
    max_images: Optional[int] = None          # digits: keep this many of the 1,797 images (quick runs)
    max_per_class: Optional[int] = None       # folders: cap images per class and domain
    eval_split: str = "test"                  # "val": evaluate on 20% carved from each train split (tuning)
    # model
    widths: tuple[int, ...] = (16, 32, 64)
    # source training (Adam, one-cycle schedule, label smoothing 0.1 as SHOT's source stage)
    source_epochs: int = 12
    source_lr: float = 1e-2
    batch_size: int = 64
    # SHOT-IM adaptation (SGD + Nesterov momentum, as SHOT)
    adapt_epochs: int = 4
    adapt_lr: float = 1e-2
    pseudo_label_weight: float = 0.0          # SHOT's beta (0.3 in SHOT; 0 = SHOT-IM)
    # calibration
    bits: tuple[int, ...] = (4, 6)            # W{b}A{b}
    methods: tuple[str, ...] = METHODS
    calib_samples: int = 32
    calib_iters: Optional[int] = 100
    noise_mode: Optional[str] = None          # None = the hdrq preset's noise mode
    # per-method QuantConfig fields on top of everything else, e.g. {"hdrq": {"lambda_dist": 0.0}}
    quant_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # analysis
    barrier_methods: tuple[str, ...] = ("qdrop", "hdrq")
    barrier_steps: int = 11
    barrier_samples: int = 512                # test images per domain used for the barrier loss
    # run
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"
    threads: Optional[int] = None             # CPU threads in all (None: torch's default)
    workers: Optional[int] = None             # processes running seeds in parallel (None: auto, see run_demo)
    backend: Optional[str] = None             # hdrq.set_backend for the run (None: leave as it is)
    out: str = "hdrq-demo-out"
    version: int = 1

    @classmethod
    def preset(cls, protocol: str = "default", **overrides) -> "DemoConfig":
        """The ``"quick"``, ``"default"`` or ``"full"`` protocol, with ``overrides`` applied on top."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        base: dict[str, Any] = {"protocol": protocol}
        if protocol == "quick":
            base.update(max_images=500, widths=(8, 16, 16), source_epochs=15, adapt_epochs=2, calib_iters=4,
                        calib_samples=16, barrier_steps=3, barrier_samples=64, seeds=(0,),
                        targets=DEFAULT_DIGIT_TARGETS[:2])
        elif protocol == "full":
            base.update(image_size=32, source_epochs=30, adapt_epochs=10, calib_iters=None)
        base.update(overrides)
        return cls(**base).validated()

    def validated(self) -> "DemoConfig":
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"eval_split must be 'test' or 'val', got {self.eval_split!r}")
        if self.data not in ("digits", "folders"):
            raise ValueError(f"data must be 'digits' or 'folders', got {self.data!r}")
        if self.data == "folders" and (not self.root or not self.source):
            raise ValueError(f"data='folders' needs root and source (the source domain's directory), got "
                             f"root={self.root!r}, source={self.source!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(self.methods)}")
        bad = [m for m in self.quant_overrides if m not in QUANT_METHODS]
        if bad:
            raise ValueError(f"quant_overrides keys must be in {QUANT_METHODS}, got {list(self.quant_overrides)}")
        bad = [m for m in self.barrier_methods if m not in QUANT_METHODS]
        if bad:
            raise ValueError(f"barrier_methods must be a subset of {QUANT_METHODS}, got {list(self.barrier_methods)}")
        if not self.bits or any(not 2 <= b <= 8 for b in self.bits):
            raise ValueError(f"bits must be a non-empty list of widths in [2, 8], got {list(self.bits)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.targets is not None and len(self.targets) < 2 and self.data == "digits":
            raise ValueError(f"merging needs at least two targets, got {list(self.targets)}")
        if self.calib_samples < 1 or self.barrier_steps < 2 or self.image_size < 8:
            raise ValueError(f"need calib_samples >= 1, barrier_steps >= 2, image_size >= 8; got "
                             f"{self.calib_samples}, {self.barrier_steps}, {self.image_size}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


# ================================================================================================
# Model
# ================================================================================================


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (conv-BN-ReLU-conv-BN plus the shortcut, then ReLU), so that the
    calibration engine finds it as a residual block exactly as on the paper's ResNets."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A ResNet for small images: a 3x3 stem (conv-BN-ReLU), one BasicBlock per width (stride 2 from the
    second on), global average pooling, and a linear classifier ``fc`` (the head SHOT keeps frozen)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        if not widths:
            raise ValueError("SmallResNet needs at least one width")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, prev = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(prev, w, stride=1 if i == 0 else 2))
            prev = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


# ================================================================================================
# Training, adaptation, evaluation
# ================================================================================================


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _translate(x: Tensor, g: torch.Generator) -> Tensor:
    """Random translation by up to one pixel (one shift per batch): the source stage's only augmentation."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_source(model: nn.Module, domain: DomainData, *, epochs: int, lr: float, batch_size: int, seed: int,
                 device: torch.device) -> nn.Module:
    """Supervised training on the source train split (Adam, one-cycle lr, label smoothing 0.1)."""
    g = _generator(seed)
    x, y = domain.x_train.to(device), domain.y_train.to(device)
    n = x.shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = max(1, epochs * math.ceil(n / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, batch_size):
            b = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_translate(x[b], g)), y[b], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def information_maximization_loss(logits: Tensor, eps: float = 1e-5) -> Tensor:
    """SHOT's IM loss: mean per-sample entropy minus the entropy of the batch-mean prediction.
    The first term makes each prediction confident; the second keeps the classes diverse (without it the
    entropy term alone collapses every image onto one class)."""
    p = logits.softmax(dim=1)
    entropy = -(p * torch.log(p + eps)).sum(dim=1).mean()
    p_mean = p.mean(dim=0)
    diversity = -(p_mean * torch.log(p_mean + eps)).sum()
    return entropy - diversity


@torch.no_grad()
def shot_pseudo_labels(model: SmallResNet, x: Tensor, batch_size: int = 512) -> Tensor:
    """SHOT's self-supervised pseudo-labels: class centroids of the (cosine-normalised) features weighted
    by the predictions, each image labelled by its nearest centroid, then one refinement with hard labels."""
    was_training = model.training
    model.eval()
    feats, probs = [], []
    for i in range(0, x.shape[0], batch_size):
        f = model.features(x[i:i + batch_size])
        feats.append(f)
        probs.append(model.fc(f).softmax(dim=1))
    model.train(was_training)
    f = torch.cat(feats)
    f = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)
    f = f / f.norm(dim=1, keepdim=True)
    p = torch.cat(probs)
    centroids = (p.t() @ f) / (p.sum(dim=0)[:, None] + 1e-8)
    labels = (f @ F.normalize(centroids, dim=1).t()).argmax(dim=1)
    onehot = F.one_hot(labels, p.shape[1]).to(f.dtype)
    centroids = (onehot.t() @ f) / (onehot.sum(dim=0)[:, None] + 1e-8)
    return (f @ F.normalize(centroids, dim=1).t()).argmax(dim=1)


def adapt_shot(model: SmallResNet, x_target: Tensor, *, epochs: int, lr: float, batch_size: int, seed: int,
               device: torch.device, pseudo_label_weight: float = 0.0) -> SmallResNet:
    """SHOT-IM on unlabeled target images: the head ``fc`` frozen, the feature extractor (BatchNorm in
    training mode, so its statistics move to the target) trained with :func:`information_maximization_loss`,
    plus ``pseudo_label_weight`` x cross-entropy on :func:`shot_pseudo_labels` recomputed every epoch.
    Adapts ``model`` in place and returns it in eval mode."""
    g = _generator(seed)
    x = x_target.to(device)
    n = x.shape[0]
    for p in model.fc.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
    for _ in range(epochs):
        labels = shot_pseudo_labels(model, x) if pseudo_label_weight > 0 else None
        model.train()
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, batch_size):
            b = perm[i:i + batch_size]
            if b.numel() < 2:  # the diversity term and BatchNorm need a batch
                continue
            logits = model(x[b])
            loss = information_maximization_loss(logits)
            if labels is not None:
                loss = loss + pseudo_label_weight * F.cross_entropy(logits, labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in model.fc.parameters():
        p.requires_grad_(True)
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (put in eval mode) on ``(x, y)``."""
    if x.shape[0] == 0:
        raise ValueError(f"evaluate: empty data, got x of shape {tuple(x.shape)}")
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        pred = model(x[i:i + batch_size].to(device)).argmax(dim=1)
        correct += int((pred == y[i:i + batch_size].to(device)).sum())
    return correct / x.shape[0]


def harmonic_mean(values: Sequence[float]) -> float:
    """The harmonic mean (0 if any value is 0): the MTDA summary, dominated by the worst domain."""
    if not values:
        raise ValueError("harmonic_mean of an empty list")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic_mean needs non-negative values, got {list(values)}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


# ================================================================================================
# Data
# ================================================================================================


def build_domains(cfg: DemoConfig, seed: int) -> DomainSuite:
    """The domains of one seed (digits: the seed also fixes the split and the random parts of the shifts).
    With ``cfg.eval_split == "val"`` every domain's test split is replaced by a validation split carved from
    its train split (and removed from it), so settings can be chosen without looking at a test split."""
    if cfg.data == "digits":
        suite = make_digits_domains(image_size=cfg.image_size, targets=cfg.targets or DEFAULT_DIGIT_TARGETS,
                                    seed=seed, max_images=cfg.max_images)
    else:
        folders = ImageFolderDomains(cfg.root, image_size=cfg.image_size, seed=seed,
                                     max_per_class=cfg.max_per_class)
        suite = folders.suite(cfg.source, cfg.targets)
        if len(suite.targets) < 2:
            raise ValueError(f"merging needs at least two target domains; {cfg.root!r} gives "
                             f"{[d.name for d in suite.targets]} besides the source {cfg.source!r}")
    if cfg.eval_split == "val":
        suite = DomainSuite(validation_split(suite.source, seed),
                            [validation_split(d, seed) for d in suite.targets], suite.classes,
                            {k: v + " (validation split)" for k, v in suite.description.items()})
    return suite


def validation_split(domain: DomainData, seed: int, fraction: float = 0.2) -> DomainData:
    """``domain`` with its test split replaced by a seeded ``fraction`` of its train split (the test split
    itself dropped): the split to choose settings on."""
    n = domain.x_train.shape[0]
    k = min(max(1, round(n * fraction)), n - 1)
    perm = torch.randperm(n, generator=_generator(_seed_of(seed, 99)))
    tr, va = perm[k:].sort().values, perm[:k].sort().values
    return DomainData(domain.name, domain.x_train[tr], domain.y_train[tr], domain.x_train[va], domain.y_train[va])


# ================================================================================================
# The pipeline
# ================================================================================================


def _quant_config(cfg: DemoConfig, method: str, bits: int, seed: int, device: torch.device):
    from .calib import QuantConfig
    from .calib.config import PRESETS

    kw: dict[str, Any] = dict(method=method, w_bits=bits, a_bits=bits, seed=seed, device=str(device),
                              calib_batch_size=cfg.calib_samples)
    if cfg.calib_iters is not None and method != "rtn":  # RTN has no iterations
        kw["iters"] = cfg.calib_iters
        if method == "brecq":  # its second (activation step size) stage keeps the published 5,000 : 20,000 ratio
            p = PRESETS["brecq"]
            kw["act_iters"] = max(1, round(cfg.calib_iters * p["act_iters"] / p["iters"]))
    if method == "hdrq" and cfg.noise_mode is not None:
        kw["noise_mode"] = cfg.noise_mode
    kw.update(cfg.quant_overrides.get(method, {}))
    return QuantConfig(**{"verbose": False, **kw})  # the demo shows one progress bar for the whole run


def _calib_batch(domain: DomainData, n: int, seed: int) -> Tensor:
    """``n`` unlabeled images of the domain's train split, chosen by ``seed``."""
    idx = torch.randperm(domain.x_train.shape[0], generator=_generator(seed))[:n]
    return domain.x_train[idx]


def _barrier_batches(domains: Sequence[DomainData], n: int, device: torch.device,
                     batch_size: int = 256) -> list[tuple[Tensor, Tensor]]:
    """The first ``n`` test images of each of ``domains``, as (x, y) batches on ``device``."""
    x = torch.cat([d.x_test[:n] for d in domains]).to(device)
    y = torch.cat([d.y_test[:n] for d in domains]).to(device)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def _ce_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _seed_of(*parts: int) -> int:
    """A distinct, reproducible seed per (seed, stage, index...) so that no two stages share a stream."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**31 - 1)
    return s


def _stage_count(cfg: DemoConfig, n_targets: int) -> int:
    """Progress-bar units of one seed: source training, adaptation per target, then per bit setting and
    quantized method one calibration per target, one merge + evaluation, one barrier where asked; fp32's
    merge and barrier once."""
    n = 1 + n_targets
    qm = [m for m in cfg.methods if m != "fp32"]
    if "fp32" in cfg.methods:
        n += 2
    for _ in cfg.bits:
        n += len(qm) * (n_targets + 1) + len([m for m in qm if m in cfg.barrier_methods])
    return n


def _run_seed(cfg: DemoConfig, seed: int, device: torch.device, bar) -> dict:
    import hdrq
    from .quant import fold_batchnorm

    def step(desc: str):
        bar.set_description_str(f"seed {seed}: {desc}")

    timings: dict[str, float] = {}
    t0, cpu0 = time.perf_counter(), time.process_time()
    suite = build_domains(cfg, seed)
    targets = suite.targets
    names = [d.name for d in targets]

    step("source training")
    torch.manual_seed(_seed_of(seed, 1))
    source = SmallResNet(suite.in_channels, suite.num_classes, cfg.widths).to(device)
    train_source(source, suite.source, epochs=cfg.source_epochs, lr=cfg.source_lr, batch_size=cfg.batch_size,
                 seed=_seed_of(seed, 2), device=device)
    bar.update()
    timings["source_training_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    adapted: list[SmallResNet] = []
    adaptation = {"source_acc": evaluate(source, suite.source.x_test, suite.source.y_test, device=device),
                  "targets": {}}
    for i, d in enumerate(targets):
        step(f"SHOT adaptation to {d.name}")
        model = adapt_shot(copy.deepcopy(source), d.x_train, epochs=cfg.adapt_epochs, lr=cfg.adapt_lr,
                           batch_size=cfg.batch_size, seed=_seed_of(seed, 3, i), device=device,
                           pseudo_label_weight=cfg.pseudo_label_weight)
        adapted.append(model)
        adaptation["targets"][d.name] = {
            "source_only": evaluate(source, d.x_test, d.y_test, device=device),
            "adapted": evaluate(model, d.x_test, d.y_test, device=device)}
        bar.update()
    timings["adaptation_s"] = time.perf_counter() - t1

    def score(merged: nn.Module, singles: Sequence[nn.Module]) -> dict:
        per = {d.name: evaluate(merged, d.x_test, d.y_test, device=device) for d in targets}
        own = {d.name: evaluate(m, d.x_test, d.y_test, device=device) for d, m in zip(targets, singles)}
        return {"merged": per, "merged_hm": harmonic_mean(list(per.values())), "unmerged": own,
                "unmerged_mean": sum(own.values()) / len(own)}

    barrier_data = _barrier_batches(targets[:2], cfg.barrier_samples, device)
    methods: dict[str, dict[str, dict]] = {}
    fp32 = None
    if "fp32" in cfg.methods:
        t2 = time.perf_counter()
        step("fp32 merge")
        folded = [fold_batchnorm(m).eval() for m in adapted]
        fp32 = score(hdrq.merge(folded, method="average", verbose=False), folded)
        bar.update()
        step("fp32 barrier")
        fp32["barrier"] = _barrier_dict(hdrq.error_barrier(folded[0], folded[1], _ce_loss, barrier_data,
                                                           steps=cfg.barrier_steps, verbose=False))
        bar.update()
        timings["fp32_s"] = time.perf_counter() - t2

    for bits in cfg.bits:
        key = f"W{bits}A{bits}"
        methods[key] = {}
        if fp32 is not None:
            methods[key]["fp32"] = fp32
        for method in (m for m in cfg.methods if m != "fp32"):
            m_idx = QUANT_METHODS.index(method)  # seeds do not depend on which other methods run
            t3 = time.perf_counter()
            quantized = []
            for i, d in enumerate(targets):
                step(f"{key} {method}: calibrating on {d.name}")
                qcfg = _quant_config(cfg, method, bits, _seed_of(seed, 5, bits, m_idx, i), device)
                calib = _calib_batch(d, cfg.calib_samples, _seed_of(seed, 6, i)).to(device)
                src = source if method == "hdrq" else None  # only HDRQ's distance term uses it
                quantized.append(hdrq.quantize(adapted[i], calib, qcfg, source=src).eval())
                bar.update()
            t_cal = time.perf_counter() - t3
            step(f"{key} {method}: merge + evaluation")
            merge_method = "hdrq" if method == "hdrq" else "average"
            merged = hdrq.merge(quantized, method=merge_method, seed=_seed_of(seed, 7, bits, m_idx), verbose=False)
            res = score(merged, quantized)
            # The ablation: the same quantized models through the other merge, to tell how much of a
            # method's merged accuracy comes from its calibration and how much from the merge.
            other = "average" if merge_method == "hdrq" else "hdrq"
            alt = hdrq.merge(quantized, method=other, seed=_seed_of(seed, 7, bits, m_idx), verbose=False)
            alt_acc = {d.name: evaluate(alt, d.x_test, d.y_test, device=device) for d in targets}
            res["merge"] = merge_method
            res["other_merge"] = {"merge": other, "merged": alt_acc, "merged_hm": harmonic_mean(list(alt_acc.values()))}
            bar.update()
            if method in cfg.barrier_methods:
                step(f"{key} {method}: quantized error barrier")
                res["barrier"] = _barrier_dict(hdrq.error_barrier(
                    quantized[0], quantized[1], _ce_loss, barrier_data, steps=cfg.barrier_steps, quant_noise=True,
                    seed=_seed_of(seed, 8, bits, m_idx), verbose=False))
                bar.update()
            methods[key][method] = res
            timings[f"{key}_{method}_calibration_s"] = t_cal
            timings[f"{key}_{method}_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0
    timings["process_cpu_s"] = time.process_time() - cpu0  # ~ the wall time on an idle core (1 thread)
    return {"seed": seed, "targets": names, "adaptation": adaptation, "methods": methods, "timings": timings,
            "barrier_pair": names[:2]}


def _barrier_dict(r: dict) -> dict:
    return {"lambdas": [float(v) for v in r["lambdas"]], "losses": [float(v) for v in r["losses"]],
            "barrier": float(r["barrier"])}


# ---- aggregation over seeds ----------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    std = float(t.std(unbiased=True)) if t.numel() > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "values": [float(v) for v in values]}


def summarize(per_seed: list[dict]) -> dict:
    """Mean and (sample) standard deviation over seeds of every number in the per-seed results."""
    first = per_seed[0]
    names = first["targets"]
    out: dict[str, Any] = {"adaptation": {
        "source_acc": _stats([r["adaptation"]["source_acc"] for r in per_seed]),
        "targets": {n: {k: _stats([r["adaptation"]["targets"][n][k] for r in per_seed])
                        for k in ("source_only", "adapted")} for n in names}}}
    for key, methods in first["methods"].items():
        out[key] = {}
        for method in methods:
            rs = [r["methods"][key][method] for r in per_seed]
            s = {"merged": {n: _stats([x["merged"][n] for x in rs]) for n in names},
                 "merged_hm": _stats([x["merged_hm"] for x in rs]),
                 "unmerged": {n: _stats([x["unmerged"][n] for x in rs]) for n in names},
                 "unmerged_mean": _stats([x["unmerged_mean"] for x in rs])}
            if "other_merge" in rs[0]:
                s["other_merge"] = {"merge": rs[0]["other_merge"]["merge"],
                                    "merged_hm": _stats([x["other_merge"]["merged_hm"] for x in rs])}
            if "barrier" in rs[0]:
                s["barrier"] = _stats([x["barrier"]["barrier"] for x in rs])
                losses = torch.tensor([x["barrier"]["losses"] for x in rs], dtype=torch.float64)
                s["barrier_curve"] = {"lambdas": rs[0]["barrier"]["lambdas"],
                                      "losses": [float(v) for v in losses.mean(dim=0)]}
            out[key][method] = s
    return out


# ---- reporting -----------------------------------------------------------------------------------


def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def format_tables(results: dict) -> str:
    """The markdown tables of a run: adaptation, then merged / unmerged accuracy per bit setting."""
    summ, names = results["summary"], results["targets"]
    n_seeds = len(results["per_seed"])
    lines = [f"Accuracy in %, mean ± std over {n_seeds} seed(s); source `{results['source']}`, "
             f"targets {', '.join(f'`{n}`' for n in names)}.", "",
             "| target | source only | SHOT-IM adapted |", "|---|---|---|"]
    for n in names:
        t = summ["adaptation"]["targets"][n]
        lines.append(f"| {n} | {_pm(t['source_only'])} | {_pm(t['adapted'])} |")
    lines.append(f"\nSource model on its own test split: {_pm(summ['adaptation']['source_acc'])}.")
    for key in results["bit_settings"]:
        lines += ["", f"**{key}**: the target models merged into one (HDRQ merge for hdrq, plain average for the "
                      f"others, float average for fp32); merged accuracy per target and their harmonic mean (HM); "
                      f"HM of the same quantized models merged the other way (ablation); each model alone on "
                      f"its own target; error barrier between `{names[0]}` and `{names[1]}` (cross-entropy; "
                      f"quantized barrier for quantized methods).", "",
                  "| method | " + " | ".join(f"merged {n}" for n in names)
                  + " | **merged HM** | HM, other merge | unmerged (own domain, mean) | barrier |",
                  "|---|" + "---|" * len(names) + "---|---|---|---|"]
        for method, s in summ[key].items():
            barrier = f"{s['barrier']['mean']:.3f} ± {s['barrier']['std']:.3f}" if "barrier" in s else "-"
            other = (f"{_pm(s['other_merge']['merged_hm'])} ({s['other_merge']['merge']})"
                     if "other_merge" in s else "-")
            name = f"{method} (float)" if method == "fp32" else method
            lines.append(f"| {name} | " + " | ".join(_pm(s["merged"][n]) for n in names)
                         + f" | **{_pm(s['merged_hm'])}** | {other} | {_pm(s['unmerged_mean'])} | {barrier} |")
    lines += ["", comparison_text(results)]
    return "\n".join(lines)


def comparison_text(results: dict) -> str:
    """One plain sentence per bit setting: does HDRQ's merged HM beat QDrop's and BRECQ's, by how much."""
    out = []
    for key in results["bit_settings"]:
        s = results["summary"][key]
        if "hdrq" not in s:
            continue
        h = s["hdrq"]["merged_hm"]
        parts = []
        for other in ("qdrop", "brecq"):
            if other not in s:
                continue
            o = s[other]["merged_hm"]
            diffs = [a - b for a, b in zip(h["values"], o["values"])]
            d = _stats(diffs)
            wins = sum(x > 0 for x in diffs)
            verdict = "beats" if d["mean"] > 0 else "trails" if d["mean"] < 0 else "ties with"
            parts.append(f"{verdict} {other} ({_pm(o)}) by {abs(d['mean']) * 100:.1f} points (paired difference "
                         f"{d['mean'] * 100:+.1f} ± {d['std'] * 100:.1f}; HDRQ ahead in {wins}/{len(diffs)} seeds)")
        if parts:
            out.append(f"- {key}: HDRQ's merged harmonic mean ({_pm(h)}) " + "; ".join(parts) + ".")
    return "\n".join(out)


def write_plots(results: dict, out_dir: str) -> list[str]:
    """``merged_hm.png`` (merged harmonic mean per method and bit setting, error bars = std over seeds) and
    one ``barrier_<bits>.png`` per bit setting (the seed-averaged loss along the interpolation path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .analysis import plot_barriers

    paths = []
    summ, keys = results["summary"], results["bit_settings"]
    methods = [m for m in summ[keys[0]] if m != "fp32"]
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * max(len(methods), 1), 3.8))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        means = [summ[key][m]["merged_hm"]["mean"] * 100 for m in methods]
        stds = [summ[key][m]["merged_hm"]["std"] * 100 for m in methods]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(methods))]
        bars = ax.bar(xs, means, width, yerr=stds, capsize=3, label=key)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    if "fp32" in summ[keys[0]]:  # the float merge does not depend on the bit width: one reference line
        fp = summ[keys[0]]["fp32"]["merged_hm"]
        ax.axhline(fp["mean"] * 100, color="black", linestyle="--", linewidth=1,
                   label=f"fp32 merge {fp['mean'] * 100:.1f}")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("merged harmonic-mean accuracy (%)")
    ax.set_title(f"{len(results['targets'])} target models merged into one "
                 f"(mean ± std over {len(results['per_seed'])} seed(s))", fontsize=10)
    ax.set_ylim(0, 105)
    ax.legend(loc="upper left", fontsize=7, ncol=len(keys) + 1)
    fig.tight_layout()
    p = os.path.join(out_dir, "merged_hm.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    for key in keys:
        curves = {m: {**s["barrier_curve"], "barrier": s["barrier"]["mean"]}
                  for m, s in summ[key].items() if "barrier_curve" in s}
        if curves:
            p = os.path.join(out_dir, f"barrier_{key.lower()}.png")
            plot_barriers(curves, p, title=f"{key}: error barrier {results['barrier_pair'][0]} -> "
                                           f"{results['barrier_pair'][1]} (mean of {len(results['per_seed'])} seed(s))")
            paths.append(p)
    return paths


def _environment(device: torch.device) -> dict:
    import hdrq

    env = {"python": platform.python_version(), "torch": torch.__version__, "hdrq": hdrq.__version__,
           "device": str(device), "backend": hdrq.get_backend(), "platform": platform.platform()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _plan_workers(cfg: DemoConfig, device: torch.device) -> tuple[int, int]:
    """(processes, torch threads per process). On the CPU the seeds, which are independent, run in parallel
    processes (default: one per core, at most one per seed) of one thread each (or ``cfg.threads`` split
    among them): the small tensors of this model keep one core busy far better than they split across
    two, where intra-op threads spend their time in barriers (on a loaded 2-core machine, 2 threads ran the
    quick protocol 13x slower than 1). On a GPU, one process."""
    if device.type != "cpu":
        workers = cfg.workers or 1
        return max(1, min(workers, len(cfg.seeds))), cfg.threads or torch.get_num_threads()
    workers = cfg.workers or min(len(cfg.seeds), cfg.threads or _cpu_count())
    workers = max(1, min(workers, len(cfg.seeds)))
    return workers, max(1, (cfg.threads or workers) // workers)


class _QueueBar:
    """What a worker process has instead of the progress bar: it sends the updates to the parent."""

    def __init__(self, queue):
        self.queue = queue

    def update(self, n: int = 1) -> None:
        self.queue.put(("update", n))

    def set_description_str(self, desc: str) -> None:
        self.queue.put(("desc", desc))


_WORKER_QUEUE = None


def _worker_init(queue, threads: int, backend: Optional[str]) -> None:
    global _WORKER_QUEUE
    _WORKER_QUEUE = queue
    torch.set_num_threads(threads)
    if backend is not None:
        import hdrq

        hdrq.set_backend(backend)


def _worker_seed(cfg: DemoConfig, seed: int, device: str) -> dict:
    return _run_seed(cfg, seed, torch.device(device), _QueueBar(_WORKER_QUEUE))


def _run_seeds_in_processes(cfg: DemoConfig, device: torch.device, bar, workers: int, threads: int) -> list[dict]:
    import multiprocessing
    import queue as queue_mod
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked child of a process that has used OpenMP can deadlock in its first parallel op
    ctx = multiprocessing.get_context("spawn")
    updates = ctx.Queue()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(updates, threads, cfg.backend)) as pool:
        futures = [pool.submit(_worker_seed, cfg, seed, str(device)) for seed in cfg.seeds]
        while True:
            try:
                kind, value = updates.get(timeout=0.2)
            except queue_mod.Empty:
                if all(f.done() for f in futures):
                    break
                continue
            if kind == "update":
                bar.update(value)
            else:
                bar.set_description_str(value)
        return [f.result() for f in futures]  # re-raises a worker's exception here


def run_demo(cfg: Optional[DemoConfig] = None, *, verbose: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Run the whole benchmark of ``cfg`` (default: ``DemoConfig.preset("default")``); write
    ``results.json`` and the PNG plots into ``cfg.out``; print the markdown tables (when ``verbose``).
    Returns the results dict (the content of results.json)."""
    import hdrq
    from tqdm.auto import tqdm

    cfg = (cfg or DemoConfig.preset("default")).validated()
    device = resolve_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    workers, threads = _plan_workers(cfg, device)
    previous_backend, previous_threads = hdrq.get_backend(), torch.get_num_threads()
    if cfg.backend is not None:
        hdrq.set_backend(cfg.backend)
    t0 = time.perf_counter()
    try:
        torch.set_num_threads(threads)
        first = build_domains(cfg, cfg.seeds[0])
        total = len(cfg.seeds) * _stage_count(cfg, len(first.targets))
        with tqdm(total=total, disable=not verbose, unit="stage", dynamic_ncols=True) as bar:
            if workers > 1:
                per_seed = _run_seeds_in_processes(cfg, device, bar, workers, threads)
            else:
                per_seed = [_run_seed(cfg, seed, device, bar) for seed in cfg.seeds]
        results = {
            "format": "hdrq-demo", "version": cfg.version, "config": cfg.to_dict(),
            "environment": {**_environment(device), "processes": workers, "threads_per_process": threads},
            "elapsed_s": time.perf_counter() - t0,
            "source": first.source.name, "targets": [d.name for d in first.targets],
            "barrier_pair": [d.name for d in first.targets[:2]],
            "domains": first.description, "bit_settings": [f"W{b}A{b}" for b in cfg.bits],
            "methods": list(cfg.methods), "per_seed": per_seed, "summary": summarize(per_seed)}
    finally:
        hdrq.set_backend(previous_backend)
        torch.set_num_threads(previous_threads)
    results["plots"] = [os.path.basename(p) for p in write_plots(results, cfg.out)]
    results["elapsed_s"] = time.perf_counter() - t0
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if verbose:
        log(format_tables(results))
        log(f"\nWrote {os.path.join(cfg.out, 'results.json')} and {', '.join(results['plots'])} "
            f"in {results['elapsed_s']:.0f} s on {device} ({workers} process(es) x {threads} thread(s)).")
    return results
