"""Process settings for the backend: host memory, garbage collection while compiling, compile options, logs.

`covid_jax.main` applies them (`configure`, which relaunches the process where it keeps freed memory);
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

This module is also the one place that decides what depends on the backend
beyond the op formulations (`covid_jax.models.formulations`): whether freed
host memory is kept (`retain_freed_host_memory`: None = on the CPU only), the
compute dtype (`dtype='auto'`: bfloat16 on a GPU or TPU, float32 on the CPU)
and each program's compiler options (`compiler_options`). The host-memory
choice is made before JAX starts its backend, from the platform JAX will pick
(`expected_platform`); the rest once the devices are known
(`apply_backend_defaults`), and the run's config then holds the values used.

This module imports no JAX at load time: the entry point calls `configure`
before the heavy imports and before JAX starts its backend.
"""

import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
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

# XLA options per (platform, program), and the backbones they apply to (None: every backbone). Programs:
# 'run_once' (an init), 'train_step', 'eval_step'.
# - XLA:CPU, run-once programs: LLVM at -O1 (see the module docstring); -O0 would change their values.
# - XLA:GPU, NASNet's steps: XLA 0.11.2 aborted compiling them on an H200 and an H100 (a Triton GEMM tiling check,
#   `triton_tiling_propagation.cc`, 784 vs. 56 on the 28x28 maps) unless Triton's GEMM fusion was off
#   (benchmarks/BENCHMARKS.md); cuBLAS then runs those matmuls.
NASNETS = ('nasnet', 'nasnet_large', 'nasnet_mobile')
PROGRAM_OPTIONS: tuple[tuple[str, str, tuple[str, ...] | None, dict[str, Any]], ...] = (
    ('cpu', 'run_once', None, {'xla_backend_optimization_level': 1}),
    ('gpu', 'train_step', NASNETS, {'xla_gpu_enable_triton_gemm': False}),
    ('gpu', 'eval_step', NASNETS, {'xla_gpu_enable_triton_gemm': False}),
)
PROGRAMS = ('run_once', 'train_step', 'eval_step')
PLATFORMS = ('cpu', 'gpu', 'tpu')
# config.dtype 'auto': the study's mixed precision (bfloat16 compute) on accelerators, float32 on the CPU.
AUTO_DTYPE = {'cpu': 'float32', 'gpu': 'bfloat16', 'tpu': 'bfloat16'}
# What jax_platforms may name, as the platform the models see (JAX's 'cuda' and 'rocm' run as 'gpu').
_PLATFORM_NAMES = {'cpu': 'cpu', 'gpu': 'gpu', 'cuda': 'gpu', 'rocm': 'gpu', 'tpu': 'tpu'}

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
  options = compiler_options('run_once', jax.default_backend())
  return jax.jit(fn).trace().lower().compile(compiler_options=options)()


def compiler_options(program: str, platform: str, model_name: str = '') -> dict[str, Any] | None:
  """XLA options for one program (`PROGRAMS`) of `model_name` on `platform`, from PROGRAM_OPTIONS; None if none.

  Pass them to `jax.jit(...).lower(...).compile(compiler_options=...)` or `jax.jit(..., compiler_options=...)`:
  they reach that program alone, never the process's other programs.
  """
  if program not in PROGRAMS:
    raise ValueError(f'Unknown program {program!r}; known: {PROGRAMS}')
  chosen = {}
  for where, which, backbones, options in PROGRAM_OPTIONS:
    if where == platform and which == program and (backbones is None or model_name in backbones):
      chosen.update(options)
  return chosen or None


def accelerator_plugins() -> list[str]:
  """The GPU/TPU plugins JAX would load, found as JAX finds them (the `jax_plugins` package and entry points,
  and libtpu) without importing any."""
  found = set()
  spec = importlib.util.find_spec('jax_plugins')
  if spec is not None and spec.submodule_search_locations:
    found.update(f'jax_plugins.{module.name}' for module in pkgutil.iter_modules(spec.submodule_search_locations))
  found.update(entry.value for entry in importlib.metadata.entry_points(group='jax_plugins'))
  if importlib.util.find_spec('libtpu') is not None:
    found.add('libtpu')
  return sorted(found)


def expected_platform(jax_platforms: str | None, plugins: list[str] | None = None) -> str:
  """The platform JAX will run on, judged before its backend starts: the first of `jax_platforms` (JAX's
  setting, e.g. from JAX_PLATFORMS) when set, else 'accelerator' where a GPU/TPU plugin is installed, else 'cpu'.

  An installed plugin does not prove a device: `apply_backend_defaults` logs where the guess was wrong.
  """
  if jax_platforms:
    first = jax_platforms.split(',')[0].strip().lower()
    return _PLATFORM_NAMES.get(first, 'accelerator')
  return 'accelerator' if (accelerator_plugins() if plugins is None else plugins) else 'cpu'


def retains_host_memory(config: Any, platform: str) -> bool:
  """config.retain_freed_host_memory when set (True/False), else True on the CPU only: a GPU/TPU step's buffers
  live on the device, and the setting would only slow compilation and grow the host heap there."""
  setting = config.retain_freed_host_memory
  return setting if setting is not None else platform == 'cpu'


def compute_dtype(dtype: str, platform: str) -> str:
  """`dtype` unless 'auto'; for 'auto', AUTO_DTYPE's choice for `platform` (another accelerator: bfloat16)."""
  return dtype if dtype != 'auto' else AUTO_DTYPE.get(platform, 'bfloat16')


# Keys whose 'auto' (or None) a run replaces with the backend's choice before it starts, so config.json holds it.
RESOLVED_AT_START = ('dtype', 'retain_freed_host_memory')


def apply_backend_defaults(config: Any, platform: str) -> None:
  """Writes the backend's choices into the config's 'auto' keys (dtype), so the run's record and config.json
  hold the values the run uses. A resumed run on the same backend resolves to the same values."""
  config.dtype = compute_dtype(config.dtype, platform)


def backend_summary(config: Any, platform: str, device_kind: str, chosen: Any) -> str:
  """One log line: backend, device kind, dtype, host-memory retention and the formulations chosen."""
  fields = ', '.join(f'{name}={value}' for name, value in dataclasses.asdict(chosen).items())
  return (f'Backend {platform} ({device_kind}): dtype {compute_dtype(config.dtype, platform)}, freed host memory '
          f'{"kept" if config.retain_freed_host_memory else "returned"}, formulations {fields}')


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


def configure(config: Any, expected: str) -> None:
  """Applies the config's process settings for the `expected` platform (`expected_platform`); call it before
  the JAX backend starts (before any device query).

  Where freed host memory is kept, the process first restarts itself with larger per-thread malloc caches
  (`relaunch_with_thread_caches`; once). config.retain_freed_host_memory then holds the choice made.
  """
  import jax
  quiet_library_logs()
  config.retain_freed_host_memory = retains_host_memory(config, expected)
  if config.retain_freed_host_memory:
    relaunch_with_thread_caches()
  # Before the backend starts, so XLA's threads share the one arena.
  if config.retain_freed_host_memory and not retain_freed_memory():
    absl_logging.info('Not glibc: freed host memory goes back to the system as usual.')
  if config.compilation_cache_dir and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache_dir))
