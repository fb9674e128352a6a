"""Datasets for the tests, made with the project's own data_prep plus hand-made bad files."""

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import build, synthetic

# Bad files planted in the source folder -> a phrase their rejection reason must contain.
BAD_FILES = {
    '1/person9001_virus_1.jpeg': 'truncated or corrupt',  # Truncated JPEG.
    '1/person9002_virus_2.jpeg': 'not an image',  # Random bytes.
    '0/IM-9003-0001.png': 'empty file',
    '0/IM-9004-0001.jpg': 'not an image',  # Text with an image extension.
    '0/IM-9005-0001.png': 'unsupported image format GIF',
    '0/IM-9006-0001.jpeg': 'too small',
    '1/person9007_bacteria_7.png': 'decompression bomb',
    '0/notes.txt': 'not an image file extension',
    '0/.DS_Store': 'hidden or system file',
    '1/._person9008_virus_8.jpeg': 'hidden or system file',
    '1/Thumbs.db': 'hidden or system file',
    'README.md': 'not inside a class folder',
}
# Pixel limit used by the fixture build, so the planted bomb stays small on disk.
MAX_PIXELS = 1_000_000
NUM_SYNTHETIC = 300


@dataclasses.dataclass
class Source:
  root: Path
  exact_duplicate: tuple[str, str]  # (original, copy under another patient's name)
  near_duplicate: tuple[str, str]  # (original, resized + re-encoded copy under another name)
  unparseable: str


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def synthetic_source_with_bad_files(root: Path) -> Source:
  synthetic.generate(root, NUM_SYNTHETIC, seed=0)
  originals = sorted(p.relative_to(root).as_posix() for p in (root / '0').iterdir())
  good = _jpeg(np.asarray(Image.open(root / originals[0]).convert('L')))
  writes = {
      '1/person9001_virus_1.jpeg': good[:len(good) // 2],
      '1/person9002_virus_2.jpeg': np.random.default_rng(0).bytes(5000),
      '0/IM-9003-0001.png': b'',
      '0/IM-9004-0001.jpg': b'this is a text file, not a JPEG\n',
      '0/notes.txt': b'notes\n',
      '0/.DS_Store': b'\0\0\0\1Bud1',
      '1/._person9008_virus_8.jpeg': good,
      '1/Thumbs.db': b'\0' * 64,
      'README.md': b'# data\n',
  }
  for rel, data in writes.items():
    (root / rel).write_bytes(data)
  Image.new('L', (64, 64)).save(root / '0/IM-9005-0001.png', format='GIF')
  Image.new('L', (20, 400), 128).save(root / '0/IM-9006-0001.jpeg')
  Image.new('L', (1200, 1000), 0).save(root / '1/person9007_bacteria_7.png')

  exact = (originals[1], '0/IM-9100-0001.jpeg')
  shutil.copy(root / exact[0], root / exact[1])
  near = (originals[2], '0/NORMAL2-IM-9101-0001.JPEG')
  image = Image.open(root / near[0]).convert('L')
  image.resize((int(image.width * 0.95), int(image.height * 0.95)), Image.Resampling.BILINEAR).save(
      root / near[1], format='JPEG', quality=75)
  unparseable = '1/scan_0042.png'
  Image.open(root / sorted((root / '1').iterdir())[0]).convert('L').rotate(90, expand=True).save(root / unparseable)
  return Source(root, exact, near, unparseable)


def build_dataset(source_dir: Path, data_dir: Path, image_size: int, seed: int = 0) -> tuple[Path, dict]:
  """Runs the build's plan and write steps; returns (data_dir, manifest)."""
  manifest, to_write = build.plan(source_dir, build.parse_label_map('0=0,1=1'), build.parse_fractions('64,16,20'),
                                  seed, image_size, max_pixels=MAX_PIXELS, progress=False)
  build.write(manifest, to_write, data_dir, overwrite=False)
  assert json.loads((data_dir / 'manifest.json').read_text()) == manifest
  return data_dir, manifest
