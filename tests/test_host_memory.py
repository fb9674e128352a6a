"""covid_jax.host_memory: freed blocks are reused instead of faulted in afresh (counted by the kernel)."""

import subprocess
import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]

# Mallocs, fills and frees a 256 MiB block five times (as XLA:CPU does a step's buffers); prints the page
# faults of the last four rounds.
_ROUNDS = """
import ctypes, ctypes.util, resource, sys
from covid_jax import host_memory
if sys.argv[1] == 'retain':
  assert host_memory.retain_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library('c'))
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def round_trip(size=2**28):
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
  out = subprocess.run([sys.executable, '-c', _ROUNDS, mode], check=True, capture_output=True, text=True,
                       cwd=_REPO)
  return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')
def test_freed_blocks_are_reused_without_page_faults():
  pages_per_block = 2**28 // 4096
  assert _faults('default') >= 4 * pages_per_block * 0.9  # glibc mmaps and unmaps a block this big each time.
  assert _faults('retain') < 0.01 * pages_per_block

