"""The evaluation suite (qllm-eval's axes) on the embedded default model, all rows in one run.

    python tools/bench_eval.py [--suite quick|full] [--workdir out/bench_eval]
        -> benchmarks/results/eval_suite.json + eval_suite.png

Models: the full-precision model itself (fp32 weights on the CPU, the reference every row is
compared with), uniform GPTQ at 4 and 3 bits (groups of 128, fp16 embedding: ``mqc compile
--method rtn --quantizer gptq``), and mq at 3.5 whole-model bits per weight (the default
recipe). Each under the settings W (weights as compiled), W+A8 and W+A4 (per-token int8/int4
inputs to every linear but the head), W+KV4 (4-bit per-token K/V cache, no full-precision
window); with ``--smooth ALPHA`` also W+A4 with SmoothQuant-style smoothing. With ``--onnx``
the mq and 4-bit artifacts are exported to ONNX at accuracy_level 0 (float32 activations) and 4
(int8 activations, onnxruntime's fast CPU mode) and scored through onnxruntime on the same
protocol: what accuracy_level 4 costs.

Every row: ``mqc.evaluate`` against the same cached reference (perplexity, KL, top-1 and greedy
agreement on the main Brown eval windows, per-genre perplexity, perplexity at 2k/4k context).
Artifacts are compiled into --workdir on first use and reused afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mqc  # noqa: E402
from mqc.atomic import write_bytes  # noqa: E402
from mqc.evaluation import SUITES  # noqa: E402
from mqc.report import machine, save_figure, write_reports  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODELS = {  # name -> recipe (None: the full-precision reference itself)
    "fp32": None,
    "gptq-4bit": {"method": "rtn", "quantizer": "gptq", "bits": 4, "group_size": 128},
    "gptq-3bit": {"method": "rtn", "quantizer": "gptq", "bits": 3, "group_size": 128},
    "mq-3.5bpw": {"method": "mq", "size": "3.5bpw"},
}
SETTINGS = ("W", "W+A8", "W+A4", "W+KV4")


def artifact(workdir: Path, name: str, recipe: dict) -> tuple[Path, float]:
    """(artifact dir, whole-model bpw), compiled now if --workdir does not hold it yet."""
    from mqc.report import build_report

    out = workdir / name
    if not (out / "report.json").is_file():
        model, tokenizer = mqc.load_hf_model()
        compiled = mqc.compile(model, mqc.Recipe.from_dict(recipe), tokenizer=tokenizer)
        mqc.save(compiled, out, force=True)
        write_reports(build_report(compiled), out)
    return out, json.loads((out / "report.json").read_text())["size"]["bpw"]


def onnx_export(workdir: Path, art: Path, level: int) -> Path:
    from mqc.export.onnx import export_onnx

    out = workdir / f"{art.name}-onnx-al{level}"
    if not (out / "mqc_onnx.json").is_file():
        export_onnx(*mqc.load(art), out, force=True, accuracy_level=level)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, ref = result["rows"], result["reference"]
    names = list(dict.fromkeys(r["name"] for r in rows))
    settings = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(16, 10))
    width = 0.8 / len(settings)
    for panel, key, label in ((axes[0][0], "ppl", "perplexity / fp32's"), (axes[0][1], "kl", "KL(fp32 || model)")):
        for j, setting in enumerate(settings):
            values = [
                next(
                    (
                        r[key] / (ref["ppl"] if key == "ppl" else 1)
                        for r in rows
                        if r["name"] == n and r["label"] == setting
                    ),
                    0,
                )
                for n in names
            ]
            panel.bar([i + j * width for i in range(len(names))], values, width, label=setting)
        panel.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
        panel.set_yscale("log")
        panel.set_ylabel(label)
        panel.legend(fontsize=8)
    ax = axes[1][0]
    w_rows = [r for r in rows if r["label"] == "W"]
    genres = list(ref["ppl_by_genre"])
    matrix = [[r["ppl_by_genre"][g] / ref["ppl_by_genre"][g] for g in genres] for r in w_rows]
    image = ax.imshow(matrix, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(genres)), genres, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(w_rows)), [r["name"] for r in w_rows])
    ax.set_title("per Brown genre, setting W: perplexity / fp32's")
    fig.colorbar(image, ax=ax)
    ax = axes[1][1]
    for r in w_rows:
        points = [(int(c), v / ref["ppl_by_context"][c]) for c, v in r["ppl_by_context"].items() if v is not None]
        ax.plot([c for c, _ in points], [v for _, v in points], "o-", label=r["name"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("perplexity / fp32's at that context")
    ax.set_title("long context, setting W")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def table(result: dict) -> str:
    ref = result["reference"]
    contexts = list(ref["ppl_by_context"])
    head = f"{'model':<22}{'setting':<20}{'bpw':>7}{'ppl':>9}{'KL':>9}{'top-1':>7}{'greedy':>8}" + "".join(
        f"{'ppl@' + c:>10}" for c in contexts
    )
    lines = [head]
    for r in result["rows"]:
        lines.append(
            f"{r['name']:<22}{r['label']:<20}{r['bpw']:>7.2f}{r['ppl']:>9.2f}{r['kl']:>9.4f}{r['top1_agreement']:>7.3f}"
            f"{r['greedy_agreement']:>8.3f}"
            + "".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}" for v in r["ppl_by_context"].values())
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=list(SUITES), default="quick")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench_eval")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--smooth", type=float, help="also W+A4 with SmoothQuant-style smoothing at this alpha")
    parser.add_argument("--onnx", action="store_true", help="also score ONNX exports at accuracy_level 0 and 4")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_suite.json")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",")]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    settings = [s.strip() for s in args.settings.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, reference, protocol = [], None, None

    def add(result, name: str, bpw: float, label: str | None = None, **extra) -> None:
        nonlocal reference, protocol
        reference, protocol = result.reference_row, result.protocol
        for row in result.rows:
            rows.append({**row, "name": name, "bpw": bpw, "label": label or row["setting"], **extra})
        print(table({"reference": reference, "rows": rows[-len(result.rows) :]}).split("\n", 1)[1], flush=True)

    for name in names:
        if MODELS[name] is None:
            target, bpw = "default", 32.0
        else:
            target, bpw = artifact(args.workdir, name, MODELS[name])
        print(f"== {name}", flush=True)
        result = mqc.evaluate(str(target), reference="default", suite=args.suite, settings=settings)
        add(result, name, bpw)
        if args.smooth is not None and "W+A4" in settings:
            smoothed = mqc.evaluate(
                str(target), reference="default", suite=args.suite, settings=["W+A4"], smooth=args.smooth
            )
            add(smoothed, name, bpw, f"W+A4 smooth {args.smooth}")
        if args.onnx and MODELS[name] is not None and name in ("gptq-4bit", "mq-3.5bpw"):
            for level in (0, 4):
                onnx_dir = onnx_export(args.workdir, Path(target), level)
                add(
                    mqc.evaluate(str(onnx_dir), reference="default", suite=args.suite),
                    name,
                    bpw,
                    f"W onnx al{level}",
                    backend=f"onnxruntime accuracy_level {level}",
                )
    result = {
        "machine": {**machine(), "torch_threads": __import__("torch").get_num_threads(), "loadavg": os.getloadavg()},
        "suite": args.suite,
        "protocol": protocol,
        "reference": reference,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    plot(result, args.out.with_suffix(".png"))
    print()
    print(table(result))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
