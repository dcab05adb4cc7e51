"""The pass manager: runs the passes in their fixed order, times them, keeps each stage's graph.

Order (``passes/README.md`` says why): ``flatten_tokens -> split_attention -> prune_logits ->
cleanup``, then the lowering passes of the chosen backend (``orca_compile.compiler``), the last
of which is kept as the ``lowered`` stage. Every pass has one contract: a function
``GraphModule -> GraphModule`` (in place or a new module) that checks its own postcondition on
its way out; in verify mode (``ORCA_VERIFY_PASSES=1``, on in the tests) the manager also lints
every stage. The manager records op counts before/after so ``orca-compile dump`` can say what
each pass changed.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import time
from typing import Callable

import torch
import torch.fx

from orca_compile import env
from orca_compile.passes.cleanup import cleanup
from orca_compile.passes.flatten_tokens import flatten_tokens
from orca_compile.passes.prune_logits import prune_logits
from orca_compile.passes.split_attention import split_attention

# (stage name the CLI shows, pass)
DEFAULT_PIPELINE: list[tuple[str, Callable]] = [
    ("flattened", flatten_tokens),
    ("split", split_attention),
    ("pruned", prune_logits),
    ("final", cleanup),
]
STAGES = ("captured", *(stage for stage, _ in DEFAULT_PIPELINE), "lowered")  # the stages every compile has


@dataclasses.dataclass
class PassRecord:
    name: str  # the pass
    stage: str  # the stage its output is kept as
    seconds: float
    before: collections.Counter
    after: collections.Counter

    def changes(self) -> dict[str, int]:
        keys = set(self.before) | set(self.after)
        return {k: self.after[k] - self.before[k] for k in sorted(keys) if self.after[k] != self.before[k]}


class PassManager:
    def __init__(self, pipeline=None, keep_stages: bool = True, verify: bool | None = None):
        self.pipeline = list(DEFAULT_PIPELINE if pipeline is None else pipeline)
        self.keep_stages = keep_stages
        self.verify = env.get().verify_passes if verify is None else verify
        self.stages: dict[str, torch.fx.GraphModule] = {}
        self.records: list[PassRecord] = []

    def run(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """Run the pipeline on ``gm``; returns the last pass's result. The input stage is kept as
        ``captured`` when the pipeline is the default one (a lowering pipeline starts from a
        ``final`` graph the caller holds already)."""
        if self.pipeline and self.pipeline[0][1] is DEFAULT_PIPELINE[0][1]:
            self._keep("captured", gm)
        for stage, fn in self.pipeline:
            before = op_counts(gm)
            start = time.perf_counter()
            gm = fn(gm)
            seconds = time.perf_counter() - start
            if self.verify:
                gm.graph.lint()
            self.records.append(PassRecord(getattr(fn, "__name__", stage), stage, seconds, before, op_counts(gm)))
            self._keep(stage, gm)
        if self.pipeline:
            self.stages[self.pipeline[-1][0]] = gm  # the result itself, not a copy
        return gm

    def _keep(self, stage, gm):
        if self.keep_stages:  # passes after this one edit gm in place: keep a copy of the graph
            snap = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
            snap.meta.update(gm.meta)
            self.stages[stage] = snap


_SHORT = {
    "aten.scaled_dot_product_attention.default": "sdpa",
    "orca.attention.default": "orca.attention",
    "orca.all_reduce.default": "all_reduce",
    "orca.all_gather.default": "all_gather",
    "orca.expert_linear.default": "expert_linear",
    "aten.linear.default": "linear",
    "aten.addmm.default": "linear",  # GPT-2's Conv1D
    "aten.softmax.int": "softmax",
    "aten._softmax.default": "softmax",
    "aten.matmul.default": "matmul",
    "aten.embedding.default": "embedding",
    "aten.index_select.default": "index_select",
    # the CPU lowering's calls
    "gemm_cpu.linear": "linear",
    "mkldnn._linear_pointwise.default": "linear",
    "attention_cpu.attention": "orca.attention",
}


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    """Counts of the ops a person asks about, plus all call_function nodes and the graph inputs."""
    counts = collections.Counter()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            counts["inputs"] += 1
        elif node.op == "call_function":
            counts["ops"] += 1
            short = _SHORT.get(_target_key(node.target))
            if short:
                counts[short] += 1
    return counts


def _target_key(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", "") or ""
    return f"{module.rpartition('.')[2]}.{getattr(target, '__name__', target)}"
