"""The key layout shared by the compressed caches and their attention mask.

A compressed cache answers a forward with runs of keys: the exact sinks, one run per compressed
stage (tokens a query sees decoded), and the exact recent tokens. For a single decoded token
the runs are disjoint and in sequence order; for a multi-token forward (prefill, perplexity)
they overlap, and the mask lets every query see exactly the copy of each token that it would
have seen decoding token by token. One forward thus measures compressed decoding.

A token enters compressed stage ``k`` once it is ``lags[k]`` tokens behind the newest token,
counted in whole ``group``\\ s of tokens after the sinks (a cache that quantizes keys per channel
moves them ``group`` at a time; the low-rank cache moves them one at a time, ``group = 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

from mqc.runtime.kv.settings import settings_of


def boundary(length: int | torch.Tensor, start: int, lag: int, group: int):
    """First token not yet in a stage of lag ``lag`` once the sequence has ``length`` tokens: the
    stage holds ``[start, boundary)`` (and every older stage's tokens before that)."""
    if isinstance(length, torch.Tensor):
        return start + group * torch.div((length - start - lag).clamp_min(0), group, rounding_mode="floor")
    return start + group * (max(0, length - start - lag) // group)


@dataclass(frozen=True)
class Sections:
    """Keys returned for ``new`` queries after ``past`` cached tokens (``total = past + new``).

    Runs of keys, in this order:

    * head ``[0, head)``: exact, the sinks of every row (the first ``sinks`` tokens after a row's
      left padding, so ``head = sinks + longest left padding``);
    * one run per compressed stage, newest stage first: tokens past the sinks that some query
      sees in that stage (see :func:`boundary`);
    * exact ``[exact_start, total)``: tokens that some query sees exact.

    Runs overlap only for ``new > 1`` or with left padding; otherwise the keys are simply
    ``[0, total)`` in order. Which copy of a token a query sees is the mask's business.
    """

    total: int
    head: int
    start: int
    runs: tuple[tuple[int, int], ...]
    exact_start: int

    @classmethod
    def of(cls, past: int, new: int, sinks: int, head: int, lags: tuple[int, ...], group: int = 1) -> Sections:
        total = past + new
        start = min(sinks, total)
        runs = []
        for k, lag in enumerate(lags):
            older = boundary(past + 1, start, lags[k + 1], group) if k + 1 < len(lags) else start
            runs.append((older, max(older, boundary(total, start, lag, group))))
        exact_start = max(start, boundary(past + 1, start, lags[0], group))
        return cls(total, min(head, total), start, tuple(runs), exact_start)

    @property
    def rebuilt_start(self) -> int:
        return self.runs[0][0]

    @property
    def rebuilt_end(self) -> int:
        return self.runs[0][1]

    @property
    def rebuilt(self) -> int:
        """Keys of all compressed runs."""
        return sum(end - begin for begin, end in self.runs)

    @property
    def length(self) -> int:
        return self.head + self.rebuilt + self.total - self.exact_start

    def sequence_index(self, kv: torch.Tensor) -> torch.Tensor:
        """Sequence position of each returned key index."""
        index = self.exact_start + kv - self.head - self.rebuilt
        offset = self.head + self.rebuilt
        for begin, end in reversed(self.runs):
            offset -= end - begin
            index = torch.where(kv < offset + end - begin, begin + kv - offset, index)
        return torch.where(kv < self.head, kv, index)

    def run_index(self, kv: torch.Tensor) -> torch.Tensor:
        """Which run each key index is in: -1 head, k the k-th compressed stage, len(runs) exact."""
        run = torch.full_like(kv, len(self.runs))
        offset = self.head + self.rebuilt
        for k in reversed(range(len(self.runs))):
            offset -= self.runs[k][1] - self.runs[k][0]
            run = torch.where(kv < offset + self.runs[k][1] - self.runs[k][0], k, run)
        return torch.where(kv < self.head, -1, run)


def leading_padding(padding: torch.Tensor | None) -> int:
    """Longest run of padding at the start of a row of a 2-D mask (True = token)."""
    if padding is None:
        return 0
    return int((~padding.bool()).long().cumprod(-1).sum(-1).max())


def compressed_kv_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    config=None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask for the cache's key runs (see :class:`Sections`); plain ``sdpa_mask`` otherwise.

    A key copy is visible to query ``t`` of row ``b`` when the model's own mask function (causal,
    sliding window) and the padding allow its token ``s``, and: a head copy, if ``s`` is one of the
    row's sinks; a stage-``k`` copy, if ``s`` is not a sink and is in stage ``k`` at ``t``; an
    exact copy, if ``s`` is not a sink and is not yet compressed at ``t``.
    """
    total = int(q_offset) + q_length
    if kv_offset or kv_length == total:  # keys are [0, total) in order: an ordinary cache or none
        return sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, **kwargs,
        )  # fmt: skip
    settings = settings_of(config)
    padding = prepare_padding_mask(attention_mask, total, 0)
    head = settings.sinks + leading_padding(padding)
    lags, group = settings.lags, settings.group
    sections = Sections.of(int(q_offset), q_length, settings.sinks, head, lags, group)
    if kv_length != sections.length:
        raise RuntimeError(f"compressed KV mask: {kv_length} keys, the cache layout has {sections.length}")
    positions = None if padding is None else padding.long().cumsum(-1) - 1  # of each row's tokens
    start, n_runs = sections.start, len(sections.runs)

    def runs(batch_idx, head_idx, q_idx, kv_idx):
        s = sections.sequence_index(kv_idx)
        run = sections.run_index(kv_idx)
        sink = (s if positions is None else positions[batch_idx, s]) < settings.sinks
        stage_of = torch.full_like(s, n_runs)  # the stage token s is in for this query (n_runs: exact)
        for k in range(n_runs):  # older stages have smaller boundaries: each overwrites a prefix
            stage_of = torch.where(s < boundary(q_idx + 1, start, lags[k], group), k, stage_of)
        copy = torch.where(run < 0, sink, ~sink & (run == stage_of))
        allowed = mask_function(batch_idx, head_idx, q_idx, s) & copy
        return allowed if padding is None else allowed & padding[batch_idx, s]

    kwargs.update(allow_is_causal_skip=False, use_vmap=False)
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=0,
        mask_function=runs, attention_mask=None, **kwargs,
    )  # fmt: skip
