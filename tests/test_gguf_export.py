"""GGUF export (``mqc export ART --gguf OUT``): metadata per family, llama.cpp's tensor names, the
exported bytes equal to the plan's, exported weights equal to the artifact's, refusals that
leave an existing file untouched, and (slow, with llama-cpp-python) llama.cpp running an export."""

import importlib.util
import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import mqc
from mqc import quant_ggml
from mqc.cli import main
from mqc.errors import ArtifactError, UnsupportedModelError
from mqc.export import export_gguf
from mqc.export import gguf as gguf_export
from mqc.models import tiny_config
from mqc.runtime.artifact import load_any
from mqc.recipe import CalibRecipe, Recipe

VOCAB = 320  # more ids than the tokenizer's 300: the rest are [PAD<i>]
ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
HAS_QWEN3 = importlib.util.find_spec("transformers.models.qwen3") is not None
FAMILIES = [f for f in ARCH if f != "qwen3" or HAS_QWEN3]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style) of 300 ids, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    text = ["The jury said the city of Atlanta had a good election.", "the a of and to in is was he it that"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def family_model(family: str) -> torch.nn.Module:
    if family == "qwen3":
        from transformers import Qwen3Config

        config = Qwen3Config(
            vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=512,
        )  # fmt: skip
    else:
        config = tiny_config(family, vocab_size=VOCAB)
    if hasattr(config, "query_pre_attn_scalar"):
        config.query_pre_attn_scalar = config.head_dim  # the query scaling llama.cpp applies
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def model_dir(path, model, tokenizer):
    """A local HF model directory, as a user would have (mqc loads its tokenizer too)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def compile_gguf(model, tokenizer=None, **recipe):
    recipe = {"size": "6bpw", "search": "none", **recipe}
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    r = Recipe(method="mq", target="gguf", calib=CalibRecipe(n_samples=4, seq_len=32), **recipe)
    return mqc.compile(model, r, calib=calib, tokenizer=tokenizer, progress=False)


class Exports:
    """One compiled artifact and its export per family, made on first use."""

    def __init__(self, root, tokenizer):
        self.root, self.tokenizer, self.done = root, tokenizer, {}

    def __call__(self, family: str):
        if family not in self.done:
            compiled = compile_gguf(family_model(family), self.tokenizer)
            art = self.root / family
            mqc.save(compiled, art)
            result = export_gguf(art, self.root / f"{family}.gguf")
            self.done[family] = (compiled, art, result, gguf.GGUFReader(result.path))
        return self.done[family]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, bpe_tokenizer):
    return Exports(tmp_path_factory.mktemp("gguf"), bpe_tokenizer)


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


# --------------------------------------------------------------------------------------------
# what is written
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_for_each_family(exports, family):
    compiled, _, result, reader = exports(family)
    c, arch = compiled.model.config, ARCH[family]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert field(reader, "general.architecture") == arch == result.arch
    assert field(reader, "general.quantized_by") == "mqc"
    expected = {
        "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size,
        "block_count": c.num_hidden_layers,
        "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": c.num_key_value_heads,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "rope.dimension_count": head_dim,
        "vocab_size": VOCAB,
    }
    for key, value in expected.items():
        assert field(reader, f"{arch}.{key}") == value, key
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(rope["rope_theta"])
    if family == "gemma2":
        assert field(reader, "gemma2.attn_logit_softcapping") == pytest.approx(c.attn_logit_softcapping)
        assert field(reader, "gemma2.final_logit_softcapping") == pytest.approx(c.final_logit_softcapping)
        assert field(reader, "gemma2.attention.sliding_window") == c.sliding_window
    if family == "gemma3_text":
        assert field(reader, "gemma3.attention.sliding_window") == c.sliding_window
        local = c.rope_parameters["sliding_attention"]["rope_theta"]
        assert field(reader, "gemma3.rope.freq_base_swa") == pytest.approx(local)
    # the tokenizer: byte-level BPE, padded to the model's vocabulary
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB and tokens[0] == "<|endoftext|>" and tokens[-1] == f"[PAD{VOCAB - 1}]"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert field(reader, "tokenizer.ggml.eos_token_id") == 0
    assert field(reader, "tokenizer.ggml.pre") in ("gpt-2", "default")  # qwen2's own regex: "default"
    assert len(field(reader, "tokenizer.ggml.merges")) > 0


def expected_names(family: str, config) -> set[str]:
    """The tensors llama.cpp's loader asks for, written out by hand (llama-model.cpp / models/*.cpp)."""
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    per_layer += {
        "qwen3": ["attn_q_norm", "attn_k_norm"],
        "gemma2": ["post_attention_norm", "post_ffw_norm"],
        "gemma3_text": ["post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"],
    }.get(family, [])
    names = {f"blk.{i}.{t}.weight" for i in range(config.num_hidden_layers) for t in per_layer}
    if family == "qwen2":
        names |= {f"blk.{i}.{t}.bias" for i in range(config.num_hidden_layers) for t in ("attn_q", "attn_k", "attn_v")}
    names |= {"token_embd.weight", "output_norm.weight"}
    return names | (set() if config.tie_word_embeddings else {"output.weight"})


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_names_as_llama_cpp_expects(exports, family):
    compiled, _, _, reader = exports(family)
    assert {t.name for t in reader.tensors} == expected_names(family, compiled.model.config)


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_tensor_bytes_equal_the_planned_bytes(exports, family):
    compiled, _, result, reader = exports(family)
    size = compiled.plan.size  # computed by the compile, on the float model
    planned = size.total_bytes(sum(entry.nbytes for entry in compiled.plan.layers.values()))
    assert sum(int(t.n_bytes) for t in reader.tensors) == planned == result.tensor_bytes
    assert result.n_params == size.n_params
    assert result.bpw == pytest.approx(size.bpw(planned - size.fixed_bytes))


def llama_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF q/k rows -> llama.cpp's rotary layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_weights_are_the_artifact_weights(exports, family):
    """Each GGUF tensor, dequantized, is the loaded artifact's weight (llama's q/k rows permuted
    as llama.cpp's converter does, Gemma's norms + 1)."""
    _, art, _, reader = exports(family)
    model, _ = load_any(art)
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCH[family].upper()], config.num_hidden_layers)
    written = {t.name: t for t in reader.tensors}
    checked = set()
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if leaf == "blocks":  # a GgmlLinear: its own table for an untied embedding
            module = model.get_submodule(owner)
            hf, want = f"{owner.removesuffix('.table')}.weight", quant_ggml.dequantize(module.ggml_weight()).numpy()
            qtype = quant_ggml.TYPES[module.fmt].qtype
        else:
            hf, want = key, value.float().numpy()
            qtype = gguf.GGMLQuantizationType.F32 if want.ndim == 1 else gguf.GGMLQuantizationType.F16
            if family.startswith("gemma") and hf.endswith("norm.weight"):
                want = want + 1.0
        name = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name not in written:  # the tied output: llama.cpp reads it from token_embd
            assert config.tie_word_embeddings and hf == "lm_head.weight"
            name = "token_embd.weight"
        tensor = written[name]
        assert tensor.tensor_type == qtype, hf
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        if ARCH[family] == "llama" and ("q_proj" in hf or "k_proj" in hf):
            want = llama_rotary(want, config.num_attention_heads if "q_proj" in hf else config.num_key_value_heads)
        np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=hf)
        checked.add(name)
    assert checked == set(written)


def test_k_quants_and_the_command_line(tmp_path, capsys):
    """The issue's tiny llama (rows of 256: k-quants), saved without a tokenizer, through ``mqc export``."""
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    compiled = compile_gguf(AutoModelForCausalLM.from_config(cfg).eval(), size="5bpw")
    art, out = tmp_path / "art", tmp_path / "k.gguf"
    mqc.save(compiled, art)
    assert main(["export", str(art), "--gguf", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"exported {out} (llama)") and "(= planned)" in line and "tokenizer none" in line
    reader = gguf.GGUFReader(out)
    types = {t.tensor_type.name for t in reader.tensors}
    assert types & {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    assert field(reader, "tokenizer.ggml.model") == "none" and field(reader, "llama.vocab_size") == 512
    size = compiled.plan.size
    assert sum(int(t.n_bytes) for t in reader.tensors) == size.total_bytes(sum(e.nbytes for e in compiled.plan.layers.values()))
    lm_head = compiled.model.lm_head
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    np.testing.assert_array_equal(np.asarray(embd.data).reshape(lm_head.blocks.shape), lm_head.blocks.numpy())

    assert main(["export", str(art), "--gguf", str(out), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensor_bytes"] == size.total_bytes(sum(e.nbytes for e in compiled.plan.layers.values()))
    assert main(["export", str(art), "--gguf", str(out)]) == 2  # exists, no --force
    err = capsys.readouterr().err.strip()
    assert err.startswith("mqc: error:") and "--force" in err and "\n" not in err
    assert main(["export", str(art), "--gguf", str(tmp_path / "x.gguf"), "--accuracy-level", "0"]) == 2
    assert "--onnx only" in capsys.readouterr().err
    for argv in (["export", str(art)], ["export", str(art), "--gguf", "a", "--onnx", "b"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2


def test_sentencepiece_style_tokenizer(tmp_path):
    """Byte-fallback BPE (Llama 2 / Mistral / Gemma style): llama.cpp's "llama" vocabulary, byte
    tokens typed BYTE, each token scored by the rank of the merge that makes it."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    pieces = ["▁", "t", "h", "e", "a", "▁t", "he", "▁the", "▁a"]
    vocab |= {p: 259 + i for i, p in enumerate(pieces)}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a")]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    path = model_dir(tmp_path / "m", family_model("llama"), tokenizer)
    result = export_gguf(path, tmp_path / "spm.gguf")
    assert result.tokenizer == "llama/default"
    reader = gguf.GGUFReader(result.path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = dict(zip(tokens, field(reader, "tokenizer.ggml.scores")))
    assert scores["▁t"] == -1 and scores["he"] == -2 and scores["▁the"] == -3 and scores["▁a"] == -4 and scores["t"] == 0
    types = dict(zip(tokens, field(reader, "tokenizer.ggml.token_type")))
    assert types["<0x41>"] == gguf.TokenType.BYTE and types["<s>"] == gguf.TokenType.CONTROL
    assert types["▁the"] == gguf.TokenType.NORMAL and types["[PAD300]"] == gguf.TokenType.UNUSED
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1
    adds_bos = tokenizer("a")["input_ids"][0] == 1  # as the tokenizer itself does
    assert field(reader, "tokenizer.ggml.add_bos_token") is adds_bos
    # a float model: every matrix in F16, the norms in F32, nothing planned
    assert result.types == {"F16": 15, "F32": 5}


# --------------------------------------------------------------------------------------------
# refusals: the existing file stays as it was
# --------------------------------------------------------------------------------------------
@pytest.fixture
def llama_art(exports):
    return exports("llama")[1]


def test_existing_file_needs_force_and_must_be_mqc(llama_art, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"not a gguf")
    with pytest.raises(ArtifactError, match="already exists"):
        export_gguf(llama_art, out)
    with pytest.raises(ArtifactError, match="not a GGUF file written by mqc"):
        export_gguf(llama_art, out, force=True)
    assert out.read_bytes() == b"not a gguf"
    foreign = tmp_path / "foreign.gguf"  # a GGUF, but not one mqc wrote
    writer = gguf.GGUFWriter(foreign, "llama")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = foreign.read_bytes()
    with pytest.raises(ArtifactError, match="not a GGUF file written by mqc"):
        export_gguf(llama_art, foreign, force=True)
    assert foreign.read_bytes() == before
    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    with pytest.raises(ArtifactError, match="not a GGUF file written by mqc"):
        export_gguf(llama_art, folder, force=True)
    assert folder.is_dir()


def test_force_replaces_an_mqc_export_and_failures_keep_it(llama_art, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    export_gguf(llama_art, out)
    before = out.read_bytes()

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
        with pytest.raises(OSError, match="disk full"):
            export_gguf(llama_art, out, force=True)
    with monkeypatch.context() as m:  # the written bytes differ from the plan's: a bug, never written over
        m.setattr(gguf_export, "planned_bytes", lambda model, plan: 1)
        with pytest.raises(RuntimeError, match="planned"):
            export_gguf(llama_art, out, force=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left
    assert export_gguf(llama_art, out, force=True).path == out


def test_mqc_formats_are_refused(llama_art, tmp_path):
    compiled = mqc.compile(mqc.tiny_model("llama"), Recipe(bits=4), progress=False)  # QLinear, mqc's own
    art = tmp_path / "rtn"
    mqc.save(compiled, art)
    out = export_gguf(llama_art, tmp_path / "o.gguf").path  # an export --force may replace
    before = out.read_bytes()
    with pytest.raises(ArtifactError, match="--target gguf"):
        export_gguf(art, out, force=True)
    with pytest.raises(ArtifactError, match="--target gguf"):
        export_gguf(art, tmp_path / "new.gguf")
    assert out.read_bytes() == before and not (tmp_path / "new.gguf").exists()


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_other_families_are_refused(family, tmp_path, capsys, bpe_tokenizer):
    path = model_dir(tmp_path / family, mqc.tiny_model(family), bpe_tokenizer)
    with pytest.raises(UnsupportedModelError, match=f"model type '{family}' has no llama.cpp export"):
        export_gguf(path, tmp_path / "o.gguf")
    capsys.readouterr()
    assert main(["export", str(path), "--gguf", str(tmp_path / "o.gguf")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "o.gguf").exists()


def test_settings_llama_cpp_would_compute_differently_are_refused(tmp_path, bpe_tokenizer):
    # query_pre_attn_scalar 256, head_dim 24: llama.cpp would scale queries by 24^-0.5
    gemma2 = AutoModelForCausalLM.from_config(tiny_config("gemma2", vocab_size=VOCAB))
    with pytest.raises(UnsupportedModelError, match="query_pre_attn_scalar"):
        export_gguf(model_dir(tmp_path / "g2", gemma2, bpe_tokenizer), tmp_path / "o.gguf")
    config = family_model("gemma").config
    config.tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="untied"):
        export_gguf(model_dir(tmp_path / "g", untied, bpe_tokenizer), tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path, bpe_tokenizer):
    """Llama 3's RoPE scaling: llama.cpp's per-frequency divisors, apart from the model's bytes."""
    config = tiny_config("llama", vocab_size=VOCAB)
    config.rope_parameters = {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    result = export_gguf(model_dir(tmp_path / "m", model, bpe_tokenizer), tmp_path / "o.gguf")
    freqs = next(t for t in gguf.GGUFReader(result.path).tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type == gguf.GGMLQuantizationType.F32 and freqs.n_elements == config.head_dim // 2
    factors = np.asarray(freqs.data)
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0)
    assert result.n_params == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# llama.cpp itself
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_llama_cpp_runs_an_export(exports):
    """llama.cpp loads the export, its logits follow mqc's, and it generates."""
    llama_cpp = pytest.importorskip("llama_cpp")
    compiled, art, result, _ = exports("llama")
    model, tokenizer = load_any(art)
    ids = tokenizer("The jury said the city")["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(result.path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    # llama.cpp rounds activations to 8 bits for its quantized dot products: close, not equal
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
    assert len(llm.tokenize(b"The jury")) > 0
    out = llm("The jury said", max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0


@pytest.mark.slow
def test_default_model_tokenizer_matches_its_source_gguf(tmp_path):
    """The embedded default model, exported in F16: the tokenizer fields equal those of the GGUF it ships as."""
    from mqc.models import _GGUF_FILE, _GGUF_PACKAGE

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None:
        pytest.skip("the default model package is not installed")
    result = export_gguf("default", tmp_path / "smol.gguf")
    assert result.tokenizer == "gpt2/smollm" and result.types == {"F16": 211, "F32": 61}
    source = gguf.GGUFReader(spec.submodule_search_locations[0] + "/" + _GGUF_FILE)
    mine = gguf.GGUFReader(result.path)
    keys_ = [k for k in source.fields if k.startswith("tokenizer.") and k != "tokenizer.ggml.add_space_prefix"]
    for key in keys_ + [k for k in source.fields if k.startswith("llama.")]:
        assert field(mine, key) == field(source, key), key
