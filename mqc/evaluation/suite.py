"""The evaluation suite: one compressed model against its full-precision reference, on every axis.

Per setting (:mod:`mqc.evaluation.settings`) a row holds:

* ``ppl``, ``kl``, ``top1_agreement`` on the main text (Brown eval split or ``eval_file``),
  ``context``-token windows (:func:`mqc.data.eval_windows`: BOS per window where the tokenizer
  adds one): mean ``KL(p_ref || p_model)`` per scored token (:func:`mqc.kl.token_kl`, the KL the
  allocator optimises) and the fraction of tokens whose argmax matches the reference's.
* ``greedy_agreement``: greedy continuations of ``prompts`` fixed prompts (``prompt_tokens``
  tokens each, evenly spaced through the main text, decoded as one batch); per prompt the
  fraction of ``new_tokens`` generated before the first token that differs from the reference's
  continuation.
* ``ppl_by_genre``: each of the Brown corpus's 15 categories (its eval-split documents).
* ``ppl_by_context``: the first ``context_tokens`` tokens of the main text scored in windows of
  each of ``contexts`` (2k/4k/8k), the same tokens at each length; a context beyond the model's
  positions or the text's length is reported as None.
* ``ppl_by_text``: any extra text files the user names.

The reference runs the same protocol once (cached, :mod:`mqc.evaluation.reference`); its row is
``reference`` in the result.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mqc import data
from mqc.errors import MqcError
from mqc.evaluation import reference as refcache
from mqc.evaluation.settings import SETTINGS, Setting, applied, smoothing_scales
from mqc.kl import token_chunk, token_kl
from mqc.stream.source import module_fingerprint
from mqc.stream.stack import Head, LayerStack


@dataclass(frozen=True)
class Suite:
    """How much of each axis to measure; ``quick`` fits 5 minutes on 2 CPU cores for the default model."""

    name: str
    tokens: int  # main-text tokens scored for ppl / KL / top-1
    genre_tokens: int  # per Brown category
    contexts: tuple[int, ...]  # long-context window lengths
    context_tokens: int  # main-text tokens scored at each of ``contexts``
    prompts: int
    new_tokens: int
    settings: tuple[str, ...]
    context: int = data.DEFAULT_CONTEXT
    prompt_tokens: int = 16
    genres: bool = True


SUITES = {
    "quick": Suite("quick", 4096, 512, (2048, 4096), 4096, 8, 32, ("W",)),
    "full": Suite("full", 16384, 2048, (2048, 4096, 8192), 16384, 32, 64, SETTINGS),
}


@dataclass
class Texts:
    """Token ids of everything a suite scores, fixed for a tokenizer."""

    main: torch.Tensor  # at most ``suite.tokens``: a shorter text is scored whole
    by_genre: dict[str, torch.Tensor]
    by_text: dict[str, torch.Tensor]
    long: torch.Tensor
    prompts: list[torch.Tensor]
    bos: int | None

    @classmethod
    def of(
        cls, tokenizer, suite: Suite, eval_file: str | Path | None = None, texts: Sequence[str | Path] = ()
    ) -> Texts:
        stream = data.token_stream(tokenizer, "eval", eval_file)
        bos = data.bos_id(tokenizer)
        prefix = [bos] if bos is not None else []
        step = max(stream.numel() // max(suite.prompts, 1), 1)
        prompts = [
            torch.tensor(prefix + stream[i * step : i * step + suite.prompt_tokens].tolist())
            for i in range(suite.prompts)
        ]

        def ids(text: str) -> torch.Tensor:
            return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

        by_genre = {}
        if suite.genres and eval_file is None:
            for genre, docs in data.brown_genres("eval").items():
                by_genre[genre] = ids("\n\n".join(text for _, text in docs))[: suite.genre_tokens]
        by_text = {Path(t).name: ids(data.read_text_file(t))[: suite.tokens] for t in texts}
        return cls(stream[: suite.tokens], by_genre, by_text, stream[: suite.context_tokens], prompts, bos)

    def protocol(self, suite: Suite) -> dict[str, Any]:
        def digest(t: torch.Tensor) -> str:
            return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]

        fields = {k: v for k, v in dataclasses.asdict(suite).items() if k not in ("name", "settings")}
        return {
            **fields,
            "bos": self.bos,
            "main": digest(self.main),
            "genres": {g: digest(t) for g, t in self.by_genre.items()},
            "texts": {n: digest(t) for n, t in self.by_text.items()},
            "long": digest(self.long),
            "prompts": [digest(p) for p in self.prompts],
        }


@dataclass
class EvalResult:
    model: str
    reference: str
    suite: str
    reference_row: dict[str, Any]
    rows: list[dict[str, Any]]
    protocol: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _ppl(model, ids: torch.Tensor, context: int, desc: str, kwargs: Callable, bos: int | None, progress: bool) -> float:
    """:func:`mqc.data.perplexity` of a whole (already cut) token stream under a setting."""
    return data.perplexity(
        model, ids, context, max_tokens=None, progress=progress, bos=bos, desc=desc, forward_kwargs=kwargs
    )


@torch.no_grad()
def _agreement(
    model, texts: Texts, suite: Suite, kwargs: Callable, ref: refcache.Reference | None, ref_head, writer, progress: bool
) -> dict[str, float]:
    """ppl, KL and top-1 agreement on the main text; the reference run fills ``writer`` with its
    hidden states instead. A few rows of logits at a time, for the model and the reference."""
    windows = list(data.eval_windows(texts.main, suite.context, bos=texts.bos))
    nll = kl = top1 = 0.0
    row = 0
    for window, first in tqdm(windows, desc="ppl / KL / top-1", disable=not progress, leave=False):
        targets = window[first + 1 :].cpu()
        if writer is not None:
            hidden = _hidden(model, window, first, kwargs())
            for i, logq in _chunked(ref_head, hidden, model.config.get_text_config().vocab_size):
                nll -= float(logq.gather(1, targets[i : i + logq.shape[0], None]).sum())
                writer.add(hidden[i : i + logq.shape[0]], logq.argmax(-1))
            row += hidden.shape[0]
            continue
        for i, logits in data.window_scorer(model)(window, first, kwargs()):
            logq = torch.log_softmax(logits.float(), -1).cpu()
            logp, ref_top1 = ref.rows(row, row + logq.shape[0], ref_head)
            nll -= float(logq.gather(1, targets[i : i + logq.shape[0], None]).sum())
            kl += float(token_kl(logq, logp).sum())
            top1 += float((logq.argmax(-1) == ref_top1).sum())
            row += logq.shape[0]
    return {"ppl": math.exp(nll / row), "kl": kl / row, "top1_agreement": top1 / row, "tokens": row}


def _hidden(model, window: torch.Tensor, first: int, kwargs: dict) -> torch.Tensor:
    """The reference's hidden states entering the head at the scored positions ``[t, H]``."""
    stack = LayerStack(model)
    device = next(model.parameters()).device
    with stack.whole(hidden_out=True) as m:
        return m(input_ids=window[None].to(device), **kwargs).logits[0, first:-1].float().cpu()


def _chunked(head, hidden: torch.Tensor, vocab: int):
    step = token_chunk(vocab)
    for i in range(0, hidden.shape[0], step):
        yield i, torch.log_softmax(head(hidden[i : i + step]).float(), -1)


def scored_rows(texts: Texts, suite: Suite) -> int:
    return sum(w.numel() - 1 - f for w, f in data.eval_windows(texts.main, suite.context, bos=texts.bos))


@torch.no_grad()
def _greedy(model, prompts: list[torch.Tensor], new_tokens: int, kwargs: Callable, progress: bool) -> list[list[int]]:
    """Greedy continuations of the prompts, decoded as one batch (they have one length, so no padding)."""
    if not prompts:
        return []
    batch = torch.stack(prompts).to(_device(model))
    step = model(input_ids=batch, use_cache=True, **kwargs())
    tokens = []
    for i in tqdm(range(new_tokens), desc="greedy continuations", disable=not progress, leave=False):
        token = step.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token.cpu())
        if i + 1 < new_tokens:
            step = model(input_ids=token, past_key_values=step.past_key_values, use_cache=True)
    return torch.cat(tokens, 1).tolist()


def _prefix_agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    fractions = []
    for a, b in zip(ours, theirs, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        fractions.append(same / len(a))
    return sum(fractions) / len(fractions) if fractions else float("nan")


def _run(
    model, texts: Texts, suite: Suite, setting: Setting, ref, ref_head, writer, smooth, progress: bool
) -> tuple[dict[str, Any], list[list[int]]]:
    start = time.perf_counter()
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    with applied(model, setting, smooth) as kwargs:
        row: dict[str, Any] = {
            "setting": setting.name,
            **_agreement(model, texts, suite, kwargs, ref, ref_head, writer, progress),
        }
        greedy = _greedy(model, texts.prompts, suite.new_tokens, kwargs, progress)
        row["greedy_agreement"] = None if ref is None else _prefix_agreement(greedy, ref.meta["greedy"])
        row["ppl_by_genre"] = {
            g: _ppl(model, ids, suite.context, f"genre: {g}", kwargs, texts.bos, progress)
            for g, ids in texts.by_genre.items()
        }
        row["ppl_by_context"] = {  # None: the model has fewer positions, or the text fewer tokens
            str(c): None
            if (positions and c > positions) or texts.long.numel() < c
            else _ppl(model, texts.long, c, f"context {c}", kwargs, texts.bos, progress)
            for c in suite.contexts
        }
        row["ppl_by_text"] = {
            n: _ppl(model, ids, suite.context, n, kwargs, texts.bos, progress) for n, ids in texts.by_text.items()
        }
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row, greedy


def reference_for(
    model: torch.nn.Module, texts: Texts, suite: Suite, root: Path | None = None, progress: bool = True
) -> tuple[refcache.Reference, Head]:
    """The cached reference of ``model`` under this protocol (computed now on a miss), and its head
    (what recomputes its log-probabilities from the stored hidden states)."""
    root = root or refcache.default_root()
    protocol = texts.protocol(suite)
    key = refcache.protocol_key(module_fingerprint(model), protocol)
    head = LayerStack(model).head()
    found = refcache.load(root, key)
    if found is not None:
        return found, head
    width = model.get_output_embeddings().in_features  # what enters the head (OPT projects it)
    writer = refcache.Writer(root, key, scored_rows(texts, suite), width)
    try:
        row, greedy = _run(model, texts, suite, Setting("W"), None, head, writer, None, progress)
        return writer.commit({"protocol": protocol, "row": row, "greedy": greedy}), head
    except BaseException:
        writer.abort()
        raise


def run_suite(
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    reference_model: torch.nn.Module | Callable[[], torch.nn.Module],
    tokenizer,
    suite: Suite,
    *,
    settings: Sequence[str] | None = None,
    eval_file: str | Path | None = None,
    texts: Sequence[str | Path] = (),
    smooth: float | None = None,
    names: tuple[str, str] = ("model", "reference"),
    cache: Path | None = None,
    progress: bool = True,
    vocab: int | None = None,
) -> EvalResult:
    """Evaluate ``model`` against ``reference_model`` (see the module docstring for the rows).

    Either may be given as a function that loads it: the reference is then loaded first and
    released (but for its head) before the model is loaded, so the two are never in memory
    together. ``vocab``: the model's vocabulary, checked before anything runs (default: read
    from the model)."""
    start = time.perf_counter()
    parsed = [Setting.parse(s) for s in (settings or suite.settings)]
    bundle = Texts.of(tokenizer, suite, eval_file, texts)
    ref_model = reference_model if isinstance(reference_model, torch.nn.Module) else reference_model()
    if vocab is None:
        model = model if isinstance(model, torch.nn.Module) else model()
        vocab = model.config.get_text_config().vocab_size
    if vocab != ref_model.config.get_text_config().vocab_size:
        raise MqcError(
            f"{names[0]} and its reference {names[1]} have different vocabularies; pass the right --reference"
        )
    ref, ref_head = reference_for(ref_model, bundle, suite, cache, progress)
    del ref_model
    gc.collect()
    model = model if isinstance(model, torch.nn.Module) else model()
    scales = None
    if smooth is not None and any(s.act_bits for s in parsed):
        calib = data.calibration_batches(tokenizer, 8, suite.context)
        scales = smoothing_scales(model, calib, smooth)
    rows = []
    for setting in parsed:
        row, _ = _run(model, bundle, suite, setting, ref, ref_head, None, scales if setting.act_bits else None, progress)
        rows.append({"name": names[0], **row, "smooth": smooth if setting.act_bits else None})
    reference_row = {"name": names[1], **ref.meta["row"]}
    return EvalResult(
        names[0], names[1], suite.name, reference_row, rows, ref.meta["protocol"], round(time.perf_counter() - start, 1)
    )
