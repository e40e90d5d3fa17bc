"""Names of the results passes exchange through :class:`~mqc.passes.base.CompileContext`.

One constant per fact, namespaced ``mqc.*``; a pass declares which it requires and produces.
"""

GRAPH = "mqc.graph"  # GraphView of the captured model (seeded by mqc.compile)
CALIB = "mqc.calib"  # LongTensor [n_samples, seq_len] of calibration token ids
MODEL_SIZE = "mqc.model_size"  # size.ModelSize: parameter count and the bytes no unit replaces
UNITS = "mqc.units"  # dict qualname -> WeightUnit: the weight tensors a plan may quantize
ACT_STATS = "mqc.act_stats"  # dict qualname -> fp32 [in_features] mean squared input activation
SENSITIVITY = "mqc.sensitivity"  # SensitivityTable
BIT_PLAN = "mqc.bit_plan"  # dict qualname -> LayerPlan
ALLOCATION = "mqc.allocation"  # AllocationReport of the exact solver
OUTLIER_MASKS = "mqc.outlier_masks"  # dict qualname -> bool [out, in]
QUANTIZED = "mqc.quantized"  # list of qualnames swapped for runtime modules
KV_PLAN = "mqc.kv_plan"  # dict layer -> KV low-rank plan
KV_COSTS = "mqc.kv_costs"  # KVCosts: measured KL increase per layer, keys/values and width
KV_CHOICE = "mqc.kv_choice"  # QuantKVSettings a joint memory allocation chose with the weights
JOINT_SPLIT = "mqc.joint_split"  # dict: a joint memory budget's weights/KV split and the fixed-KV alternatives
KV_QUANT_PLAN = "mqc.kv_quant_plan"  # {"settings": QuantKVSettings, "at_context": bytes at the context}
KV_REWRITTEN = "mqc.kv_rewritten"
FUSION_GROUPS = "mqc.fusion_groups"  # list of tuples of qualnames fused into one launch
HESSIANS = "mqc.hessians"  # dict qualname -> fp32 [in, in] E[x x^T] of the unit's input (shared inputs share one)
CANDIDATES = "mqc.candidates"  # CandidateTable: every unit's packed weight for every allowed choice
OUTPUT_FISHER = "mqc.output_fisher"  # OutputFisher: squared output gradients per unit (sampled labels)
COSTS = "mqc.costs"  # CostTable: unit -> choice -> predicted loss of choosing it
START_PLAN = "mqc.start_plan"  # dict qualname -> LayerPlan: the exact knapsack plan a search starts from
SEARCH = "mqc.search"  # SearchReport of the measured-KL search
