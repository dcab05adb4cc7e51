"""The one source of defaults: the engine's (``runtime/config.py``'s ``EngineConfig``), the
compiler's backends and the cache sizing's. ``optimize()``, the CLI and the benchmarks read them
from here."""
from __future__ import annotations

from orca_compile.compiler import BACKENDS
from orca_compile.runtime.config import KV_MODES, EngineConfig
from orca_compile.runtime.kv_cache import DEFAULT_MAX_MODEL_LEN, DEVICE_MEMORY_FRACTION, HOST_MEMORY_FRACTION

DEFAULTS = EngineConfig()  # every field at its default (num_kv_blocks None: sized from memory)
DEFAULT_BACKEND = "auto"

__all__ = ["BACKENDS", "KV_MODES", "EngineConfig", "DEFAULTS", "DEFAULT_BACKEND", "DEFAULT_MAX_MODEL_LEN",
           "HOST_MEMORY_FRACTION", "DEVICE_MEMORY_FRACTION"]
