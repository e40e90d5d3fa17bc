"""Runtime: custom ops, quantized modules, low-rank KV cache, artifacts.

Importing it registers the ``mqc::`` custom ops, every runtime module kind (so artifacts load)
and the low-rank KV attention implementation.
"""

from mqc.runtime import kv, ops  # noqa: F401
from mqc.runtime import fused  # noqa: F401,E402  (registers fused_qlinear / fused_slice for artifacts)
from mqc.kernels import launch as _launch  # noqa: F401,E402  (registers the cuda implementation of mqc::qlinear)
