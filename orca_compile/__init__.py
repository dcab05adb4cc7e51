"""orca-compile: compile a Hugging Face causal LM into Orca's selective-batching form and serve it
one iteration at a time."""
from orca_compile import ops  # noqa: F401  (registers torch.ops.orca.*)
from orca_compile.capture import capture
from orca_compile.compiler import CompiledModel, compile
from orca_compile.config import EngineConfig
from orca_compile.optimize import optimize
from orca_compile.runtime.engine import Engine
from orca_compile.runtime.request import RequestOutput, SamplingParams

__all__ = ["capture", "compile", "CompiledModel", "optimize", "Engine", "EngineConfig", "SamplingParams",
           "RequestOutput"]
__version__ = "0.1.0"
