"""The fusion pass and fused runtime modules: same outputs, fewer launches, artifacts round-trip.

Tolerance: fusing only concatenates rows of the packed layout, so on the CPU path the logits
must agree to ``LOGIT_ATOL = 1e-5`` (they are in fact bit-identical on this machine; the bound
leaves room for a BLAS that blocks a wider matmul differently).
"""

from __future__ import annotations

import json

import pytest
import torch

import mqc
from mqc.bench import _static_decode, decode_benchmark
from mqc.capture import capture
from mqc.errors import MqcError
from mqc.kernels import launch
from mqc.lowering.fuse import FuseSiblings, fusable_groups, fuse_group, fuse_model
from mqc.passes import keys
from mqc.runtime.fused import FusedQLinear, FusedSlice
from mqc.runtime.modules import QLinear

LOGIT_ATOL = 1e-5
QLINEAR_OP = torch.ops.mqc.qlinear.default


def compiled(family: str, outlier_frac: float = 0.01):
    model = mqc.tiny_model(family)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = mqc.Recipe(bits=4, group_size=32, outlier_frac=outlier_frac)
    return mqc.compile(model, recipe, calib=calib if outlier_frac else None, progress=False)


def count_qlinear_ops(model) -> int:
    return sum(node.target == QLINEAR_OP for node in capture(model).graph_module.graph.nodes)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def fused_case(request):
    """(compiled model after fusion, logits before, op count before, greedy tokens before)."""
    result = compiled(request.param)
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = result.model(ids).logits
    ops_before = count_qlinear_ops(result.model)
    tokens = result.model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False)
    groups = fusable_groups(result.model, result.analysis.shared_inputs)
    assert groups == result.stats["fusion_groups"]  # what the compile recorded
    fuse_model(result.model, groups)
    return result, ids, before, ops_before, tokens


def test_fusion_keeps_logits(fused_case):
    result, ids, before, _, _ = fused_case
    with torch.no_grad():
        after = result.model(ids).logits
    assert float((after - before).abs().max()) <= LOGIT_ATOL


def test_fusion_keeps_greedy_generation(fused_case):
    result, ids, _, _, tokens = fused_case
    assert torch.equal(result.model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False), tokens)


def test_decode_benchmark_on_fused_model_matches_generate(fused_case):
    """Both decode loops of mqc.bench (model cache; StaticCache, the CUDA-graph loop run eagerly)
    produce generate()'s greedy tokens."""
    result, ids, _, _, tokens = fused_case
    prompt, expected = ids[:1, :6], tokens[0, 6:].tolist()
    timing = decode_benchmark(result.model, prompt, 8, "cpu")
    assert timing["tokens"] == expected and timing["mode"] == "eager" and timing["tokens_per_s"] > 0
    with torch.no_grad():
        static, _, _ = _static_decode(result.model, prompt, 8, torch.device("cpu"), capture=False)
    assert torch.cat(static, dim=1)[0].tolist() == expected
    with pytest.raises(MqcError):
        decode_benchmark(result.model, prompt, 1, "cpu")


def test_qkv_and_gate_up_share_one_launch_each(fused_case):
    result, _, _, ops_before, _ = fused_case
    groups = result.stats["fusion_groups"]
    leaves = sorted({tuple(name.rsplit(".", 1)[1] for name in group) for group in groups})
    assert leaves == [("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj")]
    assert len(groups) == 2 * result.model.config.num_hidden_layers
    # per layer q, k, v, o, gate, up, down: 7 launches before, 4 after
    assert ops_before == 7 * result.model.config.num_hidden_layers
    assert count_qlinear_ops(result.model) == ops_before - sum(len(g) - 1 for g in groups)


def test_fused_bytes_are_the_siblings_bytes(fused_case):
    result, _, _, _, _ = fused_case
    plan = result.plan.layers
    for group in result.stats["fusion_groups"]:
        fused = result.model.get_submodule(group[0]).fused
        expected = sum(plan[name].nbytes for name in group) - 4 * (len(group) - 1)  # one CSR row-pointer array
        assert fused.nbytes() == expected
        assert all(result.model.get_submodule(name).nbytes() == 0 for name in group)


def test_fused_artifact_round_trips(fused_case, tmp_path):
    result, ids, before, _, _ = fused_case
    mqc.save(result, tmp_path / "art")
    kinds = {r["kind"] for r in json.loads((tmp_path / "art" / "manifest.json").read_text())["modules"].values()}
    assert {"fused_qlinear", "fused_slice", "qlinear"} <= kinds
    model, _ = mqc.load(tmp_path / "art")
    assert isinstance(model.get_submodule(result.stats["fusion_groups"][0][1]), FusedSlice)
    with torch.no_grad():
        assert float((model(ids).logits - before).abs().max()) <= LOGIT_ATOL


def test_recording_pass_and_fuse_model_give_the_same_groups(tmp_path):
    """The lowering records the groups (rewrite=False) and leaves every layer a QLinear;
    fuse_model (capturing the model itself) later fuses exactly those groups, once, in memory or
    after loading."""
    result = compiled("qwen2", outlier_frac=0.0)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = result.model(ids).logits
    recorded = result.stats["fusion_groups"]
    assert recorded and all(type(result.model.get_submodule(n)) is QLinear for g in recorded for n in g)
    loaded, _ = mqc.load(mqc.save(result, tmp_path / "art"))
    assert fuse_model(loaded) == recorded
    assert fuse_model(result.model) == recorded
    assert fuse_model(result.model) == []
    with torch.no_grad():
        assert float((result.model(ids).logits - before).abs().max()) <= LOGIT_ATOL


def test_fuse_pass_waits_for_extra_keys():
    assert keys.KV_REWRITTEN in FuseSiblings(after=(keys.KV_REWRITTEN,)).requires
    assert keys.KV_REWRITTEN not in FuseSiblings().requires


# --------------------------------------------------------------------------------------------
# grouping rules and the sibling output cache, on hand-made modules
# --------------------------------------------------------------------------------------------
def qlinear(out_features: int, bits: int = 4, in_features: int = 64, seed: int = 0, outlier_frac: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    mask = torch.rand(weight.shape, generator=gen) < outlier_frac if outlier_frac else None
    return QLinear.from_weight(weight, torch.randn(out_features, generator=gen), bits, 32, mask)


def block(**layers) -> torch.nn.Module:
    parent = torch.nn.Module()
    for name, module in layers.items():
        parent.add_module(name, module)
    root = torch.nn.Module()
    root.add_module("attn", parent)
    return root


def test_only_agreeing_siblings_fuse():
    root = block(q=qlinear(32, 4), k=qlinear(16, 4, seed=1), v=qlinear(16, 8, seed=2), o=torch.nn.Linear(64, 64))
    groups = fusable_groups(root, [("attn.q", "attn.k", "attn.v", "attn.o")])
    assert groups == [("attn.q", "attn.k")]  # v has other bits, o is not quantized
    assert fusable_groups(block(q=qlinear(32), k=qlinear(16, in_features=96)), [("attn.q", "attn.k")]) == []


def test_from_siblings_refuses_differing_layouts():
    with pytest.raises(ValueError):
        FusedQLinear.from_siblings([qlinear(8, 4), qlinear(8, 3)])


def test_fused_module_concatenates_packed_rows_and_outliers():
    siblings = [qlinear(24, 3, seed=0, outlier_frac=0.05), qlinear(8, 3, seed=1, outlier_frac=0.05)]
    fused = FusedQLinear.from_siblings(siblings)
    dense = torch.cat([s.dense_weight() for s in siblings])
    assert torch.equal(fused.dense_weight(), dense)
    assert fused.outlier_crow[-1] == sum(s.n_outliers for s in siblings) and fused.n_outliers == fused.outlier_crow[-1]
    rebuilt = FusedQLinear.from_config(fused.config(), None)
    assert rebuilt.splits == [24, 8] and rebuilt.qweight.shape == fused.qweight.shape


def test_slices_compute_exact_outputs_in_any_call_order():
    siblings = [qlinear(32, seed=0), qlinear(16, seed=1), qlinear(16, seed=2)]
    root = block(q=siblings[0], k=siblings[1], v=siblings[2])
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    expected = {id(t): [s(t) for s in siblings] for t in (x, y)}
    target = fuse_group(root, ("attn.q", "attn.k", "attn.v"))
    q, k, v = (root.get_submodule(f"attn.{n}") for n in "qkv")
    fused = root.get_submodule(target)
    calls = [(k, x, 1), (q, x, 0), (q, x, 0), (v, y, 2), (k, x, 1), (v, x, 2), (q, y, 0), (k, y, 1)]
    for module, t, index in calls:
        assert torch.equal(module(t), expected[id(t)][index])
    assert fused._kept is None or len(fused._kept.taken) < 3  # released once every sibling has taken
    x.mul_(2.0)  # same tensor, new values: recomputed, not served from the kept outputs
    assert torch.equal(q(x), siblings[0](x))
    assert torch.equal(k(x), siblings[1](x))


def test_slices_unfuse_to_their_original_layers():
    siblings = [qlinear(24, 3, seed=0, outlier_frac=0.05), qlinear(8, 3, seed=1, outlier_frac=0.05)]
    root = block(a=siblings[0], b=siblings[1])
    fuse_group(root, ("attn.a", "attn.b"))
    for name, original in zip("ab", siblings):
        restored = root.get_submodule(f"attn.{name}").to_qlinear()
        assert restored.state_dict().keys() == original.state_dict().keys()
        for (key, tensor), (_, expected) in zip(restored.state_dict().items(), original.state_dict().items()):
            assert torch.equal(tensor, expected), key


def test_slice_records_point_at_their_fused_module():
    root = block(gate=qlinear(40), up=qlinear(40, seed=3))
    target = fuse_group(root, ("attn.gate", "attn.up"))
    assert target == "attn.fused_gate_up"
    up = root.get_submodule("attn.up")
    assert up.config() == {"tied_to": target, "index": 1}
    assert FusedSlice.from_config(up.config(), root).fused is root.get_submodule(target)
    assert (up.in_features, up.out_features) == (64, 40)


# --------------------------------------------------------------------------------------------
# on a GPU
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not launch.kernels_available(), reason="needs CuPy and a CUDA device")
def test_fused_model_decodes_on_gpu_like_on_cpu():
    """fp16 on the GPU (fused kernels for the single-token steps) against fp32 on the CPU: the
    greedy tokens of both decode loops agree with each other, the logits with the CPU's within
    fp16 precision (5e-3 of max |logit|)."""
    result = compiled("llama")
    fuse_model(result.model)
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cpu_logits = result.model(prompt).logits
        model = result.model.to("cuda", torch.float16)
        gpu_logits = model(prompt.cuda()).logits.float().cpu()
        step = model(prompt[:, -1:].cuda(), past_key_values=model(prompt[:, :-1].cuda()).past_key_values).logits
    assert float((gpu_logits - cpu_logits).abs().max()) <= 5e-3 * float(cpu_logits.abs().max())
    assert float((step.float().cpu()[0, -1] - cpu_logits[0, -1]).abs().max()) <= 5e-3 * float(cpu_logits.abs().max())
    eager = decode_benchmark(model, prompt, 12, "cuda")
    graphed = decode_benchmark(model, prompt, 12, "cuda", cuda_graph=True)
    assert graphed["tokens"] == eager["tokens"] and graphed["mode"] == "cuda_graph", graphed.get("cuda_graph_error")
