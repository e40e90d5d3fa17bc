"""GPTQ candidates: several grids in one column loop, deployed unchanged, priced by what they store."""

import pytest
import torch

import mqc
from mqc import quant
from mqc.planning.types import choice_of


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(96, 96, generator=gen) / 10 + torch.eye(96)
    x = torch.randn(2048, 96, generator=gen) @ mix * (torch.rand(96, generator=gen) * 3 + 0.1)
    return torch.randn(40, 96, generator=gen), x, x.T @ x / x.shape[0]


def output_error(x, weight, approx):
    return float(((x @ (approx - weight).T) ** 2).mean())


def test_batched_grids_are_each_gptq(layer):
    """Every grid of a batch is on its grid and beats round-to-nearest, like a lone GPTQ run."""
    weight, x, hessian = layer
    grids = [quant.Grid(b, g) for b in (2, 3, 4, 8) for g in (32, 64)]
    for grid, (q, z, s, target, _, _) in zip(grids, quant.gptq_batch(weight, hessian, grids)):
        assert int(q.max()) <= (1 << grid.bits) - 1 and int(q.min()) >= 0
        dense = quant._from_codes(q, z, s, weight.shape[1])
        assert target is None  # no outliers: the target is the dense part itself
        rtn = quant.fake_quantize(weight, grid.bits, grid.group_size)
        assert output_error(x, weight, dense) < 0.97 * output_error(x, weight, rtn)
        alone = quant.fake_quantize(weight, grid.bits, grid.group_size, hessian=hessian)
        assert output_error(x, weight, dense) == pytest.approx(output_error(x, weight, alone), rel=0.05)


def test_row_error_from_the_column_losses_is_the_output_error(layer):
    """GPTQ's summed column losses less the damping's share are ``diag(dW H dW^T)``, also with dead inputs."""
    weight, x, _ = layer
    x = x.clone()
    x[:, :5] = 0.0
    hessian = x.T @ x / x.shape[0]
    grids = [quant.Grid(b, g) for b in (2, 3, 4, 8) for g in (32, 64)]
    for grid, result in zip(grids, quant.gptq_batch(weight, hessian, grids)):
        dense = quant._from_codes(result.q, result.zero, result.scale, weight.shape[1])
        exact = ((dense - weight) @ hessian * (dense - weight)).sum(1)
        torch.testing.assert_close(quant.gptq_row_error(result, weight, dense, hessian), exact, rtol=1e-4, atol=1e-9)


def test_row_chunks_do_not_change_the_result(layer, monkeypatch):
    weight, _, hessian = layer
    grids = [quant.Grid(4, 32), quant.Grid(3, 64)]
    whole = quant.gptq_batch(weight, hessian, grids)
    monkeypatch.setattr(quant, "GPTQ_CHUNK_ELEMENTS", 7 * weight.shape[1])  # pieces of 7 rows, grids never mixed
    chunked = quant.gptq_batch(weight, hessian, grids)
    for (qa, za, sa, *_), (qb, zb, sb, *_) in zip(whole, chunked):
        dense_a, dense_b = quant._from_codes(qa, za, sa, weight.shape[1]), quant._from_codes(qb, zb, sb, weight.shape[1])
        assert torch.allclose(dense_a, dense_b, atol=1e-5)


@pytest.fixture(scope="module")
def compiled():
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = mqc.Recipe(method="mq", size="4.5bpw", outlier_frac=0.01, search="none")
    return mqc.compile(mqc.tiny_model("llama"), recipe, calib=calib, progress=False)


def test_deployed_weights_are_the_candidates(compiled):
    table, units = compiled.analysis.candidates, compiled.analysis.units
    reference = mqc.tiny_model("llama")
    for name, entry in compiled.plan.layers.items():
        weight = units[name].oriented(reference.get_submodule(name).weight.detach())
        runtime = compiled.model.get_submodule(name)
        deployed = weight.half().float() if entry.bits == 16 else runtime.dense_weight()
        assert torch.equal(deployed, table.dense(name, choice_of(entry))), name


def test_candidate_bytes_are_the_plan_bytes(compiled):
    table = compiled.analysis.candidates
    for name, plans in table.plans.items():
        for choice, plan in plans.items():
            cand = table.candidate(name, choice)
            if cand.weight is not None:
                stored = cand.weight.nbytes() + (cand.outliers.nbytes() if cand.outliers else 0)
                assert stored == plan.nbytes - (2 * plan.out_features if plan.has_bias else 0)
                assert cand.outliers is not None and cand.outliers.nnz == plan.n_outliers


def test_row_error_falls_with_width(compiled):
    table = compiled.analysis.candidates
    for name in table.plans:
        errors = [float(table.row_error(name, (b, 32)).sum()) for b in (2, 3, 4, 8)]
        assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("gptq", [True, False])
def test_row_blocks_give_the_whole_units_candidates(layer, gptq, monkeypatch):
    """A unit quantized a block of rows at a time (as a large head is) is the unit quantized whole:
    rows are independent given the Hessian. Outliers are shared out between blocks exactly, so the
    plan's count and bytes hold."""
    from mqc.analysis import candidates as cands
    from mqc.planning.types import WeightUnit, plan_entry

    weight, _, hessian = layer
    hessian = hessian if gptq else None
    unit = WeightUnit("w", *weight.shape, False)
    monkeypatch.setattr(cands, "BLOCK_ELEMENTS", 5 * weight.shape[1] * 8)  # blocks of 5 rows
    blocks = cands.row_blocks(unit, 1)
    assert len(blocks) > 2
    for frac in (0.0, 0.01):
        plans = {(b, 32): plan_entry(unit, b, 32, frac) for b in (2, 4)}
        whole = cands.make_candidates(weight, plans, hessian)
        for choice, plan in plans.items():
            parts = [cands.make_candidates(weight[r0:r1], {choice: plan}, hessian, block=(r0, r1))[choice] for r0, r1 in blocks]
            joined = cands.joined(plan, unit, parts)
            if frac == 0.0:
                assert torch.equal(quant.dequantize(joined.weight), quant.dequantize(whole[choice].weight))
                assert torch.allclose(joined.row_error, whole[choice].row_error)
            else:
                assert joined.outliers.nnz == plan.n_outliers == whole[choice].outliers.nnz
                assert joined.weight.nbytes() + joined.outliers.nbytes() == plan.nbytes
