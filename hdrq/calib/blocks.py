"""Which modules are reconstructed together: residual blocks, transformer blocks, else single layers.

The rule, applied top-down from the model's children (the first match wins, its subtree is one block):

1. **Transformer block**: an ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``, or a module
   whose class name ends in ``Layer`` or ``Block`` and that contains an attention module (a submodule
   whose class name contains ``Attention``, e.g. Hugging Face ``BertLayer`` > ``BertAttention``,
   ``LlamaDecoderLayer`` > ``LlamaAttention``, ``GPT2Block`` > ``GPT2Attention``).
2. **Residual block**: a module whose own forward adds two tensors that both depend on its first input
   along different paths: the residual branch and the shortcut (identity or a projection such as
   torchvision's ``downsample``). It is read off a ``torch.fx`` trace of the module with every child
   kept opaque (a leaf), so a ``Sequential`` of residual blocks is *not* itself a block (its own forward
   adds nothing), while ``BasicBlock`` / ``Bottleneck`` / any hand-written ``x + f(x)`` module is. A
   module that cannot be traced (data-dependent control flow) is not a residual block; its children are
   examined instead.
3. Quantizable layers (``nn.Conv2d`` / ``nn.Linear``) outside every block are single-layer blocks.

Every other layer that multiplies by a weight matrix or kernel (``nn.Conv1d``, ``nn.ConvTranspose2d``,
``nn.Embedding``, ...) stays float: :func:`unquantizable_layers` names them and :func:`report_unquantizable`
says so in one warning, so nothing is left float silently (transformers' ``Conv1D`` is quantized:
``hdrq.quantize`` turns it into the ``nn.Linear`` it is).

Only modules containing at least one quantizable layer are considered, never the model itself. Users can
name the blocks instead (``QuantConfig.blocks`` or ``hdrq.quantize(..., blocks=[...])``).
"""
from __future__ import annotations

import operator
import re
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.fx
from torch import nn

from ..quant.attention import DecomposedMultiheadAttention
from ..quant.layers import is_transposed_linear

QUANTIZABLE = (nn.Conv2d, nn.Linear)
BLOCK_KINDS = ("transformer", "residual", "explicit", "layer")

_TRANSFORMER_NAME = re.compile(r"(Layer|Block)$")
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclass(frozen=True)
class Block:
    """One reconstruction unit: the module ``name`` and the quantizable layers (full names) inside it."""

    name: str
    kind: str
    layers: tuple[str, ...]


def _computes_as_base(m: nn.Module) -> bool:
    """A subclass that keeps ``nn.Linear`` / ``nn.Conv2d``'s forward computes what its base class does; one with
    its own forward (EfficientNet's static "same" padding, for example) may compute something else."""
    return type(m).forward in (nn.Linear.forward, nn.Conv2d.forward)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Conv2d`` / ``nn.Linear`` of ``model`` by name (subclasses that keep the base class's forward
    included), in registration order."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QUANTIZABLE) and _computes_as_base(m) and name}


# Why a layer type that holds a weight matrix stays float, by class name (optional libraries need not be
# imported); any other such type gets the generic reason.
_FLOAT_REASONS = {
    "Embedding": "an embedding table is a lookup, not a matmul",
    "EmbeddingBag": "an embedding table is a lookup, not a matmul",
}


def unquantizable_layers(model: nn.Module) -> dict[str, str]:
    """The layers of ``model`` that hold a weight matrix or kernel (a parameter named ``*weight*`` of two or more
    dimensions) but are not a quantizable ``nn.Linear`` / ``nn.Conv2d``: ``{name: why it stays float}``, in
    registration order. A weight shared with a quantizable layer (an embedding tied to the output layer) is
    named too: it holds that layer's quantized values. Norm layers (1-D weights) and parameters such as position
    embeddings or class tokens (not named weights) are not layers hdrq would quantize, and are not listed."""
    owners = {id(m.weight): name for name, m in quantizable_layers(model).items()}
    found = {}
    for name, m in model.named_modules():
        if (isinstance(m, QUANTIZABLE) and _computes_as_base(m)) or is_transposed_linear(m):
            continue  # quantized (a transposed linear as the nn.Linear it is)
        weights = [p for pn, p in m.named_parameters(recurse=False) if "weight" in pn and p.dim() >= 2]
        if not weights:
            continue
        cls = type(m).__name__
        if isinstance(m, QUANTIZABLE):
            base = "Linear" if isinstance(m, nn.Linear) else "Conv2d"
            why = f"{cls}: a subclass of nn.{base} with its own forward (hdrq cannot tell what it computes)"
        else:
            why = f"{cls}: {_FLOAT_REASONS.get(cls, 'only nn.Linear and nn.Conv2d layers are quantized')}"
        tied = [owners[id(p)] for p in weights if id(p) in owners]
        if tied:
            why += f"; its weight is tied to {tied[0]!r}, so it holds that layer's quantized weight"
        found[name] = why
    return found


def report_unquantizable(model: nn.Module, *, what: str = "hdrq.quantize") -> dict[str, str]:
    """One ``UserWarning`` listing :func:`unquantizable_layers` of ``model`` (none when there are none);
    returns them."""
    found = unquantizable_layers(model)
    if found:
        listed = "; ".join(f"{name or '<root>'!r} ({why})" for name, why in list(found.items())[:12])
        more = f"; and {len(found) - 12} more" if len(found) > 12 else ""
        warnings.warn(f"{what}: {len(found)} layer(s) with weights stay float: {listed}{more}", UserWarning,
                      stacklevel=3)
    return found


def is_transformer_block(module: nn.Module) -> bool:
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return True
    if not _TRANSFORMER_NAME.search(type(module).__name__):
        return False
    return any(isinstance(m, (nn.MultiheadAttention, DecomposedMultiheadAttention))
               or "Attention" in type(m).__name__ for m in module.modules() if m is not module)


class _ShallowTracer(torch.fx.Tracer):
    """Traces only the root's own forward: every submodule call stays one opaque node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _is_add(node: torch.fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ADD_METHODS))


def is_residual_block(module: nn.Module) -> bool:
    """True if ``module``'s own forward adds two different tensors that both depend on its first input."""
    try:
        graph = _ShallowTracer().trace(module)
    except Exception:  # data-dependent control flow, unsupported Python: not recognisable, not a block
        return False
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return False
    depends = {placeholders[0]}
    for node in graph.nodes:  # topological order: one pass marks everything downstream of the input
        if node not in depends and any(a in depends for a in node.all_input_nodes):
            depends.add(node)
        if _is_add(node) and len(node.args) >= 2:
            a, b = node.args[0], node.args[1]
            if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a is not b \
                    and a in depends and b in depends:
                return True
    return False


def _layers_under(name: str, layers: Sequence[str]) -> tuple[str, ...]:
    prefix = name + "."
    return tuple(l for l in layers if l == name or l.startswith(prefix))


def find_blocks(model: nn.Module, explicit: Optional[Sequence[str]] = None) -> list[Block]:
    """The blocks of ``model`` (see the module docstring), in registration order; every quantizable layer is
    in exactly one. ``explicit``: module names to use as the blocks instead of the automatic detection."""
    layers = list(quantizable_layers(model))
    blocks: list[Block] = []
    if explicit is not None:
        modules = dict(model.named_modules())
        for name in explicit:
            if name not in modules or not name:
                raise ValueError(f"block {name!r} is not a submodule of {type(model).__name__} "
                                 f"(submodules: {[n for n in modules if n][:12]}...)")
            inside = _layers_under(name, layers)
            if not inside:
                raise ValueError(f"block {name!r} ({type(modules[name]).__name__}) contains no nn.Conv2d / "
                                 f"nn.Linear layer")
            blocks.append(Block(name, "explicit", inside))
        for a in blocks:
            for b in blocks:
                if a is not b and (a.name == b.name or b.name.startswith(a.name + ".")):
                    raise ValueError(f"blocks must not overlap: {a.name!r} contains {b.name!r}")
    else:
        def visit(prefix: str, parent: nn.Module) -> None:
            for child_name, child in parent.named_children():
                name = f"{prefix}.{child_name}" if prefix else child_name
                if isinstance(child, QUANTIZABLE) or not _layers_under(name, layers):
                    continue
                if is_transformer_block(child):
                    blocks.append(Block(name, "transformer", _layers_under(name, layers)))
                elif is_residual_block(child):
                    blocks.append(Block(name, "residual", _layers_under(name, layers)))
                else:
                    visit(name, child)

        visit("", model)
    covered = {l for b in blocks for l in b.layers}
    blocks += [Block(l, "layer", (l,)) for l in layers if l not in covered]
    position = {l: i for i, l in enumerate(layers)}
    return sorted(blocks, key=lambda b: min(position[l] for l in b.layers))
