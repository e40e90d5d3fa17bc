"""Plans over llama.cpp's types (``target="gguf"``): row constraints, exact bytes under the budget,
the lowered model holding exactly the candidates that were priced, refusals."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import mqc
from mqc import quant_ggml
from mqc.errors import RecipeError
from mqc.recipe import CalibRecipe, Recipe
from mqc.runtime.modules import GgmlLinear, QEmbedding
from mqc.size import parse_size

K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


@pytest.fixture(scope="module")
def model():
    """hidden 256 (k-quants fit) but intermediate 288 (down_proj rows of 288: block-32 types only)."""
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=288, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _compile(model, **kw):
    recipe = Recipe(method="mq", target="gguf", search_generations=2, calib=CalibRecipe(n_samples=4, seq_len=32), **kw)
    calib = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    return mqc.compile(copy.deepcopy(model), recipe, calib=calib, progress=False)


@pytest.fixture(scope="module")
def compiled(model):
    return _compile(model, size="4.6bpw")


def test_plan_fits_rows_and_the_whole_model_budget(compiled):
    plan, size = compiled.plan.layers, compiled.plan.size
    assert all(quant_ggml.fits(e.fmt, e.in_features) for e in plan.values())
    assert all(e.fmt not in K_QUANTS for n, e in plan.items() if n.endswith("down_proj"))
    assert any(e.fmt in K_QUANTS for e in plan.values())  # the 256-wide rows do use them
    total = size.total_bytes(sum(e.nbytes for e in plan.values()))
    assert total <= parse_size("4.6bpw").to_bytes(size.n_params)
    # every non-unit tensor is a 1-D norm, stored F32 in a GGUF file
    norms = sum(p.numel() for n, p in compiled.model.named_parameters() if p.ndim == 1)
    assert size.fixed_bytes == 4 * norms


def test_lowered_model_holds_the_priced_candidates(compiled):
    table = compiled.analysis.candidates
    model = compiled.model
    for name, entry in compiled.plan.layers.items():
        module = model.get_submodule(name)
        if entry.fmt == quant_ggml.F16:
            assert isinstance(module, torch.nn.Linear)
            continue
        assert isinstance(module, GgmlLinear) and module.fmt == entry.fmt
        assert torch.equal(module.blocks, table.candidate(name, entry.fmt).weight.blocks)
        assert module.blocks.numel() == entry.nbytes
    assert isinstance(model.model.embed_tokens, QEmbedding) and model.model.embed_tokens.table is model.lm_head
    ids = torch.tensor([[3, 7, 11]])
    emb = model.model.embed_tokens(ids)[0]
    torch.testing.assert_close(emb, quant_ggml.dequantize(model.lm_head.ggml_weight())[ids[0]], rtol=0, atol=0)


def test_gguf_types_restrict_the_choices(model):
    c = _compile(model, size="6bpw", gguf_types=("Q4_0", "Q8_0"))
    assert {e.fmt for e in c.plan.layers.values()} <= {"Q4_0", "Q8_0"}


def test_infeasible_size_names_the_smallest(model):
    with pytest.raises(mqc.errors.InfeasibleBudgetError, match="infeasible"):
        _compile(model, size="3bpw", gguf_types=("Q4_0", "Q8_0"))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(method="rtn"), "target 'gguf' plans with --method mq"),
        (dict(method="mq", outlier_frac=0.01), "no outliers"),
        (dict(method="mq", gguf_types=("Q4_0", "Q9_K")), "unknown llama.cpp type"),
    ],
)
def test_recipe_refusals(kw, message):
    with pytest.raises(RecipeError, match=message):
        Recipe(target="gguf", **kw)
    with pytest.raises(RecipeError, match="only apply with target 'gguf'"):
        Recipe(method="mq", gguf_types=("Q4_0",))


def test_report_and_plot_of_a_gguf_plan(compiled, tmp_path):
    from mqc.report import build_report, layer_table, write_reports

    report = build_report(compiled)
    write_reports(report, tmp_path)
    assert (tmp_path / "report.json").is_file() and any(tmp_path.glob("*.png"))
    assert "Q" in layer_table(report["layers"])
