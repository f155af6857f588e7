"""The ``hdrq`` command line (console script ``hdrq = "hdrq.cli:main"``; also ``python -m hdrq``).

    hdrq info                 version, device and the kernel backends available

The benchmark of merged low-bit models is an application of the library: ``python -m examples.mtda``
(``make demo``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


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
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"hdrq {__version__}")
        return 0
    if args.command == "info":
        return _info()
    parser.print_help()
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
