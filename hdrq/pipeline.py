"""The file pipeline behind ``hdrq calibrate``, ``hdrq merge`` and ``hdrq convert``.

Models come from the user's files: a Hugging Face ``transformers`` model folder (``config.json`` and its
weights), or a plain checkpoint (``torch.save`` of a state dict, or ``.safetensors``) with a builder
``module:factory`` (``factory()`` returns the float architecture; the checkpoint's tensors are loaded into it).
Calibration data: one file per target model, ``.pt`` (``torch.save`` of a tensor), ``.safetensors`` (one
tensor) or ``.npy``, the first dimension indexing samples. The config: a ``.json`` or ``.toml`` file of
:class:`hdrq.QuantConfig` fields.

``calibrate`` checks every file first (present, readable, the checkpoints' tensors matching the architecture,
the targets matching the source, the data non-empty) and only then starts. Under ``torchrun`` it runs one of
two kinds of parallelism (``torch.distributed``; gloo on CPUs, NCCL on GPUs):

* ``domain``: process ``r`` calibrates targets ``r, r + N, ...``; process 0 waits for all and merges;
* ``data``: every process works on every target, each block's samples split across processes and gradients
  summed each step (``hdrq.quantize(..., data_parallel=True)``); process 0 writes.

Outputs, in ``--out``: ``<target>.quant.safetensors`` per target (``hdrq.calib.checkpoint``: the same
calibration writes the same bytes), ``<target>.report.json`` (per block: iterations, seconds, losses), and
with ``--merge`` ``merged.quant.safetensors``. A run killed at any point and started again with the same
command continues: finished targets are kept (their files verified), the unfinished one resumes after its
last finished block (``.checkpoints/<target>/``), and the files come out the same.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

QUANT_SUFFIX = ".quant.safetensors"
MERGED = "merged"


class PipelineError(ValueError):
    """A problem with the user's files or arguments, found before any work starts."""


# --------------------------------------------------------------------------------------------------
# Models, data, config
# --------------------------------------------------------------------------------------------------


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _builder(spec: Optional[str], path: str):
    if not spec:
        raise PipelineError(f"{path} is a checkpoint file: pass --builder module:factory (a function returning the "
                            f"float architecture its tensors load into)")
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise PipelineError(f"--builder must be module:factory, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise PipelineError(f"--builder {spec}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(factory):
        raise PipelineError(f"--builder {spec} is a {type(factory).__name__}, not a function")
    return factory


def _build(spec: Optional[str], path: str, device: Optional[str] = None) -> nn.Module:
    factory = _builder(spec, path)
    if device is not None:
        with torch.device(device):
            model = factory()
    else:
        model = factory()
    if not isinstance(model, nn.Module):
        raise PipelineError(f"--builder {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _checkpoint_tensors(path: str) -> dict[str, Tensor]:
    """A checkpoint's tensors (memory-mapped where the format allows)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise PipelineError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise PipelineError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd


def _checkpoint_shapes(path: str) -> dict[str, tuple]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise PipelineError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    return {k: tuple(v.shape) for k, v in _checkpoint_tensors(path).items()}


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise PipelineError("a transformers model folder needs the transformers package (pip install transformers)") \
            from None
    return transformers


def check_model(path: str, builder: Optional[str], what: str) -> dict:
    """Raise :class:`PipelineError` unless ``path`` is a loadable model; returns a description to compare
    models by (HF: the config's shape fields; checkpoint: tensor names and shapes)."""
    if not os.path.exists(path):
        raise PipelineError(f"{what} {path}: no such file or folder")
    if is_hf_folder(path):
        with open(os.path.join(path, "config.json")) as f:
            conf = json.load(f)
        if not any(n.endswith((".safetensors", ".bin")) for n in os.listdir(path)):
            raise PipelineError(f"{what} {path}: a transformers folder without weights (*.safetensors / *.bin)")
        keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size")
        return {"kind": "transformers", **{k: conf.get(k) for k in keys}}
    if os.path.isdir(path):
        raise PipelineError(f"{what} {path}: a folder without config.json (not a transformers model folder)")
    shapes = _checkpoint_shapes(path)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in _build(builder, path).state_dict().items()}
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = [f"{k}: file {shapes[k]}, model {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or extra or wrong:
        raise PipelineError(f"{what} {path} does not fit --builder {builder}: tensors missing {missing[:5]}, "
                            f"unexpected {extra[:5]}, shapes that differ {wrong[:5]}")
    return {"kind": "checkpoint", "shapes": shapes}


def load_model(path: str, builder: Optional[str] = None) -> nn.Module:
    """The float model in ``path`` (module docstring), in eval mode, on the CPU."""
    if is_hf_folder(path):
        transformers = _import_transformers()
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(path)
        except ValueError:
            model = transformers.AutoModel.from_pretrained(path)
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # calibration runs whole sequences: no key/value cache
        return model.eval()
    model = _build(builder, path)
    try:
        model.load_state_dict(_checkpoint_tensors(path), strict=True)
    except RuntimeError as e:
        raise PipelineError(f"{path} does not load into --builder {builder}: {e}") from None
    return model.eval()


def load_data(path: str) -> Tensor:
    """Calibration inputs ``[N, ...]`` from ``.pt`` / ``.safetensors`` (one tensor) / ``.npy``."""
    if not os.path.isfile(path):
        raise PipelineError(f"calibration data {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path)
            if len(tensors) != 1:
                raise PipelineError(f"calibration data {path}: expected one tensor, found {sorted(tensors)}")
            data = next(iter(tensors.values()))
        elif path.endswith(".npy"):
            import numpy as np

            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(f"calibration data {path}: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(data, Tensor) or data.dim() < 1 or data.shape[0] == 0:
        raise PipelineError(f"calibration data {path}: expected a non-empty tensor [samples, ...], got "
                            f"{tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__}")
    return data


def load_config(path: Optional[str]):
    """A :class:`hdrq.QuantConfig` from a JSON or TOML file of its fields (None: the defaults)."""
    from .calib import QuantConfig

    if path is None:
        return QuantConfig(verbose=False)
    if not os.path.isfile(path):
        raise PipelineError(f"config {path}: no such file")
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ImportError:  # Python < 3.11
                raise PipelineError(f"config {path}: TOML needs Python 3.11 (tomllib); use a .json file") from None

            with open(path, "rb") as f:
                fields = tomllib.load(f)
        else:
            with open(path) as f:
                fields = json.load(f)
    except Exception as e:
        raise PipelineError(f"config {path}: cannot parse it ({type(e).__name__}: {e})") from None
    if not isinstance(fields, dict):
        raise PipelineError(f"config {path}: expected a table of QuantConfig fields, got {type(fields).__name__}")
    known = {f.name for f in dataclasses.fields(QuantConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise PipelineError(f"config {path}: unknown QuantConfig fields {unknown} (known: {sorted(known)})")
    try:
        return QuantConfig(**{"verbose": False, **fields})
    except (TypeError, ValueError) as e:
        raise PipelineError(f"config {path}: {e}") from None


# --------------------------------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def init_distributed(device: str, timeout_hours: float) -> Dist:
    """Join the process group torchrun describes in the environment (gloo on CPUs, NCCL on GPUs); a single
    process without torchrun gets ``Dist()``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=timeout_hours))
    return Dist(dist.get_rank(), dist.get_world_size(), local)


# --------------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    model: str
    data: str


def _sha256(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _file_identity(path: str) -> list:
    """Names and sizes of a model's files (what a finished output must have been calibrated from)."""
    if os.path.isdir(path):
        return sorted([n, os.path.getsize(os.path.join(path, n))] for n in os.listdir(path)
                      if os.path.isfile(os.path.join(path, n)))
    return [os.path.basename(path), os.path.getsize(path)]


def calibrate(*, source: str, targets: Sequence[str], data: Sequence[str], out: str, config: Optional[str] = None,
              builder: Optional[str] = None, parallel: str = "domain", merge: Optional[str] = None,
              merge_seed: int = 0, device: Optional[str] = None, timeout_hours: float = 48.0,
              log=print) -> dict:
    """Calibrate every target model on its data (module docstring); returns ``{target: output path}`` (and
    ``"merged"`` with ``merge``)."""
    from . import merge as merge_models
    from .calib import quantize
    from .calib.checkpoint import load_quantized, read_verified, save_quantized

    if parallel not in ("domain", "data"):
        raise PipelineError(f"--parallel must be 'domain' or 'data', got {parallel!r}")
    if len(targets) != len(data):
        raise PipelineError(f"give one --data file per --targets model: {len(targets)} targets, {len(data)} data files")
    if not targets:
        raise PipelineError("no --targets given")
    if merge is not None and len(targets) < 2:
        raise PipelineError(f"--merge needs at least 2 targets, got {len(targets)}")
    names = [_target_name(t) for t in targets]
    if len(set(names)) != len(names):
        raise PipelineError(f"targets must have different file names (outputs are named after them), got {names}")
    cfg = load_config(config)
    desc = check_model(source, builder, "source")
    for t in targets:
        d = check_model(t, builder, "target")
        if d != desc:
            raise PipelineError(f"target {t} does not match the source {source}: {_differs(desc, d)}")
    calib = [load_data(p) for p in data]
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PipelineError(f"--out {out}: not writable")

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist = init_distributed(dev, timeout_hours)
    if dev == "cuda" and dist.active:
        dev = f"cuda:{dist.local_rank}"
    if dev == "cpu" and dist.active:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world))
    cfg = dataclasses.replace(cfg, device=dev)
    if parallel == "data" and dist.active and cfg.calib_batch_size < dist.world:
        raise PipelineError(f"--parallel data splits each batch of calib_batch_size={cfg.calib_batch_size} samples "
                            f"across {dist.world} processes: set calib_batch_size >= {dist.world}")
    mine = list(range(len(targets)))
    if parallel == "domain" and dist.active:
        mine = mine[dist.rank::dist.world]
    writer = dist.rank == 0 or parallel == "domain"

    src_model = load_model(source, builder)
    outputs = {}
    for i, (name, tpath) in enumerate(zip(names, targets)):
        path = os.path.join(out, name + QUANT_SUFFIX)
        outputs[name] = path
        if i not in mine:
            continue
        identity = {"config": cfg.to_dict(), "data": _sha256(calib[i]), "target": _file_identity(tpath),
                    "source": _file_identity(source), "builder": builder}
        if os.path.exists(path):
            try:
                info, _ = read_verified(path)
                if info.get("extra", {}).get("identity") == json.loads(json.dumps(identity)):
                    log(f"[rank {dist.rank}] {name}: already calibrated ({path})")
                    continue
                log(f"[rank {dist.rank}] {name}: {path} is from another run; calibrating again")
            except ValueError as e:
                log(f"[rank {dist.rank}] {name}: {e}; calibrating again")
        log(f"[rank {dist.rank}] {name}: calibrating {tpath} on {tuple(calib[i].shape)} ({cfg.method}, {dev})")
        model = load_model(tpath, builder)
        anchor = src_model if cfg.method == "hdrq" and cfg.lambda_dist > 0 else None  # HDRQ's distance term
        q = quantize(model, calib[i], cfg, source=anchor, checkpoint=os.path.join(out, ".checkpoints", name),
                     data_parallel=parallel == "data" and dist.active)
        if writer:
            save_quantized(q, path, extra={"identity": identity, "arch": os.path.abspath(source), "builder": builder})
            with open(os.path.join(out, name + ".report.json"), "w") as f:
                json.dump(q.hdrq_report, f, indent=1)
            log(f"[rank {dist.rank}] {name}: wrote {path}")
        del q, model
    dist.barrier()
    if merge is not None and dist.rank == 0:
        models = [load_quantized(outputs[n], src_model) for n in names]
        merged = merge_models(models, method=merge, seed=merge_seed, verbose=False,
                              source=src_model if merge in ("task_arithmetic", "ties") else None)
        outputs[MERGED] = os.path.join(out, MERGED + QUANT_SUFFIX)
        save_quantized(merged, outputs[MERGED], extra={"arch": os.path.abspath(source), "builder": builder,
                                                       "merged": names})
        log(f"merged {names} ({merge}) -> {outputs[MERGED]}")
    dist.barrier()
    return outputs


def _target_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for ext in (".safetensors", ".pt", ".pth", ".bin"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def _model_name(path: str) -> str:
    base = os.path.basename(path)
    return base[: -len(QUANT_SUFFIX)] if base.endswith(QUANT_SUFFIX) else base


def _differs(a: dict, b: dict) -> str:
    if a.get("kind") != b.get("kind"):
        return f"{a.get('kind')} vs {b.get('kind')}"
    if "shapes" in a:
        diff = [k for k in a["shapes"] if a["shapes"][k] != b["shapes"].get(k)]
        return f"tensor shapes differ at {diff[:5]}"
    return ", ".join(f"{k}: {a[k]} vs {b.get(k)}" for k in a if a[k] != b.get(k))


# --------------------------------------------------------------------------------------------------
# merge, convert
# --------------------------------------------------------------------------------------------------


def _arch_of(path: str, arch: Optional[str], builder: Optional[str]) -> tuple[str, Optional[str]]:
    """The float architecture a calibrated file rebuilds on: ``--arch`` or the one recorded in the file."""
    from .calib.checkpoint import read_verified

    if arch is not None:
        return arch, builder
    try:
        info, _ = read_verified(path)
    except (ValueError, FileNotFoundError) as e:
        raise PipelineError(str(e)) from None
    extra = info.get("extra") or {}
    if not extra.get("arch"):
        raise PipelineError(f"{path} does not record its architecture: pass --arch (and --builder)")
    return extra["arch"], builder if builder is not None else extra.get("builder")


def merge_files(models: Sequence[str], out: str, *, method: str = "hdrq", seed: int = 0, candidates: int = 100,
                arch: Optional[str] = None, builder: Optional[str] = None, source: Optional[str] = None) -> str:
    """Merge calibrated model files into ``out`` (``hdrq.merge``)."""
    from . import merge as merge_models
    from .calib.checkpoint import load_quantized, save_quantized

    if len(models) < 2:
        raise PipelineError(f"merge needs at least 2 model files, got {len(models)}")
    for p in models:
        if not os.path.isfile(p):
            raise PipelineError(f"model file {p}: no such file")
    arch, builder = _arch_of(models[0], arch, builder)
    check_model(arch, builder, "architecture")
    float_model = load_model(arch, builder)
    loaded = []
    for p in models:
        try:
            loaded.append(load_quantized(p, float_model))
        except (ValueError, FileNotFoundError) as e:
            raise PipelineError(str(e)) from None
    src = load_model(source, builder) if source is not None else None
    merged = merge_models(loaded, method=method, seed=seed, candidates=candidates, source=src, verbose=False)
    save_quantized(merged, out, extra={"arch": os.path.abspath(arch), "builder": builder,
                                       "merged": [_model_name(p) for p in models]})
    return out


def convert_file(model: str, out: str, *, arch: Optional[str] = None, builder: Optional[str] = None,
                 act: str = "static") -> str:
    """A calibrated model file to the deploy format (``hdrq.convert`` then ``hdrq.save``)."""
    from .calib.checkpoint import load_quantized
    from .deploy import convert, save

    if not os.path.isfile(model):
        raise PipelineError(f"model file {model}: no such file")
    arch, builder = _arch_of(model, arch, builder)
    check_model(arch, builder, "architecture")
    try:
        q = load_quantized(model, load_model(arch, builder))
    except ValueError as e:
        raise PipelineError(str(e)) from None
    save(convert(q, act=act, verbose=False), out)
    return out


__all__ = ["calibrate", "merge_files", "convert_file", "load_model", "load_data", "load_config", "check_model",
           "PipelineError", "init_distributed"]

