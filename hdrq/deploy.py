"""Deploy path: quantized (or float) models to real integer layers, and their files.

``convert(model)`` returns a copy of a quantized model (the quantized-model contract: ``QuantLinear`` /
``QuantConv2d`` in the hard-quantized state) with ``hdrq.nn.QLinear`` / ``hdrq.nn.QConv2d`` in their place,
built from the quantizers' integers and step sizes exactly. With ``w_bits``/``a_bits`` it also converts float
``nn.Linear`` / ``nn.Conv2d`` layers by round-to-nearest (``QLinear.from_float``). The converted model is an
ordinary ``nn.Module``: evaluate it exactly as the fake-quant model was evaluated to compare accuracy.

``save(model, path)`` / ``load(path, model=None)``: one safetensors file, no pickle anywhere.

* Tensors: each integer layer's canonical tensors (``weight_int6`` = ``hdrq.ops.pack_int6`` of the
  integers, or ``weight_int8``; ``weight_scale``; ``bias``; ``act_scale``), never the kernel layout of
  ``hdrq.ops.pack_weight`` (that belongs to the kernels and is made again on load); plus the state_dict
  entries of every other module.
* Metadata (safetensors' string header), key ``"hdrq"``: JSON with the format name and version, the hdrq
  version, the model's ``hdrq_config`` and convert settings, and ``modules``: every module path in
  ``named_modules`` order with its type and, where hdrq knows how, its constructor arguments (``spec``):
  each integer layer's bits, act mode and shapes, and a fixed table of ``torch.nn`` containers and layers.
  Key ``"hdrq_sha256"``: SHA-256 over the JSON and every tensor's name, dtype, shape and bytes.

Rebuilding: a model made only of known modules (``nn.Sequential`` of layers, activations, pools, norms...)
is rebuilt from the file alone (``load(path)``). Any other model (a custom ``nn.Module`` class, whose code a
file cannot carry without pickle) is loaded into a skeleton: ``load(path, model=MyNet())``, where the
skeleton is the float architecture (or its fake-quant or converted form); hdrq checks it against the file
module by module, puts the integer layers in place of the ``nn.Linear`` / ``nn.Conv2d`` (transformers'
``Conv1D`` too, or ``QuantLinear`` ...) at their paths and ``nn.Identity`` where BatchNorm was folded, and loads
the other tensors. All checks run before the skeleton is touched. Truncated, corrupted (checksum), foreign,
wrong-version or mismatched files raise ``ValueError`` naming what differs; a missing file ``FileNotFoundError``
and a folder ``IsADirectoryError``. Loaded models are returned in eval mode.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from . import __version__
from .calib.blocks import report_unquantizable
from .calib.config import check_device
from .nn import OBSERVERS, OFF_ACT_MODES, ActQuant, QConv2d, QLAYERS, QLinear, qlayers
from .quant.boundary import attach_block_quantizer, is_boundary_quantizer
from .quant.layers import QuantConv2d, QuantLinear, is_transposed_linear, linear_from_transposed, set_module
from .quant.quantizer import Quantizer

__all__ = ["ConvertConfig", "convert", "save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "hdrq-deploy"
FORMAT_VERSION = 1


# ======================================================================================================
# convert
# ======================================================================================================


@dataclass
class ConvertConfig:
    """How :func:`convert` builds the integer layers.

    act: ``"static"`` (the calibrated per-tensor input step size: the fake-quant model's results) or
        ``"dynamic"`` (per-token scales at run time) for quantized layers whose inputs were quantized.
    off_act: layers whose act quantizer is off: ``"float"`` (float matmul on the dequantized integer
        weights: identical results, no speed-up) or ``"dynamic8"`` (8-bit per-token inputs on the integer
        kernel: faster, results change slightly).
    w_bits, a_bits: when set, float ``nn.Linear`` / ``nn.Conv2d`` layers (exact types; subclasses such as
        MultiheadAttention's out_proj are left alone) are converted too, by RTN with ``observer``
        (``"mse"`` or ``"minmax"``) and dynamic per-token inputs (a float layer has no calibrated scale).
    skip: module names (``named_modules`` paths) left as they are.
    """

    act: str = "static"
    off_act: str = "float"
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    observer: str = "mse"
    skip: tuple = ()

    def __post_init__(self):
        if isinstance(self.skip, (str, bytes)) or not all(isinstance(n, str) for n in self.skip):
            raise TypeError(f"ConvertConfig: skip must be a list of module names, got {self.skip!r}"
                            + (f" (write skip=[{self.skip!r}])" if isinstance(self.skip, str) else ""))
        self.skip = tuple(self.skip)
        if self.act not in ("static", "dynamic"):
            raise ValueError(f"ConvertConfig: act must be 'static' or 'dynamic', got {self.act!r}")
        if self.off_act not in OFF_ACT_MODES:
            raise ValueError(f"ConvertConfig: off_act must be one of {OFF_ACT_MODES}, got {self.off_act!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"ConvertConfig: observer must be one of {OBSERVERS}, got {self.observer!r}")
        if (self.w_bits is None) != (self.a_bits is None):
            raise ValueError(f"ConvertConfig: give both w_bits and a_bits to convert float layers, or neither; "
                             f"got w_bits={self.w_bits!r}, a_bits={self.a_bits!r}")
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8):
                raise ValueError(f"ConvertConfig: {name} must be an int from 2 to 8, got {v!r}")


def _convert_one(m: nn.Module, cfg: ConvertConfig, name: str = "") -> Optional[nn.Module]:
    """The integer layer for ``m`` (at path ``name``), or None if ``m`` is not converted."""
    if isinstance(m, Quantizer) and is_boundary_quantizer(name):
        return ActQuant.from_quantizer(m) if m.mode != "off" else nn.Identity()
    if isinstance(m, QuantLinear):
        return QLinear.from_quant(m, act=cfg.act, off_act=cfg.off_act)
    if isinstance(m, QuantConv2d):
        return QConv2d.from_quant(m, act=cfg.act, off_act=cfg.off_act)
    if cfg.w_bits is not None and type(m) is nn.Linear:
        return QLinear.from_float(m, cfg.w_bits, cfg.a_bits, observer=cfg.observer)
    if cfg.w_bits is not None and is_transposed_linear(m):  # transformers' Conv1D
        return QLinear.from_float(linear_from_transposed(m), cfg.w_bits, cfg.a_bits, observer=cfg.observer)
    if cfg.w_bits is not None and type(m) is nn.Conv2d:
        return QConv2d.from_float(m, cfg.w_bits, cfg.a_bits, observer=cfg.observer)
    return None


@torch.no_grad()
def convert(model: nn.Module, config: Optional[ConvertConfig] = None, *, verbose: bool = True,
            **overrides) -> nn.Module:
    """A copy of ``model`` with integer layers (``hdrq.nn.QLinear`` / ``QConv2d``) in place of its
    ``QuantLinear`` / ``QuantConv2d`` (and of float layers when ``w_bits``/``a_bits`` are given); ``model``
    is untouched. ``config`` fields may also be passed as keywords: ``convert(m, act="dynamic")``,
    ``convert(float_model, w_bits=8, a_bits=8)``. Quantized layers must be in the hard-quantized state; their
    integers and step sizes are taken exactly, so with ``act="static"`` the converted model computes what the
    fake-quant model computes, up to fp32 summation order (see ``hdrq.nn``)."""
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, ConvertConfig):
        raise TypeError(f"convert: config must be a hdrq.deploy.ConvertConfig, got {type(config).__name__} (its "
                        f"fields may also be passed as keywords: convert(model, act='dynamic'))")
    cfg = dataclasses.replace(config or ConvertConfig(), **overrides)
    root = _convert_one(model, cfg)
    if root is not None:  # a bare layer
        return root
    unknown = sorted(set(cfg.skip) - {name for name, _ in model.named_modules()})
    if unknown:
        raise ValueError(f"convert: skip names modules the model does not have: {unknown[:8]}")
    if cfg.w_bits is not None:
        report_unquantizable(model, what="hdrq.convert")
    out = copy.deepcopy(model)
    # every path (a layer registered twice is converted once and stays shared)
    targets = [(name, m) for name, m in out.named_modules(remove_duplicate=False)
               if name not in cfg.skip and (isinstance(m, (QuantLinear, QuantConv2d))
                                            or (isinstance(m, Quantizer) and is_boundary_quantizer(name))
                                            or (cfg.w_bits is not None and (type(m) in (nn.Linear, nn.Conv2d)
                                                                            or is_transposed_linear(m))))]
    if not targets:
        raise ValueError("convert: the model has no QuantLinear / QuantConv2d to convert (pass w_bits and a_bits "
                         "to convert a float model's nn.Linear / nn.Conv2d by round-to-nearest)")
    done: dict[int, nn.Module] = {}
    for name, m in tqdm(targets, desc="hdrq.convert", disable=not verbose, leave=False):
        if id(m) not in done:
            try:
                done[id(m)] = _convert_one(m, cfg, name)
            except (ValueError, TypeError) as e:
                raise type(e)(f"convert: layer {name!r}: {e}") from None
        set_module(out, name, done[id(m)])
    out.hdrq_deploy = {**dataclasses.asdict(cfg), "skip": list(cfg.skip)}  # as it reads back from JSON
    return out


# ======================================================================================================
# Module specs: what the file records so that a model of known modules can be rebuilt without pickle
# ======================================================================================================


def _attrs(*names: str) -> Callable[[nn.Module], dict]:
    return lambda m: {n: getattr(m, n) for n in names}


def _with_bias(*names: str) -> Callable[[nn.Module], dict]:
    return lambda m: {**{n: getattr(m, n) for n in names}, "bias": m.bias is not None}


_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")

# type -> its constructor arguments read off an instance. Only exact types are matched (a subclass may
# take other arguments or compute something else).
_KNOWN: dict[type, Callable[[nn.Module], dict]] = {
    nn.Sequential: _attrs(), nn.ModuleList: _attrs(), nn.ModuleDict: _attrs(), nn.Identity: _attrs(),
    nn.ReLU: _attrs("inplace"), nn.ReLU6: _attrs("inplace"), nn.SiLU: _attrs("inplace"),
    nn.Hardswish: _attrs("inplace"), nn.LeakyReLU: _attrs("negative_slope", "inplace"),
    nn.GELU: _attrs("approximate"), nn.Sigmoid: _attrs(), nn.Tanh: _attrs(), nn.Softmax: _attrs("dim"),
    nn.Flatten: _attrs("start_dim", "end_dim"), nn.Dropout: _attrs("p", "inplace"),
    nn.MaxPool2d: _attrs("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"),
    nn.AvgPool2d: _attrs("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    nn.AdaptiveAvgPool2d: _attrs("output_size"),
    nn.BatchNorm1d: _attrs(*_NORM), nn.BatchNorm2d: _attrs(*_NORM),
    nn.LayerNorm: _with_bias("normalized_shape", "eps", "elementwise_affine"),
    nn.Linear: _with_bias("in_features", "out_features"),
    nn.Conv2d: _with_bias("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                          "padding_mode"),
    QLinear: QLinear.spec, QConv2d: QConv2d.spec, ActQuant: ActQuant.spec,
}
_BY_NAME = {f"{t.__module__}.{t.__qualname__}": t for t in _KNOWN}


def _type_name(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def _tuples(v):
    """JSON lists back to the tuples the constructors were given."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _spec(m: nn.Module) -> Optional[dict]:
    fn = _KNOWN.get(type(m))
    if fn is None:
        return None
    return {k: _jsonable(v) for k, v in fn(m).items()}


def _build(entry: dict, device) -> nn.Module:
    cls = _BY_NAME.get(entry["type"])
    if cls is None:
        raise ValueError(f"module {entry['path']!r} is a {entry['type']}, which hdrq cannot rebuild from a file")
    spec = entry["spec"]
    try:
        if cls in QLAYERS or cls is ActQuant:
            return cls(**spec, device=device)
        return cls(**{k: _tuples(v) for k, v in spec.items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"module {entry['path']!r}: cannot rebuild a {entry['type']} from {spec}: {e}") from None


# ======================================================================================================
# save
# ======================================================================================================


def _owner(key: str) -> str:
    return key.rpartition(".")[0]


def _under(path: str, roots: set[str]) -> bool:
    """True if ``path`` is one of ``roots`` or inside one of them."""
    if path in roots or "" in roots:
        return True
    parts = path.split(".")
    return any(".".join(parts[:i]) in roots for i in range(1, len(parts)))


def _digest(meta_json: str, tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the metadata JSON and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write a converted model (at least one ``hdrq.nn.QLinear`` / ``QConv2d``) to ``path`` as safetensors
    with hdrq's JSON metadata and checksum (module docstring). Written to a temporary file first and
    renamed, so an interrupted save never leaves a partial file under ``path``. Tensors shared between
    modules (tied weights) are written once per use and come back untied."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"hdrq.save: model must be an nn.Module, got {type(model).__name__}")
    qpaths = {name for name, _ in qlayers(model)}
    if not qpaths:
        raise ValueError("save: the model has no hdrq.nn.QLinear / QConv2d; convert it first (hdrq.convert)")
    modules, tensors = [], {}
    for name, m in model.named_modules(remove_duplicate=False):
        modules.append({"path": name, "type": _type_name(m), "spec": _spec(m)})
        if isinstance(m, QLAYERS):
            tensors.update({f"{name}.{k}" if name else k: v for k, v in m.canonical_tensors().items()})
    for key, t in model.state_dict().items():
        if not _under(_owner(key), qpaths):
            tensors[key] = t.detach().cpu().contiguous().clone()
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "hdrq_version": __version__,
        "torch_version": torch.__version__,
        "config": getattr(model, "hdrq_config", None), "convert": getattr(model, "hdrq_deploy", None),
        "modules": modules,
    }
    meta_json = json.dumps(info, default=str)
    path = _file_path(path, "hdrq.save")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"hdrq.save: the folder {folder} does not exist (create it first)")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={"hdrq": meta_json, "hdrq_sha256": _digest(meta_json, tensors)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ======================================================================================================
# load
# ======================================================================================================


def _file_path(path, what: str) -> str:
    """``path`` as a str; ``TypeError`` for a non-path, ``IsADirectoryError`` for a directory."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{what}: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fsdecode(os.fspath(path))
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[:4]
        raise IsADirectoryError(f"{what}: {path} is a directory; pass the path of a file (written by hdrq.save)"
                                + (f", e.g. one of {found}" if found else ""))
    return path


def _read(path: str) -> tuple[dict, dict[str, Tensor]]:
    """The parsed, version-checked, checksum-verified metadata and the tensors (CPU) of an hdrq file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"hdrq.load: {path} is not a readable safetensors file (truncated or corrupted?): {e}") \
            from None
    if "hdrq" not in meta or "hdrq_sha256" not in meta:
        raise ValueError(f"hdrq.load: {path} is a safetensors file without hdrq metadata; hdrq.load reads files "
                         f"written by hdrq.save")
    try:
        info = json.loads(meta["hdrq"])
    except json.JSONDecodeError as e:
        raise ValueError(f"hdrq.load: {path}: the hdrq metadata is not valid JSON (corrupted file?): {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"hdrq.load: {path}: unknown format {info.get('format') if isinstance(info, dict) else info!r}"
                         f", expected {FORMAT!r}")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"hdrq.load: {path} has format version {info.get('format_version')!r} (written by hdrq "
                         f"{info.get('hdrq_version')}); this hdrq {__version__} reads version {FORMAT_VERSION}")
    if _digest(meta["hdrq"], tensors) != meta["hdrq_sha256"]:
        raise ValueError(f"hdrq.load: {path}: checksum mismatch, the file is corrupted")
    modules = info.get("modules")
    if (not isinstance(modules, list) or not modules or modules[0].get("path") != ""
            or not all(isinstance(e, dict) and {"path", "type", "spec"} <= set(e) for e in modules)):
        raise ValueError(f"hdrq.load: {path}: malformed module list in the metadata")
    return info, tensors


def _layer_tensors(tensors: dict[str, Tensor], path: str) -> dict[str, Tensor]:
    prefix = f"{path}." if path else ""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}


def _module_device(m: nn.Module) -> torch.device:
    for t in (*m.parameters(), *m.buffers()):
        return t.device
    return torch.device("cpu")


def _geometry_matches(skel: nn.Module, spec: dict) -> Optional[str]:
    """None if the skeleton layer has the shapes of the file's integer layer, else what differs."""
    if is_transposed_linear(skel):  # transformers' Conv1D: a Linear that calls its sizes nx, nf
        diff = [f"{k}: file {spec.get(k)}, model {v}" for k, v in (("in_features", skel.nx), ("out_features", skel.nf))
                if spec.get(k) != v]
        return "; ".join(diff) or None
    if isinstance(skel, (nn.Linear, QuantLinear, QLinear)):
        keys = ("in_features", "out_features")
    else:
        keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                "padding_mode")
    diff = [f"{k}: file {_tuples(spec.get(k))}, model {getattr(skel, k)}" for k in keys
            if _tuples(spec.get(k)) != _tuples(_jsonable(getattr(skel, k)))]
    return "; ".join(diff) or None


_REPLACEABLE = {QLinear: (nn.Linear, QuantLinear, QLinear), QConv2d: (nn.Conv2d, QuantConv2d, QConv2d)}


def _place(parent: nn.Module, path: str, module: nn.Module) -> None:
    """Put a rebuilt module at ``path`` under its ``parent``: a block-boundary rounding step goes back with its
    hook (``hdrq.quant.boundary``), anything else as an ordinary child."""
    child = path.rpartition(".")[2]
    if isinstance(module, ActQuant) and is_boundary_quantizer(path):
        attach_block_quantizer(parent, "input" if child.startswith("block_input") else "output", module)
    else:
        parent.add_module(child, module)


def _build_act_quant(entry: dict, tensors: dict[str, Tensor], device) -> ActQuant:
    where = f"hdrq.load: module {entry['path']!r}"
    if set(tensors) != {"scale"} or tuple(tensors["scale"].shape) != (1,) or tensors["scale"].dtype != torch.float32:
        raise ValueError(f"{where}: an ActQuant needs one float32 tensor 'scale' of shape (1,), got "
                         f"{ {k: (str(v.dtype), tuple(v.shape)) for k, v in tensors.items()} }")
    m = _build(entry, device)
    try:
        return m.set_scale(tensors["scale"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _plan_skeleton(model: nn.Module, modules: list[dict]) -> tuple[dict[str, type], set[str]]:
    """Check the skeleton against the file's module list. Returns {path: integer layer class} to build and
    the paths where a folded BatchNorm becomes nn.Identity. Raises ValueError on any mismatch. Block-boundary
    rounding steps (``ActQuant``) are the file's own: the skeleton may have a quantizer there (a fake-quant
    skeleton) or nothing (the float architecture), but the block they belong to must exist."""
    skel = dict(model.named_modules(remove_duplicate=False))
    qbuild, folded = {}, set()
    for e in modules:
        cls = _BY_NAME.get(e["type"])
        if cls in QLAYERS:
            qbuild[e["path"]] = cls
        elif cls is nn.Identity and isinstance(skel.get(e["path"]), (nn.BatchNorm1d, nn.BatchNorm2d)):
            folded.add(e["path"])
        elif cls is ActQuant and (not is_boundary_quantizer(e["path"]) or _owner(e["path"]) not in skel):
            raise ValueError(f"hdrq.load: the file has an activation rounding step at {e['path']!r}, but the model "
                             f"has no module {_owner(e['path'])!r} for it")
    replaced = set(qbuild) | folded
    file_paths = {e["path"] for e in modules if not is_boundary_quantizer(e["path"])}
    skel_paths = {p for p in skel if not (p not in replaced and _under(p, replaced)) and not is_boundary_quantizer(p)}
    if file_paths != skel_paths:
        only_file, only_model = sorted(file_paths - skel_paths), sorted(skel_paths - file_paths)
        raise ValueError(f"hdrq.load: the model does not have the file's module structure: modules only in the "
                         f"file {only_file[:8]}, only in the model {only_model[:8]}")
    for e in modules:
        if is_boundary_quantizer(e["path"]):
            continue
        p, m = e["path"], skel[e["path"]]
        where = f"module {p!r}" if p else "the root module"
        if p in qbuild:
            ok = _REPLACEABLE[qbuild[p]]
            if not isinstance(m, ok) and not (qbuild[p] is QLinear and is_transposed_linear(m)):
                raise ValueError(f"hdrq.load: {where} is a {qbuild[p].__name__} in the file but a "
                                 f"{type(m).__name__} in the model (expected one of {[c.__name__ for c in ok]})")
            diff = _geometry_matches(m, e["spec"])
            if diff:
                raise ValueError(f"hdrq.load: shape mismatch at {where}: {diff}")
        elif p not in folded and e["type"].rpartition(".")[2] != type(m).__name__:
            raise ValueError(f"hdrq.load: {where} is a {e['type']} in the file but a {_type_name(m)} in the model")
    return qbuild, folded


def _check_rest(target_state: dict[str, Tensor], rest: dict[str, Tensor]) -> None:
    """The file's non-integer-layer tensors must match the model's, name for name, shape and dtype."""
    missing, unexpected = sorted(set(target_state) - set(rest)), sorted(set(rest) - set(target_state))
    if missing or unexpected:
        raise ValueError(f"hdrq.load: tensors missing from the file {missing[:8]}, tensors the model does not "
                         f"have {unexpected[:8]}")
    for k, t in sorted(rest.items()):
        want = target_state[k]
        if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
            raise ValueError(f"hdrq.load: shape/dtype mismatch at {k!r}: file {t.dtype} {tuple(t.shape)}, model "
                             f"{want.dtype} {tuple(want.shape)}")


def load(path: Union[str, os.PathLike], model: Optional[nn.Module] = None, *,
         device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Read a file written by :func:`save`.

    Without ``model`` the file's model is rebuilt, which needs every module to be one hdrq knows (module
    docstring). With ``model`` (the float architecture, or its fake-quant or converted form) the file is
    loaded into it: checked module by module, integer layers put in place, the other tensors loaded;
    ``model`` is modified in place and returned (or, when the root itself is an integer layer, the new
    layer is returned). The skeleton's own values are never read, so it may be made on the meta device
    (``with torch.device("meta"): skeleton = MyNet()``, with ``device=`` given) to skip allocating and
    initialising float weights. Integer weights are packed for the kernels on ``device`` (default: the
    skeleton module's device, or CPU when rebuilding); the whole model moves to ``device`` when it is given.
    Returns the model in eval mode, with ``hdrq_config`` / ``hdrq_deploy`` from the file."""
    path = _file_path(path, "hdrq.load")
    if not os.path.exists(path):
        raise FileNotFoundError(f"hdrq.load: no such file: {path}")
    if device is not None:
        device = check_device(device, what="hdrq.load: device")
    info, tensors = _read(path)
    modules = info["modules"]
    qentries = {e["path"]: e for e in modules if _BY_NAME.get(e["type"]) in QLAYERS}
    aentries = {e["path"]: e for e in modules if _BY_NAME.get(e["type"]) is ActQuant}
    built_paths = set(qentries) | set(aentries)
    rest = {k: v for k, v in tensors.items() if not _under(_owner(k), built_paths)}

    def build_q(p: str, dev) -> nn.Module:
        if p in aentries:
            return _build_act_quant(aentries[p], _layer_tensors(tensors, p), dev)
        layer = _build(qentries[p], dev)
        try:
            return layer.load_canonical(_layer_tensors(tensors, p), where=f"hdrq.load: layer {p!r}")
        except TypeError as e:
            raise ValueError(f"hdrq.load: layer {p!r}: {e}") from None

    if model is None:
        unknown = [e for e in modules if e["spec"] is None]
        if unknown:
            e = unknown[0]
            raise ValueError(f"hdrq.load: {path} holds a {e['type']} at {e['path']!r} (a module class hdrq cannot "
                             f"rebuild from a file); pass the architecture: hdrq.load(path, model=<an instance of "
                             f"the float model>)")
        built = {e["path"]: (build_q(e["path"], device) if e["path"] in built_paths else _build(e, None))
                 for e in modules}
        for p, m in built.items():
            if p:
                _place(built[p.rpartition(".")[0]], p, m)
        result = built[""]
        _check_rest({k: v for k, v in result.state_dict().items() if not _under(_owner(k), built_paths)}, rest)
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"load: model must be an nn.Module skeleton, got {type(model).__name__}")
        qbuild, folded = _plan_skeleton(model, modules)
        if device is None and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise ValueError("hdrq.load: the model has tensors on the meta device; pass device= to say where the "
                             "loaded model goes")
        skel = dict(model.named_modules(remove_duplicate=False))
        new = {p: build_q(p, device if device is not None else _module_device(skel.get(p, skel[_owner(p)])))
               for p in [*qbuild, *aentries]}
        replaced = set(qbuild) | folded | set(aentries)
        target = {k: v for k, v in model.state_dict().items() if not _under(_owner(k), replaced)}
        _check_rest(target, rest)
        # Everything is checked: only now is the skeleton modified.
        if "" in new:
            result = new[""]
        else:
            for p, m in new.items():
                _place(model.get_submodule(_owner(p)), p, m)
            for p in folded:
                set_module(model, p, nn.Identity())
            result = model
    if rest:
        # assign=True: the file's tensors become the parameters (no second copy in memory, and a skeleton
        # made on the meta device works); each goes to the device of the tensor it replaces, or to ``device``.
        dst = result.state_dict()
        result.load_state_dict({k: v.to(device if device is not None else dst[k].device) for k, v in rest.items()},
                               strict=False, assign=True)
    if device is not None:
        result.to(device)
    result.hdrq_config = info.get("config")
    result.hdrq_deploy = info.get("convert")
    return result.eval()
