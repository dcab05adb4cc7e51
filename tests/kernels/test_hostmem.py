"""kernels/hostmem.py: tensors on memory mapped for transparent huge pages.

Whether the kernel then backs them with huge pages depends on the machine's THP setting, so
these tests check what the module controls: alignment, the tensor's contents and lifetime, and
the fall-backs."""
import gc
import sys

import pytest
import torch

from orca_compile.kernels import hostmem
from orca_compile.runtime.kv_cache import new_kv_cache

BIG = (3, hostmem.HUGE_PAGE // 4)  # 6 MiB of float32


def _mapped(t):  # the huge-page path hands out a view into a larger, separately mapped region
    return t.untyped_storage().nbytes() > t.numel() * t.element_size()


@pytest.mark.skipif(not hostmem.enabled(), reason="huge pages off: not Linux, no mmap.MADV_HUGEPAGE, or ORCA_HUGE_PAGES=0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_tensors_are_mapped_on_a_huge_page_boundary(dtype):
    t = hostmem.empty(BIG, dtype)
    assert t.shape == BIG and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % hostmem.HUGE_PAGE == 0 and _mapped(t)
    z = hostmem.zeros(BIG, dtype)
    assert _mapped(z) and not z.any()


@pytest.mark.skipif(not hostmem.enabled(), reason="huge pages off: not Linux, no mmap.MADV_HUGEPAGE, or ORCA_HUGE_PAGES=0")
def test_a_view_keeps_the_mapping_alive():
    t = hostmem.empty(BIG, torch.float32)
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(BIG))
    row = t[2]
    del t
    gc.collect()
    torch.testing.assert_close(row, torch.arange(2 * BIG[1], 3 * BIG[1], dtype=torch.float32))
    row += 1  # still writable memory


def test_small_tensors_and_the_opt_out_use_torch_empty(monkeypatch, setenv):
    small = hostmem.empty((4, 5), torch.float32)
    assert small.shape == (4, 5) and not _mapped(small)
    setenv("ORCA_HUGE_PAGES", "0")
    assert not hostmem.enabled()
    big = hostmem.zeros(BIG, torch.float64)
    assert big.shape == BIG and not _mapped(big) and not big.any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_the_kv_cache_and_packed_weights_use_it():
    from orca_compile.kernels import gemm_cpu
    from tests.conftest import compiled_preset
    w = torch.randn(4096, 256)
    packed = gemm_cpu.pack(w)
    assert _mapped(packed) == hostmem.enabled()
    torch.testing.assert_close(packed[3, :, 5], w[3 * 16 + 5])
    _, cm = compiled_preset("tiny-llama")
    layer = cm.layers[0]
    blocks = -(-hostmem.HUGE_PAGE // (16 * layer.num_kv_heads * layer.head_dim * 8))  # float64: >= 2 MiB a tensor
    for k, v in new_kv_cache(cm, blocks, 16):
        assert _mapped(k) == _mapped(v) == hostmem.enabled() and not k.any() and not v.any()
