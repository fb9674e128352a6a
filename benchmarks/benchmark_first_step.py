"""Seconds from start to the first train step done, spent as `train.train_and_evaluate` spends them.

  python -m benchmarks.benchmark_first_step --model nasnet_large --image_size 331
  python -m benchmarks.benchmark_first_step --model nasnet_large --given_backbone

Times, in one fresh process: the model's outline (one abstract trace: variable
shapes and the head's input), the initial variables (random, or with a given
backbone as from ported weights: --given_backbone uses zeros of the right
shapes, which compile and run as ported values do), the train state, and the
train step, traced, lowered and compiled by XLA as `steps.TrainStep` does on
its first call (on a CPU two programs, gradients and update, side by side; one
program elsewhere); then that step's first run, on a batch of zeros. The train
step is the full fine-tune (every layer trainable), unless --freeze_backbone
(the study's first phase).
No persistent compilation cache is used, unless --compilation_cache names one
(as covid_jax.main's `compilation_cache_dir` does): run twice to time a re-run,
whose compilation is a load from the cache.

The process keeps freed host memory as covid_jax.main does, unless
--retain_freed_host_memory false: its one malloc arena slows XLA's compiler
threads (benchmarks/BENCHMARKS.md). Like covid_jax.main, it restarts itself at
once with glibc's per-thread malloc caches enlarged (covid_jax/runtime.py),
unless GLIBC_TUNABLES names their size already: GLIBC_TUNABLES=glibc.malloc.tcache_count=7
(glibc's default) times it without them. It also reports the seconds that
Python's garbage collector took within those steps, and how many of its
collections were full ones (covid_jax/runtime.py holds those back while the
model is traced).
"""

import argparse
import gc
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)

from covid_jax import runtime  # noqa: E402

if __name__ == '__main__':
  runtime.relaunch_with_thread_caches()  # As covid_jax.main does, before anything heavy loads.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from configs import default  # noqa: E402
from covid_jax import input_pipeline, model_init, state, steps  # noqa: E402


class GarbageCollectionClock:
  """Seconds spent in Python's garbage collector, and the number of full collections, while installed."""

  def __init__(self):
    self.seconds, self.full_collections, self._started = 0.0, 0, 0.0
    gc.callbacks.append(self._record)

  def _record(self, phase: str, info: dict) -> None:
    if phase == 'start':
      self._started = time.perf_counter()
    else:
      self.seconds += time.perf_counter() - self._started
      self.full_collections += info['generation'] == 2


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='nasnet_large')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--given_backbone', action='store_true', help='initialise only the head, as with init_from')
  parser.add_argument('--freeze_backbone', action='store_true', help="the study's first phase: only the head trains")
  parser.add_argument('--compilation_cache', help='persistent compilation cache directory (default: none)')
  parser.add_argument('--retain_freed_host_memory', choices=('true', 'false'),
                      help="the config key of that name (default: the config's); see covid_jax/runtime.py")
  args = parser.parse_args()
  if args.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', args.compilation_cache)
  config = default.get_config()
  config.model.name, config.model.image_size = args.model, args.image_size
  config.freeze_backbone = args.freeze_backbone
  if args.retain_freed_host_memory:
    config.retain_freed_host_memory = args.retain_freed_host_memory == 'true'
  if runtime.retains_host_memory(config, 'cpu'):  # As covid_jax.main does on a CPU, before the backend starts.
    runtime.retain_freed_memory()
  mesh = input_pipeline.data_mesh()
  chosen = model_init.choose_formulations(config, mesh.devices.flat[0].platform)  # As train.Trainer chooses them.
  model = model_init.create_model(config, chosen)
  seconds = {}
  collector = GarbageCollectionClock()

  start = time.perf_counter()
  outline = model_init.model_outline(model, config)
  seconds['outline'] = time.perf_counter() - start

  backbone = None
  if args.given_backbone:
    backbone = {col: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree['backbone'])
                for col, tree in outline.variables.items() if 'backbone' in tree}
  start = time.perf_counter()
  variables = jax.block_until_ready(model_init.initial_variables(model, config, backbone=backbone, outline=outline))
  seconds['initial variables'] = time.perf_counter() - start
  phase = state.make_phases(config)[0]

  start = time.perf_counter()
  # The layer order matters only to the study's second phase (trailing layers), which this does not time.
  train_state = state.make_state(model, config, variables, phase, [], steps_per_epoch=1000)
  seconds['train state'] = time.perf_counter() - start

  train_step, _ = steps.compile_steps(mesh, phase, config, chosen.separate_update)
  images = jax.ShapeDtypeStruct((args.batch_size, args.image_size, args.image_size, 3), jnp.float32)
  batch = {'image': images, 'label': jax.ShapeDtypeStruct((args.batch_size,), jnp.int32)}
  start = time.perf_counter()
  # The step traced, lowered and compiled as its first call does (on a CPU, two programs side by side).
  train_step.compile(train_state, batch, jax.random.key(0))
  seconds['train step'] = time.perf_counter() - start

  data = NamedSharding(mesh, PartitionSpec(steps.AXIS))
  zeros = {k: jax.make_array_from_process_local_data(data, np.zeros(s.shape, s.dtype)) for k, s in batch.items()}
  start = time.perf_counter()
  # The compiled step's first run is slower than the later ones: it faults its buffers in (benchmarks/BENCHMARKS.md).
  jax.block_until_ready(train_step(train_state, zeros, jax.random.key(0)))
  seconds['first run'] = time.perf_counter() - start

  print(f'{args.model}@{args.image_size} batch {args.batch_size}, phase {phase.name} '
        f'({phase.trainable.value} trainable), {"given" if args.given_backbone else "random"} backbone:')
  print(', '.join(f'{name} {s:.1f} s' for name, s in seconds.items()) + f'; total {sum(seconds.values()):.1f} s')
  print(f'Python garbage collection within them: {collector.seconds:.2f} s, '
        f'{collector.full_collections} full collections')


if __name__ == '__main__':
  main()
