"""One run of the benchmark: for every seed, source training, SHOT-IM adaptation to every target, then per
bit width and method: calibration of every target model, both merges, and the measures of
``examples.mtda.measure``. Seeds run in parallel worker processes on the CPU.

Every method is merged both ways (``hdrq.merge(method="average")`` and ``method="hdrq"``, the latter with
``merge_seeds`` seeds, BRECQ with 30 candidates and the others with 100, as the authors merge them), so the
merge's share of a gain is visible. ``fp32`` is the float average of the BatchNorm-folded adapted models
(the noise-sampling merge of float models is that average too). Nothing here chooses a setting by looking
at a test split.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import hdrq
from hdrq.quant import fold_batchnorm

from . import measure
from .adapt import adapt_shot
from .config import MERGE_CANDIDATES, MERGES, MTDAConfig, QUANT_METHODS, resolve_device
from .data import DomainSuite, generator
from .model import SmallResNet, evaluate, harmonic_mean, train_source

__all__ = ["build_domains", "run_seed", "run", "seed_of"]


def build_domains(cfg: MTDAConfig) -> DomainSuite:
    """The domains of the run (they do not depend on the seed); with ``eval_split="val"`` every test split
    is replaced by a validation split carved from the train split."""
    if cfg.data == "real":
        from .real import make_real_domains

        suite = make_real_domains(targets=cfg.targets, severity=cfg.severity, source_train=cfg.source_train,
                                  source_test=cfg.source_test, target_train=cfg.target_train,
                                  target_test=cfg.target_test, data_dir=cfg.data_dir)
    elif cfg.data == "synthetic":
        from .synthetic import DEFAULT_DIGIT_TARGETS, make_digits_domains

        suite = make_digits_domains(image_size=cfg.image_size, targets=cfg.targets or DEFAULT_DIGIT_TARGETS,
                                    max_images=cfg.max_images)
    else:
        from .folders import ImageFolderDomains

        folders = ImageFolderDomains(cfg.root, image_size=cfg.image_size, max_per_class=cfg.max_per_class)
        suite = folders.suite(cfg.source, cfg.targets)
        if len(suite.targets) < 2:
            raise ValueError(f"merging needs at least two target domains; {cfg.root!r} gives "
                             f"{[d.name for d in suite.targets]} besides the source {cfg.source!r}")
    return suite.validation(0) if cfg.eval_split == "val" else suite


def seed_of(*parts: int) -> int:
    """A distinct, reproducible seed per (seed, stage, index...) so that no two stages share a stream."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**31 - 1)
    return s


def _stage_count(cfg: MTDAConfig, n_targets: int) -> int:
    """Progress units of one seed: source, each adaptation, fp32, and per bit width and quantized method
    each target's calibration plus one for merges and measures."""
    quantized = len([m for m in cfg.methods if m != "fp32"])
    return 1 + n_targets + ("fp32" in cfg.methods) + len(cfg.bits) * quantized * (n_targets + 1)


def run_seed(cfg: MTDAConfig, seed: int, device: torch.device, bar=None) -> dict:
    """Everything of one seed, as a JSON-able dict."""
    def step(desc: str) -> None:
        if bar is not None:
            bar.set_description_str(f"seed {seed}: {desc}")

    def done() -> None:
        if bar is not None:
            bar.update()

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    suite = build_domains(cfg)
    targets, names = suite.targets, [d.name for d in suite.targets]
    timings["data_s"] = time.perf_counter() - t0

    step("source training")
    t = time.perf_counter()
    s_seed = cfg.stage_seed("source", seed)
    torch.manual_seed(seed_of(s_seed, 1))
    source = SmallResNet(suite.in_channels, suite.num_classes, cfg.widths, cfg.stem_stride).to(device)
    train_source(source, suite.source, epochs=cfg.source_epochs, lr=cfg.source_lr, batch_size=cfg.batch_size,
                 seed=seed_of(s_seed, 2), device=device)
    done()
    timings["source_s"] = time.perf_counter() - t

    t = time.perf_counter()
    adapted = []
    adaptation = {"source_acc": evaluate(source, suite.source.x_test, suite.source.y_test, device=device),
                  "targets": {}}
    for i, d in enumerate(targets):
        step(f"SHOT adaptation to {d.name}")
        model = adapt_shot(copy.deepcopy(source), d.x_train, epochs=cfg.adapt_epochs, lr=cfg.adapt_lr,
                           batch_size=cfg.batch_size, seed=seed_of(cfg.stage_seed("adapt", seed), 3, i),
                           device=device, pseudo_label_weight=cfg.pseudo_label_weight)
        adapted.append(model)
        adaptation["targets"][d.name] = {"source_only": evaluate(source, d.x_test, d.y_test, device=device),
                                         "adapted": evaluate(model, d.x_test, d.y_test, device=device)}
        done()
    timings["adaptation_s"] = time.perf_counter() - t

    def accuracies(model: nn.Module) -> dict:
        return {d.name: evaluate(model, d.x_test, d.y_test, device=device) for d in targets}

    pair_data = measure.labelled_batches([d.x_test for d in targets[:2]], [d.y_test for d in targets[:2]],
                                         cfg.barrier_samples, device)
    hess_data = [measure.labelled_batches([d.x_test], [d.y_test], cfg.hessian_images, device) for d in targets[:2]]
    folded_source = fold_batchnorm(source).eval()
    folded = [fold_batchnorm(m).eval() for m in adapted]

    def analyse(models: Sequence[nn.Module], quantized: bool, key: int) -> dict:
        return {"barrier": measure.barrier(models[0], models[1], pair_data, steps=cfg.barrier_steps,
                                           seed=seed_of(seed, 8, key), quantized=quantized),
                "hessian_trace": [measure.flatness(m, hd, samples=cfg.hessian_samples, seed=seed_of(seed, 9, key))
                                  for m, hd in zip(models, hess_data)],
                "distance_to_source": [measure.weight_distance(m, folded_source) for m in models],
                "distance_between": measure.weight_distance(models[0], models[1])}

    results: dict[str, dict] = {}
    fp32 = None
    if "fp32" in cfg.methods:
        step("fp32 merge and measures")
        t = time.perf_counter()
        merged = accuracies(hdrq.merge(folded, method="average", verbose=False))
        merged_hm = harmonic_mean(list(merged.values()))
        unmerged = {d.name: adaptation["targets"][d.name]["adapted"] for d in targets}
        fp32 = {"unmerged": unmerged, "unmerged_mean": sum(unmerged.values()) / len(unmerged),
                "merges": {m: {"merged": merged, "merged_hm": merged_hm, "merged_hm_seeds": [merged_hm]}
                           for m in MERGES},
                **analyse(folded, False, 0)}
        done()
        timings["fp32_s"] = time.perf_counter() - t
    for bits in cfg.bits:
        key = f"W{bits}A{bits}"
        results[key] = {} if fp32 is None else {"fp32": fp32}
        for method in (m for m in cfg.methods if m != "fp32"):
            m_idx = QUANT_METHODS.index(method)  # seeds do not depend on which other methods run
            t = time.perf_counter()
            quantized = []
            for i, d in enumerate(targets):
                step(f"{key} {method}: calibrating on {d.name}")
                c_seed = seed_of(cfg.stage_seed("calib", seed), 5, bits, m_idx, i)
                qcfg = cfg.quant_config(method, bits, seed=c_seed, device=str(device))
                idx = torch.randperm(d.x_train.shape[0], generator=generator(c_seed))[:cfg.calib_samples]
                src = source if qcfg.lambda_dist > 0 else None  # only HDRQ's distance term uses it
                quantized.append(hdrq.quantize(adapted[i], d.x_train[idx].to(device), qcfg, source=src).eval())
                done()
            t_cal = time.perf_counter() - t
            step(f"{key} {method}: merges and measures")
            unmerged = {d.name: evaluate(q, d.x_test, d.y_test, device=device) for d, q in zip(targets, quantized)}
            merges = {}
            for merge in MERGES:
                n_seeds = cfg.merge_seeds if merge == "hdrq" else 1  # the average is deterministic
                per_seed = [accuracies(hdrq.merge(quantized, method=merge, candidates=MERGE_CANDIDATES[method],
                                                  seed=seed_of(cfg.stage_seed("merge", seed), 7, bits, k),
                                                  verbose=False)) for k in range(n_seeds)]
                hms = [harmonic_mean(list(a.values())) for a in per_seed]
                merges[merge] = {"merged": {n: sum(a[n] for a in per_seed) / n_seeds for n in names},
                                 "merged_hm": sum(hms) / n_seeds, "merged_hm_seeds": hms}
            results[key][method] = {
                "unmerged": unmerged, "unmerged_mean": sum(unmerged.values()) / len(unmerged), "merges": merges,
                "moved_share": [measure.moved_share(q, f) for q, f in zip(quantized, folded)],
                **analyse(quantized, True, 1 + bits * 10 + m_idx)}
            done()
            timings[f"{key}_{method}_calibration_s"] = t_cal
            timings[f"{key}_{method}_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return {"seed": seed, "targets": names, "adaptation": adaptation, "methods": results, "timings": timings}


# ---- worker processes ----------------------------------------------------------------------------


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_workers(cfg: MTDAConfig, device: torch.device) -> tuple[int, int]:
    """(processes, torch threads per process). On the CPU the seeds, which are independent, run in parallel
    processes of one thread each (or ``cfg.threads`` split among them): this model's small tensors keep one
    core busy far better than they split across two, where intra-op threads spend their time in barriers.
    On a GPU, one process."""
    if device.type != "cpu":
        return max(1, min(cfg.workers or 1, len(cfg.seeds))), cfg.threads or torch.get_num_threads()
    workers = max(1, min(cfg.workers or min(len(cfg.seeds), cfg.threads or _cpu_count()), len(cfg.seeds)))
    return workers, max(1, (cfg.threads or workers) // workers)


class _QueueBar:
    """What a worker process has instead of the progress bar: it sends the updates to the parent."""

    def __init__(self, queue):
        self.queue = queue

    def update(self, n: int = 1) -> None:
        self.queue.put(("update", n))

    def set_description_str(self, desc: str) -> None:
        self.queue.put(("desc", desc))


_WORKER_QUEUE = None


def _worker_init(queue, threads: int, backend: Optional[str]) -> None:
    global _WORKER_QUEUE
    _WORKER_QUEUE = queue
    torch.set_num_threads(threads)
    if backend is not None:
        hdrq.set_backend(backend)


def _worker_seed(cfg: MTDAConfig, seed: int, device: str) -> dict:
    return run_seed(cfg, seed, torch.device(device), _QueueBar(_WORKER_QUEUE))


def _run_in_processes(cfg: MTDAConfig, device: torch.device, bar, workers: int, threads: int) -> list[dict]:
    import multiprocessing
    import queue as queue_mod
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked child of a process that has used OpenMP can deadlock in its first parallel op
    ctx = multiprocessing.get_context("spawn")
    updates = ctx.Queue()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(updates, threads, cfg.backend)) as pool:
        futures = [pool.submit(_worker_seed, cfg, seed, str(device)) for seed in cfg.seeds]
        while True:
            try:
                kind, value = updates.get(timeout=0.2)
            except queue_mod.Empty:
                if all(f.done() for f in futures):
                    break
                continue
            bar.update(value) if kind == "update" else bar.set_description_str(value)
        return [f.result() for f in futures]  # re-raises a worker's exception here


def _environment(device: torch.device, workers: int, threads: int) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "hdrq": hdrq.__version__,
           "device": str(device), "backend": hdrq.get_backend(), "platform": platform.platform(),
           "processes": workers, "threads_per_process": threads, "cpu_count": _cpu_count()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run(cfg: Optional[MTDAConfig] = None, *, verbose: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark of ``cfg`` (default: the default protocol); write ``results.json`` and the PNG
    plots into ``cfg.out`` and print the tables (when ``verbose``). Returns the results dict."""
    from tqdm.auto import tqdm

    from . import report

    cfg = (cfg or MTDAConfig.preset("default")).validated()
    device = resolve_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    workers, threads = plan_workers(cfg, device)
    previous_backend, previous_threads = hdrq.get_backend(), torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        if cfg.backend is not None:
            hdrq.set_backend(cfg.backend)
        torch.set_num_threads(threads)
        suite = build_domains(cfg)  # fetches and caches the data once, before the workers start
        total = len(cfg.seeds) * _stage_count(cfg, len(suite.targets))
        with tqdm(total=total, disable=not verbose, unit="stage", dynamic_ncols=True) as bar:
            if workers > 1:
                per_seed = _run_in_processes(cfg, device, bar, workers, threads)
            else:
                per_seed = [run_seed(cfg, seed, device, bar) for seed in cfg.seeds]
    finally:
        hdrq.set_backend(previous_backend)
        torch.set_num_threads(previous_threads)
    results = {"format": "hdrq-mtda", "version": cfg.version, "config": cfg.to_dict(),
               "environment": _environment(device, workers, threads),
               "source": suite.source.name, "targets": [d.name for d in suite.targets],
               "barrier_pair": [d.name for d in suite.targets[:2]], "domains": suite.description,
               "bit_settings": [f"W{b}A{b}" for b in cfg.bits], "methods": list(cfg.methods),
               "merges": list(MERGES), "per_seed": per_seed, "summary": report.summarize(per_seed)}
    results["plots"] = report.write_plots(results, cfg.out)
    results["elapsed_s"] = time.perf_counter() - t0
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if verbose:
        log(report.format_tables(results))
        log(f"\nWrote {os.path.join(cfg.out, 'results.json')} and {', '.join(results['plots'])} in "
            f"{results['elapsed_s']:.0f} s on {device} ({workers} process(es) x {threads} thread(s)).")
    return results
