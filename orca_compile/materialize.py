"""Each rank materialises only its own shard: the model is built on meta tensors, captured,
rewritten and partitioned there (no weight is allocated), and then the tensors the rank's graph
holds are read from the checkpoint's safetensors files, each shard as the slices it is made of
(``gm.meta["orca_weight_slices"]``, recorded by the tensor-parallel pass). A rank of a 70B model
split 8 ways reads its eighth and the replicated weights, not the whole checkpoint.

What a checkpoint does not hold (buffers computed at construction, such as rotary tables) comes
from the model built with its buffers real and its parameters on meta. A tensor found nowhere is
a ``ValueError`` naming it; ``ModelSpec.build`` then logs it and loads the whole checkpoint.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os

import torch

from orca_compile.passes.graph_utils import fetch_attr

log = logging.getLogger(__name__)


def has_safetensors(path) -> bool:
    return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*.safetensors")))


class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file or shards), read by name, whole or in slices;
    ``bytes_read`` counts what was read."""

    def __init__(self, directory: str, aliases: dict[str, list[str]] | None = None, prefix: str = ""):
        from safetensors import safe_open

        self.files: dict[str, str] = {}
        for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    self.files[key] = path
        if not self.files:
            raise ValueError(f"no safetensors weights in {directory!r}")
        self.aliases = aliases or {}
        self.prefix = prefix
        self.bytes_read = 0

    _DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

    def dtype(self) -> torch.dtype:
        """The floating-point dtype the checkpoint's weights are stored in."""
        from safetensors import safe_open

        for key, path in self.files.items():
            with safe_open(path, framework="pt") as f:
                found = self._DTYPES.get(f.get_slice(key).get_dtype())
            if found is not None:
                return found
        return torch.float32

    def key(self, name: str) -> str | None:
        """The checkpoint's key for a parameter name: itself, a tied alias, or without the base
        model's prefix (old GPT-2 checkpoints)."""
        for candidate in (name, *self.aliases.get(name, ())):
            for k in (candidate, candidate.removeprefix(self.prefix + ".") if self.prefix else candidate):
                if k in self.files:
                    return k
        return None

    def read(self, name: str, dim: int | None = None, ranges=None) -> torch.Tensor:
        from safetensors import safe_open

        key = self.key(name)
        if key is None:
            raise ValueError(f"{name!r} is not in the checkpoint")
        with safe_open(self.files[key], framework="pt") as f:
            view = f.get_slice(key)
            if dim is None:
                t = view[:]
            else:
                lead = (slice(None),) * dim
                t = torch.cat([view[lead + (slice(a, b),)] for a, b in ranges], dim=dim)
        self.bytes_read += t.numel() * t.element_size()
        return t


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on meta and keep their buffers real (a
    model's computed tables, which no checkpoint holds)."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def empty_model(directory: str, dtype: torch.dtype):
    """(the model on meta tensors, its real buffers by name, the tied-parameter aliases, the
    base model prefix) for the checkpoint in ``directory``; nothing of size is allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with _parameters_on_meta():
        shell = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    buffers = {name: b for name, b in shell.named_buffers() if b.device.type != "meta"}
    groups: dict[int, list[str]] = {}
    for name, p in shell.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    aliases = {name: [n for n in names if n != name] for names in groups.values() for name in names}
    if os.path.exists(os.path.join(directory, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model, buffers, aliases, getattr(model, "base_model_prefix", "")


def materialize(gm: torch.fx.GraphModule, reader: CheckpointReader, buffers: dict, dtype: torch.dtype,
                device: str | torch.device = "cpu") -> torch.fx.GraphModule:
    """Every meta tensor the graph reads, read from the checkpoint (a shard: only its slices) or
    taken from ``buffers``, in ``dtype`` (floating point) on ``device``. In place."""
    slices = gm.meta.get("orca_weight_slices", {})
    done: dict[int, torch.Tensor] = {}  # a tied weight (one meta tensor, two names) is read once
    for node in gm.graph.find_nodes(op="get_attr"):
        t = fetch_attr(gm, node.target)
        if not isinstance(t, torch.Tensor):
            continue
        if t.device.type != "meta":  # computed while compiling (ALiBi slopes): real already, on the CPU
            if t.device != torch.device(device):
                _put(gm, node.target, done.setdefault(id(t), t.to(device)))
            continue
        source, dim, ranges = slices.get(node.target, (node.target, None, None))
        if id(t) in done:
            real = done[id(t)]
        elif reader.key(source) is not None:
            real = reader.read(source, dim, ranges)
        elif source in buffers and dim is None:
            real = buffers[source]
        else:
            raise ValueError(f"{source!r} (read by {node.name}) is neither in the checkpoint nor a buffer the "
                             "model computes")
        if real.is_floating_point() and t.is_floating_point():
            real = real.to(t.dtype)  # the graph's (a float32 rotary table stays float32 in a bf16 model)
        if tuple(real.shape) != tuple(t.shape):
            raise ValueError(f"{source!r}: the checkpoint's slice is {tuple(real.shape)}, the graph needs "
                             f"{tuple(t.shape)}")
        _put(gm, node.target, done.setdefault(id(t), real.to(device).contiguous()))
    return gm


def _put(gm: torch.fx.GraphModule, target: str, real: torch.Tensor) -> None:
    """``real`` in place of the tensor at ``target``, a parameter if that was one."""
    *path, leaf = target.split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    if isinstance(getattr(owner, leaf), torch.nn.Parameter):
        setattr(owner, leaf, torch.nn.Parameter(real, requires_grad=False))
    else:
        owner.register_buffer(leaf, real, persistent=False)
