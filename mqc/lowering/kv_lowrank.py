"""Low-rank K/V projections for the bi-branch KV cache (CSKV): factor, pick ranks, train, swap.

Per layer, each of ``W_k`` and ``W_v`` is factored ``W ~= B A`` (``A [r, in]``, ``B [out, r]``):

* ``svd``: truncated SVD of ``W``; the error is the weight's relative Frobenius error.
* ``asvd`` (activation-aware): SVD of ``W D`` with ``D = diag(sqrt(E[x_j^2]))`` from the
  calibration statistics, ``A = V_r^T D^-1``, ``B = U_r S_r``. ``||(W - B A) D||_F^2`` is then the
  expected output error ``E||(W - B A) x||^2`` for input channels taken as uncorrelated, so the
  SVD minimises the error the cache actually makes; RMS rather than ASVD's ``mean|x|^0.5`` makes
  that identity exact.

With activation statistics the factors are rebalanced so that every feature channel
``c_j = (A x)_j`` has unit RMS, estimated as ``sum_i A_ji^2 E[x_i^2]`` (``A <- S^-1 A``,
``B <- B S``; the product is unchanged): a per-token quantization group of ``c`` then holds
channels of one scale, and its error, spread evenly over them, is weighted by the singular
values in ``B`` (``sum s_j^2`` rather than ``r * s_1^2`` with the spread left in ``c``).

Ranks: ``round(kv.rank * width)`` for every projection, or, with ``kv.budget_frac``, per
projection from a grid of ranks (:func:`rank_grid`), minimising the sum over projections of the
relative error each one's factorisation causes in its attention layer's output on calibration
sequences (:func:`attention_output_errors`) under
``sum(feature bytes per token) <= budget_frac * sum(fp16 K/V bytes per token)``, solved exactly by
the same multiple-choice-knapsack MILP as the bit allocation (the window, a constant, is not
part of the budget).

Reconstruction training (``kv.train_steps > 0``): for each projection, ``train_steps`` rounds of
block-coordinate descent on ``A`` and ``B`` minimising the relative error of ``B q(A x)`` against
``W x`` on calibration inputs of that layer, where ``q`` is the compressed branch's quantization
when ``kv.quant_bits`` is set (see :func:`train_factors`). Errors are measured on held-out
calibration tokens, and the best round there is kept (the initial factors if none beats them).

The original ``W`` stays as the exact window branch; :class:`mqc.runtime.kv.LowRankKVProj`
replaces each projection and :func:`mqc.runtime.kv.install` makes the model use the cache. The
pass runs on the lowered model (its weights quantized), whose forwards it needs whole: the
attention errors and the training inputs are those of the model as it will run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mqc import quant
from mqc.errors import InfeasibleBudgetError, PassContractError, RecipeError, UnsupportedModelError
from mqc.lowering.context import LoweringContext
from mqc.passes import keys
from mqc.passes.base import Pass, PassResult
from mqc.planning.knapsack import solve_mckp
from mqc.recipe import KVRecipe
from mqc.runtime.kv import FULL_BYTES, KVSettings, LowRankKVProj, check_supported, install
from mqc.stream.stack import CALIB_BATCH

RANK_GRID = 16  # ranks tried per projection under a budget: width * i / 16
BUDGET_SAMPLES = 2  # calibration sequences whose attention outputs price the ranks under a budget
TRAIN_TOKENS = 4096  # calibration tokens kept per layer for training (plus a held-out eighth)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the small dense linear algebra of this pass on one thread. Its matrices are at most a
    few hundred wide, so threads buy nothing; on a loaded machine, OpenMP barriers made a
    192x576 SVD take 1.7 s on 2 threads against 12 ms on one (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def least_squares(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``B [out, r]`` minimising ``||features @ B^T - target||``, by the normal equations in float64
    (features are unit-RMS after balancing, so well conditioned; a 1e-10 ridge guards dead ones)."""
    f = features.double()
    gram = f.T @ f
    gram += torch.eye(gram.shape[0], dtype=gram.dtype) * (1e-10 * gram.diagonal().mean() + 1e-30)
    return torch.linalg.solve(gram, f.T @ target.double()).T.float()


@dataclass(frozen=True)
class ProjectionPlan:
    """What was decided for one K or V projection, and how well it reconstructs."""

    qualname: str
    out_features: int
    in_features: int
    rank: int
    spectral_error: float  # relative error of the truncated SVD (activation-weighted for asvd)
    heldout_error_init: float | None = None  # relative output error on held-out calibration inputs
    heldout_error_trained: float | None = None


@dataclass(frozen=True)
class KVLayerPlan:
    layer: int
    k: ProjectionPlan
    v: ProjectionPlan


class Factorization:
    """SVD of a (column-scaled) weight, from which any rank's factors and error follow."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None):
        self.weight = weight.float()
        self.scale = scale
        scaled = self.weight if scale is None else self.weight * scale
        self.u, self.s, self.vh = torch.linalg.svd(scaled.double(), full_matrices=False)
        energy = self.s.pow(2)
        self._tail = (energy.flip(0).cumsum(0).flip(0) / energy.sum().clamp_min(1e-300)).tolist() + [0.0]

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    def error(self, rank: int) -> float:
        """Relative squared error of the rank-``rank`` truncation in the factorised metric."""
        return self._tail[rank]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [rank, in], B [out, rank]) with ``B A`` the best rank-``rank`` approximation."""
        down = self.vh[:rank].float()
        if self.scale is not None:
            down = down / self.scale
        return down, (self.u[:, :rank] * self.s[:rank]).float()


def _scale_of(energy: torch.Tensor) -> torch.Tensor:
    """``sqrt(E[x^2])`` per input channel, floored so that dead channels do not divide by zero."""
    return energy.float().clamp_min(energy.float().max() * 1e-10 + 1e-30).sqrt()


def balance(down: torch.Tensor, up: torch.Tensor, energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale so each feature channel has unit RMS under inputs of energy ``E[x^2]``."""
    rms = (down.pow(2) @ energy.float()).sqrt().clamp_min(1e-12)
    return down / rms[:, None], up * rms[None, :]


def uniform_ranks(widths: list[int], fraction: float) -> list[int]:
    return [min(w, max(1, round(w * fraction))) for w in widths]


def rank_grid(width: int, settings: KVSettings) -> list[int]:
    """Candidate ranks: sixteenths of the width, plus whole quantization groups when quantized
    (a rank inside a group costs as much as the full group)."""
    grid = {max(1, round(width * i / RANK_GRID)) for i in range(1, RANK_GRID + 1)}
    if settings.quant_bits is not None:
        grid |= set(range(settings.group_size, width + 1, settings.group_size))
    return sorted(grid)


def budget_ranks(
    grids: list[list[int]], costs: list[list[float]], settings: KVSettings, budget_frac: float
) -> list[int]:
    """Exact per-projection ranks (one from each grid) minimising the total cost under
    ``sum(feature bytes per token) <= budget_frac * sum(fp16 K/V bytes per token)``."""
    sizes = [[settings.feature_bytes(r) for r in grid] for grid in grids]
    full = sum(grid[-1] * FULL_BYTES for grid in grids)
    budget = int(budget_frac * full)
    smallest = sum(s[0] for s in sizes)
    if smallest > budget:
        raise InfeasibleBudgetError(
            f"kv budget {budget_frac:.3f} of the fp16 KV bytes is infeasible: the smallest ranks need "
            f"{smallest / full:.3f}; raise --kv-budget or lower --kv-quant"
        )
    choices, _ = solve_mckp(costs, sizes, budget)
    return [grid[c] for grid, c in zip(grids, choices)]


def capture_attention_inputs(
    model: torch.nn.Module, attentions: list[str], calib: torch.Tensor
) -> dict[str, dict[str, object]]:
    """The keyword arguments each attention module is called with, on ``calib`` (no cache)."""
    captured: dict[str, dict[str, object]] = {}

    def hook(name):
        def record(module, args, kwargs):
            captured[name] = {**kwargs, "hidden_states": args[0] if args else kwargs["hidden_states"]}

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in attentions]
    try:
        with torch.no_grad():
            model(input_ids=calib.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def attention_output_errors(
    model: torch.nn.Module, layers: list[tuple[int, str, str]], factorizations, grids, calib: torch.Tensor
) -> list[list[float]]:
    """For every projection and candidate rank, the relative error of its attention module's output
    (through ``o_proj``) when that projection alone is replaced by its rank-r factorisation.

    The allocator's cost: K and V errors measured on one scale. Relative K/V reconstruction
    errors are not: the keys' spectra decay fast, so an allocator fed those errors starved the
    keys and lost to uniform ranks at equal memory (measured on SmolLM2).
    """
    names = [n for _, k, v in layers for n in (k, v)]
    attentions = [n.rsplit(".", 1)[0] for n in names]
    inputs = capture_attention_inputs(model, sorted(set(attentions)), calib)
    costs = []
    for name, attention_name, fact, grid in zip(names, attentions, factorizations, grids):
        attention, role = model.get_submodule(attention_name), name.rsplit(".", 1)[1]
        original = getattr(attention, role)
        exact = attention(**inputs[attention_name])[0]
        errors = []
        for rank in grid:
            down, up = fact.factors(rank)
            approx = torch.nn.Linear(original.in_features, original.out_features, bias=original.bias is not None)
            approx.weight.data, approx.bias = up @ down, original.bias
            setattr(attention, role, approx)
            error = (attention(**inputs[attention_name])[0] - exact).pow(2).sum() / exact.pow(2).sum()
            errors.append(error.item())
        setattr(attention, role, original)
        costs.append(errors)
    return costs


# --------------------------------------------------------------------------------------------
# reconstruction training
# --------------------------------------------------------------------------------------------
def collect_inputs(
    model: torch.nn.Module, names: list[str], calib: torch.Tensor, tokens: int, seed: int = 0, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Up to ``tokens`` random input rows ``[n, in]`` of each named module over the calibration set."""
    total = calib.numel()
    keep = min(1.0, tokens / total)
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            pick = torch.rand(x.shape[0], generator=gen) < keep
            rows[name].append(x[pick.to(x.device)].float().cpu())

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in tqdm(
                range(0, calib.shape[0], CALIB_BATCH), desc="kv inputs", disable=not progress, leave=False
            ):
                model(input_ids=calib[start : start + CALIB_BATCH].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def relative_error(
    down: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, inputs: torch.Tensor, bits: int | None, group_size: int
) -> torch.Tensor:
    """``||B q(A x) - W x||^2 / ||W x||^2`` over ``inputs``; ``q`` straight-through quantization."""
    features = inputs @ down.T
    if bits is not None:
        features = features + (quant.fake_quantize(features.detach(), bits, group_size) - features).detach()
    target = inputs @ weight.T
    return (features @ up.T - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def train_factors(
    down: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    inputs: torch.Tensor,
    steps: int,
    settings: KVSettings,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A, B, held-out error before, after) after ``steps`` rounds of block-coordinate descent.

    The loss is quadratic in each factor, so each round solves exactly instead of taking a
    gradient step: ``A = (B^T B)^-1 B^T W`` (the minimiser for any full-rank input covariance),
    rebalanced to unit-RMS feature channels, then ``B`` = least squares of ``W x`` on the
    features ``q(A x)`` *as the cache stores them* (quantized when the branch is). On SmolLM2's
    K/V projections Adam (500 steps, lr 1e-3 to 3e-3) stopped well short of the closed-form
    optimum; these rounds reach it in about ten. The round with the lowest error on the held-out
    eighth of ``inputs`` is returned.
    """
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(inputs.shape[0], generator=gen)
    held = max(1, inputs.shape[0] // 8)
    test, train = inputs[order[:held]], inputs[order[held:]]
    bits, group = settings.quant_bits, settings.group_size
    target, energy = train @ weight.T, train.pow(2).mean(0)
    before = relative_error(down, up, weight, test, bits, group).item()
    best = (down, up, before)
    for _ in range(steps):
        down, up = balance(torch.linalg.lstsq(up, weight).solution, up, energy)
        features = train @ down.T
        if bits is not None:
            features = quant.fake_quantize(features, bits, group)
        up = least_squares(features, target)
        error = relative_error(down, up, weight, test, bits, group).item()
        if error < best[2]:
            best = (down, up, error)
    return best[0], best[1], before, best[2]


# --------------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------------
def required_results(kv: KVRecipe, inputs_given: bool = False) -> tuple[str, ...]:
    """Context results the pass reads for ``kv`` beyond the graph: activation statistics for
    activation-aware SVD, calibration ids to train factors (unless their inputs are given) and
    to price ranks under a budget."""
    calib = (kv.train_steps and not inputs_given) or kv.budget_frac is not None
    return ((keys.ACT_STATS,) if kv.method == "asvd" else ()) + ((keys.CALIB,) if calib else ())


class KVLowRank(Pass):
    """Rewrite every layer's K/V projections into exact + low-rank branches and install the cache.

    Runs after the weights are lowered (it requires ``WEIGHTS_LOWERED``), so that training reads
    the activations of the model as it will run.
    """

    name = "kv_lowrank"
    requires = (keys.WEIGHTS_LOWERED,)
    produces = (keys.KV_PLAN, keys.KV_REWRITTEN)

    def __init__(self, kv: KVRecipe | None = None, inputs: dict[str, torch.Tensor] | None = None):
        """``kv``: the recipe's KV settings, to declare the calibration results it needs; None
        reads the plan's recipe at run time (and then checks those results itself).
        ``inputs``: calibration inputs ``[n, in]`` of each layer's K projection (as from
        :func:`collect_inputs`), to reuse across compilations of one model instead of collecting
        them from ``ctx[CALIB]`` each time."""
        self.kv, self.inputs = kv, inputs
        if kv is not None:
            self.requires = type(self).requires + required_results(kv, inputs is not None)

    def _recipe(self, ctx: LoweringContext) -> KVRecipe:
        kv = self.kv or ctx[keys.PLAN].recipe.kv
        if kv is None:
            raise RecipeError("the kv_lowrank pass needs KV settings: set recipe.kv (e.g. --kv-rank 0.5)")
        for key in required_results(kv, self.inputs is not None):
            if key not in ctx:
                raise PassContractError(f"pass {self.name} needs {key!r} (kv method {kv.method!r}, training or budget)")
        return kv

    def _projections(self, ctx: LoweringContext) -> list[tuple[int, str, str]]:
        """(layer, k qualname, v qualname) per attention, checked to be plain separate linears."""
        model, sites = ctx.model, ctx.analysis.kv_sites
        if not sites:
            raise UnsupportedModelError(f"{model.config.model_type}: no K/V projections found in the graph")
        for site in sites:
            if site.k_proj == site.v_proj:
                raise UnsupportedModelError(
                    f"{model.config.model_type}: keys and values come from one fused projection ({site.k_proj}); "
                    "low-rank KV needs separate k/v projections"
                )
            for name in (site.k_proj, site.v_proj):
                module = model.get_submodule(name)
                if type(module) is not torch.nn.Linear:
                    raise UnsupportedModelError(
                        f"{name} is a {type(module).__name__}, not nn.Linear; keep K/V projections out of weight "
                        "quantization (skip them) when compressing the KV cache"
                    )
        return [(s.layer, s.k_proj, s.v_proj) for s in sites]

    def run(self, ctx: LoweringContext) -> PassResult:
        kv = self._recipe(ctx)
        model = ctx.model
        check_supported(model)
        layers = self._projections(ctx)
        names = [n for _, k, v in layers for n in (k, v)]
        settings = KVSettings(kv.window, kv.quant_bits, sinks=kv.sink_tokens)
        stats = ctx.results.get(keys.ACT_STATS, {})
        weights = {n: model.get_submodule(n).weight.detach().float() for n in names}
        with single_threaded():
            factorizations = [
                Factorization(weights[n], _scale_of(stats[n]) if kv.method == "asvd" else None) for n in names
            ]
        if kv.budget_frac is None:
            ranks = uniform_ranks([f.width for f in factorizations], kv.rank)
        else:
            grids = [rank_grid(f.width, settings) for f in factorizations]
            with single_threaded():
                calib = ctx[keys.CALIB][:BUDGET_SAMPLES]
                costs = attention_output_errors(model, layers, factorizations, grids, calib)
            ranks = budget_ranks(grids, costs, settings, kv.budget_frac)
        factors = {}
        for name, fact, rank in zip(names, factorizations, ranks):
            down, up = fact.factors(rank)
            factors[name] = balance(down, up, stats[name]) if name in stats else (down, up)
        heldout = self._train(ctx, kv, settings, layers, weights, factors) if kv.train_steps else {}
        plans = {}
        for name, fact, rank in zip(names, factorizations, ranks):
            module = model.get_submodule(name)
            model.set_submodule(name, LowRankKVProj.from_factors(module.weight, module.bias, *factors[name]))
            plans[name] = ProjectionPlan(
                name, fact.width, module.in_features, rank, fact.error(rank), *heldout.get(name, (None, None))
            )
        install(model, settings)
        ctx.results[keys.KV_PLAN] = {layer: KVLayerPlan(layer, plans[k], plans[v]) for layer, k, v in layers}
        ctx.results[keys.KV_REWRITTEN] = names
        mean_rank = sum(p.rank / p.out_features for p in plans.values()) / len(plans)
        return PassResult(True, f"{len(layers)} attention layers low-rank (mean rank {mean_rank:.3f} of width)")

    def _train(
        self, ctx, kv: KVRecipe, settings: KVSettings, layers, weights, factors
    ) -> dict[str, tuple[float, float]]:
        """Train every projection's factors in place in ``factors``; (held-out error before, after).
        K and V of a layer read the same input, collected once."""
        inputs = self.inputs
        if inputs is None:
            k_names = [k for _, k, _ in layers]
            inputs = collect_inputs(ctx.model, k_names, ctx[keys.CALIB], TRAIN_TOKENS * 9 // 8, progress=ctx.progress)
        errors = {}
        with single_threaded():
            for index, (_, k, v) in enumerate(tqdm(layers, desc="kv training", disable=not ctx.progress, leave=False)):
                for offset, name in enumerate((k, v)):
                    down, up, before, after = train_factors(
                        *factors[name], weights[name], inputs[k], kv.train_steps, settings, seed=2 * index + offset
                    )
                    factors[name] = (down, up)
                    errors[name] = (before, after)
        return errors
