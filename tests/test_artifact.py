"""Artifacts: a save/load round trip is the same function, the file holds exactly the accounted
bytes, overwrites need force, damage of every kind is an ArtifactError, and a crash mid-save
leaves nothing behind."""

import json
import os
import struct

import pytest
import torch
from transformers import AutoTokenizer

import mqc
from mqc import quant
from mqc.errors import ArtifactError
from mqc.runtime import artifact
from mqc.runtime.modules import QLinear

RECIPES = {
    # tied embedding left in fp16 (stored once, aliased), plain QLinears; the CUDA kernels' target
    "llama-rtn4": ("llama", dict(bits=4, group_size=32, target="cuda")),
    # untied quantized embedding that owns its table, biases, outliers
    "qwen2-emb-outliers": ("qwen2", dict(bits=3, group_size=32, quantize_embeddings=True, outlier_frac=0.02)),
    # Conv1D layers, fused QKV
    "gpt2-rtn8": ("gpt2", dict(bits=8, group_size=64)),
}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def saved(request, zoo, token_ids, word_tokenizer, tmp_path_factory):
    family, recipe = RECIPES[request.param]
    compiled = mqc.compile(zoo.model(family), mqc.Recipe(**recipe), calib=token_ids, progress=False)
    compiled.tokenizer = word_tokenizer
    out = mqc.save(compiled, tmp_path_factory.mktemp("art") / "artifact")
    return compiled, out


@pytest.fixture(scope="module")
def llama_compiled(zoo, token_ids):
    return mqc.compile(zoo.model("llama"), mqc.Recipe(bits=4, group_size=32), progress=False)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_round_trip_gives_identical_logits_and_tokens(saved, token_ids):
    compiled, out = saved
    model, tokenizer = mqc.load(out)
    assert torch.equal(logits(model, token_ids), logits(compiled.model, token_ids))
    prompt = token_ids[:1]
    greedy = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(prompt, **greedy), compiled.model.generate(prompt, **greedy))
    # the tokenizer comes back as transformers loads it from a model directory with the same files
    # (for model type qwen2, transformers 5 picks Qwen2Tokenizer over the saved generic class)
    reference_dir = out.parent / "hf"
    compiled.model.config.save_pretrained(reference_dir)
    compiled.tokenizer.save_pretrained(reference_dir)
    reference = AutoTokenizer.from_pretrained(reference_dir)
    assert type(tokenizer) is type(reference)
    assert tokenizer("the jury said")["input_ids"] == reference("the jury said")["input_ids"]
    assert {n for n, m in model.named_modules() if isinstance(m, QLinear)} == {
        n for n, m in compiled.model.named_modules() if isinstance(m, QLinear)
    }


def safetensors_header(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length]), len(raw)


def test_file_size_is_accounted_bytes_plus_header(saved):
    compiled, out = saved
    manifest = json.loads((out / artifact.MANIFEST).read_text())
    header_len, header, size = safetensors_header(out / artifact.TENSORS)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    nbytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in tensors.items()}
    accounting = manifest["accounting"]
    assert size == 8 + header_len + sum(nbytes.values()) == 8 + header_len + accounting["tensor_bytes"]
    # the torch and cuda targets store mqc's formats as they are: planned whole-model bytes = stored
    assert accounting["target"] == compiled.recipe.target in ("torch", "cuda")
    assert accounting["model_bytes"] == compiled.model_bytes == accounting["tensor_bytes"]
    # the runtime modules' tensors are exactly the bytes the plan accounted for, layer by layer
    for entry in manifest["plan"]:
        stored = sum(n for k, n in nbytes.items() if k.startswith(entry["qualname"] + "."))
        assert stored == entry["bytes"] == quant.layer_bytes(
            entry["out_features"], entry["in_features"], entry["bits"], entry["group_size"],
            entry["n_outliers"], entry["has_bias"],
        ), entry["qualname"]  # fmt: skip
    planned = [k for k in nbytes if any(k.startswith(e["qualname"] + ".") for e in manifest["plan"])]
    assert sum(nbytes[k] for k in planned) == accounting["plan_bytes"]
    assert accounting["plan_weights"] == sum(p.n_weights for p in compiled.plan.layers.values())


def test_manifest_records_the_compilation(saved):
    compiled, out = saved
    manifest = artifact.read_manifest(out)
    assert manifest["format_version"] == artifact.FORMAT_VERSION and manifest["mqc_version"] == mqc.__version__
    assert mqc.Recipe.from_dict(manifest["recipe"]) == compiled.recipe
    assert {e["qualname"]: e["bits"] for e in manifest["plan"]} == {n: e.bits for n, e in compiled.plan.layers.items()}
    assert manifest["tokenizer"] and (out / "config.json").is_file()


def test_tied_weights_are_stored_once(llama_compiled, tmp_path):
    """The tiny llama ties its (fp16, unquantized) embedding to lm_head: one tensor, one alias."""
    out = mqc.save(llama_compiled, tmp_path / "a")
    assert artifact.read_manifest(out)["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    _, header, _ = safetensors_header(out / artifact.TENSORS)
    assert "lm_head.weight" not in header and "model.embed_tokens.weight" in header
    model, _ = mqc.load(out)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


# --------------------------------------------------------------------------------------------
# overwrite and crash safety
# --------------------------------------------------------------------------------------------
def test_refuses_to_overwrite_without_force(llama_compiled, tmp_path):
    out = mqc.save(llama_compiled, tmp_path / "a")
    before = snapshot(out)
    with pytest.raises(ArtifactError, match="already exists.*--force"):
        mqc.save(llama_compiled, out, extra={"marker": 1})
    assert snapshot(out) == before


def test_force_replaces_and_leaves_no_temporaries(llama_compiled, tmp_path):
    out = mqc.save(llama_compiled, tmp_path / "a")
    mqc.save(llama_compiled, out, force=True, extra={"marker": 2})
    assert artifact.read_manifest(out)["marker"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_force_refuses_to_replace_what_is_not_an_artifact(llama_compiled, tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtifactError, match="not an mqc artifact"):
        mqc.save(llama_compiled, precious, force=True)
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("existing", [False, True])
def test_crash_mid_save_leaves_no_partial_directory(llama_compiled, tmp_path, monkeypatch, existing):
    out = tmp_path / "a"
    if existing:
        mqc.save(llama_compiled, out)
    before = snapshot(out) if existing else None

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(artifact, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        mqc.save(llama_compiled, out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == (["a"] if existing else [])
    if existing:
        assert snapshot(out) == before


def test_failed_swap_restores_the_old_artifact(llama_compiled, tmp_path, monkeypatch):
    out = mqc.save(llama_compiled, tmp_path / "a")
    before = snapshot(out)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):  # moving the new artifact into place fails
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(artifact.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        mqc.save(llama_compiled, out, force=True)
    assert snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["a"]


# --------------------------------------------------------------------------------------------
# damaged artifacts
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fresh(llama_compiled, tmp_path):
    return mqc.save(llama_compiled, tmp_path / "a")


def edit_manifest(path, change):
    manifest = json.loads((path / artifact.MANIFEST).read_text())
    change(manifest)
    (path / artifact.MANIFEST).write_text(json.dumps(manifest))


def flip_byte(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["data", "header"])
def test_corrupted_tensor_file(fresh, where):
    tensors = fresh / artifact.TENSORS
    flip_byte(tensors, tensors.stat().st_size - 100 if where == "data" else 12)
    with pytest.raises(ArtifactError, match="sha256.*corrupted"):
        mqc.load(fresh)


def test_truncated_tensor_file(fresh):
    tensors = fresh / artifact.TENSORS
    tensors.write_bytes(tensors.read_bytes()[:-1000])
    with pytest.raises(ArtifactError, match="truncated"):
        mqc.load(fresh)


def test_missing_tensor_file(fresh):
    (fresh / artifact.TENSORS).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        mqc.load(fresh)


def test_bad_json_manifest(fresh):
    (fresh / artifact.MANIFEST).write_text('{"format": "mqc-artifact", "format_version": 1,')
    with pytest.raises(ArtifactError, match="corrupted"):
        mqc.load(fresh)


def test_wrong_format_version(fresh):
    edit_manifest(fresh, lambda m: m.update(format_version=artifact.FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError, match=f"format version {artifact.FORMAT_VERSION + 1}.*recompile"):
        mqc.load(fresh)


def test_not_an_mqc_manifest(fresh):
    edit_manifest(fresh, lambda m: m.update(format="something-else"))
    with pytest.raises(ArtifactError, match="not an mqc manifest"):
        mqc.load(fresh)


@pytest.mark.parametrize("key", ["tensors", "modules", "aliases"])
def test_manifest_missing_a_field(fresh, key):
    edit_manifest(fresh, lambda m: m.pop(key))
    with pytest.raises(ArtifactError, match=repr(key)):
        mqc.load(fresh)


def test_missing_manifest(fresh):
    (fresh / artifact.MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="not an mqc artifact"):
        mqc.load(fresh)


def test_missing_config(fresh):
    (fresh / "config.json").unlink()
    with pytest.raises(ArtifactError, match="config.json"):
        mqc.load(fresh)


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        mqc.load(tmp_path / "nothing-here")


def test_unknown_module_kind(fresh):
    def rename(manifest):
        name = next(iter(manifest["modules"]))
        manifest["modules"][name]["kind"] = "qfuture"

    edit_manifest(fresh, rename)
    with pytest.raises(ArtifactError, match="'qfuture'"):
        mqc.load(fresh)
