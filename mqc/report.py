"""Compile reports: ``report.json`` (everything), ``report.md`` (for people), ``report.png`` (plots).

The same per-layer table is printed by ``mqc compile`` and ``mqc inspect``; it is built from the
artifact's plan rows so that the two always agree.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from mqc import quant, quant_ggml
from mqc.version import __version__
from mqc.atomic import replaced_file, write_bytes
from mqc.memory import process_peak_bytes
from mqc.planning.types import choice_label


def peak_rss_bytes() -> int:
    """Peak resident memory of this process."""
    return process_peak_bytes()


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``): speed depends on it, and it changes between sessions."""
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        if cpuinfo.is_file()
        else []
    )
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where a measurement ran, for every JSON the benchmarks and reports write."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mqc": __version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def build_report(compiled, evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything worth keeping about one compilation, as plain JSON-able data."""
    plan, analysis = compiled.plan, compiled.analysis
    plan_rows = [{**vars(e), "bytes": e.nbytes} for e in plan.layers.values()]
    report: dict[str, Any] = {
        "model_type": compiled.model.config.model_type,
        "recipe": plan.recipe.to_dict(),
        "layers": plan_rows,
        "totals": totals(plan_rows),
        "peak_rss_mib": process_peak_bytes() / 2**20,
        "machine": machine(),
    }
    if plan.allocation is not None:
        a = plan.allocation
        report["allocation"] = {**vars(a), "slack_bytes": a.slack_bytes, "budget_bits": a.budget_bits, "used_bits": a.used_bits}
    if plan.joint is not None:
        report["joint"] = plan.joint
    size, plan_bytes = plan.size, report["totals"]["bytes"]
    report["size"] = {
        "params": size.n_params,
        "fixed_bytes": size.fixed_bytes,
        "plan_bytes": plan_bytes,
        "total_bytes": size.total_bytes(plan_bytes),
        "bpw": size.bpw(plan_bytes),
    }
    if plan.allocation is not None:
        report["size"]["budget_bytes"] = size.total_bytes(plan.allocation.budget_bytes)
        report["size"]["budget_bpw"] = size.bpw(plan.allocation.budget_bytes)
    report["stages"] = stage_rows(analysis, plan, compiled.stats)
    report["analysis"] = {"path": str(analysis.root), "bytes": analysis.size_bytes()}
    if plan.costs is not None:
        report["costs"] = {
            "kind": plan.costs.kind,
            "predicted": plan.costs.plan_cost(plan.layers),
            "per_unit": {u: {choice_label(c): v for c, v in per.items()} for u, per in plan.costs.costs.items()},
        }
    if plan.search is not None:
        report["search"] = vars(plan.search)
    if compiled.stats.get("kv"):
        report["kv"] = compiled.stats["kv"]
    if evaluation:
        report["evaluation"] = evaluation
    return report


def stage_rows(analysis, plan, lowering: dict[str, Any]) -> dict[str, Any]:
    """Time and peak memory of every stage: the analysis's passes (each layer of the streamed ones
    under ``steps``), the plan, the lowering's passes."""
    rows = {}
    for name, stage in analysis.stages.items():
        rows[f"analysis.{name}"] = {
            "seconds": stage.get("seconds"),
            "peak_rss_mib": (stage.get("peak_rss_bytes") or 0) / 2**20 or None,
            "steps": stage.get("steps", []),
        }
    rows["plan"] = {"seconds": plan.seconds, "peak_rss_mib": None}
    for name, seconds in lowering.get("pass_seconds", {}).items():
        rows[f"lower.{name}"] = {"seconds": seconds, "peak_rss_mib": None}
    return rows


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
            f"{r['qualname']:<{width}}  {shape:>13}  {r.get('fmt') or r['bits']:>4}  {r['group_size']:>5}  {r['n_outliers']:>8}  {r['bytes']:>11,}  {bits:>8.3f}"
        )
    t = totals(plan_rows)
    lines.append(
        f"{'total':<{width}}  {t['weights']:>13,}  {'':>4}  {'':>5}  {t['outliers']:>8}  {t['bytes']:>11,}  {t['average_bits']:>8.3f}"
    )
    return "\n".join(lines)


def summary_lines(report: dict[str, Any]) -> list[str]:
    t = report["totals"]
    lines = []
    if "size" in report:
        z = report["size"]
        budget = f", budget {z['budget_bpw']:.3f} bpw ({z['budget_bytes'] / 1e6:.2f} MB)" if "budget_bpw" in z else ""
        target = report["recipe"].get("target", "torch")
        lines.append(
            f"whole model as target {target} stores it: {z['total_bytes'] / 1e6:.2f} MB, {z['bpw']:.3f} bits/weight over {z['params']:,} parameters "
            f"(every tensor: {z['plan_bytes'] / 1e6:.2f} MB planned + {z['fixed_bytes'] / 1e6:.2f} MB other tensors: fp16, F32 norms in a GGUF){budget}"
        )
    lines.append(
        f"planned {t['layers']} tensors, {t['weights']:,} weights: {t['bytes'] / 2**20:.2f} MiB "
        f"({t['average_bits']:.3f} bits/weight, {t['compression_vs_fp16']:.2f}x smaller than fp16)"
    )
    if "allocation" in report:
        a = report["allocation"]
        lines.append(
            f"budget {a['budget_bits']:.3f} bits ({a['budget_bytes']:,} B), used {a['used_bits']:.3f} bits, "
            f"slack {a['slack_bytes']:,} B, objective {a['objective']:.4g} ({a['status']})"
        )
    if "search" in report:
        r = report["search"]
        lines.append(
            f"search: measured KL {r['start_kl']:.4f} (knapsack plan) -> {r['final_kl']:.4f} in {r['generations']} "
            f"generations, {r['accepted']} accepted, {r['evaluations']} evaluations, {r['seconds']:.0f} s"
        )
    if report.get("kv"):
        from mqc.runtime.kv import kv_summary_lines

        lines += kv_summary_lines(report["kv"])
    if "joint" in report:
        lines += joint_lines(report["joint"], report.get("size", {}).get("total_bytes"))
    seconds = sum(v["seconds"] or 0 for v in report.get("stages", {}).values())
    lines.append(f"time {seconds:.1f} s (analysis, plan, lowering), peak memory {report['peak_rss_mib']:.0f} MiB")
    stages = [
        f"{n} {v['seconds']:.0f} s" + (f" ({v['peak_rss_mib']:.0f} MiB)" if v["peak_rss_mib"] else "")
        for n, v in report.get("stages", {}).items()
        if (v["seconds"] or 0) >= 0.5
    ]
    if stages:
        lines.append("stages (time, peak memory): " + ", ".join(stages))
    if "analysis" in report:
        lines.append(f"analysis {report['analysis']['path']} ({report['analysis']['bytes'] / 2**20:.0f} MiB on disk)")
    ev = report.get("evaluation")
    if ev:
        lines.append(
            f"perplexity: reference {ev['ppl_reference']:.3f}, compiled {ev['ppl_compiled']:.3f} "
            f"({ev['ppl_compiled'] / ev['ppl_reference']:.3f}x) on {ev['tokens']} tokens of {ev['text']}"
        )
    return lines


def joint_lines(joint: dict[str, Any], weights_bytes: int | None) -> list[str]:
    """A joint memory budget's split, and what the same memory buys with a fixed KV width."""
    mib = 2**20
    stored = weights_bytes if weights_bytes is not None else joint["weights_bytes"]
    split = (
        f"memory {joint['memory_bytes'] / mib:.2f} MiB holds weights {stored / mib:.2f} MiB + KV cache "
        f"{joint['kv_bytes'] / mib:.2f} MiB ({joint['batch']} x {joint['context']:,} tokens); "
        f"predicted KL {joint['predicted_cost']:.4f}"
    )
    lines = [split]
    fixed = [
        f"KV{r['kv_bits']}: {r['predicted_cost']:.4f}" if r["predicted_cost"] is not None else f"KV{r['kv_bits']}: does not fit"
        for r in joint["fixed_kv"]
    ]
    lines.append("same memory, weights-only allocation + one KV width for every layer, predicted KL: " + ", ".join(fixed))
    return lines


def markdown(report: dict[str, Any]) -> str:
    parts = ["# mqc compile report", ""] + [f"- {line}" for line in summary_lines(report)]
    parts += ["", "## Per-layer plan", "", "```", layer_table(report["layers"]), "```", ""]
    parts += ["## Stages", "", "| stage | seconds | peak RSS MiB |", "|---|---|---|"]
    for name, v in report["stages"].items():
        peak = f"{v['peak_rss_mib']:.0f}" if v["peak_rss_mib"] else ""
        parts.append(f"| {name} | {v['seconds'] or 0:.2f} | {peak} |")
        for step in v.get("steps", []):
            what = step.get("layer", step.get("unit"))
            parts.append(f"| &nbsp;&nbsp;{name} {what} | {step.get('seconds', 0):.2f} | {step.get('peak_rss_bytes', 0) / 2**20:.0f} |")
    return "\n".join(parts) + "\n"


def _label_bits(label: str) -> float:
    """x position of a choice label: its width ("4/g64" -> 4), or a llama.cpp type's bits per weight."""
    if label in quant_ggml.TYPES:
        return quant_ggml.TYPES[label].bits_per_weight
    return 16.0 if label == quant_ggml.F16 else float(label.split("/")[0])


def plot(report: dict[str, Any], path: Path) -> None:
    """Per-layer widths; each layer's cost curve over widths (best group size per width); the
    search's measured KL per generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    costs, search = report.get("costs"), report.get("search")
    panels = 1 + bool(costs) + bool(search)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels + 2, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.bar(range(len(rows)), [r["bits"] for r in rows], color="tab:blue")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("bits")
    whole = f"{report['size']['bpw']:.3f} bpw whole model" if "size" in report else ""
    ax.set_title(f"per-layer width ({report['totals']['average_bits']:.3f} avg bits planned; {whole})")
    if costs:
        ax = axes[0][1]
        for entry in costs["per_unit"].values():
            best: dict[float, float] = {}
            for label, value in entry.items():
                bits = _label_bits(label)
                best[bits] = min(best.get(bits, float("inf")), value)
            curve = sorted(best.items())
            ax.plot([b for b, _ in curve], [max(v, 1e-12) for _, v in curve], alpha=0.35, lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("bits (llama.cpp types: bits per weight with block scales)")
        ax.set_ylabel(f"cost ({costs['kind']})")
        ax.set_title("cost curves, one line per layer (best option per width)")
    if search:
        ax = axes[0][panels - 1]
        ax.plot(range(len(search["trace"]) + 1), [search["start_kl"]] + search["trace"], "o-", ms=3)
        ax.set_xlabel("generation")
        ax.set_ylabel("measured KL to full precision (nats/token)")
        ax.set_title("search")
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with replaced_file(path, True, Path.is_file, "a file") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def write_reports(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    out = Path(out_dir)
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    write_bytes(paths[0], json.dumps(report, indent=2, default=str).encode())
    write_bytes(paths[1], markdown(report).encode())
    plot(report, paths[2])
    return paths
