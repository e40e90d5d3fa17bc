"""Runtime: custom ops, quantized modules, low-rank KV cache, artifacts.

Importing it registers the ``mqc::`` custom ops, every runtime module kind (so artifacts load)
and the low-rank KV attention implementation.
"""

from mqc.runtime import kv, ops  # noqa: F401
