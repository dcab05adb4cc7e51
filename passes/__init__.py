"""Graph -> graph rewrites, one verb per file; see README.md for the order and the invariants."""
from orca_compile.passes.cleanup import cleanup
from orca_compile.passes.flatten_tokens import flatten_tokens
from orca_compile.passes.manager import DEFAULT_PIPELINE, STAGES, PassManager, op_counts
from orca_compile.passes.prune_logits import prune_logits
from orca_compile.passes.split_attention import split_attention

__all__ = ["cleanup", "flatten_tokens", "prune_logits", "split_attention", "PassManager",
           "DEFAULT_PIPELINE", "STAGES", "op_counts"]
