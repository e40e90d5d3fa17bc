"""KL divergence of a model's next-token distribution to a reference model's, on fixed windows.

The quantity mq's allocator optimises (its costs predict it; its search measures it) and the
evaluation suite (:mod:`mqc.evaluation`) reports next to perplexity: mean over scored tokens of
``KL(p_ref || p_model)``, both through :func:`token_kl`.
Reference log-probabilities are computed once, which saves one forward of the reference per
evaluation; the search keeps them in float32 in memory (computing them in fp16 is off by up to
1e-2 at -20), the suite caches float32 results rounded to float16 on disk, an error weighted by
the probability in the KL (:mod:`mqc.evaluation.reference`).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def _logprobs(
    model: torch.nn.Module, batch: torch.Tensor, position_ids: torch.Tensor | None = None, use_cache: bool = False
) -> torch.Tensor:
    """``position_ids`` ``[L]``: the positions of ``batch``'s tokens (default ``0..L-1``);
    ``use_cache``: run through the model's cache (what a compressed KV cache is measured by)."""
    device = next(model.parameters()).device
    positions = {} if position_ids is None else {"position_ids": position_ids.to(device)[None]}
    logits = model(input_ids=batch.to(device), use_cache=use_cache, **positions).logits
    return torch.log_softmax(logits.float(), -1).cpu()


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, ids: torch.Tensor, **forward) -> torch.Tensor:
    """``[n, L, vocab]`` float32 log-probabilities of ``model`` on ``ids [n, L]``; ``forward``:
    ``position_ids`` / ``use_cache`` as :func:`_logprobs` takes them."""
    return torch.cat([_logprobs(model, ids[i : i + 1], **forward) for i in range(ids.shape[0])])


def token_kl(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row of two ``[T, vocab]`` log-probability tensors (float32)."""
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def mean_kl(model: torch.nn.Module, ids: torch.Tensor, reference: torch.Tensor, **forward) -> float:
    """Mean per-token ``KL(reference || model)`` on ``ids [n, L]`` (reference from :func:`reference_logprobs`).

    One sequence at a time: a vocabulary-wide float32 row per token is the largest thing in memory
    (100 MB per 512 tokens of a 49k vocabulary), and each temporary of the KL is one more.
    """
    total = 0.0
    for i in range(ids.shape[0]):
        total += float(token_kl(_logprobs(model, ids[i : i + 1], **forward)[0], reference[i]).sum())
    return total / (ids.shape[0] * ids.shape[1])
