"""orca-compile: compile a Hugging Face causal LM into Orca's selective-batching form and serve it
one iteration at a time."""
import logging as _logging

from orca_compile import env
from orca_compile import ops  # noqa: F401  (registers torch.ops.orca.*)
from orca_compile.capture import capture
from orca_compile.compiler import CompiledModel, ModelSpec, compile, lower
from orca_compile.config import EngineConfig
from orca_compile.optimize import optimize
from orca_compile.runtime.engine import Engine
from orca_compile.runtime.executor import Executor, register_executor
from orca_compile.runtime.policy import SchedulingPolicy, register_policy
from orca_compile.runtime.request import RequestOutput, SamplingParams

_logging.getLogger(__name__).addHandler(_logging.NullHandler())  # quiet unless the user configures logging
env.configure_logging()  # ORCA_LOG_LEVEL, when set

__all__ = ["capture", "compile", "lower", "CompiledModel", "ModelSpec", "optimize", "Engine", "EngineConfig",
           "SamplingParams", "RequestOutput", "Executor", "register_executor", "SchedulingPolicy", "register_policy"]
__version__ = "0.1.0"
