"""GPTQ candidates: several grids in one column loop, deployed unchanged, priced by what they store."""

import pytest
import torch

import mqc
from mqc import quant
from mqc.passes import keys
from mqc.passes.units import choice_of


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
    for grid, (q, z, s, target) in zip(grids, quant.gptq_batch(weight, hessian, grids)):
        assert int(q.max()) <= (1 << grid.bits) - 1 and int(q.min()) >= 0
        dense = quant._from_codes(q, z, s, weight.shape[1])
        assert target is None  # no outliers: the target is the dense part itself
        rtn = quant.fake_quantize(weight, grid.bits, grid.group_size)
        assert output_error(x, weight, dense) < 0.97 * output_error(x, weight, rtn)
        alone = quant.fake_quantize(weight, grid.bits, grid.group_size, hessian=hessian)
        assert output_error(x, weight, dense) == pytest.approx(output_error(x, weight, alone), rel=0.05)


def test_row_chunks_do_not_change_the_result(layer, monkeypatch):
    weight, _, hessian = layer
    grids = [quant.Grid(4, 32), quant.Grid(3, 64)]
    whole = quant.gptq_batch(weight, hessian, grids)
    monkeypatch.setattr(quant, "GPTQ_CHUNK_ELEMENTS", 7 * weight.shape[1])  # pieces of 7 rows, grids never mixed
    chunked = quant.gptq_batch(weight, hessian, grids)
    for (qa, za, sa, _), (qb, zb, sb, _) in zip(whole, chunked):
        dense_a, dense_b = quant._from_codes(qa, za, sa, weight.shape[1]), quant._from_codes(qb, zb, sb, weight.shape[1])
        assert torch.allclose(dense_a, dense_b, atol=1e-5)


@pytest.fixture(scope="module")
def compiled():
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = mqc.Recipe(method="mq", size="4.5bpw", outlier_frac=0.01, search="none")
    return mqc.compile(mqc.tiny_model("llama"), recipe, calib=calib, progress=False)


def test_deployed_weights_are_the_candidates(compiled):
    table, units = compiled.context[keys.CANDIDATES], compiled.context[keys.UNITS]
    reference = mqc.tiny_model("llama")
    for name, entry in compiled.plan.items():
        weight = units[name].weight(reference)
        runtime = compiled.model.get_submodule(name)
        deployed = weight.half().float() if entry.bits == 16 else runtime.dense_weight()
        assert torch.equal(deployed, table.dense(name, choice_of(entry), weight)), name


def test_candidate_bytes_are_the_plan_bytes(compiled):
    table = compiled.context[keys.CANDIDATES]
    for per_choice in table.units.values():
        for cand in per_choice.values():
            if cand.weight is not None:
                stored = cand.weight.nbytes() + (cand.outliers.nbytes() if cand.outliers else 0)
                assert stored == cand.plan.nbytes - (2 * cand.plan.out_features if cand.plan.has_bias else 0)
                assert cand.outliers is not None and cand.outliers.nnz == cand.plan.n_outliers


def test_row_error_falls_with_width(compiled):
    table = compiled.context[keys.CANDIDATES]
    for per_choice in table.units.values():
        errors = [float(per_choice[(b, 32)].row_error.sum()) for b in (2, 3, 4, 8)]
        assert errors == sorted(errors, reverse=True)
