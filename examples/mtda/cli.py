"""``python -m examples.mtda``: the command line of the benchmark (``make demo`` runs it).

    python -m examples.mtda                 the default protocol (2-core CPU: ~15 minutes; the GPU when present)
    python -m examples.mtda --quick         the smoke protocol (every stage, one seed, small budgets)
    python -m examples.mtda --full          the authors' protocol (20,000 iterations per block, 32 merge seeds)
    python -m examples.mtda --data synthetic
    python -m examples.mtda --data folders --root OfficeHome --source Real_World

Every option is checked before any work starts; a bad one is a usage error (exit status 2).
"""
from __future__ import annotations

import argparse
import ast
from typing import Optional, Sequence

from .config import DATA, METHODS, STAGES, MTDAConfig, resolve_device

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.mtda",
        description="Train a source model, adapt it to several target domains (SHOT-IM), quantize every target "
                    "model (RTN, BRECQ, QDrop, HDRQ), merge them (plain average and HDRQ merge) and report the "
                    "merged accuracy per target and its harmonic mean, with error barriers, Hessian traces, "
                    "distances and paired comparisons over seeds.")
    proto = p.add_mutually_exclusive_group()
    proto.add_argument("--quick", action="store_true", help="smoke protocol: one seed, small budgets, every stage")
    proto.add_argument("--full", action="store_true", help="the authors' protocol (a GPU job)")
    p.add_argument("--out", default=None, help="output folder (default ./mtda-out)")
    p.add_argument("--data", choices=DATA, default=None,
                   help="real: MNIST -> UCI digits and ImageNet-C corruptions of MNIST (default); synthetic: "
                        "shifted scikit-learn digits; folders: root/<domain>/<class>/<image>")
    p.add_argument("--data-dir", default=None, help="real: where MNIST and the corrupted images are cached "
                                                    "(default $XDG_CACHE_HOME/hdrq-mtda)")
    p.add_argument("--root", default=None, help="folders: the root directory")
    p.add_argument("--source", default=None, help="folders: the source domain's directory name")
    p.add_argument("--targets", nargs="+", default=None, help="target domains (default: the data's own)")
    p.add_argument("--severity", type=int, default=None, help="real: ImageNet-C severity, 1-5 (default 3)")
    p.add_argument("--image-size", type=int, default=None, help="synthetic and folders")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="run seeds 0..N-1")
    p.add_argument("--vary", nargs="+", choices=STAGES, default=None,
                   help="the stages whose randomness follows the seed (default all; the others use seed 0)")
    p.add_argument("--bits", type=int, nargs="+", default=None, metavar="B", help="W{B}A{B} settings (default 4 6)")
    p.add_argument("--w3a3", action="store_true", help="add W3A3 to the bit settings")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--calib-iters", type=int, default=None, help="reconstruction iterations per block, all methods")
    p.add_argument("--calib-samples", type=int, default=None, help="unlabeled calibration images per target")
    p.add_argument("--merge-seeds", type=int, default=None, help="seeds of the noise-sampling merge, averaged")
    p.add_argument("--quant-set", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="override a hdrq.QuantConfig field for one method, e.g. hdrq.lambda_dist=0 (repeatable)")
    p.add_argument("--source-epochs", type=int, default=None)
    p.add_argument("--adapt-epochs", type=int, default=None)
    p.add_argument("--adapt-lr", type=float, default=None)
    p.add_argument("--pseudo-label-weight", type=float, default=None,
                   help="SHOT's pseudo-label loss weight (0 = SHOT-IM, SHOT uses 0.3)")
    p.add_argument("--eval-split", choices=("test", "val"), default=None,
                   help="val: score on a split carved from each train split (for choosing settings)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads in all (default: one per worker)")
    p.add_argument("--workers", type=int, default=None, help="processes running seeds in parallel")
    p.add_argument("--backend", choices=("auto", "reference", "triton", "cuda"), default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no tables")
    return p


def _quant_overrides(items: Sequence[str]) -> dict:
    """``["hdrq.w_lr=1e-3"]`` -> ``{"hdrq": {"w_lr": 0.001}}``; a value is a Python literal where it parses
    as one, else a string (the QuantConfig then names what it got)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--quant-set expects METHOD.FIELD=VALUE, got {item!r}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out.setdefault(method, {})[name] = parsed
    return out


_PLAIN = ("out", "data", "data_dir", "root", "source", "severity", "image_size", "calib_iters", "calib_samples",
          "merge_seeds", "source_epochs", "adapt_epochs", "adapt_lr", "pseudo_label_weight", "eval_split",
          "device", "threads", "workers", "backend")


def config_from_args(args: argparse.Namespace) -> MTDAConfig:
    """The config the options describe, fully checked (raises ``ValueError`` / ``FileNotFoundError``)."""
    protocol = "quick" if args.quick else "full" if args.full else "default"
    overrides = {name: getattr(args, name) for name in _PLAIN if getattr(args, name) is not None}
    if args.methods is not None:
        overrides["methods"] = tuple(args.methods)
    if args.vary is not None:
        overrides["vary"] = tuple(args.vary)
    if args.targets is not None:
        overrides["targets"] = tuple(args.targets)
    if args.quant_set:
        overrides["quant_overrides"] = _quant_overrides(args.quant_set)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        overrides["seeds"] = tuple(range(args.seeds))
    for name in ("threads", "workers", "image_size"):
        if name in overrides and overrides[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {overrides[name]}")
    bits = list(args.bits) if args.bits is not None else list(MTDAConfig.preset(protocol).bits)
    if args.w3a3 and 3 not in bits:
        bits.insert(0, 3)
    overrides["bits"] = tuple(bits)
    cfg = MTDAConfig.preset(protocol, **overrides)
    resolve_device(cfg.device)
    if cfg.data == "folders":
        from .folders import ImageFolderDomains

        folders = ImageFolderDomains(cfg.root)
        wanted = [cfg.source] + list(cfg.targets or [])
        missing = [d for d in wanted if d not in folders.domains]
        if missing:
            raise ValueError(f"{missing} are not domains of {cfg.root!r}; have {folders.domains}")
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    from .run import run

    run(cfg, verbose=not args.quiet)
    return 0
