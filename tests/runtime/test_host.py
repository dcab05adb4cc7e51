import sys

import pytest

from orca_compile.runtime import host


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tune_malloc_applies_on_glibc_and_can_be_switched_off(monkeypatch, setenv):
    monkeypatch.setattr(host, "_done", False)
    setenv("ORCA_TUNE_MALLOC", "0")
    assert host.tune_malloc() is False and host._done is False
    setenv("ORCA_TUNE_MALLOC", "1")
    assert host.tune_malloc() is True and host._done is True
