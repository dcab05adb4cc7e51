"""What a user should know goes to the standard logging module under ``orca_compile``: the backend
``auto`` chose and why, a C kernel that failed to build, a checkpoint without a tokenizer. Quiet
unless asked (``ORCA_LOG_LEVEL`` / the CLI's ``-v``)."""
import logging
import shutil
import sys

import pytest
import torch

import orca_compile
from orca_compile.kernels import cbuild
from orca_compile.passes import lower_cpu
from orca_compile.presets import load_model

LOGGER = "orca_compile"


def test_the_package_is_quiet_by_default():
    handlers = logging.getLogger(LOGGER).handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
    assert not [h for h in handlers if getattr(h, "_orca", False)]  # ORCA_LOG_LEVEL is unset in the tests


def test_auto_logs_its_choice_and_warns_on_the_slow_path(caplog, monkeypatch):
    from orca_compile import sixteen_bit

    caplog.set_level(logging.INFO, logger=LOGGER)
    # a model no CPU lowering takes (mixed 16- and 32-bit weights): eager, the slow path, a warning
    mixed = load_model("tiny-llama", dtype=torch.bfloat16)
    mixed.lm_head.to(torch.float32)
    orca_compile.compile(mixed, backend="auto", keep_stages=False)
    (slow,) = [r for r in caplog.records if "backend auto ->" in r.getMessage()]
    assert slow.levelno == logging.WARNING and "-> eager" in slow.getMessage()
    assert "the slow path on a CPU" in slow.getMessage() and "torch.bfloat16" in slow.getMessage()
    # a bfloat16 model on a CPU with bfloat16 matrix units: a CPU lowering, its linears in
    # bfloat16 on oneDNN, said at INFO
    caplog.clear()
    monkeypatch.setattr(sixteen_bit, "native_sixteen_bit_matmul", lambda dtype: True)
    cm = orca_compile.compile(load_model("tiny-llama", dtype=torch.bfloat16), backend="auto", keep_stages=False)
    assert cm.backend != "eager" or not (lower_cpu.available("orca") or lower_cpu.available("onednn"))
    if lower_cpu.available("onednn") and sixteen_bit.native_supported(torch.bfloat16):
        (native,) = [r for r in caplog.records if "weights on the CPU" in r.getMessage()]
        assert native.levelno == logging.INFO and "multiply in torch.bfloat16 on oneDNN" in native.getMessage()
    caplog.clear()
    cm = orca_compile.compile(load_model("tiny-llama", dtype=torch.float32), backend="auto", keep_stages=False)
    (chosen,) = [r for r in caplog.records if "backend auto ->" in r.getMessage()]
    assert chosen.levelno == logging.INFO and chosen.getMessage() == f"backend auto -> {cm.backend}"
    assert cm.backend != "eager" or not (lower_cpu.available("orca") or lower_cpu.available("onednn"))


@pytest.mark.skipif(not (sys.platform.startswith("linux") and shutil.which("cc")), reason="needs a C compiler")
def test_a_kernel_that_fails_to_build_is_logged_with_its_fallback(caplog, tmp_path, setenv):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fake cc 1.0'\nexit 1\n")
    fake.chmod(0o755)
    setenv("CC", str(fake))
    setenv("ORCA_CACHE_DIR", str(tmp_path / "cache"))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    lib = cbuild.CLibrary("cpu_rope.c", lambda lib: None)
    assert not lib.available()
    (record,) = [r for r in caplog.records if r.name == "orca_compile.kernels.cbuild"]
    assert "cpu_rope.c is unavailable" in record.getMessage() and "torch path runs instead" in record.getMessage()


def test_a_checkpoint_without_a_tokenizer_is_logged(caplog, tmp_path):
    load_model("tiny-gpt2", dtype=torch.float32).save_pretrained(tmp_path)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with orca_compile.optimize(str(tmp_path), num_kv_blocks=8, backend="eager") as engine:
        assert engine.tokenizer is None
    assert any("holds no tokenizer files" in r.getMessage() for r in caplog.records)


def test_the_cli_verbose_flag_prints_the_log(capsys):
    from orca_compile.cli import main

    logger = logging.getLogger(LOGGER)
    level = logger.level
    try:
        assert main(["-v", "dump", "tiny-llama", "--summary-only"]) == 0
        assert "orca-compile INFO orca_compile.compiler: backend auto ->" in capsys.readouterr().err
    finally:
        for h in [h for h in logger.handlers if getattr(h, "_orca", False)]:
            logger.removeHandler(h)
        logger.setLevel(level)
