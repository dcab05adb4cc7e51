"""orca-compile: compile a Hugging Face causal LM into Orca's selective-batching form."""
from orca_compile import ops  # noqa: F401  (registers torch.ops.orca.*)
from orca_compile.capture import capture
from orca_compile.compiler import CompiledModel, compile

__all__ = ["capture", "compile", "CompiledModel"]
__version__ = "0.1.0"
