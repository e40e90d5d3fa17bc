"""Any model size on one machine: peak memory and time of the streamed analysis, plans and lowering.

    python tools/bench_scale.py                 # every row -> benchmarks/results/scale.json + scale.png
    python tools/bench_scale.py --rows 1B,270M  # some rows (the others kept from the JSON)

Models are random-weight models built from the configurations of real families and saved as
bfloat16 safetensors shards under --models (no hub): Llama-3.2-1B (16 layers, 128k tied
vocabulary), Llama-3.1-8B (untied 128k vocabulary; analysed at --layers-8b of its 32 layers),
Gemma-3 270M (262k tied vocabulary) and the embedded SmolLM2-135M itself. They carry the default
model's tokenizer (its ids are within every vocabulary): the text is Brown's, the shapes are the
real ones. Every measurement is a fresh ``mqc`` process; its peak RSS is the kernel's
(``getrusage`` of the child), its stages and per-layer times come from the analysis directory and
the compile reports.

Rows: ``1B`` full ``mqc compile --method mq --size 3.5bpw,4.5bpw`` with the defaults; ``8B``
``mqc analyze`` of the first layers with the embedding and head (projected to 32 layers from the
per-layer times); ``270M`` full compile at 4.5 bpw and ``mqc eval`` of it; ``135M`` compile and
eval, next to the same commands of the mqc before streaming (``--before REV``, a git revision run
from a worktree) when given. ``replan_seconds``: ``mqc.plan`` at a new size without search, from the
1B analysis, in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqc.atomic import write_bytes  # noqa: E402
from mqc.models import cache_dir, default_model_dir  # noqa: E402
from mqc.report import machine, save_figure  # noqa: E402
from mqc.stream.skeleton import build_skeleton  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GiB = 2**30


def llama_1b():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )  # fmt: skip


def llama_8b(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )  # fmt: skip


def gemma3_270m():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
    )  # fmt: skip


def build(config, out: Path, seed: int = 0, shard_bytes: int = GiB) -> Path:
    """A random-weight model of ``config`` as bfloat16 shards (normal(0, 0.02) matrices, unit
    norms), written one shard at a time: an 8B model never exists in memory."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    if (out / "model.safetensors.index.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = build_skeleton(config).state_dict(keep_vars=True)
    seen, shards, current, size = set(), [], {}, 0
    for name, tensor in state.items():
        if id(tensor) in seen:
            continue  # a tied tensor is stored once
        seen.add(id(tensor))
        if tensor.ndim == 1:
            value = torch.ones(tensor.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(tensor.shape, generator=gen) * 0.02).to(torch.bfloat16)
        current[name], size = value, size + value.numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    shards += [current] if current else []
    index = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, tmp / file, metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, file))
    total = sum(v.numel() * 2 for s in shards for v in s.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    config.dtype = "bfloat16"
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(tmp)
    tmp.rename(out)
    return out


def measured(argv: list[str], **kw) -> dict:
    """:func:`run` in a process of its own, so that its peak RSS is its own and not a maximum
    over earlier children."""
    code = (
        "import json, resource, subprocess, sys, time;"
        "t = time.perf_counter();"
        "p = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True, env=json.loads(sys.argv[2]), cwd=sys.argv[3]);"
        "print(json.dumps({'rc': p.returncode, 'wall_seconds': time.perf_counter() - t, "
        "'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, 'stdout': p.stdout, 'stderr': p.stderr[-3000:]}))"
    )
    cwd = kw.get("cwd", ROOT)
    python = kw.get("python", sys.executable)
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    wrapper = subprocess.run(
        [sys.executable, "-c", code, json.dumps([python, "-m", "mqc.cli", *argv]), json.dumps(env), str(cwd)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(wrapper.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"mqc {' '.join(argv)} failed:\n{result['stderr']}")
    print(
        f"  mqc {' '.join(argv)}: {result['wall_seconds']:.0f} s, peak {result['peak_rss_bytes'] / GiB:.2f} GiB",
        flush=True,
    )
    return result


def analysis_stages(path: Path) -> dict:
    manifest = json.loads((path / "analysis.json").read_text())
    stages = {
        name: {"seconds": s.get("seconds"), "peak_rss_bytes": s.get("peak_rss_bytes"), "steps": s.get("steps", [])}
        for name, s in manifest["stages"].items()
    }
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"stages": stages, "analysis_bytes": size, "n_layers": manifest["n_layers"]}


def layer_seconds(stages: dict) -> list[float]:
    """Per decoder layer: its sweep step and its backward step, added."""
    per: dict[int, float] = {}
    for name in ("sweep", "output_fisher"):
        for step in stages.get(name, {}).get("steps", []):
            if isinstance(step.get("layer"), int):
                per[step["layer"]] = per.get(step["layer"], 0.0) + step["seconds"]
    return [per[i] for i in sorted(per)]


def fp32_bytes(path: Path) -> int:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return index["metadata"]["total_size"] * 2  # bfloat16 on disk


def compile_row(name: str, model: Path, work: Path, sizes: str, layers: int, evaluate: bool = False) -> dict:
    analysis, out = work / f"{name}-analysis", work / f"{name}-compiled"
    analyze = measured(["analyze", str(model), "--out", str(analysis), "--force"])
    argv = ["compile", str(model), "--analysis", str(analysis), "--size", sizes, "--out", str(out), "--force", "--json"]
    compiled = measured(argv + (["--eval"] if evaluate else []))
    reports = json.loads(compiled["stdout"])
    reports = reports if isinstance(reports, list) else [reports]
    facts = analysis_stages(analysis)
    stages = {f"analysis.{k}": v for k, v in facts["stages"].items()}
    for report in reports:
        size = report["recipe"]["size"]
        stages[f"plan {size}"] = {"seconds": report["stages"]["plan"]["seconds"]}
        for key, value in report["stages"].items():
            if key.startswith("lower."):
                stages[f"{key} {size}"] = {"seconds": value["seconds"]}
    return {
        "name": name,
        "model": str(model),
        "layers": layers,
        "full_compile": True,
        "peak_rss_bytes": max(analyze["peak_rss_bytes"], compiled["peak_rss_bytes"]),
        "peak_rss_analysis_bytes": analyze["peak_rss_bytes"],
        "peak_rss_plans_and_lowering_bytes": compiled["peak_rss_bytes"],
        "wall_seconds": analyze["wall_seconds"] + compiled["wall_seconds"],
        "analysis_seconds": analyze["wall_seconds"],
        "plans_and_lowering_seconds": compiled["wall_seconds"],
        "per_layer_seconds": layer_seconds(facts["stages"]),
        "stages": stages,
        "analysis_bytes": facts["analysis_bytes"],
        "sizes": [
            {
                "size": r["recipe"]["size"],
                "bpw": r["size"]["bpw"],
                "search_kl": r.get("search", {}).get("final_kl"),
                "artifact_bytes": r["artifact"]["bytes_on_disk"],
                "ppl": r.get("evaluation", {}).get("ppl_compiled"),
                "ppl_reference": r.get("evaluation", {}).get("ppl_reference"),
            }
            for r in reports
        ],
        "fp32_weight_bytes": fp32_bytes(model) if (model / "model.safetensors.index.json").is_file() else None,
    }


def analysis_row(name: str, model: Path, work: Path, layers: int, full_layers: int) -> dict:
    analysis = work / f"{name}-analysis"
    result = measured(["analyze", str(model), "--out", str(analysis), "--force"])
    facts = analysis_stages(analysis)
    per_layer = layer_seconds(facts["stages"])
    other = result["wall_seconds"] - sum(per_layer)
    return {
        "name": name,
        "model": str(model),
        "layers": layers,
        "full_compile": False,
        "peak_rss_bytes": result["peak_rss_bytes"],
        "wall_seconds": result["wall_seconds"],
        "per_layer_seconds": per_layer,
        "projected_seconds_full_depth": other + full_layers * sum(per_layer) / len(per_layer),
        "full_depth_layers": full_layers,
        "per_layer_peak_rss_bytes": [s["peak_rss_bytes"] for s in facts["stages"]["sweep"]["steps"]],
        "stages": {f"analysis.{k}": v for k, v in facts["stages"].items()},
        "analysis_bytes": facts["analysis_bytes"],
    }


def eval_row(name: str, artifact: Path, **kw) -> dict:
    result = measured(["eval", str(artifact), "--json"], **kw)
    rows = json.loads(result["stdout"])["rows"]
    return {
        "peak_rss_bytes": result["peak_rss_bytes"],
        "wall_seconds": result["wall_seconds"],
        "ppl": rows[0]["ppl"],
        "kl": rows[0]["kl"],
    }


def replan_seconds(analysis: Path) -> dict:
    import mqc

    began = time.perf_counter()
    opened = mqc.Analysis.open(analysis)
    opened_s = time.perf_counter() - began
    began = time.perf_counter()
    plan = mqc.plan(opened, size="4bpw", search_generations=0, progress=False)
    return {"open_seconds": opened_s, "plan_seconds": time.perf_counter() - began, "bpw": plan.bpw}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for row in result["rows"]:
        if row.get("per_layer_seconds"):
            left.plot(range(len(row["per_layer_seconds"])), row["per_layer_seconds"], "o-", ms=3, label=row["name"])
    left.set_xlabel("decoder layer")
    left.set_ylabel("seconds (sweep + backward)")
    left.set_title("analysis time per layer")
    left.legend()
    names = [r["name"] for r in result["rows"]]
    right.bar(names, [r["peak_rss_bytes"] / GiB for r in result["rows"]], color="tab:blue")
    right.set_ylabel("peak RSS (GiB)")
    right.set_title(f"peak memory ({result['machine']['cpu_model']})")
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="135M,270M,1B,8B", help="rows to measure (others are kept from the JSON)")
    p.add_argument(
        "--models", default=str(cache_dir() / "bench-models"), help="where the random-weight models are built"
    )
    p.add_argument("--work", default=str(ROOT / "out" / "bench_scale"), help="analyses and artifacts")
    p.add_argument("--layers-8b", type=int, default=4, help="decoder layers of the 8B model analysed")
    p.add_argument("--before", help="git revision of mqc before streaming, for the 135M before/after rows")
    args = p.parse_args()
    wanted = set(args.rows.split(","))
    models, work = Path(args.models), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "scale.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    rows = {r["name"]: r for r in previous.get("rows", [])}
    result = {
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "rows": [],
        "replan_seconds": previous.get("replan_seconds"),
    }

    def save():
        result["rows"] = list(rows.values())
        write_bytes(out, json.dumps(result, indent=1).encode())

    if "135M" in wanted:
        print("135M (the default model)", flush=True)
        row = compile_row("135M SmolLM2", default_model_dir(), work, "3.5bpw,4.5bpw", 30, evaluate=True)
        pareto = json.loads((RESULTS / "pareto.json").read_text())
        earlier = {r["budget_bpw"]: r["ppl"] for r in pareto["rows"] if r["family"] == "mq"}
        for entry in row["sizes"]:
            entry["ppl_pareto_json"] = earlier.get(float(entry["size"].removesuffix("bpw")))
        row["eval"] = eval_row("135M", work / "135M SmolLM2-compiled" / "mq-3.5bpw")
        if args.before:
            row["before"] = before_rows(args.before, work)
        rows[row["name"]] = row
        save()
    if "270M" in wanted:
        print("270M (Gemma-3 shapes)", flush=True)
        model = build(gemma3_270m(), models / "gemma-3-270m-random")
        row = compile_row("270M Gemma-3", model, work, "4.5bpw", 18)
        row["eval"] = eval_row("270M", work / "270M Gemma-3-compiled")
        rows[row["name"]] = row
        save()
    if "1B" in wanted:
        print("1B (Llama-3.2-1B shapes)", flush=True)
        model = build(llama_1b(), models / "llama-3.2-1b-random")
        rows["1B Llama-3.2"] = compile_row("1B Llama-3.2", model, work, "3.5bpw,4.5bpw", 16)
        result["replan_seconds"] = replan_seconds(work / "1B Llama-3.2-analysis")
        save()
    if "8B" in wanted:
        print(f"8B (Llama-3.1-8B shapes, {args.layers_8b} of 32 layers)", flush=True)
        model = build(llama_8b(args.layers_8b), models / f"llama-3.1-8b-random-{args.layers_8b}layers")
        rows["8B Llama-3.1"] = analysis_row("8B Llama-3.1", model, work, args.layers_8b, 32)
        save()
    print(f"{'row':<16} {'layers':>6} {'peak GiB':>9} {'wall s':>8} {'s/layer':>8}")
    for row in rows.values():
        per = row.get("per_layer_seconds") or [0]
        print(
            f"{row['name']:<16} {row['layers']:>6} {row['peak_rss_bytes'] / GiB:>9.2f} {row['wall_seconds']:>8.0f} {sum(per) / len(per):>8.1f}"
        )
    if result.get("replan_seconds"):
        print(f"re-plan from the 1B analysis without search: {result['replan_seconds']['plan_seconds']:.2f} s")
    plot(result, RESULTS / "scale.png")
    return 0


def before_rows(revision: str, work: Path) -> dict:
    """The same 135M compile and eval with the mqc of ``revision`` (checked out in a worktree)."""
    tree = work / f"worktree-{revision}"
    if not tree.is_dir():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), revision], cwd=ROOT, check=True, capture_output=True
        )
    art = work / "before-135M"
    compiled = measured(["compile", "--method", "mq", "--size", "3.5bpw", "--out", str(art), "--force"], cwd=tree)
    evaluated = eval_row("135M before", art, cwd=tree)
    return {"revision": revision, "compile_peak_rss_bytes": compiled["peak_rss_bytes"], "compile_seconds": compiled["wall_seconds"],
            "eval_peak_rss_bytes": evaluated["peak_rss_bytes"], "eval_seconds": evaluated["wall_seconds"]}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
