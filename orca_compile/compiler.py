"""``orca_compile.compile(model) -> CompiledModel``: capture, run the passes, run ragged iterations."""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.fx

from orca_compile.capture import capture
from orca_compile.kernels import hostmem
from orca_compile.ops import ATTENTION
from orca_compile.passes.manager import PassManager
from orca_compile.runtime.batch import RaggedBatch


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What the runtime needs to know of one attention layer (read off the final graph)."""

    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype
    scale: float
    sliding_window: int
    softcap: float


class CompiledModel:
    """The rewritten graph of one model plus what it takes to run it.

    ``graph_module`` is the final ``torch.fx.GraphModule``; ``stages`` maps each stage name
    (``captured``, ``flattened``, ``split``, ``pruned``, ``final``) to its graph; ``records`` holds
    each pass's time and op-count changes.
    """

    def __init__(self, graph_module, stages, records, capture_seconds, config, model_class):
        self.graph_module = graph_module
        self.stages = stages
        self.records = records
        self.capture_seconds = capture_seconds
        self.config = config
        self.model_class = model_class
        self.input_names = [n.target for n in graph_module.graph.find_nodes(op="placeholder")]
        self.layers = _layer_specs(graph_module)
        logits = graph_module.graph.output_node().args[0].meta["val"]
        self.vocab_size = int(logits.shape[-1])
        self.device = logits.device
        self.eos_token_ids: tuple[int, ...] = ()  # what generate() stops at, read off the HF model
        self.max_model_len = int(getattr(config, "max_position_embeddings", 0) or 0)  # 0: no limit

    def adopt(self, lowered: torch.fx.GraphModule) -> None:
        """Make ``lowered`` (a lowering of the final graph: same inputs, same outputs) the final graph
        and let go of the unlowered one. An engine that compiled its model itself does this, so
        that the original of every weight the lowering packed can be freed: the packed copy is the
        only one left."""
        old = self.graph_module
        self.graph_module = lowered
        self.stages = {name: lowered if gm is old else gm for name, gm in self.stages.items()}

    @property
    def pass_seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return sum(block_size * l.num_kv_heads * (l.head_dim + l.v_head_dim) * l.dtype.itemsize for l in self.layers)

    def new_kv_cache(self, num_blocks: int, block_size: int, device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (k, v) pair per layer, ``[num_blocks, block_size, kv_heads, head_dim]`` each."""
        device = torch.device(device or self.device)

        def zeros(*shape, dtype):  # on the CPU, huge pages: decode attention streams the cache from DRAM
            return hostmem.zeros(shape, dtype) if device.type == "cpu" else torch.zeros(*shape, dtype=dtype,
                                                                                          device=device)
        return [(zeros(num_blocks, block_size, l.num_kv_heads, l.head_dim, dtype=l.dtype),
                 zeros(num_blocks, block_size, l.num_kv_heads, l.v_head_dim, dtype=l.dtype))
                for l in self.layers]

    def inputs(self, batch: RaggedBatch, kv_cache) -> list[torch.Tensor]:
        """The graph's positional inputs for one iteration, in placeholder order."""
        if len(kv_cache) != self.num_layers:
            raise ValueError(f"kv_cache has {len(kv_cache)} layers; the model has {self.num_layers}")
        feed = {
            "input_ids": batch.input_ids, "position_ids": batch.positions,
            "slot_mapping": batch.slot_mapping, "query_start_loc": batch.query_start_loc,
            "seq_lens": batch.seq_lens, "block_tables": batch.block_tables,
            "logits_indices": batch.logits_indices,
        }
        for i, (k, v) in enumerate(kv_cache):
            feed[f"k_cache_{i}"], feed[f"v_cache_{i}"] = k, v
        return [feed[name] for name in self.input_names]

    def __call__(self, batch: RaggedBatch, kv_cache) -> torch.Tensor:
        """Run one ragged iteration; returns logits ``[len(batch.logits_indices), vocab]``."""
        with torch.no_grad():
            return self.graph_module(*self.inputs(batch, kv_cache))


def _layer_specs(gm: torch.fx.GraphModule) -> list[LayerSpec]:
    specs = []
    for node in gm.graph.find_nodes(op="call_function", target=ATTENTION):
        q, k, v, k_cache, v_cache = node.args[:5]
        kc, vc = k_cache.meta["val"], v_cache.meta["val"]
        scale, window, softcap = node.args[9:12]
        specs.append(LayerSpec(int(kc.shape[2]), int(kc.shape[3]), int(vc.shape[3]), kc.dtype, scale, window, softcap))
    return specs


def compile(model: torch.nn.Module, *, keep_stages: bool = True, max_tokens: int | None = None) -> CompiledModel:
    """Capture ``model`` (an HF causal LM) and rewrite it into selective-batching form."""
    start = time.perf_counter()
    gm = capture(model, max_tokens=max_tokens)
    capture_seconds = time.perf_counter() - start
    manager = PassManager(keep_stages=keep_stages)
    final = manager.run(gm)
    info = final.meta["orca"]
    info.module_paths = {}  # only the passes read HF's modules; keep none reachable from the result
    compiled = CompiledModel(final, manager.stages, manager.records, capture_seconds, info.config, info.model_class)
    compiled.eos_token_ids = eos_token_ids(model)
    return compiled


def eos_token_ids(model) -> tuple[int, ...]:
    """The ids HF ``generate`` stops at: the generation config's, else the model config's."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
