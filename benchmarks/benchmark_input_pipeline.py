"""Input pipeline throughput: images/s of training batches, first (decoding) epoch vs cached epochs.

  python -m benchmarks.benchmark_input_pipeline --data_dir DATA [--image_size 224 --batch_size 128 --epochs 4]

Builds a synthetic dataset first when --data_dir has no manifest.json and
--num_images is given. Prints one line per epoch and a Markdown row.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

from covid_jax import input_pipeline  # noqa: E402


def _build_synthetic(data_dir: Path, num_images: int, image_size: int) -> None:
  with tempfile.TemporaryDirectory() as source:
    for args in (['data_prep.synthetic', '--output_dir', source, '--num_images', str(num_images), '--seed', '0'],
                 ['data_prep.build', '--source_dir', source, '--data_dir', str(data_dir), '--image_size',
                  str(image_size)]):
      subprocess.run([sys.executable, '-m', *args], check=True, stdout=subprocess.DEVNULL,
                     cwd=Path(__file__).resolve().parents[1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--num_images', type=int, default=0, help='build a synthetic set of this size if needed')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--epochs', type=int, default=4)
  parser.add_argument('--no_augment', action='store_true')
  parser.add_argument('--json', action='store_true', help='end with a JSON line of the results')
  args = parser.parse_args()

  data_dir = Path(args.data_dir)
  if not (data_dir / 'manifest.json').exists():
    if not args.num_images:
      parser.error(f'{data_dir} has no manifest.json; pass --num_images to build a synthetic set there')
    _build_synthetic(data_dir, args.num_images, args.image_size)

  reader = input_pipeline.SplitReader(data_dir, 'train', args.image_size)
  rates = []
  for epoch in range(args.epochs):
    start, count = time.perf_counter(), 0
    for batch in reader.train_epoch(args.batch_size, epoch, seed=0, flip=not args.no_augment,
                                    contrast=0.0 if args.no_augment else 0.2):
      jax.block_until_ready(batch['image'])
      count += batch['image'].shape[0]
    rates.append(count / (time.perf_counter() - start))
    print(f'epoch {epoch}: {count} images, {rates[-1]:,.0f} images/s' + (' (decoding)' if epoch == 0 else ' (cached)'))
  cached = sorted(rates[1:])[len(rates[1:]) // 2] if len(rates) > 1 else float('nan')
  if args.json:
    print(json.dumps({'image_size': args.image_size, 'batch_size': args.batch_size, 'first_epoch_images_per_s':
                      rates[0], 'cached_images_per_s': cached}))
    return
  print(f'| {args.image_size} | {args.batch_size} | {"off" if args.no_augment else "on"} | {rates[0]:,.0f} | '
        f'{cached:,.0f} | {os.cpu_count()} CPU cores, {jax.devices()[0].platform} |')


if __name__ == '__main__':
  main()
