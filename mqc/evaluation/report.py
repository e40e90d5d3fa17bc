"""An evaluation as a person reads it: a table, a per-genre table, ``eval.json`` and ``eval.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mqc.atomic import write_bytes
from mqc.report import machine, save_figure


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    ref = result["reference_row"]
    contexts = list(ref["ppl_by_context"])
    head = ["setting", "ppl", "x ref", "KL", "top-1", "greedy"] + [f"ppl@{c}" for c in contexts] + ["worst genre"]
    lines = [f"{result['model']} against {result['reference']} ({result['suite']} suite, {ref['tokens']} tokens)"]
    rows = [
        ["reference", _fmt(ref["ppl"]), "1.000", "0", "1", "1"]
        + [_fmt(ref["ppl_by_context"][c]) for c in contexts]
        + ["-"]
    ]
    for row in result["rows"]:
        worst = "-"
        if row["ppl_by_genre"]:
            genre = max(row["ppl_by_genre"], key=lambda g: row["ppl_by_genre"][g] / ref["ppl_by_genre"][g])
            worst = f"{genre} x{row['ppl_by_genre'][genre] / ref['ppl_by_genre'][genre]:.2f}"
        setting = row["setting"] + (f" (smooth {row['smooth']})" if row.get("smooth") is not None else "")
        rows.append(
            [
                setting,
                _fmt(row["ppl"]),
                _fmt(row["ppl"] / ref["ppl"]),
                _fmt(row["kl"], ".4f"),
                _fmt(row["top1_agreement"]),
                _fmt(row["greedy_agreement"]),
            ]
            + [_fmt(row["ppl_by_context"][c]) for c in contexts]
            + [worst]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    return "\n".join(lines)


def genre_table(result: dict[str, Any]) -> str:
    ref = result["reference_row"]
    if not ref["ppl_by_genre"]:
        return ""
    head = ["genre", "reference"] + [r["setting"] for r in result["rows"]]
    rows = [
        [g, _fmt(ppl)] + [_fmt(r["ppl_by_genre"][g]) for r in result["rows"]] for g, ppl in ref["ppl_by_genre"].items()
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows])


def plot(result: dict[str, Any], path: Path) -> None:
    """Per-genre perplexity relative to the reference; perplexity by context length; KL and
    top-1 agreement per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, rows = result["reference_row"], result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(19, 5))
    ax = axes[0]
    genres = list(ref["ppl_by_genre"])
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        ratios = [row["ppl_by_genre"][g] / ref["ppl_by_genre"][g] for g in genres]
        ax.bar([k + i * width for k in range(len(genres))], ratios, width, label=row["setting"])
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(genres))], genres, rotation=60, ha="right", fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("perplexity / reference's")
    ax.set_title("per Brown genre" if genres else "per Brown genre (not measured)")
    if rows and genres:
        ax.legend(fontsize=8)
    ax = axes[1]
    for row in [ref, *rows]:
        points = [(int(c), v) for c, v in row["ppl_by_context"].items() if v is not None]
        label = "reference" if row is ref else row["setting"]
        ax.plot([c for c, _ in points], [v for _, v in points], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("long context (same tokens at every length)")
    ax.legend(fontsize=8)
    ax = axes[2]
    names = [r["setting"] for r in rows]
    ax.bar(names, [max(r["kl"], 1e-8) for r in rows], color="tab:red")
    ax.set_ylabel("KL(reference || model), nats/token", color="tab:red")
    ax.set_yscale("log")
    twin = ax.twinx()
    twin.plot(names, [r["top1_agreement"] for r in rows], "ko-", label="top-1")
    twin.plot(names, [r["greedy_agreement"] for r in rows], "s--", color="tab:green", label="greedy prefix")
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("agreement with the reference")
    twin.legend(fontsize=8, loc="lower left")
    ax.set_title(f"{Path(result['model']).name}: agreement per setting")
    save_figure(fig, path)


def write(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``eval.json`` (with the machine) and ``eval.png`` in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    paths = [out / "eval.json", out / "eval.png"]
    write_bytes(paths[0], json.dumps({**result, "machine": machine()}, indent=2).encode())
    plot(result, paths[1])
    return paths
