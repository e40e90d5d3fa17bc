"""mqc: compile Hugging Face causal LMs into small, fast, mixed-precision models.

Python API::

    import mqc
    model, tok = mqc.load_hf_model()                       # embedded SmolLM2-135M, or a local dir
    compiled = mqc.compile(model, mqc.Recipe(method="mq", bits=3.0, outlier_frac=0.005), tokenizer=tok)
    mqc.save(compiled, "out/smol-mq3")
    model, tok = mqc.load("out/smol-mq3")
    result = mqc.evaluate("out/smol-mq3", suite="quick")   # against its source: ppl, KL, agreement, ...
"""

__version__ = "0.1.0"

from mqc import runtime as _runtime  # noqa: E402,F401  (registers the mqc:: custom ops)
from mqc.api import CompiledModel, compile, default_pipeline  # noqa: E402
from mqc.errors import MqcError  # noqa: E402
from mqc.evaluation import evaluate  # noqa: E402
from mqc.models import load_any, load_hf_model, tiny_model  # noqa: E402
from mqc.passes.base import CompileContext, Pass, PassManager, PassResult  # noqa: E402
from mqc.recipe import CalibRecipe, KVQuantRecipe, KVRecipe, Pin, Recipe  # noqa: E402
from mqc.runtime.artifact import load, save  # noqa: E402

__all__ = [
    "CalibRecipe",
    "CompileContext",
    "CompiledModel",
    "KVQuantRecipe",
    "KVRecipe",
    "MqcError",
    "Pass",
    "PassManager",
    "PassResult",
    "Pin",
    "Recipe",
    "compile",
    "default_pipeline",
    "evaluate",
    "load",
    "load_any",
    "load_hf_model",
    "save",
    "tiny_model",
]
