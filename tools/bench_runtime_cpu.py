"""CPU runtime benchmark: peak memory and decode speed of artifacts on the torch runtime, compressed
kernels against the dense float32 reference path, and of their ONNX exports.

    python tools/bench_runtime_cpu.py ART [ART ...] [--onnx DIR ...] -> benchmarks/results/runtime_cpu.json

Every measurement is a fresh process (peak RSS is per process): ``mqc bench decode ART --json``
with ``--cpu-kernels packed`` and ``dense`` for each artifact, and the same greedy loop through
onnxruntime (``mqc.export.OnnxLM``, 2 threads) for each ONNX export. Rounds interleave all
variants; speeds are medians, ratios the median of per-round ratios. Peak RSS includes the
Python, torch and transformers runtime itself (``baseline_rss_bytes``: a process that imports
mqc and loads nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqc.atomic import write_bytes  # noqa: E402
from mqc.report import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "The history of the city begins"
THREADS = 2
ONNX_DECODE = """
import json, sys, time, numpy as np
from transformers import AutoTokenizer
from mqc.export import OnnxLM
from mqc.report import peak_rss_bytes
path, new = sys.argv[1], int(sys.argv[2])
ids = np.array([AutoTokenizer.from_pretrained(path, local_files_only=True)(sys.argv[3])["input_ids"]])
lm = OnnxLM(path, threads=int(sys.argv[4]))
for timed in (False, True):
    step = lm.prefill(ids)
    start = time.perf_counter()
    for _ in range(new - 1):
        step = lm.step(step.logits[:, -1].argmax(-1)[:, None], step)
    seconds = time.perf_counter() - start
print(json.dumps({"tokens_per_s": (new - 1) / seconds, "peak_rss_bytes": peak_rss_bytes()}))
"""
BASELINE = "import json, mqc, transformers; from mqc.report import peak_rss_bytes; print(json.dumps({'peak_rss_bytes': peak_rss_bytes()}))"


def run_json(command: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(kind: str, path: Path, new_tokens: int) -> dict:
    if kind == "onnx":
        return run_json([sys.executable, "-c", ONNX_DECODE, str(path), str(new_tokens), PROMPT, str(THREADS)])
    mqc = [sys.executable, "-m", "mqc.cli", "bench", "decode", str(path), "--prompt", PROMPT]
    return run_json([*mqc, "--new-tokens", str(new_tokens), "--cpu-kernels", kind, "--json"])


def artifact_bytes(path: Path) -> int:
    manifest = json.loads((path / "manifest.json").read_text())
    return manifest["tensors"]["size"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--onnx", nargs="*", type=Path, default=[], help="ONNX exports to time the same way")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "runtime_cpu.json")
    args = parser.parse_args(argv)
    variants = [(f"{p.name}:{k}", k, p) for p in args.artifacts for k in ("packed", "dense")]
    variants += [(f"{p.name}:onnx", "onnx", p) for p in args.onnx]
    samples: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    baseline = run_json([sys.executable, "-c", BASELINE])["peak_rss_bytes"]
    for round_ in range(args.rounds):
        for name, kind, path in variants:
            samples[name].append(measure(kind, path, args.new_tokens))
            print(f"round {round_ + 1}/{args.rounds} {name}: {samples[name][-1]['tokens_per_s']:.1f} tok/s", flush=True)
    rows = []
    for name, kind, path in variants:
        runs = samples[name]
        dense = samples.get(f"{path.name}:dense") if kind != "onnx" else None
        row = {
            "variant": name,
            "kernels": kind,
            "path": str(path),
            "artifact_bytes": artifact_bytes(path) if kind != "onnx" else None,
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "decode_tok_s": statistics.median(r["tokens_per_s"] for r in runs),
            "decode_tok_s_samples": [r["tokens_per_s"] for r in runs],
        }
        if dense is not None:
            row["decode_vs_dense_paired_median"] = statistics.median(
                r["tokens_per_s"] / d["tokens_per_s"] for r, d in zip(runs, dense)
            )
        if row["artifact_bytes"]:
            row["rss_over_artifact_bytes"] = row["peak_rss_bytes"] - row["artifact_bytes"]
        rows.append(row)
    print(f"{'variant':40s} {'artifact MB':>11s} {'peak RSS MB':>11s} {'RSS-artifact':>12s} {'tok/s':>7s} {'vs dense':>8s}")
    for r in rows:
        art = f"{r['artifact_bytes'] / 1e6:.1f}" if r["artifact_bytes"] else "-"
        over = f"{r['rss_over_artifact_bytes'] / 1e6:.0f}" if r.get("rss_over_artifact_bytes") else "-"
        ratio = f"{r['decode_vs_dense_paired_median']:.2f}x" if "decode_vs_dense_paired_median" in r else "-"
        print(f"{r['variant']:40s} {art:>11s} {r['peak_rss_bytes'] / 1e6:>11.0f} {over:>12s} {r['decode_tok_s']:>7.1f} {ratio:>8s}")
    print(f"baseline (python + torch + transformers + mqc imported, nothing loaded): {baseline / 1e6:.0f} MB")
    result = {
        "protocol": {"prompt": PROMPT, "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": THREADS,
                     "process": "one fresh process per measurement; decode tokens/s after a warm-up run"},
        "baseline_rss_bytes": baseline,
        "rows": rows,
        "machine": machine(),
    }  # fmt: skip
    write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
