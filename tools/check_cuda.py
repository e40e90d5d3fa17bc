"""Compile-check every CUDA source of mqc without a GPU.

For each ``mqc/kernels/cuda/*.cu`` and each architecture (sm_80, sm_90 by default):

* nvcc ``-cubin`` with every kernel variant the launcher can pick instantiated, ``-Werror
  all-warnings``, and ptxas' register/spill report (a spill in a GEMV is a performance bug, so it
  fails the check too);
* NVRTC, the compiler CuPy really uses at run time, with the launcher's exact source and
  options, when a ``libnvrtc`` is found (``$MQC_NVRTC``, the system, or the ``nvidia-cuda-nvrtc``
  wheel that CuPy installs). NVRTC has no CUDA headers on its include path, which is exactly
  what this catches.

Usage: ``python tools/check_cuda.py [--arch sm_80 sm_90] [--quick] [--skip-nvrtc]``. ``--quick``
compiles every (bits, vector width) pair at M = 1 with outliers plus the largest-M variants of
4 bits (seconds; what ``make test`` runs); the default compiles all 112 variants (minutes: each is
fully unrolled). Exits 0 when all compile cleanly, 1 on any error, warning or spill, 2 when nvcc
is missing (the tests skip then).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqc.kernels import launch

ARCHS = ("sm_80", "sm_90")


def qgemv_names(full: bool) -> list[str]:
    if full:
        return launch.all_kernel_names()
    quick = [launch.kernel_name(bits, vec, 1, True) for bits, vecs in launch.VECS.items() for vec in vecs]
    return quick + [launch.kernel_name(4, 4, 2, False), launch.kernel_name(4, 4, launch.MAX_ROWS, False)]


# Which template instantiations each source must compile; a source not listed has plain kernels.
INSTANTIATIONS = {"qgemv.cu": qgemv_names}
_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class CheckResult:
    source: str
    arch: str
    compiler: str
    kernels: int
    ok: bool
    seconds: float
    max_registers: int = 0
    spill_bytes: int = 0
    log: str = ""


def _instantiation_table(names: list[str]) -> str:
    """Host-side references that make the front end instantiate every named kernel."""
    body = ",\n".join(f"    (const void*)&{name}" for name in names)
    return f"\nextern const void* const mqc_all_kernels[] = {{\n{body}\n}};\n" if names else ""


def _names(source: Path, full: bool) -> list[str]:
    make = INSTANTIATIONS.get(source.name)
    return make(full) if make else []


def check_nvcc(source: Path, arch: str, nvcc: str, full: bool) -> CheckResult:
    names = _names(source, full)
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = Path(tmp) / f"check_{source.stem}.cu"
        wrapper.write_text(f'#include "{source}"\n{_instantiation_table(names)}')
        cmd = [
            nvcc, "-cubin", f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings",
            "-Xptxas", "-v,-warn-spills,-warn-lmem-usage", "-o", str(Path(tmp) / "out.cubin"), str(wrapper),
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    registers = [int(r) for r in _PTXAS_USAGE.findall(log)]
    spills = sum(int(s) + int(l) for s, l in _SPILL.findall(log))
    warned = "warning" in log.lower()
    ok = proc.returncode == 0 and spills == 0 and not warned
    return CheckResult(source.name, arch, "nvcc", len(names), ok, seconds, max(registers, default=0), spills, log)


def find_nvrtc() -> str | None:
    """Path of a libnvrtc shared library, or None."""
    candidates = [os.environ.get("MQC_NVRTC", "")]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(glob.glob(f"{root}/*/lib/libnvrtc.so*"))
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates += sorted(glob.glob(f"{cuda_home}/lib64/libnvrtc.so*"))
    candidates.append(ctypes.util.find_library("nvrtc") or "")
    return next((c for c in candidates if c and "builtins" not in c and os.path.exists(c)), None)


def check_nvrtc(source: Path, arch: str, library: str, full: bool) -> CheckResult:
    """Compile the launcher's exact source and options, every variant as a name expression."""
    nvrtc = ctypes.CDLL(library)
    names = _names(source, full)
    text = launch.kernel_source() if source == launch.KERNEL_FILE else source.read_text()
    program = ctypes.c_void_p()
    start = time.perf_counter()
    status = nvrtc.nvrtcCreateProgram(ctypes.byref(program), text.encode(), source.name.encode(), 0, None, None)
    if status == 0:
        for name in names:
            nvrtc.nvrtcAddNameExpression(program, name.encode())
        options = [o.encode() for o in (*launch.NVRTC_OPTIONS, f"--gpu-architecture={arch}")]
        status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    buffer = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, buffer)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    log = buffer.value.decode(errors="replace")
    ok = status == 0 and "warning" not in log.lower()
    return CheckResult(source.name, arch, "nvrtc", len(names), ok, time.perf_counter() - start, log=log)


def run_checks(
    archs: tuple[str, ...] = ARCHS, full: bool = True, nvcc: bool = True, nvrtc: bool = True
) -> list[CheckResult]:
    """Every check asked for and possible; FileNotFoundError when nvcc is asked for but missing."""
    sources = sorted(launch.CUDA_DIR.glob("*.cu"))
    jobs = []
    if nvcc:
        compiler = shutil.which("nvcc")
        if compiler is None:
            raise FileNotFoundError("nvcc not found")
        jobs += [(check_nvcc, s, a, compiler, full) for s in sources for a in archs]
    library = find_nvrtc() if nvrtc else None
    jobs += [(check_nvrtc, s, a, library, full) for s in sources for a in archs] if library else []
    with ThreadPoolExecutor(max_workers=2) as pool:  # the subprocesses run in parallel
        return list(pool.map(lambda job: job[0](*job[1:]), jobs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS))
    parser.add_argument("--quick", action="store_true", help="a representative subset of the variants")
    parser.add_argument("--skip-nvrtc", action="store_true")
    args = parser.parse_args(argv)
    try:
        results = run_checks(tuple(args.arch), full=not args.quick, nvrtc=not args.skip_nvrtc)
    except FileNotFoundError:
        print("check_cuda: nvcc not found; install the CUDA toolkit to compile-check the kernels", file=sys.stderr)
        return 2
    print(f"{'source':<12} {'arch':<6} {'compiler':<8} {'kernels':>7} {'max regs':>8} {'spills':>6} {'s':>6}  result")
    for r in results:
        print(
            f"{r.source:<12} {r.arch:<6} {r.compiler:<8} {r.kernels:>7} {r.max_registers:>8} {r.spill_bytes:>6} {r.seconds:>6.1f}  {'ok' if r.ok else 'FAIL'}"
        )
    if not any(r.compiler == "nvrtc" for r in results) and not args.skip_nvrtc:
        print("(NVRTC not found: set MQC_NVRTC or install cupy-cuda13x to also check the run-time compiler)")
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"\n--- {r.source} {r.arch} {r.compiler} ---\n{r.log.strip()}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
