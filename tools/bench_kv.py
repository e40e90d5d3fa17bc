"""KV caches side by side on the default model: fp16, KIVI 4/2-bit, low-rank, PM-KVQ under budgets.

    python tools/bench_kv.py   -> benchmarks/results/kv.json + kv.png

Quality: perplexity (mqc.data.perplexity, stride = context) at each --contexts length on the first
--tokens Brown evaluation tokens (the split's documents concatenated). One forward per window
shows every query the copy of each key that token-by-token decoding would (mqc.runtime.kv.layout),
so the figure is compressed decoding's. ppl_ratio is against the fp16 cache (HF's DynamicCache,
exact) at the same context.

Memory: kv_fraction = compressed cache bytes / fp16 cache bytes of a whole cache of that context
(sinks and window included; mqc.runtime.kv accounting, the one the compile report prints).

Rows: fp16; KIVI (keys per channel in groups of 32 tokens, values per token in groups of 32,
window 32 + sinks 4) at 4 and 2 bits; the low-rank cache's best configuration of
tools/bench_kv_lowrank.py (activation-aware SVD, trained, 4-bit features, ranks by the knapsack
at 25% of the fp16 per-token bytes) and the same allocator at lower budgets; PM-KVQ (per-layer
key/value widths from 2/4/8/16 chosen by the exact knapsack on KL measured through the cache at
positions interpolated over 4096 tokens, keys in groups of --pm-group tokens, values per head) at
each --budgets fraction of the fp16 cache at that context. A budget below what 2-bit codes and the
exact window need is reported as infeasible (no perplexity) with that minimum.

Speed: greedy decode, paired: every model decodes one step in turn (the same load hits all), at
each context of --contexts and --speed-contexts; decode_vs_fp16_cache is the median over steps of
(fp16 cache step time / this cache's step time). --threads 1: on this shared 2-core machine one
thread measured faster for these sizes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_kv_lowrank import Bench as LowRankBench
from bench_kv_lowrank import decode_speed

import mqc
from mqc.data import perplexity
from mqc.errors import InfeasibleBudgetError
from mqc.analysis.kv_costs import measure_costs
from mqc.passes import keys
from mqc.planning.kv import allocate_kv, base_settings
from mqc.report import machine
from mqc.runtime.kv import QuantKVSettings, install, kv_accounting, quant_cache_bytes
from mqc.stream.stack import LayerStack

RESULTS = ROOT / "benchmarks" / "results"
LOWRANK_BEST = {"method": "asvd", "window": 32, "quant_bits": 4, "train_steps": 10}


def kivi(layers: int, bits: int) -> QuantKVSettings:
    return QuantKVSettings.uniform(layers, bits, window=32, sinks=4, group=32, value_group=32)


def kv_fraction(model, context: int) -> float:
    if not getattr(model.config, "mqc_kv", None):
        return 1.0
    acc = kv_accounting(model, context)
    return acc["cache_bytes_after"] / acc["cache_bytes_before"]


def paired_decode(models: dict[str, torch.nn.Module], prompt: torch.Tensor, steps: int) -> dict[str, dict]:
    """bench_kv_lowrank's interleaved decode (one step per model in turn), with each model's
    median per-step speed ratio to the "fp16" one."""
    result = decode_speed(models, prompt, steps)
    base = result["fp16"]["step_seconds"]
    for r in result.values():
        r["decode_vs_fp16_cache"] = statistics.median(b / s for b, s in zip(base, r["step_seconds"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per context")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--speed-contexts", type=int, nargs="+", default=[1024])
    parser.add_argument("--kivi", type=int, nargs="*", default=[4, 2], help="KIVI widths")
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.25, 0.2, 0.15, 0.10], help="PM-KVQ")
    parser.add_argument("--lowrank-budgets", type=float, nargs="*", default=[0.25, 0.18, 0.15, 0.10])
    parser.add_argument("--append", action="store_true", help="add the rows to --out (same name and context: replaced)")
    parser.add_argument("--pm-group", type=int, default=64, help="PM-KVQ: tokens per key grid, channels per value grid")
    parser.add_argument("--cost-samples", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "kv.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lowrank = LowRankBench(
        argparse.Namespace(calib_samples=16, calib_len=512, context=args.contexts[0], tokens=args.tokens)
    )
    base, ids, layers = lowrank.base, lowrank.ids, lowrank.base.config.num_hidden_layers
    models: dict[str, torch.nn.Module] = {"fp16": base}
    for bits in args.kivi:
        models[f"kivi{bits}"] = copy.deepcopy(base)
        install(models[f"kivi{bits}"], kivi(layers, bits))
    for frac in args.lowrank_budgets:
        try:
            models[f"lowrank-{round(frac * 100)}%"] = lowrank.compress(mqc.KVRecipe(**LOWRANK_BEST, budget_frac=frac))[
                0
            ]
        except InfeasibleBudgetError as exc:
            print(f"lowrank-{round(frac * 100)}%: {exc}", flush=True)
    pm = mqc.KVQuantRecipe(budget_frac=1.0, context=4096, group=args.pm_group, value_group=args.pm_group,
                           cost_samples=args.cost_samples)  # fmt: skip
    cost_start, costs = time.perf_counter(), None
    if args.budgets:
        costs = measure_costs(LayerStack(copy.deepcopy(base)), lowrank.shared[keys.CALIB][: args.cost_samples], pm)
    cost_seconds = time.perf_counter() - cost_start
    print(f"setup {time.perf_counter() - start:.0f} s (PM-KVQ costs {cost_seconds:.0f} s)", flush=True)

    rows, plans = [], {}
    for context in args.contexts:
        variants = dict(models)
        for frac in args.budgets:
            name = f"pmkvq-{round(frac * 100)}%"
            recipe = dataclasses.replace(pm, budget_frac=frac, context=context)
            try:
                settings = allocate_kv(costs, recipe, base.config)
            except InfeasibleBudgetError as exc:
                narrow = base_settings(recipe, layers, (2,) * layers, (2,) * layers)
                minimum = quant_cache_bytes(narrow, base.config, context)["kv_fraction"]
                rows.append({"name": name, "context": context, "kv_fraction": None, "ppl": None, "ppl_ratio": None,
                             "infeasible": str(exc), "min_kv_fraction": minimum})  # fmt: skip
                print(f"{context} {name}: infeasible (minimum {minimum:.3f})", flush=True)
                continue
            variants[name] = copy.deepcopy(base)
            install(variants[name], settings)
            plans[f"{name}@{context}"] = {"k_bits": settings.k_bits, "v_bits": settings.v_bits}
        base_ppl = None
        for name, model in variants.items():
            t = time.perf_counter()
            ppl = perplexity(model, ids, context=context, max_tokens=args.tokens, progress=False)
            base_ppl = base_ppl or ppl
            row = {"name": name, "context": context, "kv_fraction": kv_fraction(model, context), "ppl": ppl,
                   "ppl_ratio": ppl / base_ppl, "eval_seconds": time.perf_counter() - t}  # fmt: skip
            rows.append(row)
            print(f"{context} {name}: kv {row['kv_fraction']:.3f} ppl {ppl:.3f} ({row['ppl_ratio']:.3f}x)", flush=True)
        speed = paired_decode(variants, ids[:context], args.decode_steps)
        for row in rows:
            if row["context"] == context and row["name"] in speed:
                row["decode_vs_fp16_cache"] = speed[row["name"]]["decode_vs_fp16_cache"]
                row["tokens_per_second"] = speed[row["name"]]["tokens_per_second"]
        print(", ".join(f"{n} {r['decode_vs_fp16_cache']:.2f}x" for n, r in speed.items()), flush=True)
        for name in [n for n in variants if n.startswith("pmkvq")]:
            del variants[name]
    speed_rows = []
    for context in args.speed_contexts:
        speed = paired_decode(models, ids[:context], args.decode_steps)
        for name, r in speed.items():
            speed_rows.append({"name": name, "context": context, "kv_fraction": kv_fraction(models[name], context),
                               "decode_vs_fp16_cache": r["decode_vs_fp16_cache"],
                               "tokens_per_second": r["tokens_per_second"]})  # fmt: skip
        print(f"decode at {context}: " + ", ".join(f"{n} {r['decode_vs_fp16_cache']:.2f}x" for n, r in speed.items()))
    report = {
        "settings": vars(args) | {"out": str(args.out), "seconds": time.perf_counter() - start},
        "machine": machine(),
        "rows": rows,
        "speed": speed_rows,
        "pmkvq_plans": plans,
        "pmkvq_costs": None if costs is None else {"key": costs.key, "value": costs.value, "seconds": cost_seconds},
    }
    if args.append:
        report = merged(json.loads(args.out.read_text()), report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def merged(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s rows added (a row of the same name and context replaced); each
    run's settings and machine kept, each row naming its run."""
    runs = old.get("runs") or [{"settings": old["settings"], "machine": old["machine"]}]
    runs.append({"settings": new["settings"], "machine": new["machine"]})
    out = {**old, "runs": runs}
    for section in ("rows", "speed"):
        fresh = [{**r, "run": len(runs) - 1} for r in new[section]]
        keys_new = {(r["name"], r["context"]) for r in fresh}
        kept = [{"run": 0, **r} for r in old[section] if (r["name"], r["context"]) not in keys_new]
        out[section] = kept + fresh
    out["pmkvq_plans"] = {**old["pmkvq_plans"], **new["pmkvq_plans"]}
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    contexts = sorted({r["context"] for r in report["rows"]})
    for context, marker in zip(contexts, "os^"):
        done = [r for r in report["rows"] if r["context"] == context and r["ppl"] is not None]
        ax.scatter([r["kv_fraction"] for r in done], [r["ppl_ratio"] for r in done], marker=marker, label=f"{context}")
        for r in done:
            ax.annotate(
                r["name"], (r["kv_fraction"], r["ppl_ratio"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.axhline(1.03, color="grey", ls="--", lw=0.8)
    ax.axhline(1.10, color="grey", ls=":", lw=0.8)
    ax.axvline(0.20, color="grey", ls="--", lw=0.8)
    ax.axvline(0.125, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("KV cache bytes / fp16 cache (whole cache at the context)")
    ax.set_ylabel("perplexity / fp16 cache")
    ax.set_title("targets: <=20% at <=1.03x (dashed), <=12.5% at <=1.10x (dotted)", fontsize=9)
    ax.legend(title="context")
    speed = [r for r in report["rows"] if "decode_vs_fp16_cache" in r] + report["speed"]
    names = sorted({r["name"] for r in speed})
    ctxs = sorted({r["context"] for r in speed})
    width = 0.8 / len(ctxs)
    for i, c in enumerate(ctxs):
        values = [
            next((r["decode_vs_fp16_cache"] for r in speed if r["name"] == n and r["context"] == c), 0) for n in names
        ]
        bx.bar([j + i * width for j in range(len(names))], values, width, label=f"{c} ctx")
    bx.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    bx.axhline(1.0, color="grey", ls="--", lw=0.8)
    bx.set_ylabel("decode speed / fp16 cache (paired)")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
