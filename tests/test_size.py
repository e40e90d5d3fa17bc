"""One size axis: parsing of --size, whole-model accounting equal to the bytes on disk."""

import pytest
import torch

import mqc
from mqc.errors import RecipeError
from mqc.runtime.artifact import TENSORS, tensor_data_bytes
from mqc.size import Size, inventory, model_size, parse_size


@pytest.mark.parametrize(
    "text, size",
    [
        ("70MB", Size(nbytes=70_000_000)),
        ("64MiB", Size(nbytes=64 * 2**20)),
        (" 3.5 BPW ", Size(bpw=3.5)),
        ("123456B", Size(nbytes=123456)),
        ("1.5GB", Size(nbytes=1_500_000_000)),
        (".5kib", Size(nbytes=512)),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["3.5", "abc", "70 parsecs", "-1MB", "0bpw", "40bpw", "3.5.1bpw", ""])
def test_parse_size_refuses(text):
    with pytest.raises(RecipeError, match="size"):
        parse_size(text)


def test_size_to_bytes():
    assert Size(bpw=4.0).to_bytes(1000) == 500 and Size(nbytes=7).to_bytes(1000) == 7


def test_recipe_size_rules():
    with pytest.raises(RecipeError, match="at most one"):
        mqc.Recipe(method="mq", size="3bpw", budget_frac=0.3)
    with pytest.raises(RecipeError, match="needs --method mq"):
        mqc.Recipe(size="3bpw")
    with pytest.raises(RecipeError, match="size"):
        mqc.Recipe(method="mq", size="three bits")


@pytest.mark.parametrize("on_meta", [False, True])
def test_model_size_counts_tied_tensors_once(on_meta):
    """Sized from the inventory of a model in memory or of its skeleton on meta: the same."""
    from mqc.stream.skeleton import build_skeleton

    model = mqc.tiny_model("llama")  # tied embedding / lm_head
    n_params = sum(p.numel() for p in model.parameters())
    everything = sum(t.numel() for t in {p.data_ptr(): p for p in model.state_dict().values()}.values())
    tensors = inventory(build_skeleton(model.config) if on_meta else model)
    assert model_size(tensors, set()).n_params == n_params
    assert model_size(tensors, set()).fixed_bytes == 2 * everything  # all in fp16, the tied table once
    head = model.lm_head.weight.numel()
    assert model_size(tensors, {"lm_head"}).fixed_bytes == 2 * (everything - head)  # under either name


@pytest.mark.parametrize("recipe", [
    mqc.Recipe(method="mq", size="5bpw", allowed_group_sizes=(32,), search="none"),
    mqc.Recipe(bits=4, group_size=32),  # uniform: the fp16 embedding is part of the size
])  # fmt: skip
def test_whole_model_size_equals_bytes_on_disk(tmp_path, recipe):
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    compiled = mqc.compile(mqc.tiny_model("llama"), recipe, calib=calib, progress=False)
    out = mqc.save(compiled, tmp_path / "a")
    assert tensor_data_bytes(out / TENSORS) == compiled.model_bytes
    if recipe.size:
        assert compiled.plan.bpw <= 5.0
