"""Phase 'head' from cached backbone features against the uncached phase: wall time of each part, one backbone.

  python -m benchmarks.benchmark_head_features --data_dir DATA --model nasnet_large [--epochs 50 --uncached_steps 3]

DATA is a build of `data_prep.build` (at --image_size). The backbone is randomly
initialised: its weights do not change the time. Timed, in this order, on the
training code itself:

- the feature step's compile (its first batch, decoding the train split included);
- view 0 extraction: the features of every train and val image (`head_features.load_or_extract` with
  views=1, the cache's write included);
- view 1 extraction: every train image's augmented view, as the second view of one K=2 extraction;
- uncached: the first train step (compile included), --uncached_steps more steps, and one val pass after
  a compiling batch; 50 epochs = first step + val compile + epochs x (steps per epoch x median step + val pass);
- the cached head phase: `train._train` for --epochs epochs (no early stop), reading the cache written
  above: head steps (compile included), per-epoch val, checkpoints.

K=1 total = compile + view 0 extraction + cached epochs; K=2 total = K=1 total + view 1 extraction (a K=2 epoch
gathers one view per image as a K=1 epoch does). With --scale_to N the per-image parts (extractions, the cached
epochs' steps and val, uncached steps per epoch and val pass) are scaled linearly to a build of N images (this
build's train + val + test); the compiles and each epoch's checkpoints are not. Prints a Markdown row of the
scaled minutes; --json writes the numbers.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from covid_jax import head_features, runtime, steps, train  # noqa: E402


def _config(args: argparse.Namespace):
  config = default.get_config()
  config.update_from_flattened_dict({
      'data_dir': args.data_dir, 'model.name': args.model, 'model.image_size': args.image_size, 'init_from': None,
      'freeze_backbone': True, 'fine_tune.num_epochs': 0, 'num_epochs': args.epochs,
      'early_stopping.patience': args.epochs, 'head_features.views': 1, 'compilation_cache_dir': ''})
  runtime.configure(config, 'cpu')
  runtime.apply_backend_defaults(config, jax.devices()[0].platform)
  return config


def _timed(fn, *args, **kwargs):
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  jax.block_until_ready(result)
  return result, time.perf_counter() - start


def _uncached(trainer: train.Trainer, train_state, num_steps: int) -> dict[str, float]:
  """The uncached head phase's first step (compile included), median step and one val pass (compiled first)."""
  config = trainer.config
  train_fn, eval_fn = trainer.compile_steps(trainer.phases[0])
  state_copy = jax.tree.map(lambda x: x.copy(), train_state)  # The step donates its state.
  batches = trainer.readers['train'].train_epoch(config.batch_size, 1, config.seed, flip=config.augment.flip,
                                                 contrast=config.augment.contrast)
  key = jax.random.key(0)
  (state_copy, _), first = _timed(train_fn, state_copy, next(batches), key)
  times = []
  for _ in range(num_steps):
    (state_copy, _), seconds = _timed(train_fn, state_copy, next(batches), key)
    times.append(seconds)
  _, compile_eval = _timed(eval_fn, train_state, next(trainer.readers['val'].eval_batches(config.eval_batch_size)))
  _, val_pass = _timed(steps.split_outputs, eval_fn, train_state, trainer.readers['val'], config.eval_batch_size)
  return {'first_step_s': first, 'step_s': float(np.median(times)), 'val_compile_s': compile_eval,
          'val_pass_s': val_pass}


def run(args: argparse.Namespace) -> dict[str, float]:
  config = _config(args)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = train.Trainer(config, workdir)
    try:
      train_state, progress = train._start_or_resume(trainer)
      readers = trainer.readers
      features_fn = steps.compile_features_step(trainer.mesh, config.model.name)  # The one load_or_extract uses.
      _, compile_s = _timed(features_fn, train_state, next(readers['train'].eval_batches(config.eval_batch_size)))
      cached, view0 = _timed(head_features.load_or_extract, config, workdir, trainer.model.dtype, readers,
                             train_state)
      (view1, _), view1_s = _timed(head_features.extract_view, features_fn, train_state, readers['train'], 1, config)
      uncached = _uncached(trainer, train_state, args.uncached_steps)
      _, epochs_s = _timed(train._train, trainer, train_state, progress)
      history = trainer.checkpoints.progress('latest')['history']
    finally:
      trainer.checkpoints.close()
  counts = {split: reader.num_examples for split, reader in readers.items()}
  scale = args.scale_to / sum(counts.values()) if args.scale_to else 1.0
  k1_bytes = sum(split.features.nbytes for split in cached.values())
  result = {
      'model': args.model, 'image_size': args.image_size, 'images': counts, 'feature_size': view1.shape[-1],
      'epochs_run': len(history), 'features_compile_s': compile_s, 'view0_extraction_s': view0,
      'view1_extraction_s': view1_s, 'cached_epochs_s': epochs_s,
      # The epochs' steps and val alone (their records' seconds): the rest (checkpoints, logs) is per epoch.
      'cached_epochs_train_val_s': sum(record['seconds'] for record in history),
      **{f'uncached_{k}': v for k, v in uncached.items()},
      'cache_bytes_k1': k1_bytes, 'cache_bytes_k2': k1_bytes + view1.nbytes,
      'peak_host_memory_bytes': runtime.peak_resident_bytes(), 'cpu_cores': os.cpu_count(), 'scale': scale,
  }
  for suffix, factor in (('', 1.0), ('_scaled', scale)):
    steps_per_epoch = round(counts['train'] * factor) // config.batch_size
    per_epoch = steps_per_epoch * uncached['step_s'] + uncached['val_pass_s'] * factor
    result[f'uncached_epochs_s{suffix}'] = (uncached['first_step_s'] + uncached['val_compile_s']
                                            + args.epochs * per_epoch)
    epochs = epochs_s + result['cached_epochs_train_val_s'] * (factor - 1)
    result[f'k1_total_s{suffix}'] = compile_s + view0 * factor + epochs
    result[f'k2_total_s{suffix}'] = result[f'k1_total_s{suffix}'] + view1_s * factor
  return result


def _row(r: dict) -> str:
  """Minutes (scaled), the uncached/K=1 ratio, the cache's MiB at K=1 / K=2 (scaled), the process's peak GiB."""
  s = r['scale']
  minutes = lambda seconds, factor=s: f'{seconds * factor / 60:.1f}'
  return (f'| {r["model"]} | {minutes(r["features_compile_s"], 1.0)} | {minutes(r["view0_extraction_s"])} | '
          f'{minutes(r["view1_extraction_s"])} | '
          f'{minutes(r["cached_epochs_s"] + r["cached_epochs_train_val_s"] * (s - 1), 1.0)} | '
          f'**{minutes(r["k1_total_s_scaled"], 1.0)}** | **{minutes(r["k2_total_s_scaled"], 1.0)}** | '
          f'{minutes(r["uncached_epochs_s_scaled"], 1.0)} | '
          f'{r["uncached_epochs_s_scaled"] / r["k1_total_s_scaled"]:.0f}x | '
          f'{r["cache_bytes_k1"] * s / 2**20:.0f} / {r["cache_bytes_k2"] * s / 2**20:.0f} | '
          f'{r["peak_host_memory_bytes"] / 2**30:.1f} |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--model', default='nasnet_large')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--epochs', type=int, default=50)
  parser.add_argument('--uncached_steps', type=int, default=3, help='timed uncached steps after the first')
  parser.add_argument('--scale_to', type=int, default=0, help='also scale every time to a build of this many images')
  parser.add_argument('--json', help='write the numbers to this JSON file')
  args = parser.parse_args()
  result = run(args)
  print(json.dumps(result, indent=1))
  print(_row(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
  main()
