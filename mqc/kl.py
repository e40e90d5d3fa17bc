"""KL divergence of a model's next-token distribution to a reference's, a few tokens at a time.

The quantity mq's allocator optimises (its costs predict it; its search measures it) and the
evaluation suite (:mod:`mqc.evaluation`) reports next to perplexity: mean over scored tokens of
``KL(p_ref || p_model)``, both through :func:`token_kl`. Log-probabilities are made from hidden
states (the tail's outputs) by a :class:`~mqc.stream.stack.Head` a few tokens at a time, so that
no ``[tokens, vocab]`` tensor of a whole window exists (a 262k vocabulary makes 1 GB per 1k
tokens). A reference is computed once and kept in float16 (``log p`` to 2^-11 of its magnitude;
the KL it shifts is weighted by ``p``, below 1e-6 nats/token, tested).
"""

from __future__ import annotations

import torch

LOGIT_ELEMENTS = 1 << 24  # float32 logits computed at a time (64 MB)


def token_kl(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row of two ``[T, vocab]`` log-probability tensors (float32)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def token_chunk(vocab: int) -> int:
    return max(1, LOGIT_ELEMENTS // vocab)


@torch.no_grad()
def logprobs16(head, hidden: torch.Tensor, vocab: int) -> torch.Tensor:
    """float16 ``[T, vocab]`` log-probabilities of ``hidden [T, H]`` (computed in float32)."""
    step = token_chunk(vocab)
    return torch.cat(
        [torch.log_softmax(head(hidden[i : i + step]).float(), -1).half() for i in range(0, hidden.shape[0], step)]
    )


@torch.no_grad()
def kl_sum(head, hidden: torch.Tensor, reference: torch.Tensor) -> float:
    """``sum_t KL(p_ref,t || p_t)`` of ``hidden [T, H]`` against float16 ``reference [T, vocab]``."""
    step = token_chunk(reference.shape[-1])
    total = 0.0
    for i in range(0, hidden.shape[0], step):
        logq = torch.log_softmax(head(hidden[i : i + step]).float(), -1)
        logp = torch.log_softmax(reference[i : i + step].float(), -1)  # renormalised after float16 storage
        total += float(token_kl(logq, logp).sum())
    return total
