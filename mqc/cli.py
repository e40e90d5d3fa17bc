"""The ``mqc`` command line: compile, eval, inspect, generate.

User mistakes raise :class:`~mqc.errors.MqcError`; :func:`main` catches them once and prints a
single ``mqc: error: ...`` line with exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from mqc.errors import MqcError


def _parse_pin(text: str) -> dict[str, Any]:
    pattern, sep, bits = text.rpartition("=")
    if not sep or not pattern or not bits.isdigit():
        raise argparse.ArgumentTypeError(f"pin {text!r} must look like PATTERN=BITS, e.g. 'lm_head=8'")
    return {"pattern": pattern, "min_bits": int(bits)}


def _parse_bits_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a comma list of integers like 2,3,4,8,16") from None


def _parse_names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# flag -> recipe field; a flag left unset keeps the recipe file's (or the default) value
_RECIPE_FLAGS = {
    "method": "method",
    "bits": "bits",
    "group_size": "group_size",
    "budget_bytes": "budget_bytes",
    "budget_frac": "budget_frac",
    "allowed_bits": "allowed_bits",
    "allowed_group_sizes": "allowed_group_sizes",
    "quantizer": "quantizer",
    "pin": "pins",
    "quantize_embeddings": "quantize_embeddings",
    "skip": "skip",
    "outliers": "outlier_frac",
    "sensitivity": "sensitivity",
    "search": "search",
    "search_generations": "search_generations",
    "target": "target",
    "gguf_types": "gguf_types",
}
_CALIB_FLAGS = {"calib_file": "file", "calib_samples": "n_samples", "calib_seq_len": "seq_len", "seed": "seed"}
_KV_FLAGS = {
    "kv_rank": "rank",
    "kv_method": "method",
    "kv_window": "window",
    "kv_quant": "quant_bits",
    "kv_train_steps": "train_steps",
    "kv_budget": "budget_frac",
    "kv_sinks": "sink_tokens",
}
_KV_QUANT_FLAGS = {
    "kv_bits": "bits",
    "kv_mixed": "budget_frac",
    "kv_context": "context",
    "kv_group": "group",
    "kv_lower_after": "lower_after",
    "kv_batch": "batch",
}


def recipe_from_args(args: argparse.Namespace, size: str | None = None, base: dict[str, Any] | None = None):
    """The recipe file (if any; else ``base``, an analysis's recipe) overridden by the flags given;
    ``size`` is one entry of --size."""
    from mqc.recipe import Recipe

    data: dict[str, Any] = Recipe.from_yaml(args.recipe).to_dict() if args.recipe else dict(base or {})
    if size is not None:
        data["size"] = size
        data.setdefault("method", "mq")  # a size budget is what mq allocates; --method rtn is refused by the recipe
    if args.target == "gguf":
        data.setdefault("method", "mq")  # a GGUF plan is an mq allocation over llama.cpp's types
    if getattr(args, "memory", None) is not None:
        data.update(memory=args.memory)
        data.setdefault("method", "mq")
        data["kv_quant"] = data.get("kv_quant") or {}
    for flag, key in _RECIPE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            data[key] = value
    calib = {key: getattr(args, flag) for flag, key in _CALIB_FLAGS.items() if getattr(args, flag) is not None}
    if calib:
        data["calib"] = {**(data.get("calib") or {}), **calib}
    kv = {key: getattr(args, flag) for flag, key in _KV_FLAGS.items() if getattr(args, flag) is not None}
    if kv:
        data["kv"] = {**(data.get("kv") or {}), **kv}
    kv_quant = {key: getattr(args, flag) for flag, key in _KV_QUANT_FLAGS.items() if getattr(args, flag) is not None}
    if kv_quant:
        if "group" in kv_quant:
            kv_quant["value_group"] = kv_quant["group"]
        data["kv_quant"] = {**(data.get("kv_quant") or {}), **kv_quant}
    return Recipe.from_dict(data)


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-file", help="evaluate on this text file instead of the Brown evaluation split")
    p.add_argument("--eval-tokens", type=int, default=16384, help="tokens scored (default 16384)")
    p.add_argument("--context", type=int, default=512, help="perplexity window and stride (default 512)")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe file; flags given explicitly override it")
    p.add_argument("--method", choices=["rtn", "mq"])
    p.add_argument(
        "--size",
        help="mq: whole-model size budget, every byte of every tensor: '70MB', '64MiB' or '3.5bpw'; "
        "a comma list ('3bpw,3.5bpw,4bpw') writes one artifact per size under --out, sharing one analysis",
    )
    p.add_argument("--bits", type=float, help="rtn: the width; mq: average bits/weight over the quantized tensors")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128])
    p.add_argument("--budget-bytes", type=int, help="mq: budget in bytes for all quantized tensors")
    p.add_argument("--budget-frac", type=float, help="mq: budget as a fraction of the fp16 size")
    p.add_argument("--allowed-bits", type=_parse_bits_list, help="mq: widths to choose from (default 2,3,4,8,16)")
    p.add_argument("--allowed-group-sizes", type=_parse_bits_list,
                   help="mq: group sizes the allocator may pick per layer, e.g. 64,128 (default: --group-size)")  # fmt: skip
    p.add_argument(
        "--quantizer", choices=["rtn", "gptq"], help="round-to-nearest or GPTQ (default: gptq for mq, rtn for uniform)"
    )
    p.add_argument("--pin", type=_parse_pin, action="append", help="PATTERN=BITS minimum width, repeatable")
    p.add_argument("--quantize-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="include embeddings and lm_head (default: on for mq, off for rtn)")  # fmt: skip
    p.add_argument("--skip", action="append", help="fnmatch pattern of layers to keep in fp16, repeatable")
    p.add_argument("--outliers", type=float, help="fraction of weights kept as fp16 sparse outliers (0 disables)")
    p.add_argument(
        "--sensitivity",
        choices=["kl", "first_order", "fisher"],
        help="mq costs: predicted KL to the full-precision model (default) or LLM-MQ's RTN-delta scores",
    )
    p.add_argument("--search", choices=["evo", "none"], help="mq: refine the knapsack plan on measured KL (default evo)")
    p.add_argument("--search-generations", type=int, help="mq: generations of the measured-KL search (default 10)")
    p.add_argument("--target", choices=["torch", "cuda", "onnx", "gguf"],
                   help="where the model will run; the plan is priced in the bytes it stores there: torch (default) "
                   "and cuda store every mqc format, onnx has no 3-bit codes (mqc export --onnx), gguf plans "
                   "over llama.cpp's types (mqc export --gguf)")
    p.add_argument("--gguf-types", type=_parse_names,
                   help="target gguf: comma list of llama.cpp types to choose from (default all: "
                   "Q2_K,Q3_K,Q4_0,Q4_1,Q4_K,Q5_0,Q5_1,Q5_K,Q6_K,Q8_0,F16)")
    p.add_argument("--calib-file", help="calibrate on this text file instead of the Brown calibration split")
    p.add_argument("--calib-samples", type=int)
    p.add_argument("--calib-seq-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--kv-rank", type=float, help="low-rank K/V cache at this fraction of the K/V width")
    p.add_argument("--kv-method", choices=["svd", "asvd"])
    p.add_argument("--kv-window", type=int, help="recent tokens kept in full precision (default 32)")
    p.add_argument("--kv-quant", type=int, choices=[2, 4, 8], help="quantize the compressed K/V branch")
    p.add_argument("--kv-train-steps", type=int, help="reconstruction training steps per layer")
    p.add_argument("--kv-budget", type=float, help="choose per-layer K/V ranks for this fraction of KV memory")
    p.add_argument("--kv-sinks", type=int, help="first tokens of a sequence kept exact (default 4)")
    p.add_argument("--kv-bits", type=int, choices=[2, 4, 8], help="quantized KV cache at this width (KIVI)")
    p.add_argument("--kv-mixed", type=float, metavar="FRAC",
                   help="quantized KV cache, per-layer widths (PM-KVQ) for this fraction of the fp16 cache at --kv-context")
    p.add_argument("--kv-context", type=int, help="quantized KV: tokens the cache is sized for (default 4096)")
    p.add_argument("--kv-group", type=int, help="quantized KV: tokens per key grid and channels per value grid (default 32)")
    p.add_argument("--kv-lower-after", type=int, metavar="TOKENS",
                   help="quantized KV: tokens older than the window + this drop one width (progressive lowering)")
    p.add_argument("--memory", metavar="SIZE",
                   help="joint budget for the whole model plus a quantized KV cache of --kv-context tokens "
                   "(e.g. 150MB): weight and KV widths chosen together (implies --method mq)")
    p.add_argument("--kv-batch", type=int, help="joint budget: sequences whose KV caches it holds (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqc", description="Compile causal LMs into small, fast mixed-precision models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="quantize a model and write an artifact (analyze, plan, lower)")
    c.add_argument("model", nargs="?", default=None, help="local HF model dir (default: embedded SmolLM2-135M, or --analysis's model)")
    c.add_argument("--out", required=True, help="artifact directory to write")
    c.add_argument("--force", action="store_true", help="replace an existing artifact at --out")
    c.add_argument("--analysis", metavar="DIR", help="plan from this finished analysis (mqc analyze) instead of analysing")
    c.add_argument("--device", default="cpu", help="where the analysis and the search run layers: cpu (default) or cuda")
    _add_recipe_args(c)
    c.add_argument("--eval", action="store_true", help="also measure perplexity before and after")
    _add_eval_args(c)
    c.add_argument("--json", action="store_true", help="print the reports as one JSON document")

    a = sub.add_parser("analyze", help="analyse a model once (streamed, resumable); plans of any size come from it")
    a.add_argument("model", nargs="?", default=None, help="local HF model dir (default: embedded SmolLM2-135M)")
    a.add_argument("--out", required=True, help="analysis directory (a killed run continues there)")
    a.add_argument("--force", action="store_true", help="start over an analysis at --out (never replaces anything else)")
    a.add_argument("--device", default="cpu", help="where layers run: cpu (default) or cuda (one layer at a time on the GPU)")
    _add_recipe_args(a)
    a.add_argument("--json", action="store_true", help="print the summary as JSON")

    e = sub.add_parser(
        "eval",
        help="evaluate a model or artifact against its full-precision source: perplexity, KL, agreement, "
        "per-genre and long-context perplexity, activation/KV settings",
    )
    e.add_argument("model", help="artifact dir, local HF model dir, or 'default'")
    e.add_argument("--suite", choices=["quick", "full"], default="quick", help="quick (default, minutes) or full")
    e.add_argument("--reference", help="full-precision model to compare with (default: the artifact's source)")
    e.add_argument("--settings", help="comma-separated: W, W+A8, W+A4, W+KV4, W+A8+KV4 (default: the suite's)")
    e.add_argument("--smooth", type=float, metavar="ALPHA", help="SmoothQuant-style smoothing for the A settings (e.g. 0.5)")
    e.add_argument("--text", action="append", default=[], help="also report perplexity on this text file (repeatable)")
    e.add_argument("--eval-file", help="main text instead of the Brown evaluation split (no per-genre results)")
    e.add_argument("--eval-tokens", type=int, help="main-text tokens scored (default: the suite's)")
    e.add_argument("--context", type=int, help="window for perplexity/KL (default 512)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")

    i = sub.add_parser("inspect", help="print an artifact's per-layer plan")
    i.add_argument("artifact")
    i.add_argument(
        "--kv-context", type=int, help="low-rank KV: size the whole cache at this many tokens (default 4096)"
    )
    i.add_argument("--json", action="store_true")

    x = sub.add_parser("export", help="export an artifact or model for onnxruntime or llama.cpp")
    x.add_argument("model", help="artifact dir, local HF model dir, or 'default'")
    fmt = x.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--onnx", metavar="OUT_DIR", help="directory to write the ONNX graphs to")
    fmt.add_argument(
        "--gguf",
        metavar="OUT_FILE",
        help="GGUF file for llama.cpp: an artifact compiled with --target gguf (a float model: F16)",
    )
    x.add_argument("--force", action="store_true", help="replace an existing export (--gguf: only one mqc wrote)")
    x.add_argument(
        "--accuracy-level",
        type=int,
        choices=[0, 1, 4],
        help="--onnx: MatMulNBits activations: 4 int8 (fast, default), 0 float32 (matches the torch runtime)",
    )
    x.add_argument("--json", action="store_true", help="print what was written as JSON")

    g = sub.add_parser("generate", help="generate text with a model or artifact")
    g.add_argument("model", nargs="?", help="artifact dir, local HF model dir, or 'default'")
    g.add_argument("--onnx", metavar="DIR", help="generate with onnxruntime from an exported directory instead")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample (temperature 0.7) instead of greedy")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--cpu-kernels", default="packed", choices=["packed", "dense"], help=CPU_KERNELS_HELP)
    g.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="measure speed")
    bench = b.add_subparsers(dest="bench", required=True)
    d = bench.add_parser("decode", help="greedy-decode tokens/s of a model or artifact")
    d.add_argument("model", help="artifact dir, local HF model dir, or 'default'")
    d.add_argument("--prompt", default="The history of the city begins")
    d.add_argument("--new-tokens", type=int, default=128)
    d.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    d.add_argument("--cuda-graph", action="store_true", help="replay each decode step from a CUDA graph (StaticCache)")
    d.add_argument("--cpu-kernels", default="packed", choices=["packed", "dense"], help=CPU_KERNELS_HELP)
    d.add_argument("--json", action="store_true")
    return parser


def _compile_targets(args, base: dict[str, Any] | None = None) -> list[tuple[Any, Path]]:
    """(recipe, artifact dir) per requested size: --out itself, or one subdirectory per size."""
    sizes = [t.strip() for t in args.size.split(",")] if args.size else [None]
    if len(sizes) != len(set(sizes)):
        raise MqcError(f"--size {args.size!r} names a size twice")
    out = Path(args.out)
    if len(sizes) == 1:
        return [(recipe_from_args(args, sizes[0], base), out)]
    return [(recipe_from_args(args, size, base), out / f"mq-{size}") for size in sizes]


def cmd_analyze(args) -> int:
    import mqc

    if args.calib_file:
        from mqc.data import check_text_file

        check_text_file(args.calib_file)
    args.method = args.method or "mq"
    recipe = recipe_from_args(args)
    budgets = tuple(r for r, _ in _compile_targets(argparse.Namespace(**{**vars(args), "out": "."}))) if args.size else ()
    analysis = mqc.analyze(args.model, recipe, args.out, force=args.force, budgets=budgets, device=args.device)
    summary = analysis_summary(analysis)
    print(json.dumps(summary, indent=2, default=str) if args.json else "\n".join(analysis_lines(summary)))
    return 0


def analysis_summary(analysis) -> dict[str, Any]:
    return {
        "analysis": str(analysis.root),
        "bytes_on_disk": analysis.size_bytes(),
        "model_type": analysis.config.model_type,
        "units": len(analysis.units),
        "layers": analysis.n_layers,
        "settings": analysis.settings.to_dict(),
        "stages": analysis.stages,
    }


def analysis_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"analysis {summary['analysis']}: {summary['model_type']}, {summary['layers']} layers, {summary['units']} units, "
             f"{summary['bytes_on_disk'] / 2**20:.0f} MiB on disk"]  # fmt: skip
    for name, stage in summary["stages"].items():
        steps = stage.get("steps", [])
        slowest = max((st.get("seconds", 0) for st in steps), default=0)
        extra = f", {len(steps)} steps (slowest {slowest:.1f} s)" if steps else ""
        peak = stage.get("peak_rss_bytes")
        lines.append(f"  {name}: {stage.get('seconds', 0):.1f} s" + (f", peak {peak / 2**20:.0f} MiB" if peak else "") + extra)
    lines.append(f"plan from it: mqc compile --analysis {summary['analysis']} --size 3.5bpw,4.5bpw --out OUT")
    return lines


def cmd_compile(args) -> int:
    import mqc
    from mqc.atomic import check_replaceable
    from mqc.data import check_text_file
    from mqc.report import build_report, layer_table, summary_lines, write_reports
    from mqc.runtime.artifact import WHAT as ARTIFACT
    from mqc.runtime.artifact import is_artifact

    analysis = mqc.Analysis.open(args.analysis) if args.analysis else None
    model = args.model
    if analysis is not None and model is None:
        model = analysis.source_spec
        if model is None:
            raise MqcError(f"{args.analysis} was made from a model in memory; name the model directory: mqc compile MODEL --analysis DIR")
    targets = _compile_targets(args, analysis.recipe.to_dict() if analysis is not None else None)
    for _, out in targets:  # before any work: what save() would refuse at the end
        check_replaceable(out, args.force, is_artifact, ARTIFACT)
    for path in (args.calib_file, args.eval_file):
        if path:
            check_text_file(path)
    if analysis is None:
        analysis = mqc.analyze(model, targets[0][0], budgets=tuple(r for r, _ in targets), device=args.device)
    if len(targets) > 1:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    reference = None
    reports = []
    for recipe, out in targets:
        plan = mqc.plan(analysis, recipe, device=args.device)
        compiled = mqc.lower(model, plan, analysis=analysis)
        mqc.save(compiled, out, force=args.force)
        evaluation = None
        if args.eval:
            if reference is None:
                reference = _evaluate(None, model, compiled.tokenizer, args)
            ppl, tokens = _evaluate(compiled.model, model, compiled.tokenizer, args)
            text = args.eval_file or "Brown eval split"
            evaluation = {"ppl_reference": reference[0], "ppl_compiled": ppl, "tokens": tokens, "context": args.context, "text": text}
        report = build_report(compiled, evaluation)
        report["artifact"] = {"path": str(out), "bytes_on_disk": sum(f.stat().st_size for f in out.iterdir())}
        write_reports(report, out)
        reports.append(report)
        if not args.json:
            print("\n".join(summary_lines(report)) if len(report["layers"]) > 40 else layer_table(report["layers"]) + "\n\n" + "\n".join(summary_lines(report)))
            print(f"artifact: {out} ({report['artifact']['bytes_on_disk'] / 2**20:.2f} MiB on disk), report: {out}/report.md")
            print()
        del compiled
        gc.collect()  # the next size's search starts from what this one freed
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2, default=str))
    return 0


def _evaluate(compiled_model, spec, tokenizer, args) -> tuple[float, int]:
    """Perplexity of the compiled model (in memory), or of the float model ``spec`` streamed from
    its shards when ``compiled_model`` is None."""
    from mqc.data import bos_id, perplexity, token_stream
    from mqc.stream.skeleton import open_model
    from mqc.stream.stack import LayerStack

    if compiled_model is None:
        skeleton, source, tokenizer, _ = open_model(spec)
        stack = LayerStack(skeleton, source)
    else:
        stack = LayerStack(compiled_model)
    ids = token_stream(tokenizer, "eval", args.eval_file)
    ppl = perplexity(stack, ids, context=args.context, max_tokens=args.eval_tokens, bos=bos_id(tokenizer))
    return ppl, min(ids.numel(), args.eval_tokens)


def cmd_eval(args) -> int:
    import mqc
    from mqc.evaluation import report

    settings = [s for s in args.settings.split(",") if s.strip()] if args.settings else None
    result = mqc.evaluate(
        args.model,
        reference=args.reference,
        suite=args.suite,
        settings=settings,
        eval_file=args.eval_file,
        texts=args.text,
        eval_tokens=args.eval_tokens,
        context=args.context,
        smooth=args.smooth,
    ).to_dict()
    written = []
    if any((Path(args.model) / f).is_file() for f in ("manifest.json", "mqc_onnx.json")):  # an artifact or export
        written = report.write(result, args.model)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(report.table(result))
    genres = report.genre_table(result)
    if genres:
        print()
        print(genres)
    if written:
        print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_inspect(args) -> int:
    from mqc.report import layer_table, totals
    from mqc.runtime.artifact import read_manifest
    from mqc.runtime.kv import REPORT_CONTEXT, kv_accounting, kv_summary_lines

    manifest = read_manifest(args.artifact)
    kv = kv_accounting(args.artifact, context=args.kv_context or REPORT_CONTEXT)
    if args.json:
        print(
            json.dumps(
                {k: manifest[k] for k in ("model_type", "plan", "accounting", "recipe")}
                | {"totals": totals(manifest["plan"]), "kv": kv},
                indent=2,
            )
        )
        return 0
    print(
        f"{args.artifact}: {manifest['model_type']}, mqc {manifest['mqc_version']}, method {manifest['recipe']['method']}"
    )
    print(layer_table(manifest["plan"]))
    for line in kv_summary_lines(kv) if kv else []:
        print(line)
    return 0


CPU_KERNELS_HELP = (
    "an artifact on the CPU: packed (default) keeps the weights compressed in memory (int4 kernels, bfloat16 "
    "activations); dense multiplies by a float32 copy of every weight (the exact reference, several times the memory)"
)


def _load(args):
    """(model, tokenizer) of MODEL; an artifact on the CPU comes on compressed kernels unless
    ``--cpu-kernels dense``."""
    from mqc.runtime.artifact import load_any

    return load_any(args.model, deploy_cpu=args.device == "cpu" and args.cpu_kernels == "packed")


def _on_device(model, device: str):
    """The model on ``device``: on CUDA, fp16 with sibling projections fused (one launch each)."""
    if device == "cpu":
        return model
    import torch

    from mqc.kernels.launch import kernels_available
    from mqc.lowering.fuse import fuse_model

    if not torch.cuda.is_available():
        raise MqcError("--device cuda: no CUDA device is visible; use --device cpu")
    fuse_model(model)  # no-op for a float or already-fused model
    if not kernels_available():
        print(
            "mqc: note: CuPy is not installed; quantized layers dequantize then matmul (pip install cupy-cuda13x)",
            file=sys.stderr,
        )
    return model.to("cuda", torch.float16)


def cmd_bench(args) -> int:
    from mqc.bench import decode_benchmark
    from mqc.report import peak_rss_bytes

    model, tokenizer = _load(args)
    if tokenizer is None:
        raise MqcError(f"{args.model} has no tokenizer; a text prompt needs one")
    model = _on_device(model, args.device)
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    r = decode_benchmark(model, ids, args.new_tokens, args.device, cuda_graph=args.cuda_graph)
    r["peak_rss_bytes"] = peak_rss_bytes()
    note = f" (CUDA graph refused: {r['cuda_graph_error']})" if "cuda_graph_error" in r else ""
    print(
        json.dumps(r)
        if args.json
        else f"{r['tokens_per_s']:.1f} tokens/s, {r['ms_per_token']:.2f} ms/token ({r['mode']}, {args.device}); "
        f"prefill {r['prompt_tokens']} tokens in {1000 * r['prefill_s']:.1f} ms; peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB{note}"
    )
    return 0


def cmd_export(args) -> int:
    if args.gguf:
        return _export_gguf(args)
    from mqc.atomic import check_replaceable
    from mqc.export import export_onnx
    from mqc.export.onnx import DEFAULT_ACCURACY_LEVEL, is_export
    from mqc.export.onnx import WHAT as EXPORT
    from mqc.runtime.artifact import load_any
    from mqc.runtime.artifact import is_artifact, read_manifest

    check_replaceable(Path(args.onnx), args.force, is_export, EXPORT)  # before loading anything
    accounting = read_manifest(args.model)["accounting"] if is_artifact(Path(args.model)) else {}
    planned, target = accounting.get("model_bytes"), accounting.get("target", "torch")
    model, tokenizer = load_any(args.model)
    level = DEFAULT_ACCURACY_LEVEL if args.accuracy_level is None else args.accuracy_level
    out = export_onnx(
        model, tokenizer, args.onnx, force=args.force, accuracy_level=level,
        planned_bytes=planned if target == "onnx" else None,
    )  # fmt: skip
    stored = json.loads((out / "mqc_onnx.json").read_text())["model_tensor_bytes"]
    if args.json:
        print(json.dumps({"onnx": str(out), "model_tensor_bytes": stored, "planned_bytes": planned, "target": target}))
        return 0
    print(f"exported to {out}: model tensors {stored:,} bytes", end="")
    if planned is None:
        print()
    elif stored == planned:
        print(f" (= planned for target {target})")
    else:
        print(
            f"; the plan (target {target}) priced {planned:,} bytes: 3-bit layers are stored as 4-bit codes in ONNX. "
            "Compile with --target onnx to plan in the bytes ONNX stores."
        )
    return 0


def _export_gguf(args) -> int:
    from mqc.export import export_gguf

    if args.accuracy_level is not None:
        raise MqcError("--accuracy-level applies to --onnx only; a GGUF file stores no activation type")
    result = export_gguf(args.model, args.gguf, force=args.force)
    print(json.dumps(result.to_dict()) if args.json else result.summary())
    return 0


def _generate_onnx(args) -> int:
    from transformers import AutoTokenizer

    from mqc.export import onnx_generate

    new = onnx_generate(args.onnx, args.prompt, max_new_tokens=args.max_new_tokens)
    text = AutoTokenizer.from_pretrained(args.onnx, local_files_only=True).decode(new, skip_special_tokens=True)
    print(json.dumps({"prompt": args.prompt, "completion": text, "tokens": new}) if args.json else args.prompt + text)
    return 0


def cmd_generate(args) -> int:
    if args.onnx:
        return _generate_onnx(args)
    if args.model is None:
        raise MqcError("generate needs MODEL (an artifact, a local HF model dir or 'default') or --onnx DIR")
    from mqc.report import peak_rss_bytes

    model, tokenizer = _load(args)
    if tokenizer is None:
        raise MqcError(f"{args.model} has no tokenizer; generation from a text prompt needs one")
    model = _on_device(model, args.device)
    ids = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    sampling = dict(do_sample=True, temperature=0.7, top_p=0.95) if args.sample else dict(do_sample=False)
    start = time.perf_counter()
    out = model.generate(**ids, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id, **sampling)
    seconds = time.perf_counter() - start
    new = out[0, ids["input_ids"].shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True)
    facts = {"tokens_per_s": len(new) / seconds, "peak_rss_bytes": peak_rss_bytes()}
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text, "tokens": new.tolist(), **facts}))
        return 0
    print(args.prompt + text)
    print(
        f"mqc: {len(new)} tokens in {seconds:.2f} s ({facts['tokens_per_s']:.1f} tokens/s, prompt included), "
        f"peak RSS {facts['peak_rss_bytes'] / 2**20:.0f} MiB",
        file=sys.stderr,
    )
    return 0


COMMANDS = {
    "analyze": cmd_analyze,
    "compile": cmd_compile,
    "eval": cmd_eval,
    "inspect": cmd_inspect,
    "generate": cmd_generate,
    "bench": cmd_bench,
    "export": cmd_export,
}


def _close_progress_bars() -> None:
    """End any progress bar a failure interrupted, so the error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        return COMMANDS[args.command](args)
    except MqcError as exc:
        _close_progress_bars()
        print(f"mqc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mqc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
