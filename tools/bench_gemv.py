"""GEMV speed of mqc's fused dequantize kernels against torch fp16 ``F.linear``, on one GPU.

    PYTHONPATH=. python tools/bench_gemv.py [--quick]   -> benchmarks/results/gemv_<gpu>.json (+ .png)

Needs torch with CUDA and CuPy; without a GPU it exits with one line (status 2).

For each shape ``N out x K in`` (Llama-2-7B's 4096x4096, 11008x4096 and 4096x11008, and the
default model's projections), rows M = 1, 4, 8, and 2/3/4/8 bits at group size 128, without
and with 0.5% fp16 outliers, in one run:

* ``kernel_us``: GPU time per call, from a CUDA graph of back-to-back launches replayed (the
  median of 20 replays). The launches rotate over copies of the weights that together exceed 4x
  the L2 cache, so every launch reads its weights from DRAM as in a real decode step;
* ``bytes_read``: packed codes + fp16 scales + packed zeros (+ CSR row pointers, column indices
  and values) + the fp16 activations; ``gbps`` = bytes_read / time, and ``copy_fraction`` =
  gbps over the device-to-device copy bandwidth measured in this run (2 x bytes of a 1 GiB
  copy / time, bandwidthTest's convention);
* ``fp16_us``: ``torch.nn.functional.linear`` with fp16 weights, timed the same way;
  ``speedup`` = fp16_us / kernel_us;
* ``eager_us``: wall time per call of eager calls from Python (launch overhead included);
* ``max_abs_err`` and ``ok``: the kernel against :func:`mqc.kernels.reference.qgemv_reference`
  with ``|out - ref| <= 1e-3 max|ref| + 2e-3 |ref|``.

Weights are random bytes: speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqc import quant
from mqc.bench import copy_bandwidth, gpu_slug, host_seconds_per_call, time_calls
from mqc.kernels import launch
from mqc.kernels.reference import qgemv_reference

RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {  # name -> (N out, K in)
    "llama7b 4096x4096 (q/k/v/o)": (4096, 4096),
    "llama7b 11008x4096 (gate/up)": (11008, 4096),
    "llama7b 4096x11008 (down)": (4096, 11008),
    "smollm2 960x576 (fused q/k/v)": (960, 576),
    "smollm2 576x576 (o)": (576, 576),
    "smollm2 3072x576 (fused gate/up)": (3072, 576),
    "smollm2 576x1536 (down)": (576, 1536),
    "smollm2 49152x576 (lm_head)": (49152, 576),
}
ROWS = (1, 4, 8)
BITS = (2, 3, 4, 8)
OUTLIER_FRAC = 0.005
RTOL, ATOL = 2e-3, 1e-3
L2_MULTIPLE = 4  # weight copies per timed graph add up to this many L2 caches
MIN_LAUNCHES = 16


def fail(message: str) -> None:
    print(f"bench_gemv: {message}", file=sys.stderr)
    sys.exit(2)


def random_layer(n: int, k: int, bits: int, group_size: int, outlier_frac: float, gen: torch.Generator) -> dict:
    """Packed tensors in mqc's layout (random codes, scales, zeros; evenly spread outliers)."""
    blocks = quant.n_blocks(k, group_size)
    dev = "cuda"
    layer = {
        "qweight": torch.randint(
            0, 256, (n, blocks, group_size * bits // 8), dtype=torch.uint8, device=dev, generator=gen
        ),
        "scales": (torch.rand(n, blocks, device=dev, generator=gen) * 0.02 + 1e-3).half(),
        "qzeros": torch.randint(
            0, 256, (n, quant.packed_len(blocks, bits)), dtype=torch.uint8, device=dev, generator=gen
        ),
        "outlier_crow": None,
        "outlier_col": None,
        "outlier_values": None,
    }
    if outlier_frac:
        per_row = max(1, round(k * outlier_frac))
        layer["outlier_crow"] = (torch.arange(n + 1, device=dev) * per_row).int()
        layer["outlier_col"] = torch.randint(0, k, (n * per_row,), device=dev, generator=gen).to(quant.index_dtype(k))
        layer["outlier_values"] = (torch.randn(n * per_row, device=dev, generator=gen) * 0.1).half()
    return layer


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def copies_for(weight_bytes: int, l2_bytes: int) -> int:
    return max(MIN_LAUNCHES, -(-L2_MULTIPLE * l2_bytes // weight_bytes))


def kernel_call(x: torch.Tensor, layer: dict, bits: int, group_size: int, k: int):
    return lambda: launch.qgemv(x, bits=bits, group_size=group_size, in_features=k, **layer)


def check(x: torch.Tensor, layer: dict, bits: int, group_size: int, k: int) -> tuple[float, bool]:
    """(max |kernel - reference|, within tolerance) for one layer."""
    out = kernel_call(x, layer, bits, group_size, k)().float()
    qw = quant.QuantizedWeight(layer["qweight"], layer["scales"], layer["qzeros"], bits, group_size, k)
    sparse = None
    if layer["outlier_values"] is not None:
        sparse = quant.SparseOutliers(
            layer["outlier_crow"], layer["outlier_col"], layer["outlier_values"], (out.shape[1], k)
        )
    ref = qgemv_reference(x, qw, sparse).float()
    bound = ATOL * ref.abs().max() + RTOL * ref.abs()
    return float((out - ref).abs().max()), bool(((out - ref).abs() <= bound).all())


def bench_fp16(n: int, k: int, m: int, l2_bytes: int, gen: torch.Generator) -> dict:
    weight_bytes = n * k * 2
    weights = [
        torch.randn(n, k, device="cuda", generator=gen).half()
        for _ in range(min(copies_for(weight_bytes, l2_bytes), 4096))
    ]
    x = torch.randn(m, k, device="cuda", generator=gen).half()
    calls = [lambda w=w: torch.nn.functional.linear(x, w) for w in weights]
    seconds, method = time_calls(calls)
    return {
        "fp16_us": seconds * 1e6,
        "fp16_eager_us": host_seconds_per_call(calls) * 1e6,
        "fp16_bytes_read": weight_bytes + nbytes(x),
        "fp16_timing": method,
    }


def bench_kernel(n, k, m, bits, group_size, outlier_frac, l2_bytes, gen) -> dict:
    first = random_layer(n, k, bits, group_size, outlier_frac, gen)
    weight_bytes = nbytes(*first.values())
    layers = [first] + [
        random_layer(n, k, bits, group_size, outlier_frac, gen) for _ in range(copies_for(weight_bytes, l2_bytes) - 1)
    ]
    x = torch.randn(m, k, device="cuda", generator=gen).half()
    max_err, ok = check(x, first, bits, group_size, k)
    calls = [kernel_call(x, layer, bits, group_size, k) for layer in layers]
    seconds, method = time_calls(calls)
    plan = launch.plan_launch(n, k, bits, group_size, m, bool(outlier_frac))
    return {
        "kernel_us": seconds * 1e6,
        "eager_us": host_seconds_per_call(calls) * 1e6,
        "bytes_read": weight_bytes + nbytes(x),
        "timing": method,
        "copies": len(layers),
        "max_abs_err": max_err,
        "ok": ok,
        "kernel": plan.kernel_name,
        "grid": plan.grid,
        "threads_per_row": 1 << plan.slot_shift,
    }


def targets(rows: list[dict]) -> dict:
    """The issue's bars, with what was measured against them."""

    def pick(shape: str, bits: int) -> dict | None:
        return next(
            (r for r in rows if r["shape"] == shape and r["m"] == 1 and r["bits"] == bits and not r["outliers"]), None
        )

    found = {}
    for shape in ("llama7b 4096x11008 (down)", "llama7b 11008x4096 (gate/up)"):
        four, two = pick(shape, 4), pick(shape, 2)
        if four:
            found[f"{shape} 4-bit M=1 speedup >= 3.0"] = {"measured": four["speedup"], "met": four["speedup"] >= 3.0}
            found[f"{shape} 4-bit M=1 copy fraction >= 0.75"] = {
                "measured": four["copy_fraction"],
                "met": four["copy_fraction"] >= 0.75,
            }
        if two:
            found[f"{shape} 2-bit M=1 speedup >= 4.5"] = {"measured": two["speedup"], "met": two["speedup"] >= 4.5}
    return found


def machine(copy_bps: float, l2_bytes: int) -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import cupy

        cupy_version = cupy.__version__
    except ImportError:
        cupy_version = None
    return {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cupy": cupy_version,
        "gpu": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "l2_bytes": l2_bytes,
        "gpu_memory_bytes": props.total_memory,
        "copy_bandwidth_gbps": copy_bps / 1e9,
    }


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(ROWS), figsize=(5 * len(ROWS), 4), sharey=True)
    for ax, m in zip(axes, ROWS):
        for shape in SHAPES:
            pts = [(r["bits"], r["speedup"]) for r in rows if r["shape"] == shape and r["m"] == m and not r["outliers"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=shape)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=f"M = {m}", xlabel="bits", xticks=BITS)
    axes[0].set_ylabel("speedup vs torch fp16 F.linear")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, M=1, 4 bits: a smoke run")
    parser.add_argument("--group-size", type=int, default=128, choices=quant.GROUP_SIZES)
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gemv_<gpu>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        fail("no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU machine")
    if not launch.kernels_available():
        fail("CuPy is not installed or sees no device; pip install cupy-cuda13x")
    shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES
    rows_m, bits_list = ((1,), (4,)) if args.quick else (ROWS, BITS)
    gen = torch.Generator(device="cuda").manual_seed(0)
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    copy_bps = copy_bandwidth()
    print(
        f"{torch.cuda.get_device_name(0)}: copy bandwidth {copy_bps / 1e9:.0f} GB/s, L2 {l2_bytes / 2**20:.0f} MiB",
        flush=True,
    )
    header = f"{'shape':<34} {'M':>2} {'bits':>4} {'outl':>4} {'kernel us':>9} {'fp16 us':>8} {'speedup':>7} {'GB/s':>6} {'copy%':>6} {'eager us':>8}  ok"
    print(header)
    rows = []
    for shape, (n, k) in shapes.items():
        for m in rows_m:
            fp16 = bench_fp16(n, k, m, l2_bytes, gen)
            for bits in bits_list:
                for frac in (0.0, OUTLIER_FRAC):
                    r = {
                        "shape": shape,
                        "n": n,
                        "k": k,
                        "m": m,
                        "bits": bits,
                        "group_size": args.group_size,
                        "outliers": frac,
                        **fp16,
                    }
                    r.update(bench_kernel(n, k, m, bits, args.group_size, frac, l2_bytes, gen))
                    r["gbps"] = r["bytes_read"] / r["kernel_us"] / 1e3
                    r["copy_fraction"] = r["gbps"] * 1e9 / copy_bps
                    r["fp16_copy_fraction"] = r["fp16_bytes_read"] / r["fp16_us"] * 1e6 / copy_bps
                    r["speedup"] = r["fp16_us"] / r["kernel_us"]
                    rows.append(r)
                    print(f"{shape:<34} {m:>2} {bits:>4} {frac:>4.3f} {r['kernel_us']:>9.1f} {r['fp16_us']:>8.1f} {r['speedup']:>7.2f} "
                          f"{r['gbps']:>6.0f} {100 * r['copy_fraction']:>5.0f}% {r['eager_us']:>8.1f}  {'ok' if r['ok'] else 'FAIL'}", flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    out = args.out or RESULTS / f"gemv_{gpu_slug()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(copy_bps, l2_bytes), "protocol": __doc__, "targets": targets(rows), "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    plotted = plot(rows, out.with_suffix(".png"))
    for name, t in result["targets"].items():
        print(f"target {name}: {t['measured']:.2f} {'met' if t['met'] else 'NOT met'}")
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plotted else " (matplotlib missing: no plot)"))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
