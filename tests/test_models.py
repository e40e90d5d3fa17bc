"""Model directories: a config.json that is not a causal-LM config is refused, naming the file,
before transformers parses it or any weights load."""

import json

import pytest

from mqc import models
from mqc.errors import UnsupportedModelError


def model_dir(tmp_path, config_text: str):
    """A directory holding only ``config.json`` (no weights: the refusal must come before loading)."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(config_text)
    return path


@pytest.fixture
def no_transformers(monkeypatch):
    """Fail the test if transformers is asked to parse the config or load weights."""

    def forbidden(*args, **kwargs):
        raise AssertionError("transformers was called before the config.json check")

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", forbidden)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", forbidden)


def test_config_without_model_type(tmp_path, no_transformers):
    path = model_dir(tmp_path, json.dumps({"hidden_size": 96, "num_hidden_layers": 2}))
    with pytest.raises(UnsupportedModelError) as info:
        models.load_hf_model(path)
    message = str(info.value)
    assert str(path / "config.json") in message and "has no 'model_type'" in message
    assert "causal-LM config" in message and "llama" in message  # says what would be accepted


@pytest.mark.parametrize(
    "config_text, problem",
    [
        ('{"model_type": "llama",', "not valid JSON"),  # truncated
        ("model_type: llama\n", "not valid JSON"),  # YAML, not JSON
        ("", "not valid JSON"),
        ('["llama"]', "not a JSON object"),
    ],
)
def test_config_that_is_not_a_json_object(tmp_path, no_transformers, config_text, problem):
    path = model_dir(tmp_path, config_text)
    with pytest.raises(UnsupportedModelError) as info:
        models.load_hf_model(path)
    message = str(info.value)
    assert str(path / "config.json") in message and problem in message and "causal-LM config" in message


def test_invalid_json_says_where(tmp_path):
    path = model_dir(tmp_path, '{\n  "model_type": "llama",\n  "hidden_size": 96,,\n}')
    with pytest.raises(UnsupportedModelError, match="line 3, column 21"):
        models.check_config_file(path)


def test_config_with_unknown_model_type(tmp_path, no_transformers):
    path = model_dir(tmp_path, json.dumps({"model_type": "not-a-real-architecture"}))
    with pytest.raises(UnsupportedModelError, match="model type 'not-a-real-architecture' is not supported"):
        models.load_hf_model(path)


def test_supported_config_passes(tmp_path):
    models.tiny_config("qwen2").save_pretrained(tmp_path)
    assert models.check_config_file(tmp_path) == "qwen2"
