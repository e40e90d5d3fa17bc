"""A causal LM as a stack: embedding, decoder layers, tail, head, each run on its own.

This is how a model of any depth is analysed on one machine (GPTQModel and llm-compressor do the
same): the inputs of every decoder layer are caught once per batch by running the real model
forward with the layers replaced by catchers (so masks, rotary embeddings and every family's own
pre-layer code are Hugging Face's), then each layer is materialized, run over every batch, and
released. The tail (final norm, OPT's ``project_out``) is small and stays; the head is applied to
a few tokens at a time, so a 262k-entry vocabulary never makes a ``[tokens, vocab]`` tensor of a
whole window. The embedding is read as rows: only the rows a batch looks up are loaded.

:meth:`LayerStack.whole` is the other way to run the same model: one ordinary ``model(...)``
call whose layers load themselves from the source just before they run and free themselves after
(for code that needs Hugging Face's whole forward, such as a compressed KV cache).

A stack over a model in memory (:class:`~mqc.stream.source.ModuleSource`) runs the same code
with nothing to load; its parameters can still be overridden for one layer at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mqc.stream.skeleton import materialize, release
from mqc.stream.source import ModuleSource, WeightSource

TAIL_MODULES = ("norm", "ln_f", "final_layer_norm", "project_out")  # decoder children after the layers, in order
ROW_BLOCK = 8192  # embedding rows read at a time
LOGIT_ELEMENTS = 1 << 24  # float32 logits computed at a time (64 MB): tokens per chunk = this / vocab

CALIB_BATCH = 4  # sequences per forward of one decoder layer (calibration, backward passes, plan scoring)

Rows = Callable[[torch.Tensor], torch.Tensor]  # sorted unique token ids -> float32 [n, hidden]


def batches(ids: torch.Tensor, size: int = CALIB_BATCH) -> list[torch.Tensor]:
    """``ids [n, L]`` in micro-batches of ``size`` sequences (the one calibration loop's unit)."""
    return [ids[start : start + size] for start in range(0, ids.shape[0], size)]


class StopForward(Exception):
    """Raised by the last catcher: the forward after the last layer's inputs is wasted work."""


@dataclass
class LayerCall:
    """What a decoder layer is called with, besides its hidden states (masks, rotary tables)."""

    args: tuple
    kwargs: dict[str, Any]


class _Catcher(torch.nn.Module):
    def __init__(self, index: int, calls: dict[int, tuple], last: bool):
        super().__init__()
        self.index, self.calls, self.last = index, calls, last

    def forward(self, *args, **kwargs):
        self.calls[self.index] = (args, kwargs)
        if self.last:
            raise StopForward
        return args[0]


def embed_scale(module: torch.nn.Module) -> float | None:
    """The factor a scaled embedding (Gemma 3) multiplies its rows by."""
    scale = getattr(module, "embed_scale", None)
    return None if scale is None else float(scale)


class RowEmbedding(torch.nn.Module):
    """An embedding that looks its rows up through ``rows`` (from the shards, or a candidate's
    codes) instead of holding the table; ``track``: the looked-up rows become leaves that record
    their gradient (an embedding unit's output Fisher)."""

    def __init__(self, original: torch.nn.Module, rows: Rows, track: bool = False):
        super().__init__()
        self.rows, self.track, self.scale = rows, track, embed_scale(original)
        self.looked_up: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, rows leaf)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        table = self.rows(unique)
        if self.track:
            table = table.detach().requires_grad_(True)
            self.looked_up.append((unique, table))
        out = table[inverse]
        return out if self.scale is None else out * self.scale


def source_rows(source: WeightSource, name: str) -> Rows:
    """Rows of ``name`` for sorted ids, read a block of :data:`ROW_BLOCK` rows at a time."""

    def rows(ids: torch.Tensor) -> torch.Tensor:
        parts, host = [], ids.cpu()
        for block in torch.unique(host // ROW_BLOCK).tolist():
            inside = host[(host // ROW_BLOCK) == block]
            lo, hi = int(inside[0]), int(inside[-1]) + 1
            parts.append(source.rows(name, lo, hi)[inside - lo])
        return torch.cat(parts).to(ids.device)

    return rows


@dataclass
class Head:
    """hidden ``[..., H]`` -> logits: ``project`` (the output matrix), then the family's softcap."""

    project: Callable[[torch.Tensor], torch.Tensor]
    softcap: float | None = None

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if not self.softcap else torch.tanh(logits / self.softcap) * self.softcap

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap(self.project(hidden))


class LayerStack:
    """``model`` (a skeleton on meta, or a model in memory) run piece by piece from ``source``, on
    ``device`` (a skeleton's layers are loaded there one at a time; its buffers, rotary tables
    say, move there at once)."""

    def __init__(
        self, model: torch.nn.Module, source: WeightSource | None = None, device: torch.device | str | None = None
    ):
        self.model = model
        self.source = source if source is not None else ModuleSource(model)
        resident = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        self.device = torch.device(device) if device is not None else resident
        if not self.source.resident:
            for module in model.modules():
                for key, buffer in module._buffers.items():
                    if buffer is not None and not buffer.is_meta:
                        module._buffers[key] = buffer.to(self.device)
        self.config = model.config
        self.decoder = model.get_decoder()
        self.layers_attr = "layers" if hasattr(self.decoder, "layers") else "h"
        self.layers: torch.nn.ModuleList = getattr(self.decoder, self.layers_attr)
        names = {id(m): n for n, m in model.named_modules()}
        self.prefix = names[id(self.layers)]
        self.embedding = model.get_input_embeddings()
        self.embedding_name = names[id(self.embedding)]
        head = model.get_output_embeddings()
        self.head_name = names[id(head)]
        self.tail_modules = [
            getattr(self.decoder, n) for n in TAIL_MODULES if getattr(self.decoder, n, None) is not None
        ]
        self.softcap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if not self.source.resident:  # norms, position tables, OPT's projections: small, kept for the stack's life
            big = {id(self.layers), id(self.embedding), id(head)}
            for name, module in model.named_modules():
                if id(module) not in big and not any(id(m) in big for m in _ancestors(model, name)):
                    materialize(module, name, self.source, recurse=False, device=self.device)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def layer_params(self, index: int) -> dict[str, torch.nn.Parameter]:
        """Full name -> parameter of decoder layer ``index`` (meta while not materialized)."""
        prefix = self.layer_name(index)
        return {f"{prefix}.{n}": p for n, p in self.layers[index].named_parameters()}

    # ---------------------------------------------------------------------------------------
    # inputs of the layers
    # ---------------------------------------------------------------------------------------
    def embedding_rows(self) -> Rows:
        return source_rows(self.source, f"{self.embedding_name}.weight")

    def catch(
        self, ids: torch.Tensor, rows: Rows | None = None, track: bool = False, **forward
    ) -> tuple[torch.Tensor, list[LayerCall], RowEmbedding | None]:
        """(hidden states entering layer 0, every layer's call, the row embedding used) for
        ``ids [B, L]``; ``rows`` replaces the embedding's table, ``track`` records its gradient."""
        calls: dict[int, tuple] = {}
        catchers = torch.nn.ModuleList([_Catcher(i, calls, i == self.n_layers - 1) for i in range(self.n_layers)])
        swap = rows is not None or track or not self.source.resident
        embedding = RowEmbedding(self.embedding, rows or self.embedding_rows(), track) if swap else None
        setattr(self.decoder, self.layers_attr, catchers)
        if embedding is not None:
            self.model.set_submodule(self.embedding_name, embedding)
        try:
            with torch.set_grad_enabled(track):
                self.model(input_ids=ids.to(self.device), use_cache=False, **forward)
        except StopForward:
            pass
        finally:
            setattr(self.decoder, self.layers_attr, self.layers)
            if embedding is not None:
                self.model.set_submodule(self.embedding_name, self.embedding)
        hidden = calls[0][0][0]
        return hidden, [LayerCall(calls[i][0][1:], calls[i][1]) for i in range(self.n_layers)], embedding

    # ---------------------------------------------------------------------------------------
    # layers
    # ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def layer(self, index: int, overrides: dict[str, torch.Tensor] | None = None) -> Iterator[torch.nn.Module]:
        """Decoder layer ``index`` with its float32 parameters (``overrides``: full parameter name ->
        tensor to use instead) for the block's duration."""
        module = self.layers[index]
        prefix = self.layer_name(index)
        overrides = overrides or {}
        saved: dict[tuple[torch.nn.Module, str], torch.nn.Parameter] = {}
        for owner_name, owner in module.named_modules():
            for leaf, param in list(owner._parameters.items()):
                full = ".".join(p for p in (prefix, owner_name, leaf) if p)
                if param is not None and full in overrides:
                    saved[(owner, leaf)] = param
                    owner._parameters[leaf] = torch.nn.Parameter(
                        overrides[full].reshape(param.shape), requires_grad=False
                    )
        materialize(module, prefix, self.source)
        try:
            yield module
        finally:
            for (owner, leaf), param in saved.items():
                owner._parameters[leaf] = param
            if not self.source.resident:
                release(module)

    @staticmethod
    def run(layer: torch.nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
        out = layer(hidden, *call.args, **call.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def tail(self, hidden: torch.Tensor) -> torch.Tensor:
        for module in self.tail_modules:
            hidden = module(hidden)
        return hidden

    # ---------------------------------------------------------------------------------------
    # head
    # ---------------------------------------------------------------------------------------
    def head(self, weight: torch.Tensor | None = None) -> Head:
        """The head: the model's head module (in memory), its float weight read from the source, or
        ``weight`` (a plan's head) instead."""
        module = self.model.get_output_embeddings()
        if weight is None and self.source.resident:
            return Head(module, self.softcap)
        bias = None
        if getattr(module, "bias", None) is not None:
            bias = self.source.tensor(f"{self.head_name}.bias").to(self.device)
        w = (weight if weight is not None else self.source.tensor(f"{self.head_name}.weight")).to(self.device)
        return Head(lambda h: torch.nn.functional.linear(h, w, bias), self.softcap)

    def vocab_size(self) -> int:
        return self.config.get_text_config().vocab_size

    def token_chunk(self) -> int:
        return max(1, LOGIT_ELEMENTS // self.vocab_size())

    def logprob_chunks(self, hidden: torch.Tensor, head: Head) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, float32 log-probabilities ``[t, vocab]``) of ``hidden [T, H]`` (tail applied
        already), a few tokens at a time."""
        step = self.token_chunk()
        for start in range(0, hidden.shape[0], step):
            yield start, torch.log_softmax(head(hidden[start : start + step]).float(), -1)

    # ---------------------------------------------------------------------------------------
    # the whole model, streamed
    # ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def whole(self, hidden_out: bool = False) -> Iterator[torch.nn.Module]:
        """The model for ordinary ``model(...)`` calls: each decoder layer loads its weights as it
        starts and frees them when it returns; the embedding reads rows; the head is held while the
        block runs. A model in memory is given as it is. ``hidden_out``: the forward's ``logits``
        are the tail's outputs instead (apply :meth:`head` a few tokens at a time)."""
        if hidden_out:
            with self._hidden_out(), self.whole() as model:
                yield model
            return
        if self.source.resident:
            yield self.model
            return
        handles = []
        for index, layer in enumerate(self.layers):
            prefix = self.layer_name(index)
            load = lambda m, a, p=prefix: materialize(m, p, self.source, device=self.device)  # noqa: E731
            handles.append(layer.register_forward_pre_hook(load))
            handles.append(layer.register_forward_hook(lambda m, a, o: release(m)))
        head = self.model.get_output_embeddings()
        embedding = RowEmbedding(self.embedding, self.embedding_rows())
        self.model.set_submodule(self.embedding_name, embedding)
        materialize(head, self.head_name, self.source, device=self.device)
        try:
            yield self.model
        finally:
            for handle in handles:
                handle.remove()
            for layer in self.layers:
                release(layer)
            release(head)
            self.model.set_submodule(self.embedding_name, self.embedding)

    @contextlib.contextmanager
    def _hidden_out(self) -> Iterator[None]:
        text = self.config.get_text_config()
        cap = getattr(text, "final_logit_softcapping", None)
        head = self.model.get_output_embeddings()
        self.model.set_submodule(self.head_name, torch.nn.Identity())
        if cap:
            text.final_logit_softcapping = None
        try:
            yield
        finally:
            self.model.set_submodule(self.head_name, head)
            if cap:
                text.final_logit_softcapping = cap


def _ancestors(model: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    parts = name.split(".") if name else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]
