"""difflab.perf: the allocator setting the CLI applies does what it says (glibc only)."""

import subprocess
import sys

import pytest

from difflab.perf import keep_freed_memory

PROBE = """
import ctypes, sys, torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    from difflab.perf import keep_freed_memory
    assert keep_freed_memory()
x = torch.empty(16 << 20, dtype=torch.uint8)  # a 16 MiB activation-sized buffer
x.fill_(1)
print(libc.mallinfo2().hblkhd >= 16 << 20)  # served by its own mmap?
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_serves_big_buffers_from_the_heap():
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc ≥ 2.33")
    mmapped = {mode: subprocess.run([sys.executable, "-c", PROBE, mode], check=True,
                                    capture_output=True, text=True).stdout.split()[-1]
               for mode in ("default", "keep")}
    assert mmapped == {"default": "True", "keep": "False"}
    assert keep_freed_memory() is True  # and applying it twice is harmless


from difflab.perf import cpu_has_bf16_dot_products, resolve_mixed_precision  # noqa: E402

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n"


def test_bf16_dot_products_are_read_from_the_cpu_flags():
    assert cpu_has_bf16_dot_products(ZEN4) is True
    assert cpu_has_bf16_dot_products(SAPPHIRE) is True
    assert cpu_has_bf16_dot_products(SKYLAKE) is False  # AVX-512 alone: bf16 is emulated
    assert cpu_has_bf16_dot_products("") is False
    assert cpu_has_bf16_dot_products("flags\t: avx512_bf16_extra\n") is False  # whole words


def test_auto_precision_follows_the_hardware(monkeypatch):
    import difflab.perf as perf

    monkeypatch.setattr(perf, "cpu_has_bf16_dot_products", lambda cpuinfo=None: True)
    assert resolve_mixed_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(perf, "cpu_has_bf16_dot_products", lambda cpuinfo=None: False)
    assert resolve_mixed_precision("auto", "cpu") == "no"
    assert resolve_mixed_precision("auto", "mps") == "no"
    for explicit in ("no", "bf16"):
        assert resolve_mixed_precision(explicit, "cpu") == explicit
    assert resolve_mixed_precision("fp16", "cpu") == "no"  # fp16 autocast is a GPU precision
    assert resolve_mixed_precision("fp16", "cuda") == "fp16"
