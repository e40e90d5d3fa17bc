"""Fused dequantize + GEMV kernels: CUDA sources (``cuda/*.cu``), their CuPy launcher
(:mod:`mqc.kernels.launch`) and the pure-torch reference they must match
(:mod:`mqc.kernels.reference`). Nothing here imports CuPy until a CUDA tensor needs a kernel."""
