"""mqc: compile Hugging Face causal LMs into small, fast, mixed-precision models.

Python API::

    import mqc
    analysis = mqc.analyze("path/to/model", mqc.Recipe(method="mq"), out="analysis/")  # streamed, resumable
    plan = mqc.plan(analysis, size="3.5bpw")                   # seconds; one analysis, any size
    compiled = mqc.lower("path/to/model", plan)                # the only step that builds a model
    mqc.save(compiled, "out/mq-3.5")
    model, tok = mqc.load("out/mq-3.5")
    mqc.compile(model_or_dir, mqc.Recipe(method="mq", size="3.5bpw"))   # the three in one call
    result = mqc.evaluate("out/mq-3.5", suite="quick")         # against its source: ppl, KL, agreement
"""

from mqc.version import __version__  # noqa: E402,F401

from mqc import runtime as _runtime  # noqa: E402,F401  (registers the mqc:: custom ops)
from mqc.analysis import Analysis, analyze  # noqa: E402
from mqc.api import compile  # noqa: E402
from mqc.errors import MqcError  # noqa: E402
from mqc.evaluation import evaluate  # noqa: E402
from mqc.lowering import CompiledModel, lower  # noqa: E402
from mqc.models import load_hf_model, tiny_model  # noqa: E402
from mqc.passes.base import Context, Pass, PassManager, PassResult  # noqa: E402
from mqc.planning import Plan, plan  # noqa: E402
from mqc.recipe import CalibRecipe, KVQuantRecipe, KVRecipe, Pin, Recipe  # noqa: E402
from mqc.runtime.artifact import load, load_any, save  # noqa: E402

__all__ = [
    "Analysis",
    "CalibRecipe",
    "CompiledModel",
    "Context",
    "KVQuantRecipe",
    "KVRecipe",
    "MqcError",
    "Pass",
    "PassManager",
    "PassResult",
    "Pin",
    "Plan",
    "Recipe",
    "analyze",
    "compile",
    "evaluate",
    "load",
    "load_any",
    "load_hf_model",
    "lower",
    "plan",
    "save",
    "tiny_model",
]
