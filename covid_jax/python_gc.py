"""Python's full garbage collections held back while a model is traced and compiled.

After TensorFlow, JAX and Flax are imported the process holds millions of
Python objects, and tracing a model's train step creates millions more.
CPython (3.11, which the project runs) starts a full (generation 2)
collection, which walks every object, once ten generation-1 collections have
passed and the survivors since the last full one reach a quarter of
generation 2: tracing NASNetLarge's train step set off eight of them, about
3 s in all, on the thread that traces, on the way to the first step
(BENCHMARKS.md). Held back, nothing is lost: young collections still run,
reference counting frees acyclic garbage at once, and cycles that reached
generation 2 wait for the first full collection after the block.
"""

import contextlib
import gc
import threading
from collections.abc import Iterator

# Generation 2's threshold counts generation-1 collections; at this value a full collection never comes.
_NEVER = 2**31 - 1
_lock = threading.Lock()
_depth = 0  # Blocks open now, in any thread.
_saved_threshold = 0  # Generation 2's threshold before the first of them opened.


@contextlib.contextmanager
def full_collections_deferred() -> Iterator[None]:
  """Within the block (or a function it decorates), no full collection starts; young ones do.

  Blocks may nest and overlap across threads: the threshold comes back when the last of them closes.
  """
  global _depth, _saved_threshold
  with _lock:
    young, middle, old = gc.get_threshold()
    if _depth == 0:
      _saved_threshold = old
      gc.set_threshold(young, middle, _NEVER)
    _depth += 1
  try:
    yield
  finally:
    with _lock:
      _depth -= 1
      if _depth == 0:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _saved_threshold)
