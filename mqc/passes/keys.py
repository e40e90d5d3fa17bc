"""Names of the results passes exchange through :class:`~mqc.passes.base.CompileContext`.

One constant per fact, namespaced ``mqc.*``; a pass declares which it requires and produces.
"""

GRAPH = "mqc.graph"  # GraphView of the captured model (seeded by mqc.compile)
CALIB = "mqc.calib"  # LongTensor [n_samples, seq_len] of calibration token ids
UNITS = "mqc.units"  # dict qualname -> WeightUnit: the weight tensors a plan may quantize
ACT_STATS = "mqc.act_stats"  # dict qualname -> fp32 [in_features] mean squared input activation
SENSITIVITY = "mqc.sensitivity"  # SensitivityTable
BIT_PLAN = "mqc.bit_plan"  # dict qualname -> LayerPlan
ALLOCATION = "mqc.allocation"  # AllocationReport of the exact solver
OUTLIER_MASKS = "mqc.outlier_masks"  # dict qualname -> bool [out, in]
QUANTIZED = "mqc.quantized"  # list of qualnames swapped for runtime modules
KV_PLAN = "mqc.kv_plan"  # dict layer -> KV low-rank plan
KV_REWRITTEN = "mqc.kv_rewritten"
FUSION_GROUPS = "mqc.fusion_groups"  # list of tuples of qualnames fused into one launch
