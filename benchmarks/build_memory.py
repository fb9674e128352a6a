"""Peak resident memory of the data build: large images decoded together, and large stored images.

  python -m benchmarks.build_memory [--num_images 8 --side 4000 --image_size 224 --workers 8 --max_pixels 20000000]

Writes --num_images gray PNGs of --side x --side pixels, builds them (`data_prep.build`'s plan and write) in a fresh
process and prints its peak RSS beside that of a build of tiny images: the baseline of importing TensorFlow and
TFDS. The build's decodes share a budget of 2 x --max_pixels pixels. --pin_malloc fixes glibc's mmap threshold
(MALLOC_MMAP_THRESHOLD_), so that freed large blocks leave the process instead of staying cached in the decoding
threads' arenas: resident memory then follows what the build holds, as tests/test_build_memory.py measures it.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PINNED_MALLOC = {'MALLOC_MMAP_THRESHOLD_': str(1 << 20)}

_BUILD = """
import sys
from pathlib import Path
from data_prep import build
source, data_dir, image_size, workers, max_pixels = sys.argv[1:]
manifest, to_write = build.plan(Path(source), {'0': 0, '1': 1}, {'train': 1.0}, 0, int(image_size),
                                max_pixels=int(max_pixels), workers=int(workers), progress=False)
build.write(manifest, to_write, Path(data_dir), overwrite=False)
"""


def make_source(root: Path, num_images: int, side: int) -> Path:
  """`num_images` distinct gray side x side PNGs in class folders 0/ and 1/ (quick to write: smooth, level-1 zlib)."""
  ramp = np.linspace(0, 200, side, dtype=np.float32)
  for i in range(num_images):
    folder = root / str(i % 2)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (ramp[:, None] * 0.5 + ramp[None, :] * 0.5 * (i + 1) / num_images).astype(np.uint8)
    pixels[np.random.default_rng(i).integers(0, side, 16)] = 255
    Image.fromarray(pixels).save(folder / f'IM-{1000 + i}-0001.png', compress_level=1)
  return root


def peak_rss_kib(source: Path, data_dir: Path, image_size: int, workers: int, max_pixels: int,
                 env: dict[str, str] | None = None) -> int:
  """Builds source into data_dir in a fresh process; returns that process's peak resident memory in KiB."""
  process = subprocess.Popen(
      [sys.executable, '-c', _BUILD, str(source), str(data_dir), str(image_size), str(workers), str(max_pixels)],
      cwd=ROOT, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'CUDA_VISIBLE_DEVICES': '', **(env or {})})
  _, status, usage = os.wait4(process.pid, 0)  # This child's own usage, not every child's maximum.
  if status:
    raise RuntimeError(f'the build failed (wait status {status})')
  return usage.ru_maxrss


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_images', type=int, default=8)
  parser.add_argument('--side', type=int, default=4000, help='source images are side x side pixels')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--workers', type=int, default=8)
  parser.add_argument('--max_pixels', type=int, default=20_000_000)
  parser.add_argument('--pin_malloc', action='store_true', help=f'run the builds with {PINNED_MALLOC}')
  args = parser.parse_args()

  env = PINNED_MALLOC if args.pin_malloc else None
  with tempfile.TemporaryDirectory() as tmp:
    tiny = peak_rss_kib(make_source(Path(tmp, 'tiny'), 4, 64), Path(tmp, 'tiny_out'), 64, args.workers,
                        args.max_pixels, env)
    peak = peak_rss_kib(make_source(Path(tmp, 'source'), args.num_images, args.side), Path(tmp, 'out'),
                        args.image_size, args.workers, args.max_pixels, env)
  print(f'tiny-image build {tiny / 1024:,.0f} MiB; this build {peak / 1024:,.0f} MiB (+{(peak - tiny) / 1024:,.0f})')
  print(f'| {args.num_images} x {args.side}^2 gray | {args.image_size} | {args.workers} | {args.max_pixels:,} | '
        f'{"pinned" if args.pin_malloc else "glibc default"} | {peak / 1024:,.0f} (+{(peak - tiny) / 1024:,.0f}) |')


if __name__ == '__main__':
  main()
