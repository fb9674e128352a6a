"""covid_jax.runtime: freed blocks are reused instead of faulted in afresh (counted by the kernel), the
per-thread caches' setting is one that glibc reads (as its dynamic loader lists it), full collections wait
for a deferral block to close (as CPython reports them), and the import chatter is dropped, nothing else."""

import contextlib
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from covid_jax import runtime

_REPO = Path(__file__).resolve().parents[1]

# Mallocs, fills and frees a 256 MiB block five times (as XLA:CPU does a step's buffers); prints the page
# faults of the last four rounds.
_ROUNDS = """
import ctypes, ctypes.util, resource, sys
from covid_jax import runtime
if sys.argv[1] == 'retain':
  assert runtime.retain_freed_memory()
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
  environ = runtime.with_thread_caches({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  tunables = _glibc_tunables(environ)
  assert tunables['glibc.malloc.tcache_count'] == hex(1024)
  assert tunables['glibc.malloc.arena_max'] == '0x2'
  assert _glibc_tunables({})['glibc.malloc.tcache_count'] != hex(1024)  # Not glibc's default.
  assert runtime.with_thread_caches({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=7'}) is None


# Prints a line on each start, then relaunches; prints its arguments and tunables once past the relaunch.
_RELAUNCHED = """
import os, sys
print('start', flush=True)
from covid_jax import runtime
runtime.relaunch_with_thread_caches()
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


# Run in a fresh interpreter, whose small heap lets CPython's own rule start full collections quickly.
_CHURN_IN_AND_OUT_OF_THE_BLOCK = '''
import gc, json
from covid_jax import runtime

gc.set_threshold(20, 1, 1)
generations = []
gc.callbacks.append(lambda phase, info: phase == 'stop' and generations.append(info['generation']))

def churn(kept):
  for i in range(20000):
    cycle = []
    cycle.append(cycle)  # Garbage that only a collection frees.
    kept.append([i])  # Survivors, which grow generation 2.

def collections_during(kept):
  generations.clear()
  churn(kept)
  return sorted(set(generations))

kept = []
result = {'before': collections_during(kept)}
with runtime.full_collections_deferred():
  result['inside'] = collections_during(kept)
  result['threshold_inside'] = gc.get_threshold()
result['after'] = collections_during(kept)
result['threshold_after'] = gc.get_threshold()
print(json.dumps(result))
'''


def test_full_collections_wait_for_the_block_to_close():
  child = subprocess.run([sys.executable, '-c', _CHURN_IN_AND_OUT_OF_THE_BLOCK], cwd=_REPO, capture_output=True,
                         text=True, check=True)
  result = json.loads(child.stdout)
  assert result['before'] == [0, 1, 2]  # The same churn sets off full collections outside the block,
  assert result['inside'] == [0, 1]  # none inside it, while the young generations are still collected,
  assert result['after'] == [0, 1, 2]  # and full ones again after it.
  assert result['threshold_inside'][:2] == [20, 1] and result['threshold_after'] == [20, 1, 1]


def test_overlapping_blocks_restore_the_threshold_when_the_last_closes():
  """Blocks opened in one thread and closed in another order (as threads may) keep the deferral until the last."""
  original = gc.get_threshold()
  first, second = contextlib.ExitStack(), contextlib.ExitStack()
  first.enter_context(runtime.full_collections_deferred())
  second.enter_context(runtime.full_collections_deferred())
  deferred = gc.get_threshold()
  first.close()
  assert gc.get_threshold() == deferred
  second.close()
  assert gc.get_threshold() == original
  assert deferred[:2] == original[:2] and deferred[2] > 10**9


def test_native_import_chatter_is_dropped_and_everything_else_passes():
  script = """
import os
from covid_jax import runtime
with runtime.quiet_tensorflow_import():
  os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')
  os.write(2, b'I0000 00:00:1.2 42 port.cc:153] oneDNN custom operations are on. You may see...\\n')
  os.write(2, b'a real warning\\n')
print('done')
"""
  child = subprocess.run([sys.executable, '-c', script], cwd=_REPO, capture_output=True, text=True, check=True)
  assert child.stderr == 'a real warning\n' and child.stdout == 'done\n'
