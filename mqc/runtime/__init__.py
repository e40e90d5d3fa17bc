"""Runtime: custom ops, quantized modules, artifacts."""

from mqc.runtime import ops  # noqa: F401  (registers torch.ops.mqc.*)
