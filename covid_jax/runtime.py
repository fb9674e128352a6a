"""Process settings for the backend: host memory, garbage collection while compiling, compile options, logs.

`covid_jax.main` applies them (`relaunch_with_thread_caches`, then `configure`);
training code only marks the work that traces and compiles (`tracing`) and
compiles run-once programs through `compile_and_run_once`. The settings that
exist for the CPU apply on the CPU only. Why each exists, with its figures:
benchmarks/BENCHMARKS.md, "Process settings".

- Freed host memory stays in the process: XLA:CPU mallocs a step's buffers and
  frees them when the step ends, and glibc hands large blocks back to the
  kernel, so every step faults its working set in afresh. One malloc arena that
  never mmaps and never trims reuses those pages; resident memory then stays at
  its peak, which the heap's fragmentation can raise.
- That one arena's lock is what XLA's compiler threads wait on, so the entry
  point restarts itself with larger per-thread caches of small freed blocks,
  which malloc and free use without the lock (glibc reads them at process start).
- Python's full collections are held back while a model is traced: tracing
  creates millions of objects, and each full collection walks every object of
  the process. Young collections still run; cycles wait for the first full
  collection after the block.
- Programs that run once (an init) compile with LLVM at -O1 on the CPU: their
  random-number kernels dominate, and -O1 compiles them faster to bit-identical
  values.

This module imports no JAX at load time: the entry point calls
`relaunch_with_thread_caches` before the heavy imports.
"""

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import platform
import re
import resource
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from absl import logging as absl_logging

# mallopt parameters (glibc's malloc.h). A trim threshold of -1 reads as SIZE_MAX: never trim.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
# Freed blocks of each small size (up to 1,032 bytes) that a thread keeps for itself; glibc's default is 7.
# Far larger values hold so much back that a step's peak memory multiplies.
_TCACHE_COUNT, _THREAD_CACHE_BLOCKS = 'glibc.malloc.tcache_count', 1024

# Generation 2's threshold counts generation-1 collections; at this value a full collection never comes.
_NEVER = 2**31 - 1
_gc_lock = threading.Lock()
_gc_depth = 0  # `full_collections_deferred` blocks open now, in any thread.
_gc_saved_threshold = 0  # Generation 2's threshold before the first of them opened.

# XLA:CPU options for programs that run once (see the module docstring); -O0 would change their values.
RUN_ONCE_CPU_OPTIONS = {'xla_backend_optimization_level': 1}

# Libraries whose INFO lines bury the run's own log (absl records, matched by source path).
_CHATTY_LIBRARIES = ('/orbax/', '/tensorflow_datasets/', '/tensorflow/', '/jax/_src/')
# What TensorFlow's native code writes to stderr on import whatever TF_CPP_MIN_LOG_LEVEL says: an INFO line
# about oneDNN, and absl's notice that logging is not initialised yet.
_NATIVE_IMPORT_CHATTER = re.compile(r'^(I\d{4} .*oneDNN custom operations are on|'
                                    r'WARNING: All log messages before absl::InitializeLog\(\) is called)')


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


@contextlib.contextmanager
def full_collections_deferred() -> Iterator[None]:
  """Within the block (or a function it decorates), no full collection starts; young ones do.

  Blocks may nest and overlap across threads: the threshold comes back when the last of them closes.
  """
  global _gc_depth, _gc_saved_threshold
  with _gc_lock:
    young, middle, old = gc.get_threshold()
    if _gc_depth == 0:
      _gc_saved_threshold = old
      gc.set_threshold(young, middle, _NEVER)
    _gc_depth += 1
  try:
    yield
  finally:
    with _gc_lock:
      _gc_depth -= 1
      if _gc_depth == 0:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _gc_saved_threshold)


def tracing() -> contextlib.AbstractContextManager[None]:
  """The process's settings for a block (or decorated function) that traces and compiles a model."""
  return full_collections_deferred()


@tracing()
def compile_and_run_once(fn: Callable[[], Any]) -> Any:
  """`jax.jit(fn)()` for code that runs once, such as an init, compiled for a short compile on the CPU."""
  import jax  # Imported on use: the entry point loads this module before JAX.
  options = RUN_ONCE_CPU_OPTIONS if jax.default_backend() == 'cpu' else None
  return jax.jit(fn).trace().lower().compile(compiler_options=options)()


class _LibraryChatter(logging.Filter):
  """Drops the INFO (and lower) records of libraries that log every dataset read and checkpoint save."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO or not any(part in record.pathname for part in _CHATTY_LIBRARIES)


def quiet_library_logs() -> None:
  """Keeps warnings and the run's own log; drops TensorFlow's, TFDS's, Orbax's and JAX's INFO log records.

  absl routes Python logging to its handler under app.run: the filter sits there.
  """
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _LibraryChatter) for f in handler.filters):
    handler.addFilter(_LibraryChatter())


@contextlib.contextmanager
def quiet_tensorflow_import() -> Iterator[None]:
  """For a block that imports TensorFlow: its native INFO lines off, and its import chatter dropped.

  TF_CPP_MIN_LOG_LEVEL (unless set) keeps TensorFlow's native log to warnings; what native code writes to
  stderr anyway is held back and passed on after the block, less the import chatter, so a real warning or
  error still reaches stderr.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      lines = held.read().decode(errors='replace').splitlines(keepends=True)
      sys.stderr.write(''.join(line for line in lines if not _NATIVE_IMPORT_CHATTER.match(line)))
      sys.stderr.flush()


def configure(config: Any) -> None:
  """Applies the config's process settings; call it before the JAX backend starts (before any device query)."""
  import jax
  quiet_library_logs()
  # Before the backend starts, so XLA's threads share the one arena.
  if config.retain_freed_host_memory and not retain_freed_memory():
    absl_logging.info('Not glibc: freed host memory goes back to the system as usual.')
  if config.compilation_cache_dir and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache_dir))
