"""PassManager: orders passes by their contracts, refuses cycles and unproduced requirements,
checks each pass kept its promise, and times every pass. Also the real analysis and lowering
pipelines: their contracts alone order them."""

import time

import pytest

import mqc
from mqc.errors import PassContractError
from mqc.passes import keys
from mqc.passes.base import Context, Pass, PassManager, PassResult


def make_pass(name: str, requires=(), produces=(), writes=None, removes=(), sleep: float = 0.0) -> Pass:
    """A pass that logs its run in ``ctx.results['log']``, writes ``writes`` (default: what it
    declares it produces) and deletes ``removes``."""

    def run(self, ctx):
        time.sleep(sleep)
        ctx.results.setdefault("log", []).append(name)
        for key in removes:
            del ctx.results[key]
        for key in produces if writes is None else writes:
            ctx.results[key] = name
        return PassResult(changed=False, summary=name)

    cls = type(name, (Pass,), {"name": name, "requires": tuple(requires), "produces": tuple(produces), "run": run})
    return cls()


def context(**results) -> Context:
    ctx = Context(progress=False)
    ctx.results.update(results)
    return ctx


def test_orders_by_requires_and_produces():
    passes = [
        make_pass("lower", requires=("plan", "masks"), produces=("done",)),
        make_pass("outliers", requires=("plan",), produces=("masks",)),
        make_pass("plan", requires=("units",), produces=("plan",)),
        make_pass("units", produces=("units",)),
    ]
    ctx = context()
    results = PassManager(passes).run(ctx)
    assert ctx["log"] == ["units", "plan", "outliers", "lower"]
    assert set(results) == {"units", "plan", "outliers", "lower"}
    assert all(isinstance(r, PassResult) for r in results.values())


def test_independent_passes_keep_their_given_order():
    passes = [make_pass("b", produces=("x",)), make_pass("a", produces=("y",)), make_pass("c", requires=("x", "y"))]
    assert [p.name for p in PassManager(passes).ordered()] == ["b", "a", "c"]


def test_cycle_is_an_error_naming_the_passes():
    passes = [
        make_pass("first", requires=("b",), produces=("a",)),
        make_pass("second", requires=("a",), produces=("b",)),
    ]
    with pytest.raises(PassContractError, match="cycle") as info:
        PassManager(passes).ordered()
    assert "first" in str(info.value) and "second" in str(info.value)


def test_missing_producer_is_named():
    passes = [make_pass("units", produces=("units",)), make_pass("plan", requires=("units", "mqc.sensitivity"))]
    with pytest.raises(PassContractError, match="pass plan requires 'mqc.sensitivity', which no pass"):
        PassManager(passes).run(context())


def test_requirement_held_by_the_context_needs_no_producer():
    ctx = context(units="seeded")
    PassManager([make_pass("plan", requires=("units",), produces=("plan",))]).run(ctx)
    assert ctx["plan"] == "plan"


def test_two_producers_of_one_key_are_an_error():
    passes = [make_pass("a", produces=("plan",)), make_pass("b", produces=("plan",))]
    with pytest.raises(PassContractError, match="'plan' is produced by both a and b"):
        PassManager(passes).ordered()


def test_pass_that_breaks_its_contract_is_caught():
    passes = [make_pass("liar", produces=("plan", "masks"), writes=("plan",)), make_pass("next", requires=("masks",))]
    ctx = context()
    with pytest.raises(PassContractError, match="pass liar declared 'masks' but did not produce it"):
        PassManager(passes).run(ctx)
    assert ctx["log"] == ["liar"]  # stopped before the pass that would have read the missing key


def test_requirement_removed_after_ordering_names_its_producer():
    """A key that vanishes between passes is reported against the pass that produced it."""
    passes = [
        make_pass("units", produces=("units",)),
        make_pass("wipe", requires=("units",), produces=("wiped",), removes=("units",)),
        make_pass("plan", requires=("units", "wiped")),
    ]
    with pytest.raises(PassContractError, match="pass plan needs 'units', which units should have produced"):
        PassManager(passes).run(context())


def test_timings_recorded():
    ctx = context()
    PassManager([make_pass("slow", produces=("x",), sleep=0.05), make_pass("fast", requires=("x",))]).run(ctx)
    assert set(ctx.timings) == {"slow", "fast"}
    assert ctx.timings["slow"] >= 0.05 and 0.0 <= ctx.timings["fast"] < ctx.timings["slow"]


RECIPES = [
    mqc.Recipe(bits=4, group_size=32),
    mqc.Recipe(bits=3, group_size=32, outlier_frac=0.01),
    mqc.Recipe(bits=4, group_size=32, quantizer="gptq"),
    mqc.Recipe(method="mq", bits=3.0, group_size=32),
    mqc.Recipe(method="mq", size="4bpw", sensitivity="fisher"),
    mqc.Recipe(method="mq", size="4bpw", kv_quant=mqc.KVQuantRecipe(budget_frac=0.5)),
    mqc.Recipe(method="mq", size="4bpw", kv=mqc.KVRecipe(rank=0.5, train_steps=1)),
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_analysis_pipelines_are_ordered_by_their_contracts(recipe):
    """Given in reverse, an analysis pipeline still runs every requirement's producer first."""
    from mqc.analysis import pipeline
    from mqc.analysis.settings import AnalysisSettings

    passes = pipeline(AnalysisSettings.of(recipe))
    order = PassManager(list(reversed(passes))).ordered({keys.GRAPH})
    available = {keys.GRAPH}
    for p in order:
        assert set(p.requires) <= available, p.name
        available |= set(p.produces)
    assert keys.UNITS in available
    if recipe.method == "mq":
        assert keys.COSTS in available


@pytest.mark.parametrize("recipe", RECIPES)
def test_lowering_pipelines_change_the_model_by_contract(recipe):
    """Every lowering pass that rewrites attention or records fusion requires the lowered weights:
    no order holds by list position."""
    from types import SimpleNamespace

    from mqc.analysis.settings import AnalysisSettings
    from mqc.lowering import pipeline

    plan = SimpleNamespace(recipe=recipe, kv=object() if recipe.kv_quant is not None else None)
    passes = pipeline(plan, SimpleNamespace(settings=AnalysisSettings.of(recipe)))
    order = PassManager(list(reversed(passes))).ordered({keys.PLAN, keys.CALIB, keys.ACT_STATS})
    assert order[0].produces == (keys.WEIGHTS_LOWERED,)
    for p in order[1:]:
        assert keys.WEIGHTS_LOWERED in p.requires, p.name
    kv_rewrite = [p for p in order if keys.KV_REWRITTEN in p.produces]
    fuse = next(p for p in order if keys.FUSION_GROUPS in p.produces)
    assert (keys.KV_REWRITTEN in fuse.requires) == bool(kv_rewrite)


def test_a_pass_runs_alone_on_a_seeded_context(zoo, tmp_path):
    """SelectUnits needs only the graph (and a directory for its product): usable from Python
    without the manager."""
    from mqc.analysis.context import AnalysisContext
    from mqc.analysis.settings import AnalysisSettings
    from mqc.analysis.store import AnalysisStore
    from mqc.analysis.units import SelectUnits
    from mqc.stream.stack import LayerStack

    model = zoo.pristine("llama")
    settings = AnalysisSettings.of(mqc.Recipe(bits=4, group_size=32))
    store = AnalysisStore.create(tmp_path / "analysis", {})
    ctx = AnalysisContext(stack=LayerStack(model), settings=settings, store=store, progress=False)
    ctx.results[keys.GRAPH] = zoo.graph("llama")
    SelectUnits().analyze(ctx)
    assert set(ctx[keys.UNITS]) == set(zoo.graph("llama").linears) - {"lm_head"}
    assert {u["qualname"] for u in store.manifest["units"]} == set(ctx[keys.UNITS])
