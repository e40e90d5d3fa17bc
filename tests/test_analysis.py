"""The saved analysis: streamed from shards it equals the analysis of the model in memory; a killed
run resumes from its last finished layer; another model, other settings, a damaged file or a full
disk are refused by name and lose nothing."""

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

import mqc
from mqc.analysis import Analysis, analyze
from mqc.analysis.fisher import OutputFisher
from mqc.analysis.sweep import LayerSweep
from mqc.errors import AnalysisError

CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
RECIPE = mqc.Recipe(method="mq", allowed_group_sizes=(32,), search_generations=2)


def flat(table: dict) -> dict:
    return {(unit, choice): value for unit, per in table.items() for choice, value in per.items()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, word_tokenizer):
    path = tmp_path_factory.mktemp("model")
    mqc.tiny_model("llama").save_pretrained(path, max_shard_size="100KB")
    word_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """An uninterrupted analysis from the shards."""
    return analyze(model_dir, RECIPE, tmp_path_factory.mktemp("a") / "analysis", calib=CALIB, progress=False)


def test_streamed_analysis_equals_the_in_memory_one(reference, tmp_path):
    in_memory = analyze(mqc.tiny_model("llama"), RECIPE, tmp_path / "analysis", calib=CALIB, progress=False)
    assert in_memory.fingerprint != reference.fingerprint  # a float32 model in memory, a directory of shards
    assert flat(in_memory.costs.costs) == pytest.approx(flat(reference.costs.costs))
    assert in_memory.costs.errors == reference.costs.errors
    for name in reference.units:
        a, b = reference.candidates.candidate(name, (3, 32)), in_memory.candidates.candidate(name, (3, 32))
        assert torch.equal(a.weight.qweight, b.weight.qweight) and torch.equal(a.weight.scales, b.weight.scales)


def test_stages_and_layers_are_timed_and_measured(reference):
    sweep = reference.stages["sweep"]
    assert [s["layer"] for s in sweep["steps"]] == [0, 1]
    assert all(s["seconds"] > 0 and s["peak_rss_bytes"] > 0 for s in sweep["steps"])
    assert set(reference.stages) >= {"select_units", "calibrate", "sweep", "output_fisher", "predicted_kl"}
    assert reference.size_bytes() > 0


@pytest.mark.parametrize("stage", [LayerSweep, OutputFisher])
def test_a_killed_run_resumes_at_its_last_finished_layer(model_dir, reference, tmp_path, monkeypatch, stage):
    """Killed in layer 1, the next run redoes layer 1 only, and ends as an uninterrupted run did."""
    done = []
    layer = stage._layer

    def dies_in_layer_1(self, ctx, index, *args):
        if index == 1 and "killed" not in done:
            done.append("killed")
            raise KeyboardInterrupt
        done.append(index)
        return layer(self, ctx, index, *args)

    monkeypatch.setattr(stage, "_layer", dies_in_layer_1)
    out = tmp_path / "analysis"
    with pytest.raises(KeyboardInterrupt):
        analyze(model_dir, RECIPE, out, calib=CALIB, progress=False)
    with pytest.raises(AnalysisError, match="unfinished"):
        Analysis.open(out)
    resumed = analyze(model_dir, RECIPE, out, calib=CALIB, progress=False)
    # the sweep runs layers 0, 1; the backward 1, 0: layer 1 is redone, no other
    assert done == ([0, "killed", 1] if stage is LayerSweep else ["killed", 1, 0])
    assert flat(resumed.costs.costs) == pytest.approx(flat(reference.costs.costs))


def test_another_model_or_other_settings_are_refused_by_name(reference, tmp_path):
    with pytest.raises(AnalysisError, match="analysis of another model"):
        analyze(mqc.tiny_model("llama", seed=3), RECIPE, reference.root, calib=CALIB, progress=False)
    other = mqc.Recipe(method="mq", allowed_group_sizes=(64,))
    with pytest.raises(AnalysisError, match=r"other analysis settings \(choices.group_sizes"):
        analyze(reference.source_spec, other, reference.root, calib=CALIB, progress=False)
    with pytest.raises(AnalysisError, match="outlier_frac"):
        mqc.plan(reference, mqc.Recipe(method="mq", allowed_group_sizes=(32,), outlier_frac=0.01))


def test_a_finished_analysis_is_reused_not_redone(model_dir, reference, monkeypatch):
    monkeypatch.setattr(LayerSweep, "analyze", lambda *a: pytest.fail("analysed again"))
    again = analyze(model_dir, RECIPE, reference.root, calib=CALIB, progress=False)
    assert again.costs.costs == reference.costs.costs


def test_damaged_files_are_refused_by_name(model_dir, tmp_path):
    import shutil

    out = tmp_path / "analysis"
    analysis = analyze(model_dir, RECIPE, tmp_path / "fresh", calib=CALIB, progress=False)
    shutil.copytree(analysis.root, out)
    victim = out / "layers" / "0001.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    victim.write_bytes(bytes(data))
    reopened = Analysis.open(out)
    with pytest.raises(AnalysisError, match=f"{victim}.*corrupted"):
        reopened.candidates.candidate("model.layers.1.mlp.down_proj", (3, 32))
    victim.write_bytes(bytes(data[:100]))
    with pytest.raises(AnalysisError, match=f"{victim}.*truncated"):
        Analysis.open(out)


def test_an_output_that_is_not_an_analysis_is_never_replaced(model_dir, tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    for force in (False, True):
        with pytest.raises(mqc.MqcError, match="mine"):
            analyze(model_dir, RECIPE, keep, calib=CALIB, progress=False, force=force)
    assert (keep / "notes.txt").read_text() == "precious"


def test_a_full_disk_is_one_line_and_the_analysis_resumes(model_dir, tmp_path):
    """Writes fail (file size limit, as a full disk makes them): the CLI says so in one line and
    exits 2; the same command later finishes the analysis."""
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the jury said it was a good day"] * 400))
    out = tmp_path / "analysis"
    argv = [sys.executable, "-m", "mqc.cli", "analyze", str(model_dir), "--out", str(out), "--allowed-group-sizes", "32",
            "--calib-file", str(text), "--calib-samples", "4", "--calib-seq-len", "32"]  # fmt: skip

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    failed = subprocess.run(argv, capture_output=True, text=True, preexec_fn=small_files, env=env, check=False)
    assert failed.returncode == 2, failed.stderr[-2000:]
    errors = [line for line in failed.stderr.replace("\r", "\n").splitlines() if "mqc: error:" in line]
    assert len(errors) == 1 and "cannot write" in errors[0] and "run the same command again" in errors[0]
    assert "Traceback" not in failed.stderr
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "analysis.json").read_text())["done"][-1] == "predicted_kl"
