"""Aggregation over seeds, the paired comparisons with confidence intervals, the markdown tables and the
plots of a run."""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

__all__ = ["stats", "paired", "summarize", "format_tables", "write_plots", "HEADLINE_MERGE"]

# The comparison the authors make: every method merged with the noise-sampling merge.
HEADLINE_MERGE = "hdrq"
TARGET_HALF_WIDTH = 0.015


def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def stats(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation and the values."""
    v = [float(x) for x in values]
    mean = math.fsum(v) / len(v)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "values": v}


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """The per-seed differences ``a - b``: mean, 95% t confidence interval, how often ``a`` is ahead, and
    how many seeds a half-width of 1.5 points would take at this spread (None with one seed)."""
    s = stats([x - y for x, y in zip(a, b)])
    n = len(s["values"])
    out = {**s, "n": n, "wins": sum(d > 0 for d in s["values"]), "half_width": None, "seeds_needed": None}
    if n > 1:
        out["half_width"] = _t975(n - 1) * s["std"] / math.sqrt(n)
        need = 2
        while need < 10_000 and _t975(need - 1) * s["std"] / math.sqrt(need) > TARGET_HALF_WIDTH:
            need += 1
        out["seeds_needed"] = need
    return out


def _mean(v: Sequence[float]) -> float:
    return math.fsum(v) / len(v)


def summarize(per_seed: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every number, and the paired HDRQ comparisons."""
    names = per_seed[0]["targets"]
    out: dict[str, Any] = {"adaptation": {
        "source_acc": stats([r["adaptation"]["source_acc"] for r in per_seed]),
        "targets": {n: {k: stats([r["adaptation"]["targets"][n][k] for r in per_seed])
                        for k in ("source_only", "adapted")} for n in names}}, "paired": {}}
    for key, methods in per_seed[0]["methods"].items():
        out[key] = {}
        for method, first in methods.items():
            rs = [r["methods"][key][method] for r in per_seed]
            s = {"unmerged_mean": stats([x["unmerged_mean"] for x in rs]),
                 "merges": {m: {"merged_hm": stats([x["merges"][m]["merged_hm"] for x in rs]),
                                "merged": {n: stats([x["merges"][m]["merged"][n] for x in rs]) for n in names},
                                "merge_seed_std": _mean([stats(x["merges"][m]["merged_hm_seeds"])["std"]
                                                         for x in rs])}
                            for m in first["merges"]},
                 "barrier": stats([x["barrier"]["barrier"] for x in rs]),
                 "barrier_curve": {"lambdas": first["barrier"]["lambdas"],
                                   "losses": [_mean(c) for c in zip(*[x["barrier"]["losses"] for x in rs])]},
                 "hessian_trace": stats([_mean([h["trace"] for h in x["hessian_trace"]]) for x in rs]),
                 "distance_to_source": stats([_mean(x["distance_to_source"]) for x in rs]),
                 "distance_between": stats([x["distance_between"] for x in rs])}
            if "moved_share" in first:
                s["moved_share"] = stats([_mean(x["moved_share"]) for x in rs])
            out[key][method] = s
        if "hdrq" in methods:
            out["paired"][key] = {
                merge: {other: paired([r["methods"][key]["hdrq"]["merges"][merge]["merged_hm"] for r in per_seed],
                                      [r["methods"][key][other]["merges"][merge]["merged_hm"] for r in per_seed])
                        for other in ("qdrop", "brecq") if other in methods}
                for merge in methods["hdrq"]["merges"]}
    return out


# ---- tables --------------------------------------------------------------------------------------


def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def _ci(p: dict) -> str:
    if p["half_width"] is None:
        return f"{p['mean'] * 100:+.1f} (one seed: no interval)"
    return (f"{p['mean'] * 100:+.1f} [{(p['mean'] - p['half_width']) * 100:+.1f}, "
            f"{(p['mean'] + p['half_width']) * 100:+.1f}]")


def format_tables(results: dict) -> str:
    """The markdown tables of a run: adaptation, then per bit width every method under both merges with
    its measures, then the paired differences."""
    summ, names = results["summary"], results["targets"]
    n_seeds = len(results["per_seed"])
    merge_seeds = results["config"]["merge_seeds"]
    lines = [f"Accuracy in %, mean ± std over {n_seeds} seed(s); source `{results['source']}`, targets "
             f"{', '.join(f'`{n}`' for n in names)}; scored on the {results['config']['eval_split']} splits.", "",
             "| target | source only | SHOT-IM adapted |", "|---|---|---|"]
    for n in names:
        t = summ["adaptation"]["targets"][n]
        lines.append(f"| {n} | {_pm(t['source_only'])} | {_pm(t['adapted'])} |")
    lines.append(f"\nSource model on its own test split: {_pm(summ['adaptation']['source_acc'])}.")
    pair = " / ".join(results["barrier_pair"])
    for key in results["bit_settings"]:
        lines += ["", f"**{key}.** Merged HM: harmonic mean over the targets of the merged model's accuracy, with "
                      f"the plain average and with the noise-sampling (HDRQ) merge ({merge_seeds} merge seeds "
                      f"averaged). Unmerged: each target model on its own target. Barrier (quantized: uniform "
                      f"noise at the step sizes), Hessian trace and distances on {pair}; distance: relative "
                      f"Frobenius distance of the layer weights to the source's and between the two models; "
                      f"moved: weight integers that differ from round-to-nearest.", "",
                  "| method | merged HM, average | **merged HM, HDRQ merge** | unmerged | barrier | Hessian trace "
                  "| dist. to source | dist. between | moved |", "|---|---|---|---|---|---|---|---|---|"]
        for method, s in summ[key].items():
            mv = f"{_pm(s['moved_share'], digits=2)}%" if "moved_share" in s else "-"
            name = f"{method} (float)" if method == "fp32" else method
            lines.append(f"| {name} | {_pm(s['merges']['average']['merged_hm'])} | "
                         f"**{_pm(s['merges']['hdrq']['merged_hm'])}** | {_pm(s['unmerged_mean'])} | "
                         f"{_pm(s['barrier'], 1, 3)} | {_pm(s['hessian_trace'], 1, 1)} | "
                         f"{_pm(s['distance_to_source'], 1, 3)} | {_pm(s['distance_between'], 1, 3)} | {mv} |")
    if summ["paired"]:
        lines += ["", "Paired per-seed differences of the merged HM, HDRQ minus the other method, in points "
                      "(mean [95% t interval]); seeds HDRQ is ahead in; seeds a half-width of 1.5 points would "
                      "take at this spread.", "",
                  "| bits | merge | vs | difference | HDRQ ahead | seeds for ±1.5 |", "|---|---|---|---|---|---|"]
        for key, by_merge in summ["paired"].items():
            for merge, by_other in by_merge.items():
                for other, p in by_other.items():
                    lines.append(f"| {key} | {merge} | {other} | {_ci(p)} | {p['wins']}/{p['n']} | "
                                 f"{p['seeds_needed'] if p['seeds_needed'] is not None else '-'} |")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------


def write_plots(results: dict, out_dir: str) -> list[str]:
    """``merged_hm.png`` (merged HM per method, bit width and merge, error bars = std over seeds),
    ``chain.png`` (:func:`_chain_plot`) and one ``barrier_<bits>.png`` per bit width (the seed-averaged loss
    along the interpolation path). Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hdrq.analysis import plot_barriers

    summ, keys, merges = results["summary"], results["bit_settings"], results["merges"]
    methods = [m for m in summ[keys[0]] if m != "fp32"]
    fig, axes = plt.subplots(1, len(keys), figsize=(1.0 + 2.6 * len(keys) * max(len(methods), 1) / 3, 3.8),
                             squeeze=False, sharey=True)
    width = 0.8 / len(merges)
    for ax, key in zip(axes[0], keys):
        for j, merge in enumerate(merges):
            s = [summ[key][m]["merges"][merge]["merged_hm"] for m in methods]
            xs = [i + (j - (len(merges) - 1) / 2) * width for i in range(len(methods))]
            bars = ax.bar(xs, [v["mean"] * 100 for v in s], width, yerr=[v["std"] * 100 for v in s], capsize=3,
                          label=f"{merge} merge")
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
        if "fp32" in summ[key]:
            fp = summ[key]["fp32"]["merges"]["average"]["merged_hm"]["mean"] * 100
            ax.axhline(fp, color="black", linestyle="--", linewidth=1, label=f"fp32 merge {fp:.1f}")
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(key, fontsize=10)
        lo = min(summ[key][m]["merges"][g]["merged_hm"]["mean"] for m in methods for g in merges) * 100
        ax.set_ylim(max(0.0, lo - 15), 100)
        ax.legend(loc="lower right", fontsize=6)
    axes[0][0].set_ylabel("merged harmonic-mean accuracy (%)")
    fig.suptitle(f"{len(results['targets'])} target models merged into one (mean ± std over "
                 f"{len(results['per_seed'])} seed(s))", fontsize=10)
    fig.tight_layout()
    paths = ["merged_hm.png"]
    fig.savefig(os.path.join(out_dir, paths[0]), dpi=120)
    plt.close(fig)
    paths.append(_chain_plot(results, out_dir, plt))
    for key in keys:
        curves = {m: {**s["barrier_curve"], "barrier": s["barrier"]["mean"]} for m, s in summ[key].items()}
        name = f"barrier_{key.lower()}.png"
        plot_barriers(curves, os.path.join(out_dir, name),
                      title=f"{key}: error barrier {' -> '.join(results['barrier_pair'])} "
                            f"(mean of {len(results['per_seed'])} seed(s))")
        paths.append(name)
    return paths


def _chain_plot(results: dict, out_dir: str, plt) -> str:
    """``chain.png``: each link of HDRQ's claim, one point per (seed, method): the merged HM under the HDRQ
    merge against the Hessian trace, the distance to the source and the error barrier, one row per bit
    width."""
    keys = results["bit_settings"]
    links = [("hessian_trace", "Hessian trace (mean of the pair)", lambda m: _mean([h["trace"] for h in m])),
             ("distance_to_source", "relative distance to the source", _mean),
             ("barrier", "quantized error barrier", lambda b: b["barrier"])]
    fig, axes = plt.subplots(len(keys), len(links), figsize=(10, 2.9 * len(keys)), squeeze=False)
    methods = [m for m in results["methods"] if m != "fp32"]
    for row, key in zip(axes, keys):
        for ax, (field, label, value) in zip(row, links):
            for method in methods:
                rs = [r["methods"][key][method] for r in results["per_seed"]]
                ax.scatter([value(x[field]) for x in rs], [x["merges"][HEADLINE_MERGE]["merged_hm"] * 100 for x in rs],
                           label=method, s=18)
            ax.set_xlabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.ticklabel_format(axis="x", useOffset=False)
        row[0].set_ylabel(f"{key}: merged HM, HDRQ merge (%)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("HDRQ's chain: flatter and closer to the source -> lower barrier -> better merge "
                 "(one point per seed and method)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "chain.png"), dpi=110)
    plt.close(fig)
    return "chain.png"


def headline(results: dict, merge: Optional[str] = None) -> dict:
    """``{bits: {method: merged HM mean}}`` under ``merge`` (default: the authors' protocol)."""
    merge = merge or HEADLINE_MERGE
    return {key: {m: s["merges"][merge]["merged_hm"]["mean"] for m, s in results["summary"][key].items()}
            for key in results["bit_settings"]}
