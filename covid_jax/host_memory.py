"""Keeps freed host memory in the process, so a CPU train step does not page-fault its buffers in every step.

XLA:CPU mallocs a step's intermediate buffers and frees them when the step
ends. glibc gives large blocks straight back to the kernel (they are mmap-ed,
or trimmed off the heap top), so the next step faults its whole working set in
again and the kernel zero-fills every page: measured on a 2-core CPU, a ResNet50
train step at batch 32 took ~10^6 page faults and 2 s of kernel time each
step. One malloc arena that never mmaps and never trims reuses those pages
(the step went from 9.4 s to 8.4 s). Resident memory then stays at its peak,
and the heap's fragmentation can raise that peak: a step's temporaries may not
fit where the last step's were, and the heap grows (ResNet50 at batch 32 peaked
at 6.1-6.2 GB in two runs, 9.8 and 13.9 GB in two others). XLA's compiler
threads contend for the one arena: NASNetLarge's train step compiles 15-20%
slower. Per-thread arenas cannot keep the gain: glibc unmaps their heaps when
they empty (BENCHMARKS.md).

The one arena's lock is what XLA's compiler threads wait on, so entry points
also enlarge glibc's per-thread caches of small freed blocks, which malloc and
free use without the lock (`relaunch_with_thread_caches`): NASNetLarge's train
step then compiled in 48-51 s against 50-57 s (BENCHMARKS.md).
"""

import ctypes
import ctypes.util
import os
import platform
import resource
import sys
from collections.abc import Mapping

# mallopt parameters (glibc's malloc.h). A trim threshold of -1 reads as SIZE_MAX: never trim.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
# Freed blocks of each small size (up to 1,032 bytes) that a thread keeps for itself; glibc's default is 7.
# 65,535 (the most) held back so much that a ResNet50 train step at batch 32 peaked at 22 GB, not 6.
_TCACHE_COUNT, _THREAD_CACHE_BLOCKS = 'glibc.malloc.tcache_count', 1024


def retain_freed_memory() -> bool:
  """Makes glibc's malloc reuse freed memory; returns False (and changes nothing) without glibc.

  Call it before the JAX backend starts, so XLA's threads share the one arena. Process-wide and not undone.
  """
  library = ctypes.util.find_library('c')
  try:
    mallopt = ctypes.CDLL(library).mallopt if library else None
  except (OSError, AttributeError):
    mallopt = None
  if mallopt is None:
    return False
  return all(mallopt(option, value) == 1 for option, value in _SETTINGS)


def peak_resident_bytes() -> int:
  """This process's peak resident memory so far (the kernel's high-water mark), to watch the kept memory grow."""
  try:
    with open('/proc/self/status') as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
  except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024  # macOS counts bytes, Linux KiB.


def with_thread_caches(environ: Mapping[str, str]) -> dict[str, str] | None:
  """`environ` with glibc's per-thread caches enlarged; None where it names their size already, or not glibc."""
  tunables = environ.get('GLIBC_TUNABLES', '')
  if platform.libc_ver()[0] != 'glibc' or _TCACHE_COUNT in tunables:
    return None
  setting = f'{_TCACHE_COUNT}={_THREAD_CACHE_BLOCKS}'
  return {**environ, 'GLIBC_TUNABLES': f'{tunables}:{setting}' if tunables else setting}


def relaunch_with_thread_caches() -> None:
  """Re-executes this process, same interpreter and arguments, with `with_thread_caches`' environment.

  glibc reads its tunables only when a process starts, hence the new process image. Call it first in an
  entry point, before heavy imports; it returns at once where the environment has the setting already.
  """
  environ = with_thread_caches(os.environ)
  if environ is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
