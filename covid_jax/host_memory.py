"""Keeps freed host memory in the process, so a CPU train step does not page-fault its buffers in every step.

XLA:CPU mallocs a step's intermediate buffers and frees them when the step
ends. glibc gives large blocks straight back to the kernel (they are mmap-ed,
or trimmed off the heap top), so the next step faults its whole working set in
again and the kernel zero-fills every page: measured on a 2-core CPU, a ResNet50
train step at batch 32 took ~10^6 page faults and 2 s of kernel time each
step. One malloc arena that never mmaps and never trims reuses those pages
(the step went from 9.4 s to 8.4 s). Resident memory then stays at its peak,
and XLA's compiler threads contend for the one arena: NASNetLarge's train step
compiles 15-20% slower. Per-thread arenas cannot keep the gain: glibc unmaps
their heaps when they empty (BENCHMARKS.md).
"""

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h). A trim threshold of -1 reads as SIZE_MAX: never trim.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))


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
