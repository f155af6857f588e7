"""The ``hdrq`` command line (console script ``hdrq = "hdrq.cli:main"``; also ``python -m hdrq``).

    hdrq info                 version, device and the kernel backends available
    hdrq calibrate --source SRC --targets T1 T2 --data D1 D2 --config cfg.json --out DIR [--merge hdrq]
                              calibrate adapted models on their data (torchrun: --parallel domain | data)
    hdrq merge --models A.quant.safetensors B.quant.safetensors --out merged.quant.safetensors
    hdrq convert --model merged.quant.safetensors --out model.safetensors   (integer layers, hdrq.load)

Models are transformers folders or checkpoints with --builder module:factory (see hdrq.pipeline). The benchmark
of merged low-bit models is an application of the library: ``python -m examples.mtda`` (``make demo``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


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
    parser.print_help()
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
