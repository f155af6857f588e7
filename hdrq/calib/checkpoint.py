"""Files of calibrated (fake-quant) models and of finished blocks, without pickle.

A calibrated model is a float architecture plus what calibration changed: every ``nn.Linear`` / ``nn.Conv2d``
became a ``QuantLinear`` / ``QuantConv2d`` (bits, signedness, step sizes, packed integer weights), residual
blocks got boundary quantizers, BatchNorm was folded. :func:`save_quantized` writes the state dict as
safetensors with that structure as JSON metadata (and a SHA-256 over both; the same content always gives the
same bytes); :func:`load_quantized` rebuilds
the model from the float architecture (the same model the calibration started from, or any model of its
architecture: its own weights are not used) on the meta device, applies the structure, and loads the tensors.

:class:`BlockCheckpoints` keeps one such file per finished block of a streamed calibration, so that a run
killed at any point continues from the last finished block (``hdrq.quantize(..., checkpoint=dir)``). Every
file is written to a temporary name and renamed (a crash never leaves a partial file under the final name)
and verified on reading (checksum, and the run's fingerprint: the config, the calibration data and the
model's layer shapes); a file that fails is reported and its block calibrated again.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..quant.boundary import attach_block_quantizer, boundary_quantizers
from ..quant.layers import quant_layers, set_module, to_quant_layer
from ..quant.quantizer import Quantizer

FORMAT = "hdrq-quantized"
FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


def _digest(meta_json: str, tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def write_atomic(path: PathLike, tensors: dict[str, Tensor], info: dict) -> None:
    """``tensors`` and the JSON ``info`` to a safetensors file at ``path``, through a temporary file renamed
    into place (and fsynced first, so a crash leaves either the old file or the whole new one)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_json = json.dumps(info, default=str)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        # One metadata key, "<sha256> <json>": safetensors writes its metadata map in no fixed order, and the
        # same content must give the same bytes.
        save_file(tensors, tmp, metadata={"hdrq": f"{_digest(meta_json, tensors)} {meta_json}"})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_verified(path: PathLike, fmt: str = FORMAT) -> tuple[dict, dict[str, Tensor]]:
    """The JSON info and tensors of a file written by :func:`write_atomic`; ``ValueError`` naming the problem
    if it is unreadable, of another format or version, or fails its checksum."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None
    digest, _, meta_json = meta.get("hdrq", "").partition(" ")
    if not meta_json:
        raise ValueError(f"{path} is a safetensors file without hdrq metadata")
    try:
        info = json.loads(meta_json)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the hdrq metadata is not valid JSON: {e}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: the hdrq metadata is not a JSON object")
    if info.get("format") != fmt or info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {info.get('format')!r} version {info.get('format_version')!r}, expected "
                         f"{fmt!r} version {FORMAT_VERSION}")
    if _digest(meta_json, tensors) != digest:
        raise ValueError(f"{path}: checksum mismatch, the file is corrupted")
    return info, tensors


# --------------------------------------------------------------------------------------------------
# Structure of a calibrated model
# --------------------------------------------------------------------------------------------------


def _quantizer_spec(q: Quantizer) -> dict:
    return {"bits": q.bits, "signed": q.signed, "axis": q.axis, "mode": q.mode}


def quant_structure(model: nn.Module) -> dict:
    """What calibration made of the float architecture: per quantized layer its quantizers and storage, per
    block-boundary quantizer its grid."""
    layers = {}
    for name, layer in quant_layers(model):
        layers[name] = {"weight": _quantizer_spec(layer.weight_quantizer), "act": _quantizer_spec(layer.act_quantizer),
                        "packed_bits": layer._packed_bits if layer.is_compact else None}
    boundaries = [{"block": b, "where": w, **_quantizer_spec(q)} for b, w, q in boundary_quantizers(model)]
    return {"layers": layers, "boundaries": boundaries}


def apply_structure(skeleton: nn.Module, structure: dict, *, root: str = "") -> nn.Module:
    """Turn the prepared float ``skeleton`` (any device, meta included) into the calibrated model's structure,
    in place. ``root``: the skeleton is the submodule at that path of the calibrated model (a block)."""
    prefix = f"{root}." if root else ""
    for name, spec in structure["layers"].items():
        if root and not name.startswith(prefix):
            continue
        path = name[len(prefix):]
        float_layer = skeleton.get_submodule(path)
        w, a = spec["weight"], spec["act"]
        q = to_quant_layer(float_layer, w["bits"], a["bits"], per_channel=w["axis"] == 0, a_signed=a["signed"],
                           a_enabled=a["mode"] != "off")
        q = q.to(float_layer.weight.device)
        q.act_quantizer.set_mode(a["mode"])
        q.weight_quantizer.set_mode(w["mode"])
        if spec["packed_bits"] is not None:
            q.compact(verify=False)
        set_module(skeleton, path, q.eval())
    for b in structure["boundaries"]:
        if root and b["block"] != root and not b["block"].startswith(prefix):
            continue
        block = skeleton if b["block"] == root else skeleton.get_submodule(b["block"][len(prefix):])
        q = Quantizer(b["bits"], signed=b["signed"], mode=b["mode"])
        attach_block_quantizer(block, b["where"], q.to(next(iter(skeleton.parameters())).device).eval())
    return skeleton


def _fill_from(model: nn.Module, float_model: nn.Module) -> None:
    """Buffers left on the meta device (not in the state dict: e.g. rotary frequencies) from the float model."""
    source = dict(float_model.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf is not None and buf.is_meta:
            if name not in source:
                raise ValueError(f"the calibrated model's buffer {name!r} is not in the file nor in the float model")
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            value = source[name]
            owner._buffers[leaf] = value.float() if value.is_floating_point() else value.clone()


def save_quantized(model: nn.Module, path: PathLike, *, extra: Optional[dict] = None) -> None:
    """Write a calibrated model (``hdrq.quantize``'s result, or a merge of such) to ``path``."""
    # Deterministic content only (no timings, no paths): the same calibration writes the same bytes.
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "structure": quant_structure(model),
            "hdrq_config": getattr(model, "hdrq_config", None), "hdrq_merge": getattr(model, "hdrq_merge", None),
            "extra": extra or {}}
    write_atomic(path, model.state_dict(), info)


def load_quantized(path: PathLike, float_model: nn.Module) -> nn.Module:
    """The calibrated model in ``path``, rebuilt on ``float_model``'s architecture (its weights are not used;
    buffers the state dict does not hold are taken from it). On the CPU, in eval mode."""
    from .engine import prepare_float
    from .stream import meta_skeleton

    info, tensors = read_verified(path)
    skeleton = prepare_float(meta_skeleton(float_model), "meta")
    try:
        apply_structure(skeleton, info["structure"])
    except (AttributeError, KeyError) as e:
        raise ValueError(f"{os.fspath(path)} does not fit the given architecture: {e}") from None
    expected = skeleton.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{os.fspath(path)} does not fit the given architecture: tensors missing from the file "
                         f"{missing[:6]}, tensors the architecture lacks {unexpected[:6]}")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(f"{os.fspath(path)}: tensor {k!r} is {tuple(t.shape)} in the file, "
                             f"{tuple(expected[k].shape)} in the architecture")
    skeleton.load_state_dict(tensors, assign=True)
    _fill_from(skeleton, float_model)
    for attr in ("hdrq_config", "hdrq_merge"):
        if info.get(attr) is not None:
            setattr(skeleton, attr, info[attr])
    return skeleton.eval()


# --------------------------------------------------------------------------------------------------
# Finished blocks of a streamed calibration
# --------------------------------------------------------------------------------------------------


def fingerprint(config: dict, data: Tensor, layers: dict[str, nn.Module], source: bool) -> str:
    """What a block checkpoint must agree with to be reused: the config, the calibration data (bytes), the
    layer names and shapes, and whether a source model was given."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    d = data.detach().cpu().contiguous()
    h.update(json.dumps([str(d.dtype), list(d.shape), source]).encode())
    h.update(d.reshape(-1).view(torch.uint8).numpy())
    for name, m in layers.items():
        h.update(json.dumps([name, list(m.weight.shape)]).encode())
    return h.hexdigest()


class BlockCheckpoints:
    """One file per finished block in ``folder`` (``block-<position>.safetensors``), for the run with
    ``fingerprint``. ``write`` is called by rank 0 only under data parallelism (``writer``)."""

    FORMAT = "hdrq-block"

    def __init__(self, folder: PathLike, fingerprint: str, *, writer: bool = True):
        self.folder, self.fingerprint, self.writer = os.fspath(folder), fingerprint, writer
        os.makedirs(self.folder, exist_ok=True)

    def _path(self, position: int) -> str:
        return os.path.join(self.folder, f"block-{position:05d}.safetensors")

    def write(self, position: int, name: str, module: nn.Module, report: Optional[dict], structure: dict) -> None:
        if not self.writer:
            return
        info = {"format": self.FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                "block": name, "report": report, "structure": structure}
        write_atomic(self._path(position), module.state_dict(), info)

    def read(self, position: int, name: str) -> Optional[tuple[dict, dict[str, Tensor]]]:
        """``(info, tensors)`` of the block's verified checkpoint, or None (absent, or failing verification:
        then a warning says why)."""
        path = self._path(position)
        if not os.path.exists(path):
            return None
        try:
            info, tensors = read_verified(path, self.FORMAT)
        except ValueError as e:
            warnings.warn(f"hdrq: ignoring checkpoint {path}: {e}", RuntimeWarning, stacklevel=2)
            return None
        if info.get("fingerprint") != self.fingerprint or info.get("block") != name:
            warnings.warn(f"hdrq: ignoring checkpoint {path}: it belongs to another run (config, data or model "
                          f"differ)", RuntimeWarning, stacklevel=2)
            return None
        return info, tensors


__all__ = ["save_quantized", "load_quantized", "quant_structure", "apply_structure", "BlockCheckpoints",
           "fingerprint", "write_atomic", "read_verified"]

