"""Low-rank KV cache (CSKV) sweep on the embedded default model (Brown evaluation split).

    python tools/bench_kv_lowrank.py   -> benchmarks/results/kv_lowrank.json + kv_lowrank.png

(tools/bench_kv.py compares the best of it with the quantized caches.)

Quality: perplexity with mqc.data.perplexity at --context 1024, stride = context, on the first
--tokens evaluation tokens. One forward per window computes, for every query, attention over
the *rebuilt* K/V of tokens at least --window positions back and exact K/V of the newer ones:
exactly what token-by-token decoding with the compressed cache sees (mqc.runtime.kv), so ~97%
of the scored tokens have most of their context in the compressed branch.

Sweep: rank 0.75/0.5/0.25 of the K/V width x SVD / activation-aware SVD x without / with
reconstruction training x fp16 / 4-bit compressed features, then per-projection ranks chosen
under KV budgets by the exact allocator, then an ablation without the exact attention-sink
tokens. Activation statistics, the graph and the training inputs depend only on the base model:
computed once, reused by every configuration. --threads (default 1) torch threads: on this
shared 2-core machine one thread ran the evaluation ~4x faster than two (measured).

Memory: mqc.runtime.kv.kv_accounting at the evaluation context (window, features, positions;
full-precision K/V counted at fp16) and per token far from the window.

Speed: greedy decode tokens/s with the default DynamicCache vs the compressed cache of the best
configurations reaching >= 50% and >= 80% KV reduction, at --speed-contexts tokens of context.
The models decode step by step in turn (interleaved), so load changes on this shared machine hit
all of them alike; the median step time is reported. Prefill time is reported separately.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mqc
from mqc.data import calibration_batches, perplexity, token_stream
from mqc.lowering.context import LoweringContext, store_rest_in_fp16
from mqc.lowering.kv_lowrank import TRAIN_TOKENS, KVLowRank, collect_inputs
from mqc.passes import keys
from mqc.report import machine
from mqc.stream.source import ModuleSource
from mqc.runtime.kv import kv_accounting

RESULTS = ROOT / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class KVWithSinks(mqc.KVRecipe):
    """A KV recipe with the number of exact attention-sink tokens (not a KVRecipe field yet)."""

    sink_tokens: int = 4


class Bench:
    """The base model and everything the KV pass needs, computed once."""

    def __init__(self, args):
        self.args = args
        self.base, tok = mqc.load_hf_model()
        self.ids = token_stream(tok, "eval")
        calib = calibration_batches(tok, args.calib_samples, args.calib_len)
        start = time.perf_counter()
        recipe = mqc.Recipe(bits=16, kv=mqc.KVRecipe())  # the K/V inputs' energy (activation-aware SVD)
        self.analysis = mqc.analyze(self.base, recipe, calib=calib, progress=False)
        store_rest_in_fp16(self.base, ModuleSource(self.base))  # what every compiled artifact holds
        k_names = [site.k_proj for site in self.analysis.kv_sites]
        self.inputs = collect_inputs(self.base, k_names, calib, TRAIN_TOKENS * 9 // 8)
        self.shared = {keys.CALIB: calib, keys.ACT_STATS: self.analysis.act_stats(), keys.WEIGHTS_LOWERED: []}
        self.setup_seconds = time.perf_counter() - start

    def compress(self, kv: mqc.KVRecipe) -> tuple[torch.nn.Module, LoweringContext, float]:
        model = copy.deepcopy(self.base)
        ctx = LoweringContext(dict(self.shared), progress=False, model=model, source=ModuleSource(model), analysis=self.analysis)
        start = time.perf_counter()
        KVLowRank(kv, self.inputs).run(ctx)
        return model, ctx, time.perf_counter() - start

    def ppl(self, model) -> float:
        return perplexity(model, self.ids, context=self.args.context, max_tokens=self.args.tokens, progress=False)


def errors(ctx: LoweringContext) -> dict:
    projections = [p for layer in ctx[keys.KV_PLAN].values() for p in (layer.k, layer.v)]
    out = {"spectral_error": statistics.mean(p.spectral_error for p in projections)}
    if projections[0].heldout_error_init is not None:
        out["heldout_error_init"] = statistics.mean(p.heldout_error_init for p in projections)
        out["heldout_error_trained"] = statistics.mean(p.heldout_error_trained for p in projections)
    return out


def sweep_configs(args) -> list[mqc.KVRecipe]:
    configs = [
        mqc.KVRecipe(rank=rank, method=method, window=args.window, quant_bits=bits, train_steps=steps)
        for rank in (0.75, 0.5, 0.25)
        for method in ("svd", "asvd")
        for steps in (0, args.train_steps)
        for bits in (None, 4)
    ]
    configs += [
        mqc.KVRecipe(method="asvd", window=args.window, quant_bits=bits, train_steps=args.train_steps, budget_frac=frac)
        for bits, frac in ((None, 0.45), (8, 0.35), (8, 0.25), (4, 0.25), (4, 0.2), (4, 0.15))
    ]
    configs += [
        KVWithSinks(rank=0.5, method="asvd", window=args.window, train_steps=steps, sink_tokens=0)
        for steps in (0, args.train_steps)
    ]
    return configs


def run_sweep(bench: Bench) -> tuple[dict, list[dict]]:
    base_ppl = bench.ppl(bench.base)
    print(f"base: ppl {base_ppl:.3f}", flush=True)
    rows = []
    for kv in sweep_configs(bench.args):
        model, ctx, compile_s = bench.compress(kv)
        start = time.perf_counter()
        ppl = bench.ppl(model)
        acc = kv_accounting(model, bench.args.context)
        row = {
            "sink_tokens": getattr(kv, "sink_tokens", model.config.mqc_kv["sinks"]),
            **asdict(kv),
            "rank": kv.rank if kv.budget_frac is None else None,  # a budget picks the ranks itself
            "ppl": ppl,
            "ppl_ratio": ppl / base_ppl,
            "kv_fraction_at_context": acc["cache_bytes_after"] / acc["cache_bytes_before"],
            "reduction_at_context": acc["reduction_at_context"],
            "reduction_per_token": acc["reduction"],
            "bytes_per_token_before": acc["bytes_per_token_before"],
            "bytes_per_token_after": acc["bytes_per_token_after"],
            "k_ranks": [r["k_rank"] for r in acc["layers"]],
            "v_ranks": [r["v_rank"] for r in acc["layers"]],
            **errors(ctx),
            "compile_seconds": compile_s,
            "eval_seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(
            f"rank {kv.rank if kv.budget_frac is None else 'budget ' + str(kv.budget_frac)} {kv.method} "
            f"train {kv.train_steps} bits {kv.quant_bits} sinks {row['sink_tokens']}: ppl {ppl:.3f} "
            f"({row['ppl_ratio']:.3f}x), "
            f"KV reduction {row['reduction_at_context']:.1%} at {bench.args.context}",
            flush=True,
        )
        del model, ctx
    return {"ppl": base_ppl}, rows


def best(rows: list[dict], reduction: float) -> dict | None:
    fitting = [r for r in rows if r["reduction_at_context"] >= reduction]
    return min(fitting, key=lambda r: r["ppl"]) if fitting else None


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return sum(cache.nbytes().values())
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def decode_speed(models: dict[str, torch.nn.Module], prompt: torch.Tensor, steps: int) -> dict[str, dict]:
    """Prefill each model, then decode greedily one step per model in turn."""
    state, result = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        out = model(prompt[None])
        result[name] = {"prefill_seconds": time.perf_counter() - start, "step_seconds": []}
        state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    for _ in range(steps):
        for name, model in models.items():
            cache, token = state[name]
            start = time.perf_counter()
            out = model(token, past_key_values=cache)
            result[name]["step_seconds"].append(time.perf_counter() - start)
            state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    for name, (cache, _) in state.items():
        median = statistics.median(result[name]["step_seconds"])
        result[name].update(tokens_per_second=1.0 / median, median_step_seconds=median, cache_bytes=cache_bytes(cache))
    return result


def run_speed(bench: Bench, rows: list[dict]) -> dict:
    chosen = {f">={int(100 * r)}%": best(rows, r) for r in (0.5, 0.8)}
    models = {"default": bench.base}
    labels = {}
    for label, row in chosen.items():
        if row is None:
            continue
        recipe_fields = ("rank", "method", "window", "quant_bits", "train_steps", "budget_frac")
        fields = {k: row[k] for k in recipe_fields if row[k] is not None or k != "rank"}
        models[label] = bench.compress(KVWithSinks(**fields, sink_tokens=row["sink_tokens"]))[0]
        labels[label] = fields
    speed = {"configs": labels, "contexts": {}}
    for context in bench.args.speed_contexts:
        prompt = bench.ids[:context]
        result = decode_speed(models, prompt, bench.args.decode_steps)
        speed["contexts"][str(context)] = result
        summary = ", ".join(f"{n} {r['tokens_per_second']:.1f} tok/s" for n, r in result.items())
        print(f"decode at {context} tokens of context: {summary}", flush=True)
    return speed


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.5))
    top = 1.3  # ratios above are drawn on the top edge as triangles, with their value
    for row in report["sweep"]:
        budget = row["budget_frac"] is not None
        color = "tab:green" if budget else {"svd": "tab:red", "asvd": "tab:blue"}[row["method"]]
        color = "tab:grey" if row["sink_tokens"] == 0 else color
        marker = "s" if row["train_steps"] else "o"
        face = color if row["quant_bits"] else "none"
        x, y = row["kv_fraction_at_context"], row["ppl_ratio"]
        if y > top:
            ax.annotate(f"{y:.2f}", (x, top), textcoords="offset points", xytext=(5, -12), fontsize=7, color=color)
            marker, y = "^", top
        ax.scatter(x, y, marker=marker, edgecolors=color, facecolors=face, s=50)
    ax.axhline(1.05, color="grey", ls="--", lw=0.8)
    ax.axvline(0.5, color="grey", ls=":", lw=0.8)
    ax.axvline(0.2, color="grey", ls=":", lw=0.8)
    ax.set_ylim(0.98, top + 0.02)
    ax.set_xlabel(f"KV-cache bytes at {report['settings']['context']} tokens / fp16 cache")
    ax.set_ylabel("perplexity / base (dashed: +5%)")
    ax.set_title(
        "red svd, blue asvd, green budget, grey no sinks; o untrained, s trained; filled: quantized", fontsize=9
    )
    contexts = list(report["speed"]["contexts"])
    names = list(report["speed"]["contexts"][contexts[0]])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [report["speed"]["contexts"][c][name]["tokens_per_second"] for c in contexts]
        bx.bar([j + i * width for j in range(len(contexts))], values, width, label=name)
    bx.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(contexts))], [f"{c} ctx" for c in contexts])
    bx.set_ylabel("decode tokens/s (median step)")
    bx.set_title("default cache vs compressed cache")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--speed-contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_lowrank.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    base, rows = run_sweep(bench)
    speed = run_speed(bench, rows)
    report = {
        "settings": vars(args) | {"out": str(args.out), "setup_seconds": bench.setup_seconds},
        "machine": machine(),
        "base": base,
        "sweep": rows,
        "best": {label: best(rows, r) for label, r in ((">=50%", 0.5), (">=80%", 0.8))},
        "speed": speed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
