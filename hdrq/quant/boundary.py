"""Activation quantizers on a residual block's boundary: the block's input and its output after the add.

Under the "output" activation placement (the convention of QDrop and of the HDRQ authors' code) the residual
stream itself is quantized: each residual block's output, after the add and the activation, goes through an
activation quantizer, so the next block's shortcut and its convolutions see the same quantized tensor. These
quantizers belong to the block module, not to a layer:

* ``block.block_output_quantizer`` quantizes the first tensor the block returns;
* ``block.block_input_quantizer`` (only where the block's input is not already a quantized block output, e.g.
  the first block after the stem) quantizes the block's first positional argument.

They are ordinary submodules (their step sizes are in the state dict, merged and interpolated like any other
quantizer's) applied by forward hooks that look the submodule up by name at call time, so the same hooks serve
the fake-quant ``Quantizer`` during calibration and the exact rounding step ``hdrq.nn.ActQuant`` after
``hdrq.convert``. The hooks are plain module-level functions: a model with them deep-copies and pickles.
"""
from __future__ import annotations

from typing import Iterator, Optional

from torch import Tensor, nn

BLOCK_INPUT = "block_input_quantizer"
BLOCK_OUTPUT = "block_output_quantizer"
BOUNDARY_NAMES = (BLOCK_INPUT, BLOCK_OUTPUT)


def _quantize_block_input(module: nn.Module, args: tuple) -> Optional[tuple]:
    quantizer = getattr(module, BLOCK_INPUT, None)
    if quantizer is None:
        return None
    if not args or not isinstance(args[0], Tensor):
        raise TypeError(f"{type(module).__name__}: a block with an input quantizer must take its input tensor as "
                        f"the first positional argument, got {type(args[0]).__name__ if args else 'no arguments'}")
    return (quantizer(args[0]),) + tuple(args[1:])


def _quantize_block_output(module: nn.Module, args: tuple, output):
    quantizer = getattr(module, BLOCK_OUTPUT, None)
    if quantizer is None:
        return None
    if isinstance(output, Tensor):
        return quantizer(output)
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return (quantizer(output[0]),) + output[1:]
    raise TypeError(f"{type(module).__name__}: a block with an output quantizer must return a tensor or a tuple "
                    f"starting with one, got {type(output).__name__}")


def attach_block_quantizer(block: nn.Module, where: str, quantizer: nn.Module) -> None:
    """Put ``quantizer`` on ``block``'s input (``where="input"``) or output (``"output"``), replacing the one
    there if any. The hook is registered once per block and side; replacing only swaps the submodule."""
    if where not in ("input", "output"):
        raise ValueError(f"attach_block_quantizer: where must be 'input' or 'output', got {where!r}")
    name, hook = (BLOCK_INPUT, _quantize_block_input) if where == "input" else (BLOCK_OUTPUT, _quantize_block_output)
    existing = getattr(block, name, None)
    if existing is not None and name not in block._modules:
        raise ValueError(f"attach_block_quantizer: {type(block).__name__} already has an attribute {name!r} that "
                         f"is not a quantizer")
    setattr(block, name, quantizer)
    hooks = block._forward_pre_hooks if where == "input" else block._forward_hooks
    if hook not in hooks.values():
        if where == "input":
            block.register_forward_pre_hook(hook)
        else:
            block.register_forward_hook(hook)


def boundary_quantizers(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(block name, "input" | "output", quantizer)`` for every block-boundary quantizer in ``model``."""
    for name, m in model.named_modules():
        for where, attr in (("input", BLOCK_INPUT), ("output", BLOCK_OUTPUT)):
            q = m._modules.get(attr)
            if q is not None:
                yield name, where, q


def is_boundary_quantizer(name: str) -> bool:
    """True for the module path of a block-boundary quantizer (``...block_output_quantizer``)."""
    return name.rpartition(".")[2] in BOUNDARY_NAMES
