"""Names of the results passes exchange through a :class:`~mqc.passes.base.Context`.

One constant per fact, namespaced ``mqc.*``; a pass declares which it requires and produces.
"""

# --- analysis (a frozen float model, streamed; every product saved in the analysis directory)
GRAPH = "mqc.graph"  # GraphView of the captured model (seeded by the analysis)
CALIB = "mqc.calib"  # LongTensor [n_samples, seq_len] of calibration token ids
UNITS = "mqc.units"  # dict qualname -> WeightUnit: the weight tensors a plan may quantize
TENSORS = "mqc.tensors"  # list of size.TensorInfo: every stored tensor, for whole-model sizes
ACT_STATS = "mqc.act_stats"  # dict qualname -> fp32 [in_features] mean squared input activation
CANDIDATES = "mqc.candidates"  # CandidateStore: every unit packed at every allowed choice, on disk
LAYER_INPUTS = "mqc.layer_inputs"  # LayerInputs: decoder-layer inputs kept for the streamed backward passes
OUTPUT_FISHER = "mqc.output_fisher"  # OutputFisherStats: squared output gradients per unit (sampled labels)
COSTS = "mqc.costs"  # CostTable: unit -> choice -> predicted loss of choosing it
SENSITIVITY = "mqc.sensitivity"  # SensitivityTable (LLM-MQ's RTN-delta scores)
KV_COSTS = "mqc.kv_costs"  # KVCosts: measured KL increase per layer, keys/values and width (float model)

# --- lowering (the only phase that changes a model)
PLAN = "mqc.plan"  # plan.Plan being lowered (seeded by lower())
OUTLIER_MASKS = "mqc.outlier_masks"  # dict qualname -> bool [out, in] (uniform and LLM-MQ lowering)
WEIGHTS_LOWERED = "mqc.weights_lowered"  # list of qualnames swapped for runtime modules; the rest rounded to fp16
KV_QUANT_PLAN = "mqc.kv_quant_plan"  # {"settings": QuantKVSettings, "at_context": bytes at the context}
KV_PLAN = "mqc.kv_plan"  # dict layer -> KV low-rank plan
KV_REWRITTEN = "mqc.kv_rewritten"  # the model has a compressed KV cache installed
FUSION_GROUPS = "mqc.fusion_groups"  # list of tuples of qualnames fused into one launch
