"""CLI: user errors are one line with exit code 2; compile/inspect/eval/generate on a tiny model."""

import json

import pytest
import torch

import mqc
from mqc.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A local HF model directory with a tokenizer, as a user would have."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a of and to in is was he it that for on with as his at by".split()
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>")
    path = tmp_path_factory.mktemp("m") / "tiny"
    mqc.tiny_model("llama").save_pretrained(path)
    tok.save_pretrained(path)
    text = tmp_path_factory.mktemp("t") / "text.txt"
    text.write_text(" ".join(words * 60))
    return path, text


def test_compile_inspect_eval_generate(tiny_dir, tmp_path, capsys, monkeypatch):
    from mqc.evaluation import reference

    monkeypatch.setattr(reference, "default_root", lambda: tmp_path / "reference-cache")  # not the user's cache
    model_dir, text = tiny_dir
    out = tmp_path / "art"
    args = [str(model_dir), "--bits", "4", "--group-size", "32", "--out", str(out), "--calib-file", str(text)]
    assert main(["compile", *args, "--eval", "--eval-file", str(text), "--context", "64"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in printed and "perplexity: reference" in printed
    assert {"manifest.json", "model.safetensors", "report.json", "report.md", "report.png"} <= {
        p.name for p in out.iterdir()
    }

    assert main(["compile", *args]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err

    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {r["bits"] for r in info["plan"]} == {4} and info["totals"]["layers"] == 14

    assert main(["eval", str(out), "--eval-file", str(text), "--context", "64", "--settings", "W,W+KV4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == str(model_dir.resolve())  # the source the artifact recorded
    assert [r["setting"] for r in result["rows"]] == ["W", "W+KV4"] and result["rows"][0]["ppl"] > 1
    assert 0 <= result["rows"][0]["kl"] and result["reference_row"]["ppl_by_context"] == {"2048": None, "4096": None}
    assert json.loads((out / "eval.json").read_text())["rows"] == result["rows"] and (out / "eval.png").is_file()

    assert main(["generate", str(out), "--prompt", "the a of", "--max-new-tokens", "5", "--json"]) == 0
    new_tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert len(new_tokens) == 5

    onnx_dir = tmp_path / "onnx"
    assert main(["export", str(out), "--onnx", str(onnx_dir), "--accuracy-level", "0"]) == 0
    assert json.loads((onnx_dir / "mqc_onnx.json").read_text())["accuracy_level"] == 0
    assert "(= planned for target torch)" in capsys.readouterr().out  # 4-bit: ONNX stores the plan's bytes
    assert main(["export", str(out), "--onnx", str(out), "--force"]) == 2  # an artifact is not an export
    assert "is not an mqc ONNX export; not replacing it even with --force" in capsys.readouterr().err
    assert (out / "manifest.json").is_file()
    assert main(["generate", "--onnx", str(onnx_dir), "--prompt", "the a of", "--max-new-tokens", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == new_tokens

    assert main(["bench", "decode", str(out), "--prompt", "the a of", "--new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens_per_s"] > 0


def test_mq_from_recipe_file(tiny_dir, tmp_path, capsys):
    model_dir, text = tiny_dir
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: mq\nbits: 4.5\ngroup_size: 32\noutlier_frac: 0.01\nsearch_generations: 3\ncalib: {n_samples: 4, seq_len: 32}\n")
    out = tmp_path / "mq"
    assert main(["compile", str(model_dir), "--recipe", str(recipe), "--calib-file", str(text), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"]["used_bits"] <= 4.5 and report["totals"]["outliers"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compile", "/nonexistent/model", "--out", "x"], "not found"),
        (["inspect", "/nonexistent/art"], "not found"),
        (["compile", "--method", "rtn", "--bits", "2.5", "--out", "x"], "rtn needs one width"),
        (["eval", "/tmp"], "no config.json"),
        (["eval", "default", "--settings", "W+A3"], "unknown setting"),
        (["eval", "default", "--text", "/nonexistent.txt"], "not found"),
        (["eval", "default", "--context", "1"], "context 1 is too small"),
        (["compile", "--method", "mq", "--size", "3.5 bits", "--out", "x"], "size '3.5 bits' not understood"),
        (["compile", "--method", "rtn", "--size", "3.5bpw", "--out", "x"], "needs --method mq"),
        (["compile", "--size", "3bpw,3bpw", "--out", "x"], "names a size twice"),
        (["compile", "--size", "4bpw", "--allowed-bits", "2,4", "--pin", "lm_head=8", "--out", "x"], "asks for at least 8"),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_binary_calibration_file_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mqc, "load_hf_model", lambda *a: pytest.fail("loaded the model before checking the file"))
    data = tmp_path / "weights.bin"
    data.write_bytes(b"\x00\x01\xff" * 100)
    assert main(["compile", "--size", "4bpw", "--calib-file", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err


def test_size_sweep_writes_one_artifact_per_size(tiny_dir, tmp_path, capsys):
    model_dir, text = tiny_dir
    out = tmp_path / "sweep"
    argv = ["compile", str(model_dir), "--size", "5bpw,3.5bpw", "--allowed-group-sizes", "32", "--search-generations", "2",
            "--calib-file", str(text), "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "whole model as target torch stores it:" in printed and "search: measured KL" in printed
    reports = {p.name: json.loads((p / "report.json").read_text()) for p in out.iterdir()}
    assert set(reports) == {"mq-5bpw", "mq-3.5bpw"}
    for name, report in reports.items():
        assert report["size"]["bpw"] <= float(name[3:-3]) and report["size"]["budget_bpw"] <= float(name[3:-3])
    # both sizes were planned from one analysis
    assert reports["mq-3.5bpw"]["analysis"] == reports["mq-5bpw"]["analysis"]
    assert "analysis.sweep" in reports["mq-5bpw"]["stages"] and reports["mq-5bpw"]["analysis"]["bytes"] > 0
    assert main(["compile", str(model_dir), "--size", "1bpw", "--out", str(tmp_path / "tiny")]) == 2
    assert "infeasible" in capsys.readouterr().err


def test_analyze_then_compile_from_the_analysis(tiny_dir, tmp_path, capsys):
    """`mqc analyze` once, then plans of any size from it, equal to a compile that analyses itself;
    a flag the analysis was not made with is refused by name."""
    model_dir, text = tiny_dir
    common = ["--allowed-group-sizes", "32", "--search-generations", "2", "--calib-file", str(text),
              "--calib-samples", "4", "--calib-seq-len", "32"]  # fmt: skip
    analysis = tmp_path / "analysis"
    assert main(["analyze", str(model_dir), "--out", str(analysis), *common]) == 0
    assert "analysis " in capsys.readouterr().out and (analysis / "analysis.json").is_file()
    argv = ["compile", "--analysis", str(analysis), "--size", "4bpw,5bpw", "--out", str(tmp_path / "planned")]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["compile", str(model_dir), "--size", "4bpw", *common, "--out", str(tmp_path / "direct")]) == 0
    planned = json.loads((tmp_path / "planned" / "mq-4bpw" / "report.json").read_text())
    direct = json.loads((tmp_path / "direct" / "report.json").read_text())
    assert [(r["qualname"], r["bits"], r["group_size"]) for r in planned["layers"]] == [
        (r["qualname"], r["bits"], r["group_size"]) for r in direct["layers"]
    ]
    capsys.readouterr()
    argv = ["compile", "--analysis", str(analysis), "--size", "4bpw", "--outliers", "0.01", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "other analysis settings" in err and "outlier_frac" in err and len(err.strip().splitlines()) == 1


def test_unknown_recipe_key(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("method: mq\nbitz: 3\n")
    assert main(["compile", "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "unknown key 'bitz'" in capsys.readouterr().err


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(tmp_path)
    assert main(["compile", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "model type 'bert' is not supported" in capsys.readouterr().err


def test_nan_weights_refused():
    model = mqc.tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(mqc.MqcError, match="NaN/Inf"):
        mqc.compile(model, mqc.Recipe(bits=4, group_size=32), progress=False)


def test_compile_and_inspect_low_rank_kv(tiny_dir, tmp_path, capsys):
    model_dir, text = tiny_dir
    out = tmp_path / "kv"
    kv = ["--kv-rank", "0.5", "--kv-method", "svd", "--kv-window", "8", "--kv-sinks", "2"]
    assert (
        main(
            [
                "compile",
                str(model_dir),
                "--bits",
                "4",
                "--group-size",
                "32",
                *kv,
                "--out",
                str(out),
                "--calib-file",
                str(text),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "low-rank KV cache: 2 layers" in printed
        and "2 sink tokens" in printed
        and "KV cache at 4,096 tokens" in printed
    )
    assert main(["inspect", str(out), "--kv-context", "100"]) == 0
    assert "KV cache at 100 tokens" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv"]["sinks"] == 2


def test_eval_of_an_artifact_without_a_recorded_source_asks_for_reference(tiny_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    model_dir, _ = tiny_dir
    compiled = mqc.compile(mqc.tiny_model("llama"), mqc.Recipe(bits=4, group_size=32), calib=torch.randint(0, 20, (2, 16)))
    compiled.tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = mqc.save(compiled, tmp_path / "art")
    assert json.loads((out / "manifest.json").read_text())["source"] is None  # built in memory
    assert main(["eval", str(out)]) == 2
    assert "does not record its source model; pass --reference" in capsys.readouterr().err
