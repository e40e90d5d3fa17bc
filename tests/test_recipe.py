"""Recipe: from_dict/from_yaml build nested frozen dataclasses and reject every mistake with a
RecipeError that names it."""

import dataclasses

import pytest

from mqc.errors import RecipeError
from mqc.recipe import CalibRecipe, KVRecipe, Pin, Recipe


def test_defaults_and_empty_dict():
    recipe = Recipe.from_dict({})
    assert recipe == Recipe()
    assert recipe.method == "rtn" and recipe.bits == 4.0 and recipe.group_size == 128
    assert not recipe.embeddings_included and not recipe.uses_gptq


def test_nested_dataclasses_and_round_trip():
    data = {
        "method": "mq",
        "bits": 3,  # an int where a float is declared is accepted and converted
        "group_size": 64,
        "allowed_bits": [2, 4, 8],
        "pins": [{"pattern": "*.down_proj", "min_bits": 4}],
        "skip": ["lm_head"],
        "calib": {"n_samples": 8, "seq_len": 64, "seed": 3},
        "kv": {"rank": 0.25, "method": "svd", "quant_bits": 4},
    }
    recipe = Recipe.from_dict(data)
    assert isinstance(recipe.bits, float) and recipe.bits == 3.0
    assert recipe.allowed_bits == (2, 4, 8) and recipe.skip == ("lm_head",)
    assert recipe.pins == (Pin("*.down_proj", 4),)
    assert recipe.calib == CalibRecipe(n_samples=8, seq_len=64, seed=3)
    assert recipe.kv == KVRecipe(rank=0.25, method="svd", quant_bits=4)
    assert recipe.embeddings_included and recipe.uses_gptq  # mq defaults to GPTQ candidates
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_recipe_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Recipe().bits = 3.0


@pytest.mark.parametrize(
    "data, named",
    [
        ({"bitz": 4}, "'bitz'"),
        ({"calib": {"n_sample": 8}}, "'n_sample' in recipe.calib"),
        ({"kv": {"rnk": 0.5}}, "'rnk' in recipe.kv"),
        ({"pins": [{"pattern": "*", "bits": 4}]}, "'bits' in recipe.pins[0]"),
    ],
)
def test_unknown_keys_are_named(data, named):
    with pytest.raises(RecipeError, match="unknown key " + named.replace("[", r"\[").replace("]", r"\]")):
        Recipe.from_dict(data)


@pytest.mark.parametrize(
    "data, where",
    [
        ({"bits": "four"}, "recipe.bits"),
        ({"bits": True}, "recipe.bits"),
        ({"group_size": 128.0}, "recipe.group_size"),
        ({"method": 3}, "recipe.method"),
        ({"skip": "lm_head"}, "recipe.skip"),
        ({"allowed_bits": [4, "8"]}, r"recipe.allowed_bits\[1\]"),
        ({"quantize_embeddings": "yes"}, "recipe.quantize_embeddings"),
        ({"calib": "many"}, "recipe.calib"),
        ({"calib": {"n_samples": 1.5}}, "recipe.calib.n_samples"),
        ({"kv": {"rank": "half"}}, "recipe.kv.rank"),
    ],
)
def test_type_errors_name_the_field(data, where):
    with pytest.raises(RecipeError, match=where):
        Recipe.from_dict(data)


def test_top_level_must_be_a_mapping():
    with pytest.raises(RecipeError, match="mapping"):
        Recipe.from_dict([("bits", 4)])


@pytest.mark.parametrize(
    "data, says",
    [
        ({"method": "awq"}, "unknown method"),
        ({"group_size": 48}, "group_size 48"),
        ({"bits": 5}, "rtn needs one width"),
        ({"bits": 3.5}, "rtn needs one width"),
        ({"allowed_bits": [1, 4]}, "allowed_bits"),
        ({"allowed_bits": []}, "allowed_bits"),
        ({"method": "mq", "bits": 0}, "bits"),
        ({"method": "mq", "budget_bytes": 100, "budget_frac": 0.5}, "at most one"),
        ({"method": "mq", "budget_bytes": 0}, "budget_bytes"),
        ({"method": "mq", "budget_frac": 1.5}, "budget_frac"),
        ({"outlier_frac": 0.6}, "outlier_frac"),
        ({"outlier_frac": -0.1}, "outlier_frac"),
        ({"sensitivity": "hessian"}, "unknown sensitivity"),
        ({"quantizer": "awq"}, "unknown quantizer"),
        ({"pins": [{"pattern": "*", "min_bits": 5}]}, "min_bits 5"),
        ({"kv": {"rank": 0.0}}, "kv rank"),
        ({"kv": {"method": "pca"}}, "kv method"),
        ({"kv": {"quant_bits": 3}}, "kv quant_bits"),
        ({"kv": {"window": 0}}, "kv window"),
        ({"kv": {"train_steps": -1}}, "train_steps"),
        ({"kv": {"budget_frac": 0.0}}, "kv budget_frac"),
        ({"calib": {"n_samples": 0}}, "n_samples"),
        ({"calib": {"seq_len": 1}}, "seq_len"),
        ({"target": "tpu"}, "unknown target 'tpu'; use one of torch, cuda, onnx, gguf"),
        ({"method": "mq", "target": "onnx", "allowed_bits": [3]}, "stores none of the allowed widths"),
    ],
)
def test_invalid_values_raise_recipe_error(data, says):
    with pytest.raises(RecipeError, match=says):
        Recipe.from_dict(data)


def test_invalid_values_raise_from_the_constructor_too():
    with pytest.raises(RecipeError):
        Recipe(group_size=100)
    with pytest.raises(RecipeError):
        CalibRecipe(n_samples=-3)


def test_embeddings_and_quantizer_defaults_follow_the_method():
    assert Recipe(quantize_embeddings=True).embeddings_included
    assert not Recipe(method="mq", bits=3.0, quantize_embeddings=False).embeddings_included
    assert Recipe(quantizer="gptq").uses_gptq and not Recipe(method="mq", bits=3.0, quantizer="rtn").uses_gptq
    assert Recipe(method="mq", bits=3.0, allowed_bits=(2, 4, 16)).quant_bits == (2, 4)


def test_from_yaml(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: mq\nbits: 3.5\ngroup_size: 64\ncalib:\n  n_samples: 16\npins:\n  - {pattern: lm_head, min_bits: 8}\n")
    recipe = Recipe.from_yaml(path)
    assert recipe == Recipe(method="mq", bits=3.5, group_size=64, calib=CalibRecipe(n_samples=16), pins=(Pin("lm_head", 8),))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert Recipe.from_yaml(empty) == Recipe()


@pytest.mark.parametrize(
    "text, says",
    [
        ("bits: 4\ngroupsize: 64\n", "unknown key 'groupsize'"),
        ("calib:\n  seqlen: 64\n", "unknown key 'seqlen' in recipe.calib"),
        ("bits: [4\n", "not valid YAML"),
        ("- 4\n- 8\n", "mapping"),
        ("bits: 7\n", "rtn needs one width"),
    ],
)
def test_from_yaml_errors(tmp_path, text, says):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=says):
        Recipe.from_yaml(path)


def test_from_yaml_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        Recipe.from_yaml(tmp_path / "nope.yaml")
