"""covid_jax.host_memory: freed blocks are reused instead of faulted in afresh (counted by the kernel), and
the per-thread caches' setting is one that glibc reads (as its dynamic loader lists it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from covid_jax import host_memory

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


def _glibc_tunables(environ: dict[str, str]) -> dict[str, str]:
  """The tunables as glibc's dynamic loader reads them from `environ` (`ld.so --list-tunables`)."""
  ldd = subprocess.run(['ldd', sys.executable], check=True, capture_output=True, text=True).stdout
  loader = next(word for word in ldd.split() if '/ld-linux' in word)
  listing = subprocess.run([loader, '--list-tunables'], check=True, capture_output=True, text=True, env=environ)
  pairs = (line.partition(' (')[0].split(':', 1) for line in listing.stdout.splitlines())
  return {name: value.strip() for name, value in pairs}


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')
def test_thread_caches_are_a_setting_glibc_reads_beside_the_callers_own():
  environ = host_memory.with_thread_caches({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  tunables = _glibc_tunables(environ)
  assert tunables['glibc.malloc.tcache_count'] == hex(1024)
  assert tunables['glibc.malloc.arena_max'] == '0x2'
  assert _glibc_tunables({})['glibc.malloc.tcache_count'] != hex(1024)  # Not glibc's default.
  assert host_memory.with_thread_caches({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=7'}) is None


# Prints a line on each start, then relaunches; prints its arguments and tunables once past the relaunch.
_RELAUNCHED = """
import os, sys
print('start', flush=True)
from covid_jax import host_memory
host_memory.relaunch_with_thread_caches()
print(sys.argv[1:], os.environ['GLIBC_TUNABLES'])
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')
@pytest.mark.parametrize('tunables, starts, after', [
    ('glibc.malloc.arena_max=2', 2, 'glibc.malloc.arena_max=2:glibc.malloc.tcache_count=1024'),
    ('glibc.malloc.tcache_count=7', 1, 'glibc.malloc.tcache_count=7'),  # The caller's own size stays.
])
def test_relaunch_restarts_once_with_the_same_arguments(tunables, starts, after):
  out = subprocess.run([sys.executable, '-c', _RELAUNCHED, 'a', '--b=c'], check=True, capture_output=True, text=True,
                       cwd=_REPO, env={**os.environ, 'GLIBC_TUNABLES': tunables}).stdout.splitlines()
  assert out == ['start'] * starts + [f"['a', '--b=c'] {after}"]
