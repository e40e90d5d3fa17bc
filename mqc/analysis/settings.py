"""What an analysis depends on, apart from the model: the fields of a recipe that change its
product. Everything else a recipe says (the size, pins, search, KV widths and budgets, the uniform
width) is decided later, by the plan, from the same analysis.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mqc.planning.choices import ChoiceSet
from mqc.recipe import CalibRecipe, KVQuantRecipe, Recipe

FISHER_SEQUENCES = 16  # calibration sequences the output gradients are measured on (KL costs)


@dataclass(frozen=True)
class AnalysisSettings:
    costs: str | None  # "predicted_kl", "first_order", "fisher"; None: a uniform plan needs none
    quantizer: str  # "gptq" | "rtn": how candidates are made (and uniform GPTQ lowers)
    choices: ChoiceSet | None  # the candidates' formats; None: no candidates (uniform, LLM-MQ)
    embeddings: bool  # the embedding and head are units
    skip: tuple[str, ...]  # fnmatch patterns of layers kept in float
    lowrank_kv: bool  # K/V projections stay float for a low-rank cache
    calib: CalibRecipe | None  # None: nothing is calibrated
    stats: bool  # a calibration sweep measures per-channel input energy (and candidates for KL costs)
    kv_costs: KVQuantRecipe | None  # measured PM-KVQ costs for these grids and context

    @classmethod
    def of(cls, recipe: Recipe) -> AnalysisSettings:
        mq = recipe.method == "mq"
        costs = None
        if mq:
            costs = "predicted_kl" if recipe.sensitivity == "kl" else recipe.sensitivity
        kv = recipe.kv_quant
        kv_costs = (
            None if kv is None or not kv.measured else dataclasses.replace(kv, bits=None, budget_frac=None, batch=1)
        )
        lowrank = recipe.kv
        lowrank_stats = lowrank is not None and lowrank.method == "asvd"  # activation-aware SVD reads input energy
        lowrank_calib = lowrank is not None and (lowrank.train_steps > 0 or lowrank.budget_frac is not None)
        stats = mq or recipe.outlier_frac > 0 or lowrank_stats
        calibrated = stats or recipe.uses_gptq or kv_costs is not None or lowrank_calib
        return cls(
            costs=costs,
            quantizer="gptq" if recipe.uses_gptq else "rtn",
            choices=_canonical(ChoiceSet.of(recipe)) if mq else None,
            embeddings=recipe.embeddings_included,
            skip=tuple(recipe.skip),
            lowrank_kv=recipe.kv is not None,
            calib=recipe.calib if calibrated else None,
            stats=stats,
            kv_costs=kv_costs,
        )

    @property
    def candidates(self) -> bool:
        """Whether every unit is quantized at every choice as it will be deployed (KL costs)."""
        return self.costs == "predicted_kl"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisSettings:
        choices = data.get("choices")
        return cls(
            costs=data["costs"],
            quantizer=data["quantizer"],
            choices=None
            if choices is None
            else ChoiceSet(**{k: tuple(v) if isinstance(v, list) else v for k, v in choices.items()}),
            embeddings=data["embeddings"],
            skip=tuple(data["skip"]),
            lowrank_kv=data["lowrank_kv"],
            calib=None if data["calib"] is None else CalibRecipe(**data["calib"]),
            stats=data["stats"],
            kv_costs=None if data["kv_costs"] is None else KVQuantRecipe(**data["kv_costs"]),
        )

    def difference(self, other: AnalysisSettings) -> str | None:
        """The first setting in which ``other`` differs from these, named as ``field: a vs b``."""
        mine, theirs = _flat(self.to_dict()), _flat(other.to_dict())
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                return f"{key}: {theirs.get(key)!r} here, {mine.get(key)!r} in the analysis"
        return None

    def serves(self, needed: AnalysisSettings) -> str | None:
        """Why an analysis made with these settings cannot stand in for one made with ``needed``
        (None when it can): it must be the same analysis, except that one that measured KV costs or
        activation statistics also serves a recipe that needs neither."""
        relaxed = dataclasses.replace(
            self,
            kv_costs=None if needed.kv_costs is None else self.kv_costs,
            stats=needed.stats and self.stats,
        )
        return relaxed.difference(needed)


def _canonical(choices: ChoiceSet) -> ChoiceSet:
    """The CUDA kernels store every format as the torch runtime does: one analysis serves both."""
    return dataclasses.replace(choices, target="torch") if choices.target == "cuda" else choices


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out
