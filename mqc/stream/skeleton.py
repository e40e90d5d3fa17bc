"""A Hugging Face model without memory for its parameters, and the tensors put into it on demand.

The skeleton is the real model class built from its config with every parameter on the meta
device (buffers such as rotary tables stay real: they are computed at construction, not stored).
A module's parameters are materialized from a :class:`~mqc.stream.source.WeightSource` for as
long as it runs and released again afterwards, so a model of any depth is held one decoder layer
at a time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mqc.models import check_config_file, check_supported, resolve_model_dir
from mqc.stream.source import ModuleSource, ShardSource, WeightSource


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters take no memory (their tensors are assigned later)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_skeleton(config, attn_implementation: str | None = None) -> PreTrainedModel:
    """The model class of ``config`` with its parameters on meta; SDPA attention where the family
    has it (one graph op for capture to find), else eager. Built in float32, as
    ``from_pretrained(..., dtype=float32)`` builds (otherwise the config's checkpoint dtype is used,
    and buffers computed at construction, Gemma's embedding scale, would be rounded to it)."""
    kwargs = {"dtype": torch.float32}
    with parameters_on_meta():
        if attn_implementation is not None:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, **kwargs)
        else:
            try:
                model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", **kwargs)
            except ValueError:
                model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", **kwargs)
    model.tie_weights()  # construction skips tying meta parameters
    return model.float().eval()


def tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """state-dict name -> the other names of the same tensor (a tied embedding and head)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return {name: [other for other in names if other != name] for names in groups.values() for name in names}


def stored_names(model: torch.nn.Module) -> list[str]:
    """Every state-dict tensor a checkpoint holds: parameters and persistent buffers."""
    return list(model.state_dict(keep_vars=True))


def open_model(spec: str | os.PathLike | None) -> tuple[PreTrainedModel, WeightSource, object, Path]:
    """(skeleton, its shard source, tokenizer, directory) of a local model directory or the default
    model; the config, the shards and every tensor name are checked before anything is read."""
    path = resolve_model_dir(spec)
    check_config_file(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_supported(config)
    model = build_skeleton(config)
    model.config._name_or_path = str(path)
    source = ShardSource(path, stored_names(model), tied_names(model), model.base_model_prefix)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, source, tokenizer, path


def source_of(model: torch.nn.Module) -> WeightSource:
    """The source of a model already in memory: its own tensors."""
    return ModuleSource(model)


def is_meta(module: torch.nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters(recurse=False))


_META = "_mqc_meta_params"  # per module: the meta parameters a materialize() replaced


def materialize(
    module: torch.nn.Module,
    prefix: str,
    source: WeightSource,
    overrides: dict[str, torch.Tensor] | None = None,
    recurse: bool = True,
    device: torch.device | str = "cpu",
) -> None:
    """Give ``module``'s meta parameters (``recurse``: its submodules' too) their float32 tensors
    (``prefix`` is its qualname in the model; ``overrides`` maps a parameter's full name to the
    tensor to use instead), on ``device``. The meta parameters are kept, so that :func:`release`
    restores them and tied parameters stay one object."""
    overrides = overrides or {}
    made: dict[int, torch.nn.Parameter] = {}  # a tied parameter becomes one tensor again
    for owner_name, owner in module.named_modules(remove_duplicate=False) if recurse else [("", module)]:
        for leaf, param in list(owner._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                full = ".".join(p for p in (prefix, owner_name, leaf) if p)
                tensor = overrides[full] if full in overrides else source.tensor(full)
                made[id(param)] = torch.nn.Parameter(tensor.reshape(param.shape).to(device), requires_grad=False)
            owner.__dict__.setdefault(_META, {})[leaf] = param
            owner._parameters[leaf] = made[id(param)]


def release(module: torch.nn.Module) -> None:
    """Put back the meta parameters :func:`materialize` replaced (the tensors are freed with their
    last reference)."""
    for owner in module.modules():
        for leaf, param in owner.__dict__.pop(_META, {}).items():
            owner._parameters[leaf] = param
