"""Compressed KV caches: low-rank (CSKV) and quantized (KIVI grids, PM-KVQ widths).

A compiled model keeps Hugging Face's attention code; mqc hooks into the places that code
offers, and nowhere else, one module each:

* :mod:`.settings`: what a cache stores, saved as ``model.config.mqc_kv``;
* :mod:`.projection`: low-rank K/V projections that also emit the features the cache keeps;
* :mod:`.layout`: the runs of keys a cache returns and the mask that shows every query the copy
  of each token that token-by-token decoding would (so one forward measures compressed decoding);
* :mod:`.attention`: the registered attention function (decoding straight from quantized codes);
* :mod:`.cache` and :mod:`.quant_cache`: the two caches; :mod:`.install`: the forward pre-hook
  that gives a model its cache;
* :mod:`.accounting`: bytes held at a context, next to the fp16 cache.
"""

from mqc.runtime.kv.accounting import fp16_cache_bytes, kv_accounting, kv_shape, kv_summary_lines, quant_cache_bytes
from mqc.runtime.kv.attention import compressed_kv_attention
from mqc.runtime.kv.cache import LowRankKVCache
from mqc.runtime.kv.install import check_supported, install
from mqc.runtime.kv.layout import Sections
from mqc.runtime.kv.projection import CompressedAttention, LowRankKVProj, lowrank_sites
from mqc.runtime.kv.quant_cache import QuantKVCache
from mqc.runtime.kv.settings import (
    ATTN_IMPLEMENTATION,
    FULL_BYTES,
    KV_BITS,
    REPORT_CONTEXT,
    KVSettings,
    QuantKVSettings,
    settings_of,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FULL_BYTES",
    "KV_BITS",
    "REPORT_CONTEXT",
    "CompressedAttention",
    "KVSettings",
    "LowRankKVCache",
    "LowRankKVProj",
    "QuantKVCache",
    "QuantKVSettings",
    "Sections",
    "check_supported",
    "compressed_kv_attention",
    "fp16_cache_bytes",
    "install",
    "kv_accounting",
    "kv_shape",
    "kv_summary_lines",
    "lowrank_sites",
    "quant_cache_bytes",
    "settings_of",
]
