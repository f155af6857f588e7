"""The ``hdrq`` command line (console script ``hdrq = "hdrq.cli:main"``; also ``python -m hdrq``).

    hdrq demo                 the default protocol (~10 minutes on a 2-core CPU; the GPU when present)
    hdrq demo --quick         the smoke protocol (every stage, one seed, tiny budgets)
    hdrq demo --full          the authors' protocol (20,000 iterations per block, ...)
    hdrq demo --data folders --root OfficeHome --source Real_World
    hdrq info                 version, device and the kernel backends available
    hdrq calibrate --source SRC --targets T1 T2 --data D1 D2 --config cfg.json --out DIR [--merge hdrq]
                              calibrate adapted models on their data (torchrun: --parallel domain | data)
    hdrq merge --models A.quant.safetensors B.quant.safetensors --out merged.quant.safetensors
    hdrq convert --model merged.quant.safetensors --out model.safetensors   (integer layers, hdrq.load)

Models are transformers folders or checkpoints with --builder module:factory (see hdrq.pipeline).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _demo_parser(sub) -> None:
    from .demo import METHODS, QUANT_METHODS

    p = sub.add_parser("demo", help="offline multi-target domain adaptation of merged low-bit models",
                       description="Train a small ResNet on a source domain, adapt it to several target domains "
                                   "(SHOT-IM), quantize every target model (RTN, BRECQ, QDrop, HDRQ), merge them and "
                                   "report the merged accuracy per target and its harmonic mean.")
    proto = p.add_mutually_exclusive_group()
    proto.add_argument("--quick", action="store_true", help="smoke protocol: one seed, tiny budgets, every stage")
    proto.add_argument("--full", action="store_true",
                       help="the authors' protocol (method presets: 20,000 iterations per block, ...)")
    p.add_argument("--out", default=None, help="output folder (default ./hdrq-demo-out)")
    p.add_argument("--data", choices=("digits", "folders"), default=None,
                   help="digits: the synthetic digits domains (default); folders: root/<domain>/<class>/<image>")
    p.add_argument("--root", default=None, help="folders: the root directory")
    p.add_argument("--source", default=None, help="folders: the source domain's directory name")
    p.add_argument("--targets", nargs="+", default=None,
                   help="target domains (digits: shift names; folders: directory names; default: all others)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="run seeds 0..N-1")
    p.add_argument("--bits", type=int, nargs="+", default=None, metavar="B", help="W{B}A{B} settings (default 4 6)")
    p.add_argument("--w3a3", action="store_true", help="add W3A3 to the bit settings")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--barrier-methods", nargs="+", choices=QUANT_METHODS, default=None)
    p.add_argument("--calib-iters", type=int, default=None, help="reconstruction iterations per block, all methods")
    p.add_argument("--calib-samples", type=int, default=None)
    p.add_argument("--noise-mode", choices=("uniform", "histogram"), default=None, help="HDRQ's noise")
    p.add_argument("--quant-set", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="override a hdrq.QuantConfig field for one method, e.g. hdrq.lambda_dist=0 (repeatable)")
    p.add_argument("--source-epochs", type=int, default=None)
    p.add_argument("--adapt-epochs", type=int, default=None)
    p.add_argument("--pseudo-label-weight", type=float, default=None,
                   help="SHOT's pseudo-label loss weight (0 = SHOT-IM, SHOT uses 0.3)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads in all (default: torch's)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes running seeds in parallel (default: one per CPU core on the CPU, 1 on a GPU)")
    p.add_argument("--eval-split", choices=("test", "val"), default=None,
                   help="val: evaluate on a split carved from each train split (for choosing settings)")
    p.add_argument("--backend", choices=("auto", "reference", "triton", "cuda"), default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no table")


def _demo_config(args: argparse.Namespace):
    from .demo import DemoConfig

    protocol = "quick" if args.quick else "full" if args.full else "default"
    overrides = {}
    for name in ("out", "data", "root", "source", "image_size", "calib_iters", "calib_samples", "noise_mode",
                 "source_epochs", "adapt_epochs", "pseudo_label_weight", "device", "backend", "threads",
                 "workers", "eval_split"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    for name in ("methods", "barrier_methods"):
        if getattr(args, name) is not None:
            overrides[name] = tuple(getattr(args, name))
    if args.targets is not None:
        overrides["targets"] = tuple(args.targets)
    elif args.data == "folders":
        overrides["targets"] = None  # every domain but the source
    if args.data == "folders" and args.image_size is None:
        overrides["image_size"] = 32
    if args.quant_set:
        overrides["quant_overrides"] = _quant_overrides(args.quant_set)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        overrides["seeds"] = tuple(range(args.seeds))
    bits = list(args.bits) if args.bits is not None else list(DemoConfig.preset(protocol).bits)
    if args.w3a3 and 3 not in bits:
        bits.insert(0, 3)
    overrides["bits"] = tuple(bits)
    cfg = DemoConfig.preset(protocol, **overrides)
    if cfg.data == "folders":
        # Fail now, with the folder layout in the message, rather than after the first seed has started.
        from .data import ImageFolderDomains

        folders = ImageFolderDomains(cfg.root)
        if cfg.source not in folders.domains:
            raise ValueError(f"--source {cfg.source!r} is not a domain of {cfg.root!r}; have {folders.domains}")
    return cfg


def _quant_overrides(items: Sequence[str]) -> dict:
    """``["hdrq.w_lr=1e-3", "qdrop.drop_prob=0.3"]`` -> ``{"hdrq": {"w_lr": 0.001}, "qdrop": {...}}``; values
    are Python literals where they parse as one, else strings."""
    import ast

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


def _pipeline_parsers(sub) -> None:
    c = sub.add_parser("calibrate", help="calibrate adapted models on their unlabeled data (torchrun for several "
                                         "processes)",
                       description="Quantize each target model with hdrq.quantize on its calibration data, the "
                                   "source model as HDRQ's distance anchor; optionally merge them. Under torchrun, "
                                   "--parallel domain splits the targets across processes, --parallel data splits "
                                   "each block's samples. A killed run, started again, continues.")
    c.add_argument("--source", required=True, help="the pre-adaptation model (transformers folder or checkpoint)")
    c.add_argument("--targets", nargs="+", required=True, help="the adapted models")
    c.add_argument("--data", nargs="+", required=True, help="one calibration data file per target (.pt, "
                                                            ".safetensors, .npy; [samples, ...])")
    c.add_argument("--config", default=None, help="a .json or .toml file of hdrq.QuantConfig fields")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--builder", default=None, help="module:factory building the architecture of checkpoint files")
    c.add_argument("--parallel", choices=("domain", "data"), default="domain")
    c.add_argument("--merge", default=None, choices=("hdrq", "average", "task_arithmetic", "ties"),
                   help="merge the calibrated targets into merged.quant.safetensors")
    c.add_argument("--merge-seed", type=int, default=0)
    c.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present; one GPU per process)")
    c.add_argument("--timeout-hours", type=float, default=48.0, help="how long a process waits for the others")
    m = sub.add_parser("merge", help="merge calibrated model files")
    m.add_argument("--models", nargs="+", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--method", default="hdrq", choices=("hdrq", "average", "task_arithmetic", "ties"))
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--candidates", type=int, default=100)
    m.add_argument("--arch", default=None, help="the float architecture (default: the one the files record)")
    m.add_argument("--builder", default=None)
    m.add_argument("--source", default=None, help="the pre-adaptation model (task_arithmetic, ties)")
    v = sub.add_parser("convert", help="a calibrated model file to integer layers (hdrq.save format)")
    v.add_argument("--model", required=True)
    v.add_argument("--out", required=True)
    v.add_argument("--arch", default=None)
    v.add_argument("--builder", default=None)
    v.add_argument("--act", choices=("static", "dynamic"), default="static")


def _run_pipeline(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .pipeline import PipelineError, calibrate, convert_file, merge_files

    try:
        if args.command == "calibrate":
            calibrate(source=args.source, targets=args.targets, data=args.data, out=args.out, config=args.config,
                      builder=args.builder, parallel=args.parallel, merge=args.merge, merge_seed=args.merge_seed,
                      device=args.device, timeout_hours=args.timeout_hours,
                      log=lambda msg: print(msg, file=sys.stderr, flush=True))
        elif args.command == "merge":
            print(merge_files(args.models, args.out, method=args.method, seed=args.seed, candidates=args.candidates,
                              arch=args.arch, builder=args.builder, source=args.source))
        else:
            print(convert_file(args.model, args.out, arch=args.arch, builder=args.builder, act=args.act))
    except PipelineError as e:
        parser.exit(2, f"hdrq {args.command}: error: {e}\n")
    return 0


def _info() -> int:
    import torch

    import hdrq

    print(f"hdrq {hdrq.__version__}, torch {torch.__version__}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}")
    print(f"backend: {hdrq.get_backend()}; available on {dev}: {hdrq.ops.available_backends(dev)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hdrq", description="merge-friendly post-training quantization (HDRQ)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    _demo_parser(sub)
    sub.add_parser("info", help="version, device and kernel backends")
    _pipeline_parsers(sub)
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"hdrq {__version__}")
        return 0
    if args.command == "info":
        return _info()
    if args.command in ("calibrate", "merge", "convert"):
        return _run_pipeline(args, parser)
    if args.command == "demo":
        from .demo import run_demo

        try:
            cfg = _demo_config(args)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        run_demo(cfg, verbose=not args.quiet)
        return 0
    parser.print_help()
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
