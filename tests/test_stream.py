"""A model streamed from its shards: the same function as the model loaded whole, held one layer at
a time; damaged checkpoints refused by name before anything is read."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import mqc
from mqc.errors import UnsupportedModelError
from mqc.stream.skeleton import open_model
from mqc.stream.stack import LayerStack

FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "gpt2", "opt")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, word_tokenizer):
    """family -> a model directory of bf16 safetensors shards (several per model)."""
    made = {}

    def make(family: str):
        if family not in made:
            path = tmp_path_factory.mktemp(family)
            mqc.tiny_model(family).to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")
            word_tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


def loaded(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_stack_equals_the_model_loaded_whole(shards, family):
    """Layer inputs caught through the model's own forward, then each layer loaded, run, freed."""
    path = shards(family)
    assert len(list(path.glob("*.safetensors"))) > 2
    reference = loaded(path)
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        skeleton, source, _, _ = open_model(path)
        stack = LayerStack(skeleton, source)
        hidden, calls, _ = stack.catch(ids)
        for i in range(stack.n_layers):
            with stack.layer(i) as layer:
                hidden = stack.run(layer, hidden, calls[i])
            assert all(p.is_meta for p in stack.layers[i].parameters())  # released again
        logits = stack.head()(stack.tail(hidden))
        with stack.whole() as model:
            whole = model(input_ids=ids).logits
    assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(whole, expected, atol=1e-5, rtol=1e-5)
    assert all(p.is_meta for p in stack.layers.parameters())


def test_embedding_rows_are_read_by_block(shards, monkeypatch):
    """A lookup reads only the blocks of rows holding the ids it needs."""
    from mqc.stream import stack as stack_module

    monkeypatch.setattr(stack_module, "ROW_BLOCK", 16)
    skeleton, source, _, _ = open_model(shards("llama"))
    stack = LayerStack(skeleton, source)
    reads = []
    rows = source.rows
    monkeypatch.setattr(source, "rows", lambda name, a, b: reads.append((a, b)) or rows(name, a, b))
    ids = torch.tensor([[3, 5, 200, 201]])
    table = stack.embedding_rows()(torch.unique(ids))
    assert reads == [(3, 6), (200, 202)]
    assert torch.equal(table, loaded(shards("llama")).model.embed_tokens.weight.detach()[[3, 5, 200, 201]])


def test_tied_head_is_read_under_the_embeddings_name(shards):
    path = shards("llama")  # tied: the checkpoint stores the table once
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index
    _, source, _, _ = open_model(path)
    assert torch.equal(source.tensor("lm_head.weight"), source.tensor("model.embed_tokens.weight"))


def test_missing_shard_is_refused_by_name(shards, tmp_path):
    import shutil

    path = tmp_path / "model"
    shutil.copytree(shards("qwen2"), path)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(UnsupportedModelError, match=f"missing the shard {victim.name}"):
        open_model(path)


def test_truncated_shard_is_refused_by_name(shards, tmp_path):
    import shutil

    path = tmp_path / "model"
    shutil.copytree(shards("qwen2"), path)
    victim = sorted(path.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(UnsupportedModelError, match=f"shard {victim}"):
        open_model(path)


def test_keys_without_the_base_prefix_are_found(tmp_path, word_tokenizer):
    """Older GPT-2 checkpoints name tensors ``h.0...`` rather than ``transformer.h.0...``."""
    from safetensors.torch import save_file

    model = mqc.tiny_model("gpt2")
    state = {
        k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    save_file(state, tmp_path / "model.safetensors")
    model.config.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    _, source, _, _ = open_model(tmp_path)
    assert torch.equal(source.tensor("transformer.h.0.attn.c_attn.weight"), model.transformer.h[0].attn.c_attn.weight)


def test_fingerprint_follows_the_bytes(shards, tmp_path):
    import shutil

    path = tmp_path / "model"
    shutil.copytree(shards("llama"), path)
    before = open_model(path)[1].fingerprint
    assert open_model(shards("llama"))[1].fingerprint == before  # a copy of the same model
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert open_model(path)[1].fingerprint != before
