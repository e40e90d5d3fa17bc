"""Compile reports: ``report.json`` (everything), ``report.md`` (for people), ``report.png`` (plots).

The same per-layer table is printed by ``mqc compile`` and ``mqc inspect``; it is built from the
artifact's plan rows so that the two always agree.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
from pathlib import Path
from typing import Any

import torch

from mqc import __version__, quant
from mqc.passes import keys


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mqc": __version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def build_report(compiled, evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything worth keeping about one compilation, as plain JSON-able data."""
    ctx = compiled.context
    plan_rows = [{**vars(e), "bytes": e.nbytes} for e in compiled.plan.values()]
    report: dict[str, Any] = {
        "model_type": compiled.model.config.model_type,
        "recipe": compiled.recipe.to_dict(),
        "layers": plan_rows,
        "totals": totals(plan_rows),
        "timings": {"compile_seconds": compiled.stats["compile_seconds"], **compiled.stats["pass_seconds"]},
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine(),
    }
    allocation = ctx.results.get(keys.ALLOCATION)
    if allocation is not None:
        report["allocation"] = {
            **vars(allocation),
            "slack_bytes": allocation.slack_bytes,
            "budget_bits": allocation.budget_bits,
            "used_bits": allocation.used_bits,
        }
    table = ctx.results.get(keys.SENSITIVITY)
    if table is not None:
        report["sensitivity"] = table.to_dict()
    for key in ("kv", "fusion"):
        if key in compiled.stats:
            report[key] = compiled.stats[key]
    if evaluation:
        report["evaluation"] = evaluation
    return report


def totals(plan_rows: list[dict[str, Any]]) -> dict[str, Any]:
    n_weights = sum(r["out_features"] * r["in_features"] for r in plan_rows)
    used = sum(r["bytes"] for r in plan_rows)
    fp16 = sum(quant.layer_bytes(r["out_features"], r["in_features"], 16, r["group_size"], 0, r["has_bias"]) for r in plan_rows)
    return {
        "layers": len(plan_rows),
        "weights": n_weights,
        "bytes": used,
        "fp16_bytes": fp16,
        "average_bits": quant.average_bits(used, n_weights) if n_weights else 0.0,
        "compression_vs_fp16": fp16 / used if used else 0.0,
        "outliers": sum(r["n_outliers"] for r in plan_rows),
    }


def layer_table(plan_rows: list[dict[str, Any]]) -> str:
    """Fixed-width per-layer table with a totals line."""
    width = max([len(r["qualname"]) for r in plan_rows] + [5])
    lines = [f"{'layer':<{width}}  {'shape':>13}  {'bits':>4}  {'group':>5}  {'outliers':>8}  {'bytes':>11}  {'avg bits':>8}"]
    for r in plan_rows:
        shape = f"{r['out_features']}x{r['in_features']}"
        bits = quant.average_bits(r["bytes"], r["out_features"] * r["in_features"])
        lines.append(
            f"{r['qualname']:<{width}}  {shape:>13}  {r['bits']:>4}  {r['group_size']:>5}  {r['n_outliers']:>8}  {r['bytes']:>11,}  {bits:>8.3f}"
        )
    t = totals(plan_rows)
    lines.append(
        f"{'total':<{width}}  {t['weights']:>13,}  {'':>4}  {'':>5}  {t['outliers']:>8}  {t['bytes']:>11,}  {t['average_bits']:>8.3f}"
    )
    return "\n".join(lines)


def summary_lines(report: dict[str, Any]) -> list[str]:
    t = report["totals"]
    lines = [
        f"quantized {t['layers']} tensors, {t['weights']:,} weights: {t['bytes'] / 2**20:.2f} MiB "
        f"({t['average_bits']:.3f} bits/weight, {t['compression_vs_fp16']:.2f}x smaller than fp16)",
    ]
    if "allocation" in report:
        a = report["allocation"]
        lines.append(
            f"budget {a['budget_bits']:.3f} bits ({a['budget_bytes']:,} B), used {a['used_bits']:.3f} bits, "
            f"slack {a['slack_bytes']:,} B, objective {a['objective']:.4g} ({a['status']})"
        )
    if report.get("kv"):
        from mqc.runtime.kv import kv_summary_lines

        lines += kv_summary_lines(report["kv"])
    lines.append(f"compile time {report['timings']['compile_seconds']:.1f} s, peak memory {report['peak_rss_mib']:.0f} MiB")
    ev = report.get("evaluation")
    if ev:
        lines.append(
            f"perplexity: reference {ev['ppl_reference']:.3f}, compiled {ev['ppl_compiled']:.3f} "
            f"({ev['ppl_compiled'] / ev['ppl_reference']:.3f}x) on {ev['tokens']} tokens of {ev['text']}"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    parts = ["# mqc compile report", ""] + [f"- {line}" for line in summary_lines(report)]
    parts += ["", "## Per-layer plan", "", "```", layer_table(report["layers"]), "```", ""]
    parts += ["## Timings (s)", ""] + [f"- {k}: {v:.2f}" for k, v in report["timings"].items()]
    return "\n".join(parts) + "\n"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot(report: dict[str, Any], path: Path) -> None:
    """Per-layer widths and, when measured, each layer's sensitivity curve over widths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    sens = report.get("sensitivity")
    fig, axes = plt.subplots(1, 2 if sens else 1, figsize=(14 if sens else 9, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.bar(range(len(rows)), [r["bits"] for r in rows], color="tab:blue")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("bits")
    ax.set_title(f"per-layer width, {report['totals']['average_bits']:.3f} avg bits")
    if sens:
        ax = axes[0][1]
        variant = report["recipe"]["sensitivity"]
        group = f"g{report['recipe']['group_size']}"
        for name, entry in sens["scores"].items():
            curve = sorted(
                (int(label.split("/")[0]), v)
                for label, v in entry[variant].items()
                if "/" not in label or label.endswith("/" + group)
            )
            ax.plot([b for b, _ in curve], [max(v, 1e-12) for _, v in curve], alpha=0.35, lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("bits")
        ax.set_ylabel(f"{variant} sensitivity")
        ax.set_title("sensitivity curves (one line per layer)")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_reports(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    out = Path(out_dir)
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    _atomic_write(paths[0], json.dumps(report, indent=2, default=str).encode())
    _atomic_write(paths[1], markdown(report).encode())
    plot(report, paths[2])
    return paths
