"""Low-rank K/V projections (CSKV): the exact projection plus the features the cache keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mqc.runtime.modules import register_runtime_module


@register_runtime_module
class LowRankKVProj(torch.nn.Module):
    """A K or V projection that also emits the low-rank features of its input.

    ``weight``/``bias`` are the original projection (the window branch); ``down`` is ``A [rank,
    in]`` and ``up`` is ``B [out, rank]``: an old token's K/V is rebuilt as ``up @ c + bias`` from
    ``c = down @ x``. All four are fp16-rounded, which is how the artifact stores them.
    """

    kind: ClassVar[str] = "kv_lowrank"

    def __init__(self, out_features: int, in_features: int, rank: int, has_bias: bool = False):
        super().__init__()
        self.out_features, self.in_features, self.rank = out_features, in_features, rank
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if has_bias else None
        self.down = torch.nn.Parameter(torch.zeros(rank, in_features), requires_grad=False)
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank), requires_grad=False)
        self.features: torch.Tensor | None = None  # c of the latest forward, taken by the cache

    @classmethod
    def from_factors(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor, up: torch.Tensor
    ) -> LowRankKVProj:
        module = cls(weight.shape[0], weight.shape[1], down.shape[0], bias is not None)
        with torch.no_grad():
            for name, value in (("weight", weight), ("bias", bias), ("down", down), ("up", up)):
                if value is not None:
                    getattr(module, name).copy_(value.detach().to(torch.float16).float())
        return module

    def config(self) -> dict[str, Any]:
        return {
            "out_features": self.out_features,
            "in_features": self.in_features,
            "rank": self.rank,
            "has_bias": self.bias is not None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], model: torch.nn.Module) -> LowRankKVProj:
        return cls(**config)  # the loaded model gets its cache hook from its config (mqc.runtime.artifact)

    def rebuild(self, features: torch.Tensor) -> torch.Tensor:
        """``B c + b``: the approximate projection output of tokens known only by their features."""
        return F.linear(
            features, self.up.to(features.dtype), None if self.bias is None else self.bias.to(features.dtype)
        )

    def take_features(self) -> torch.Tensor:
        features, self.features = self.features, None
        if features is None:
            raise RuntimeError("LowRankKVProj.features is empty: the cache must update right after the projection runs")
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features = F.linear(x, self.down.to(x.dtype))
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


@dataclass(frozen=True)
class CompressedAttention:
    """One compressed attention layer of a model: its module and projections."""

    layer: int
    attention: torch.nn.Module
    k_proj: LowRankKVProj
    v_proj: LowRankKVProj


def lowrank_sites(model: torch.nn.Module) -> list[CompressedAttention]:
    """The compressed attention layers of ``model``, in layer order."""
    sites = [
        CompressedAttention(module.layer_idx, module, module.k_proj, module.v_proj)
        for module in model.modules()
        if isinstance(getattr(module, "k_proj", None), LowRankKVProj)
    ]
    return sorted(sites, key=lambda s: s.layer)
