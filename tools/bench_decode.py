"""Greedy-decode tokens/s, compressed vs fp16, for decoders with random weights on one GPU.

    PYTHONPATH=. python tools/bench_decode.py [--bits 4 2] [--new-tokens 128] [--models smollm2 llama7b]
        -> benchmarks/results/decode_<gpu>.json

Needs torch with CUDA and CuPy; without a GPU it exits with one line (status 2).

Models are built from configs with random weights, on the GPU (decode speed does not depend on
the values; quality is measured on the CPU with real weights):

* ``smollm2``: the default model's architecture (SmolLM2-135M: Llama, hidden 576, intermediate
  1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings);
* ``llama7b``: a Llama-2-7B-shaped decoder (hidden 4096, intermediate 11008, 32 heads, vocab
  32000), with as many of its 32 layers as fit in 60% of the free GPU memory.

Per model: the fp16 model is timed; then every decoder linear is quantized in place on the GPU
(round-to-nearest, group 128, as ``mqc compile --bits B`` does; embeddings and lm_head stay
fp16, as in the rtn recipe), q/k/v and gate/up are fused (:func:`mqc.lowering.fuse.fuse_group`,
the groups the fusion pass finds on Llama models), and the same prompt is timed again. Each is
timed eagerly (HF forward per token: often launch-bound) and with the decode step replayed from
a CUDA graph (weight-bound), see :mod:`mqc.bench`. A sanity figure compares one decode step's
logits with the fused kernels against dequantize + matmul (``launch.fused_kernels(False)``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqc.bench import copy_bandwidth, decode_benchmark, gpu_slug
from mqc.kernels import launch
from mqc.lowering.fuse import fuse_group
from mqc.runtime.modules import QLinear

RESULTS = ROOT / "benchmarks" / "results"
GROUP_SIZE = 128
MEMORY_SHARE = 0.6  # of the free GPU memory, for the fp16 model plus its compressed copy
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
SIBLINGS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def fail(message: str) -> None:
    print(f"bench_decode: {message}", file=sys.stderr)
    sys.exit(2)


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0,
    )  # fmt: skip


def llama7b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )  # fmt: skip


def llama7b_layers_that_fit() -> int:
    """Layers of the 7B shape whose fp16 weights, plus the compressed copy made while quantizing,
    fit in MEMORY_SHARE of the free memory (at most the real model's 32)."""
    free, _ = torch.cuda.mem_get_info()
    hidden, inter, vocab = 4096, 11008, 32000
    layer = (4 * hidden * hidden + 3 * hidden * inter) * 2 * 1.4  # fp16 + a 4-bit copy + scratch
    embeddings = 2 * vocab * hidden * 2
    return max(1, min(32, int((free * MEMORY_SHARE - embeddings) // layer)))


def build(config, device: str = "cuda") -> torch.nn.Module:
    """The model with random weights, fp16, created on ``device``; the same weights every call."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16, attn_implementation="sdpa")
    return model.eval()


def compress(model: torch.nn.Module, bits: int, device: str = "cuda") -> int:
    """Quantize every decoder linear in place and fuse siblings; returns the number of launches
    per token saved by fusion."""
    with torch.no_grad(), torch.device(device):
        for i in range(model.config.num_hidden_layers):
            for leaf in PROJECTIONS:
                name = f"model.layers.{i}.{leaf}"
                linear = model.get_submodule(name)
                model.set_submodule(name, QLinear.from_weight(linear.weight.float(), linear.bias, bits, GROUP_SIZE))
            for group in SIBLINGS:
                fuse_group(model, tuple(f"model.layers.{i}.{leaf}" for leaf in group))
    return model.config.num_hidden_layers * sum(len(g) - 1 for g in SIBLINGS)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer the model stores (tied tensors once)."""
    seen = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def kernel_vs_dense(model: torch.nn.Module, prompt: torch.Tensor) -> float:
    """Max |logits| difference of one decode step, fused kernels vs dequantize + matmul, relative
    to max |logits|."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        fused = model(input_ids=token, past_key_values=copy.deepcopy(out.past_key_values)).logits.float()
        with launch.fused_kernels(False):
            dense = model(input_ids=token, past_key_values=out.past_key_values).logits.float()
    return float((fused - dense).abs().max() / dense.abs().max())


def timed(model, prompt, new_tokens, device: str) -> dict:
    return {
        mode: {
            k: v
            for k, v in decode_benchmark(model, prompt, new_tokens, device, cuda_graph=graph).items()
            if k != "tokens"
        }
        for mode, graph in (("eager", False), ("cuda_graph", True))
    }


def bench_model(
    name: str, config, bits_list: list[int], prompt_tokens: int, new_tokens: int, device: str = "cuda"
) -> dict:
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), generator=gen).to(device)
    model = build(config, device)
    result = {"model": name, "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
              "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
              "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
              "fp16": {"bytes": weight_bytes(model), **timed(model, prompt, new_tokens, device)}, "compressed": {}}  # fmt: skip
    for index, bits in enumerate(bits_list):
        if index:  # start again from the same fp16 weights (same seed)
            del model
            torch.cuda.empty_cache()
            model = build(config, device)
        saved = compress(model, bits, device)
        torch.cuda.empty_cache()
        entry = {"bytes": weight_bytes(model), "launches_saved_per_token": saved,
                 "kernel_vs_dense_rel_err": kernel_vs_dense(model, prompt), **timed(model, prompt, new_tokens, device)}  # fmt: skip
        for mode in ("eager", "cuda_graph"):
            entry[f"speedup_{mode}"] = entry[mode]["tokens_per_s"] / result["fp16"][mode]["tokens_per_s"]
        result["compressed"][str(bits)] = entry
        print(f"{name}: {bits}-bit  eager {entry['eager']['tokens_per_s']:.1f} tok/s ({entry['speedup_eager']:.2f}x fp16)  "
              f"graph {entry['cuda_graph']['tokens_per_s']:.1f} tok/s ({entry['speedup_cuda_graph']:.2f}x fp16; "
              f"mode {entry['cuda_graph']['mode']})  err {entry['kernel_vs_dense_rel_err']:.2e}", flush=True)  # fmt: skip
    del model
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama7b"], choices=["smollm2", "llama7b"])
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 2], choices=[2, 3, 4, 8])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/decode_<gpu>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        fail("no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU machine")
    if not launch.kernels_available():
        fail("CuPy is not installed or sees no device; pip install cupy-cuda13x")
    copy_bps = copy_bandwidth()
    configs = {"smollm2": smollm2_config, "llama7b": lambda: llama7b_config(llama7b_layers_that_fit())}
    models = []
    for name in args.models:
        config = configs[name]()
        print(f"{name}: {config.num_hidden_layers} layers, fp16 first", flush=True)
        models.append(bench_model(name, config, args.bits, args.prompt_tokens, args.new_tokens))
    seven = next((m for m in models if m["model"] == "llama7b"), None)
    targets = {}
    if seven and "4" in seven["compressed"]:
        for mode in ("eager", "cuda_graph"):
            measured = seven["compressed"]["4"][f"speedup_{mode}"]
            targets[f"llama7b 4-bit decode ({mode}) >= 1.5x fp16 tokens/s"] = {
                "measured": measured,
                "met": measured >= 1.5,
            }
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0),
            "copy_bandwidth_gbps": copy_bps / 1e9,
        },
        "protocol": __doc__,
        "targets": targets,
        "models": models,
    }
    out = args.out or RESULTS / f"decode_{gpu_slug()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for name, t in targets.items():
        print(f"target {name}: {t['measured']:.2f} {'met' if t['met'] else 'NOT met'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
