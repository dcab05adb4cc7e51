"""Capture an HF causal LM as an ATen-level ``torch.fx.GraphModule`` with ``torch.export``.

The model is exported with ``use_cache=False`` (the KV cache is ours, not HF's), with explicit
``position_ids`` (each request's new tokens sit at its own offsets), and with *two* symbolic
dimensions: the batch ``B`` and the tokens ``T``. Keeping ``B`` symbolic, not 1, is what makes
``flatten_tokens`` exact: a dimension is the batch dimension iff its size is the symbol ``B``, so
no size-1 dimension is ever mistaken for it.

Parameters and buffers become ``get_attr`` nodes on a root that shares the HF tensors (no copy);
the HF module itself is never called again after capture.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time

import torch
import torch.fx

_EXAMPLE_BATCH, _EXAMPLE_TOKENS = 2, 7  # distinct, and neither 0 nor 1, so nothing specialises


@dataclasses.dataclass
class CaptureInfo:
    """What the passes need to know about the captured model; kept in ``gm.meta["orca"]``."""

    model_class: str
    config: object  # the HF PretrainedConfig
    batch_symbol: object  # sympy.Symbol of the batch dimension
    token_symbol: object  # sympy.Symbol of the token dimension
    module_paths: dict = dataclasses.field(default_factory=dict)  # qualified name -> nn.Module
    export_seconds: float = 0.0
    positions_in_attention: bool = False  # exported without position_ids (ALiBi): split_attention checks
    # the 16-bit dtype (bfloat16, float16) a float32 graph's weights came from: the C GEMM keeps
    # its linear weights in it (float32 arithmetic on 16-bit weights); None: the graph's own dtype
    weight_storage: object = None
    # the dtype the linears of such a graph multiply in (oneDNN's 16-bit GEMM); None: float32
    # arithmetic (orca_compile/sixteen_bit.py)
    matmul_dtype: object = None


def check_supported(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` for a model that is not a decoder-only causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{name} is not a Hugging Face PreTrainedModel (it has no .config)")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; orca-compile handles decoder-only causal LMs")
    if name not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise ValueError(
            f"{name} is not a causal LM class (model_type={config.model_type!r}); orca-compile "
            "handles decoder-only *ForCausalLM models (load with AutoModelForCausalLM)"
        )
    if not _takes_position_ids(model) and config.model_type not in POSITIONS_IN_ATTENTION:
        raise ValueError(f"{name}.forward takes no position_ids; orca-compile must pass each token's position "
                         f"(families whose positions live in the attention alone: {', '.join(POSITIONS_IN_ATTENTION)})")


# Families whose forward takes no position_ids because the positions act only inside attention
# (ALiBi): exported without them, split_attention then requires ALiBi on every layer. Any other
# family without position_ids derives positions from arange(T) of its input, which is wrong for a
# flattened batch and for every decode step, and is refused (Bart's, TrOCR's decoders...).
POSITIONS_IN_ATTENTION = ("bloom",)


def _takes_position_ids(model: torch.nn.Module) -> bool:
    """False for families whose positions live in the attention alone (Bloom's ALiBi): they are
    exported without ``position_ids``, and ``split_attention`` gives the positions to the
    attention op from the cache (each request's context length), which is all ALiBi needs."""
    return "position_ids" in inspect.signature(model.forward).parameters


def _prepare_attention(model: torch.nn.Module) -> None:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl in ("sdpa", "eager"):
        return
    if impl is None or impl.startswith("flash") or impl == "flex_attention" or impl.startswith("paged"):
        # The rewrite matches SDPA or the eager pattern; these fused forms compute the same thing.
        try:
            model.set_attn_implementation("sdpa")
        except ValueError:  # models without SDPA support (e.g. Gemma2's soft-capping)
            model.set_attn_implementation("eager")


def _orca_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """HF's experts interface, as orca-compile captures it (``ALL_EXPERTS_FUNCTIONS["orca"]``).

    The experts' two projections become ``orca::expert_linear`` ops (tokens grouped by expert at run
    time); the gate or activation, the optional post-expert norm and the weighted sum over the
    ``k`` routed experts stay ATen ops, so every family's own gating (GPT-OSS's clamped, interleaved
    SwiGLU, say) is traced from its code rather than reimplemented here."""
    if getattr(self, "_is_expert_parallel", False):
        raise ValueError(f"{type(self).__name__} is set up for HF's expert parallelism; orca-compile partitions "
                         "the model itself: load it without a device mesh")
    up = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = getattr(self, "gate_up_proj_bias" if self.has_gate else "up_proj_bias", None) if self.has_bias else None
    down_bias = self.down_proj_bias if self.has_bias else None
    h = torch.ops.orca.expert_linear(hidden_states, top_k_index, up, up_bias, self.is_transposed)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out = torch.ops.orca.expert_linear(h, top_k_index, self.down_proj, down_bias, self.is_transposed)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    out = (out * top_k_weights.unsqueeze(-1)).sum(dim=1)  # HF's order: weight each pair, then sum the k
    return out.to(hidden_states.dtype)


@contextlib.contextmanager
def _orca_experts(model: torch.nn.Module):
    """Route the model's experts modules (``@use_experts_implementation``: Mixtral, Qwen2/3-MoE,
    GPT-OSS, OLMoE, DeepSeek ... ) through ``_orca_experts_forward`` while exporting; the user's
    model gets its own implementation back afterwards."""
    config = model.config
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # a Transformers without the experts interface: nothing to route
        yield
        return
    if not hasattr(config, "_experts_implementation"):
        yield
        return
    ALL_EXPERTS_FUNCTIONS["orca"] = _orca_experts_forward
    before = config._experts_implementation
    config._experts_implementation = "orca"
    try:
        yield
    finally:
        config._experts_implementation = before


def capture(model: torch.nn.Module, max_tokens: int | None = None) -> torch.fx.GraphModule:
    """Export ``model`` and return a GraphModule taking ``(input_ids, position_ids)`` of shape [B, T]."""
    from torch.export import Dim

    check_supported(model)
    _prepare_attention(model)
    config = model.config
    max_pos = max_tokens or getattr(config, "max_position_embeddings", None) or 8192
    device = next(model.parameters()).device
    ids = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_TOKENS, dtype=torch.long, device=device)
    pos = torch.arange(_EXAMPLE_TOKENS, device=device).expand(_EXAMPLE_BATCH, -1).contiguous()
    batch, tokens = Dim("B", min=1, max=1024), Dim("T", min=1, max=max(max_pos, _EXAMPLE_TOKENS + 1))
    kwargs = dict(input_ids=ids, position_ids=pos, use_cache=False)
    shapes = dict(input_ids={0: batch, 1: tokens}, position_ids={0: batch, 1: tokens}, use_cache=None)
    if not _takes_position_ids(model):
        del kwargs["position_ids"], shapes["position_ids"]
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad(), _orca_experts(model):
            ep = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # export's own errors are long; say which model first
        raise ValueError(f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
        _forget_export_trace()
    export_seconds = time.perf_counter() - start
    gm = _unlift(ep)
    ids_val = next(iter(gm.graph.find_nodes(op="placeholder"))).meta["val"]
    gm.meta["orca"] = CaptureInfo(
        model_class=type(model).__name__,
        config=config,
        batch_symbol=ids_val.shape[0].node.expr,
        token_symbol=ids_val.shape[1].node.expr,
        module_paths=dict(model.named_modules()),
        export_seconds=export_seconds,
        positions_in_attention=not _takes_position_ids(model),
    )
    return gm


def _forget_export_trace() -> None:
    """Empty the module-level map torch's make_fx tracer leaves after every trace (fake tensor id ->
    node, for export's leak detector, which reads it inside the export call). Left alone it keeps
    the last trace's graph alive, and through it every parameter of the model: a model exported,
    optimized and then dropped would never be freed (``tests/runtime/test_memory.py``)."""
    from torch.fx.experimental import proxy_tensor

    leftover = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(leftover, dict):
        leftover.clear()


def _unlift(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """Lifted parameter/buffer/constant placeholders -> ``get_attr`` on a root sharing the tensors."""
    sig = ep.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    tensors = {**ep.state_dict, **ep.constants}
    root = torch.nn.Module()
    graph = ep.graph_module.graph
    for node in list(graph.find_nodes(op="placeholder")):
        if node.name not in lifted and node.name not in ("input_ids", "position_ids") and not node.users:
            graph.erase_node(node)  # constant inputs such as use_cache=False
    user_inputs = [n for n in graph.find_nodes(op="placeholder") if n.name not in lifted]
    if [n.name for n in user_inputs] == ["input_ids"]:  # positions only through the attention (ALiBi)
        with graph.inserting_after(user_inputs[0]):
            position_ids = graph.placeholder("position_ids")
        position_ids.meta = dict(user_inputs[0].meta)  # same shape and dtype: [B, T] int64
        user_inputs.append(position_ids)
    if [n.name for n in user_inputs] != ["input_ids", "position_ids"]:
        raise ValueError(f"unexpected user inputs after export: {[n.name for n in user_inputs]}")
    first = user_inputs[0]
    for node in list(graph.find_nodes(op="placeholder")):
        if node.name not in lifted:
            continue
        target = lifted[node.name]
        _set_attr(root, target, tensors[target])
        with graph.inserting_before(first):
            attr = graph.create_node("get_attr", target)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    for node in list(graph.nodes):
        # export's runtime dtype/device assertions: noise for every later pass, no value at run time
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()  # plain positional signature instead of pytree specs
    out = graph.output_node()
    logits = out.args[0]
    while isinstance(logits, (tuple, list)):
        logits = [a for a in logits if a is not None][0]
    out.args = (logits,)
    gm = torch.fx.GraphModule(root, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _set_attr(root: torch.nn.Module, qualname: str, tensor: torch.Tensor) -> None:
    *path, name = qualname.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if isinstance(tensor, torch.nn.Parameter):
        mod.register_parameter(name, tensor)
    else:
        mod.register_buffer(name, tensor)
