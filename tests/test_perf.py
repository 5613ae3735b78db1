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
