"""One memory budget for weights and KV cache: the joint allocation against weights-only + fixed KV.

    python tools/bench_kv_joint.py   -> the "joint" rows of benchmarks/results/kv.json (+ kv_joint.png)

At each --memory total (whole model + a quantized KV cache of --context tokens, batch 1): the
joint allocation (`mqc compile --memory M --kv-context 8192`: per-layer weight formats and
per-layer KV widths in one knapsack on measured-KL costs) and, for every fixed KV width w in
2/4/8 bits (the same grids: keys per channel and values per token in groups of --group), the
weights-only allocation of what is left (`--size M - KV(w)`), and the fp16 cache where it fits.
All in one run, planned from one analysis. Weights: mq with round-to-nearest candidates
and the knapsack only (--quantizer/--search, so the comparison is the allocation's, and the run
takes minutes). Perplexity: --tokens Brown evaluation tokens at --eval-context, through each
model's compressed cache (accounted at --context tokens). `best_fixed_ppl`: the best of the
fixed-KV combinations of the same total.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mqc
from mqc.data import perplexity, token_stream
from mqc.errors import InfeasibleBudgetError
from mqc.lowering.context import store_rest_in_fp16
from mqc.planning.kv import base_settings
from mqc.stream.source import ModuleSource
from mqc.report import machine
from mqc.runtime.kv import fp16_cache_bytes, quant_cache_bytes

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=float, nargs="+", default=[100, 150, 200], help="totals in MB")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--quantizer", default="rtn")
    parser.add_argument("--search", default="none")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--eval-context", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "kv.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base, tok = mqc.load_hf_model()
    store_rest_in_fp16(base, ModuleSource(base))
    ids = token_stream(tok, "eval")
    layers = base.config.num_hidden_layers
    grid = {"context": args.context, "group": args.group, "value_group": args.group, "cost_samples": 1}
    common = {"method": "mq", "quantizer": args.quantizer, "search": args.search}

    analysis = mqc.analyze(base, mqc.Recipe(**common, memory="1GB", kv_quant=mqc.KVQuantRecipe(**grid)), tokenizer=tok)

    def compile_(recipe):
        return mqc.lower(copy.deepcopy(base), mqc.plan(analysis, recipe, progress=False), analysis=analysis, progress=False)

    def ppl(compiled) -> float:
        return perplexity(compiled.model, ids, context=args.eval_context, max_tokens=args.tokens, progress=False)

    rows = []
    for memory_mb in args.memory:
        total = int(memory_mb * 1e6)
        recipe = mqc.Recipe(**common, memory=f"{total}B", kv_quant=mqc.KVQuantRecipe(**grid))
        joint = compile_(recipe)
        split = joint.plan.joint
        row = {"memory_bytes": total, "ppl": ppl(joint), "weights_bytes": joint.model_bytes,
               "kv_bytes": split["kv_bytes"], "k_bits": list(joint.plan.kv.k_bits),
               "v_bits": list(joint.plan.kv.v_bits), "fixed": []}  # fmt: skip
        for width in (2, 4, 8, 16):
            if width == 16:
                kv_bytes, kv = fp16_cache_bytes(base.config, args.context), None
            else:
                kv = mqc.KVQuantRecipe(bits=width, **grid)
                settings = base_settings(kv, layers, (width,) * layers, (width,) * layers)
                kv_bytes = quant_cache_bytes(settings, base.config, args.context)["cache_bytes_after"]
            fixed = {"kv_bits": width, "kv_bytes": kv_bytes, "weights_bytes": total - kv_bytes, "ppl": None}
            if kv_bytes >= total:
                fixed["infeasible"] = "the KV cache alone exceeds the memory"
                row["fixed"].append(fixed)
                continue
            try:
                compiled = compile_(mqc.Recipe(**common, size=f"{total - kv_bytes}B", kv_quant=kv))
                fixed.update(ppl=ppl(compiled), weights_bytes=compiled.model_bytes)
            except InfeasibleBudgetError as exc:
                fixed["infeasible"] = str(exc)
            row["fixed"].append(fixed)
        measured = [f["ppl"] for f in row["fixed"] if f["ppl"] is not None]
        row["best_fixed_ppl"] = min(measured) if measured else None
        rows.append(row)
        fixed_text = ", ".join(
            f"KV{f['kv_bits']} {f['ppl']:.2f}" if f["ppl"] else f"KV{f['kv_bits']} -" for f in row["fixed"]
        )
        print(
            f"{memory_mb:.0f} MB: joint ppl {row['ppl']:.3f} (weights {row['weights_bytes'] / 1e6:.1f} MB + KV "
            f"{row['kv_bytes'] / 1e6:.1f} MB); weights-only + fixed KV: {fixed_text}",
            flush=True,
        )
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report["joint"] = rows
    report["joint_run"] = {"settings": vars(args) | {"out": str(args.out), "seconds": time.perf_counter() - start},
                           "machine": machine()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(rows, args.out.with_name("kv_joint.png"))
    print(f"wrote {args.out} (joint) and {args.out.with_name('kv_joint.png')}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    memories = [r["memory_bytes"] / 1e6 for r in rows]
    ax.plot(memories, [r["ppl"] for r in rows], "o-", color="black", label="joint allocation")
    for width, color in zip((2, 4, 8, 16), ("tab:red", "tab:orange", "tab:green", "tab:blue")):
        points = [
            (m, f["ppl"]) for m, r in zip(memories, rows) for f in r["fixed"] if f["kv_bits"] == width and f["ppl"]
        ]
        if points:
            ax.plot(*zip(*points), "s--", color=color, label=f"weights-only + KV{width}")
    ax.set_xlabel("memory: whole model + KV cache at the context (MB)")
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
