"""Speed measurements: greedy-decode tokens/s (``mqc bench decode``, tools/bench_decode.py) and the
CUDA timing helpers the GEMV benchmark shares (tools/bench_gemv.py).

Prefill (one forward over the prompt) yields the first new token; each further token is one
single-token forward through the KV cache. ``tokens_per_s`` counts only those decode steps:
``batch * (new_tokens - 1) / decode seconds``, measured after a short warm-up (kernel
compilation, allocator growth) with the device synchronised around the timed region.

Two ways to run the decode steps:
* eager (default): ``model(next_token, past_key_values=cache)`` per step, the model's own cache
  (so a low-rank KV cache installed by mqc is used). On a GPU this is often bound by Python and
  launch overhead rather than by the weights, for fp16 and compressed models alike.
* ``cuda_graph=True``: a transformers ``StaticCache`` and one CUDA graph of the decode step,
  replayed per token, as gpt-fast-style runtimes do; this measures the weights and kernels
  rather than the launch overhead. If the model cannot be captured (an op that synchronises
  the host), the result says why in ``cuda_graph_error`` and holds the eager figures.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mqc.errors import MqcError

WARMUP_TOKENS = 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _next_token(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].argmax(-1, keepdim=True)


def _eager_decode(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[list, float, float]:
    """(tokens, prefill seconds, decode seconds) with the model's own dynamic cache."""
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    token = _next_token(out.logits)
    _sync(device)
    prefilled = time.perf_counter()
    tokens = [token]
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = _next_token(out.logits)
        tokens.append(token)
    _sync(device)
    return tokens, prefilled - start, time.perf_counter() - prefilled


def _capture(step, device: torch.device) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A CUDA graph of ``step`` and its output buffer. The warm-up run on a side stream (as the
    CUDA graph docs ask) writes the cache slot the first replay rewrites with the same values."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step()
    return graph, logits


def _static_decode(model, ids: torch.Tensor, new_tokens: int, device: torch.device, capture: bool):
    """The same greedy decode with a transformers StaticCache, the step replayed from one CUDA
    graph when ``capture`` (without, it runs eagerly: the CPU-testable form of the same loop)."""
    from transformers import StaticCache

    length = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + new_tokens)
    _sync(device)
    start = time.perf_counter()
    positions = torch.arange(length, device=device)
    token = _next_token(model(input_ids=ids, past_key_values=cache, cache_position=positions, use_cache=True).logits)
    _sync(device)
    prefilled = time.perf_counter()
    static_token, static_position = token.clone(), positions[-1:] + 1

    def step() -> torch.Tensor:
        return model(
            input_ids=static_token, past_key_values=cache, cache_position=static_position, use_cache=True
        ).logits

    if capture:
        graph, logits = _capture(step, device)
        _sync(device)
    decode_start = time.perf_counter()
    tokens = [token]
    for _ in range(new_tokens - 1):
        if capture:
            graph.replay()
        else:
            logits = step()
        token = _next_token(logits)
        tokens.append(token)
        static_token.copy_(token)
        static_position.add_(1)
    _sync(device)
    return tokens, prefilled - start, time.perf_counter() - decode_start


def decode_benchmark(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    new_tokens: int,
    device: str | torch.device,
    cuda_graph: bool = False,
) -> dict[str, Any]:
    """Greedy-decode ``new_tokens`` after ``prompt_ids`` ([T] or [batch, T]) on ``device``, where
    the model already lives; returns the timings, tokens/s and the generated ids."""
    if new_tokens < 2:
        raise MqcError(f"new_tokens must be at least 2 (one prefill token, then decode steps), got {new_tokens}")
    device = torch.device(device)
    ids = prompt_ids.reshape(-1, prompt_ids.shape[-1]).to(device)
    graphed = cuda_graph and device.type == "cuda"
    error = None
    with torch.no_grad():
        _eager_decode(model, ids, min(WARMUP_TOKENS, new_tokens), device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            if not graphed:
                tokens, prefill_s, decode_s = _eager_decode(model, ids, new_tokens, device)
            else:
                tokens, prefill_s, decode_s = _static_decode(model, ids, new_tokens, device, capture=True)
        except RuntimeError as exc:  # capture refused (a host sync in the step): report, go eager
            error, graphed = str(exc).splitlines()[0], False
            tokens, prefill_s, decode_s = _eager_decode(model, ids, new_tokens, device)
    steps = new_tokens - 1
    result = {
        "device": str(device),
        "mode": "cuda_graph" if graphed else "eager",
        "batch": ids.shape[0],
        "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "tokens_per_s": ids.shape[0] * steps / decode_s,
        "ms_per_token": 1000.0 * decode_s / steps,
        "tokens": torch.cat(tokens, dim=1)[0].tolist(),
    }
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    if error is not None:
        result["cuda_graph_error"] = error
    return result


# --------------------------------------------------------------------------------------------
# CUDA timing helpers
# --------------------------------------------------------------------------------------------
def gpu_slug(device: int = 0) -> str:
    """A file-name-safe name of the GPU, e.g. ``h100_80gb_hbm3`` (for ``gemv_<gpu>.json``)."""
    name = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")
    return name.removeprefix("nvidia_")


def _event_seconds(run: Callable[[], None], repeats: int) -> float:
    """Median GPU seconds of ``run`` over ``repeats`` (CUDA events around each)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write (2 x nbytes),
    as CUDA's bandwidthTest does."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / _event_seconds(lambda: dst.copy_(src), repeats)


def time_calls(calls: Sequence[Callable[[], Any]], repeats: int = 20) -> tuple[float, str]:
    """(GPU seconds per call, method) of a sequence of launches run back to back.

    Captured once into a CUDA graph and replayed, so the figure is the kernels' time and not
    Python's launch overhead; when a call cannot be captured, event-timed eager runs instead.
    """
    for call in calls:  # warm-up: compile, allocate
        call()
    torch.cuda.synchronize()

    def eager() -> None:
        for call in calls:
            call()

    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
        graph.replay()
        return _event_seconds(graph.replay, repeats) / len(calls), "cuda_graph"
    except RuntimeError:
        torch.cuda.synchronize()
        return _event_seconds(eager, repeats) / len(calls), "eager_events"


def host_seconds_per_call(calls: Sequence[Callable[[], Any]], repeats: int = 5) -> float:
    """Wall seconds per call of eager back-to-back calls, Python and launch overhead included."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        for call in calls:
            call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (repeats * len(calls))
