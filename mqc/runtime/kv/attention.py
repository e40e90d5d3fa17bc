"""The attention function registered for compressed caches (and their mask).

The low-rank cache returns every key run dense from ``update``. The quantized cache returns only
its exact runs (sinks and window) and leaves itself on the attention module as ``mqc_kv_layer``:
a decoded token (one query, no mask) then attends to the quantized tokens straight from their
codes (:meth:`mqc.runtime.kv.quant_cache.QuantKVLayer.decode_attention`), and any other forward
gets the quantized runs decoded and placed between the two, in the layout the mask expects.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from mqc.runtime.kv.layout import compressed_kv_mask
from mqc.runtime.kv.settings import ATTN_IMPLEMENTATION

QUERY_CHUNK = 1024  # queries per sdpa call under a materialised mask (bounds prefill memory)
PENDING_ATTR = "mqc_kv_layer"  # set on the attention module by QuantKVLayer.update, taken here


def compressed_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA over the sections the cache returned, in query chunks when the mask is materialised.

    A prefill's banded mask has ``2T - window`` keys per query; chunking the queries keeps the
    attention weights of a 4k-token prefill in a few hundred MB instead of gigabytes.
    """
    layer = module.__dict__.pop(PENDING_ATTR, None)
    if layer is not None:
        if attention_mask is None and query.shape[2] == 1:
            scaling = kwargs.get("scaling") or module.scaling
            return layer.decode_attention(query, key, value, scaling), None
        key, value = layer.with_compressed_runs(key, value)
    q_length = query.shape[2]
    if attention_mask is None or q_length <= QUERY_CHUNK:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, i : i + QUERY_CHUNK], key, value, attention_mask[:, :, i : i + QUERY_CHUNK], **kwargs
        )[0]
        for i in range(0, q_length, QUERY_CHUNK)
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(ATTN_IMPLEMENTATION, compressed_kv_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, compressed_kv_mask)
