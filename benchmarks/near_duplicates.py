"""Calibrates the near-duplicate threshold: hash distances of perturbed copies against distinct images.

  python -m benchmarks.near_duplicates [--num_images 3000 --num_perturbed 300 --seed 0]

Renders --num_images synthetic radiographs (data_prep.synthetic: several images
for some patients), each saved as the generator saves it. Each perturbation
family, with seeded random parameters, makes one copy of each of the first
--num_perturbed images (the `small:` ones of a 96-160 px version of it). Every
file goes through the build's path to its hash (`images.decode`, then
`images.perceptual_hash`, as `images.prepare` does). It prints the Hamming
distances between each original and its copy (per family: max, 99th
percentile, median) and between distinct images, same patient (the hard
negatives: one anatomy, jittered) and different patients (min, 1st
percentile), then the gap between the copies of the families the threshold
covers (all but NOT_COVERED) and the distinct pairs. Writes the histograms to
--json.
"""

import argparse
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import duplicates, images, synthetic

_HERE = Path(__file__).resolve().parent
_FILTERS = (Image.Resampling.NEAREST, Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC,
            Image.Resampling.LANCZOS)

Pixels = np.ndarray  # uint8 (H, W) or (H, W, 3), as `images.decode` returns.


def _encode(pixels: Pixels, fmt: str = 'PNG', quality: int = 90) -> bytes:
  """Pixels -> file bytes."""
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, fmt, **({'quality': quality} if fmt == 'JPEG' else {}))
  return buffer.getvalue()


def _resize(pixels: Pixels, rng: np.random.Generator) -> Pixels:
  """To 85-100% of the size, the aspect changed by up to 2%, with a random resampling filter."""
  scale = rng.uniform(0.85, 1.0)
  height, width = pixels.shape[:2]
  size = (round(width * scale * rng.uniform(0.98, 1.02)), round(height * scale))
  return np.asarray(Image.fromarray(pixels).resize(size, _FILTERS[rng.integers(len(_FILTERS))]))


def _shrink(pixels: Pixels, rng: np.random.Generator) -> Pixels:
  """To a short side of 96-160 px (the generator draws 200-600): a small original, as some sources hold."""
  height, width = pixels.shape[:2]
  scale = rng.uniform(96, 160) / min(height, width)
  return np.asarray(Image.fromarray(pixels).resize((round(width * scale), round(height * scale)),
                                                   Image.Resampling.LANCZOS))


def _margins(pixels: Pixels, rng: np.random.Generator, most: float) -> tuple[int, int, int, int]:
  """Top, bottom, left, right: each up to `most` of the image's height or width."""
  height, width = pixels.shape[:2]
  top, bottom = np.round(rng.uniform(0, most, 2) * height).astype(int)
  left, right = np.round(rng.uniform(0, most, 2) * width).astype(int)
  return int(top), int(bottom), int(left), int(right)


def _crop(most: float) -> Callable[[Pixels, np.random.Generator], Pixels]:
  """Cuts each side by up to `most` of the image's side."""

  def apply(pixels: Pixels, rng: np.random.Generator) -> Pixels:
    top, bottom, left, right = _margins(pixels, rng, most)
    height, width = pixels.shape[:2]
    return np.ascontiguousarray(pixels[top:height - bottom, left:width - right])

  return apply


def _pad(most: float) -> Callable[[Pixels, np.random.Generator], Pixels]:
  """Pads each side by up to `most` of the image's side, with black, white or the image's mean."""

  def apply(pixels: Pixels, rng: np.random.Generator) -> Pixels:
    top, bottom, left, right = _margins(pixels, rng, most)
    value = (0, 255, int(pixels.mean()))[rng.integers(3)]
    return np.pad(pixels, ((top, bottom), (left, right)) + ((0, 0),) * (pixels.ndim - 2), constant_values=value)

  return apply


def _gamma(pixels: Pixels, rng: np.random.Generator) -> Pixels:
  """Gamma in [0.7, 1.4] (a windowing or display change)."""
  return np.round(255 * (pixels / 255.0) ** rng.uniform(0.7, 1.4)).astype(np.uint8)


def _contrast(pixels: Pixels, rng: np.random.Generator) -> Pixels:
  """Contrast x0.7-1.3 about the mean, brightness +-20 levels, clipped."""
  mean = pixels.mean()
  out = mean + rng.uniform(0.7, 1.3) * (pixels - mean) + rng.uniform(-20, 20)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _tint(pixels: Pixels, rng: np.random.Generator) -> Pixels:
  """Gray -> RGB with per-channel gains in [0.9, 1] (a tinted export: decoded as colour)."""
  gray = pixels if pixels.ndim == 2 else pixels.mean(-1)
  return np.round(gray[..., None] * rng.uniform(0.9, 1.0, 3)).astype(np.uint8)


def _jpeg(pixels: Pixels, rng: np.random.Generator) -> bytes:
  """JPEG at quality 50-95."""
  return _encode(pixels, 'JPEG', int(rng.integers(50, 96)))


def _png(pixels: Pixels, rng: np.random.Generator) -> bytes:
  """Lossless: the family's own change only."""
  del rng
  return _encode(pixels)


def _sixteen_bit(pixels: Pixels, rng: np.random.Generator) -> bytes:
  """As a 16-bit PNG, the low byte dithered (decoding scales it back to the same 8 bits)."""
  gray = pixels if pixels.ndim == 2 else pixels.mean(-1)
  wide = np.clip(gray * 257.0 + rng.integers(-128, 128, gray.shape), 0, 65535).astype(np.uint16)
  return _encode(wide)


def _chain(*steps: Callable, last: Callable = _png) -> Callable[[Pixels, np.random.Generator], bytes]:
  """Pixel steps in order, then `last` (pixels -> file bytes)."""

  def apply(pixels: Pixels, rng: np.random.Generator) -> bytes:
    for step in steps:
      pixels = step(pixels, rng)
    return last(pixels, rng)

  return apply


# Family -> (original's decoded pixels, rng) -> the copy's file bytes.
FAMILIES: dict[str, Callable] = {
    'resize 85-100%': _chain(_resize),
    'JPEG q50-95': _chain(last=_jpeg),
    'gamma 0.7-1.4': _chain(_gamma),
    'contrast x0.7-1.3, +-20': _chain(_contrast),
    'pad <=0.5%/side': _chain(_pad(0.005)),
    'pad <=3%/side': _chain(_pad(0.03)),
    'crop <=0.5%/side': _chain(_crop(0.005)),
    'crop <=1%/side': _chain(_crop(0.01)),
    'crop <=3%/side': _chain(_crop(0.03)),
    '8 -> 16-bit PNG': _sixteen_bit,
    'gray -> tinted RGB': _chain(_tint),
    'resize + JPEG': _chain(_resize, last=_jpeg),
    'resize + gamma + JPEG': _chain(_resize, _gamma, last=_jpeg),
    'pad <=0.5% + resize + JPEG': _chain(_pad(0.005), _resize, last=_jpeg),
    'crop <=0.5% + resize + JPEG': _chain(_crop(0.005), _resize, last=_jpeg),
    'RGB + contrast + resize + JPEG': _chain(_tint, _contrast, _resize, last=_jpeg),
}
# The same, from a small original (`_shrink`, saved as PNG) instead of the generator's file.
SMALL_FAMILIES: dict[str, Callable] = {
    'small: JPEG q50-95': _chain(last=_jpeg),
    'small: resize + JPEG': _chain(_resize, last=_jpeg),
}


# Families the threshold does not cover: pads, and crops beyond 0.5% of a side, move the content as far as one
# synthetic patient's images differ from each other (position, zoom and angle jitter), so no threshold separates them.
NOT_COVERED = ('pad <=0.5%/side', 'pad <=3%/side', 'crop <=1%/side', 'crop <=3%/side', 'pad <=0.5% + resize + JPEG')


def _hamming_matrix(hashes: np.ndarray) -> np.ndarray:
  """All pairwise Hamming distances of packed hashes (float32 matmuls count exactly up to 2**24)."""
  bits = np.unpackbits(hashes, axis=1).astype(np.float32)
  return (bits @ (1 - bits).T + (1 - bits) @ bits.T).astype(np.int32)


def _hash(data: bytes) -> np.ndarray:
  """File bytes -> perceptual hash, as the build computes it (`images.prepare`)."""
  return images.perceptual_hash(images.decode(data))


def _distance(a: np.ndarray, b: np.ndarray) -> int:
  return int(np.unpackbits(a ^ b).sum())


def _stats(distances: np.ndarray, tail: str) -> dict:
  """Count, median, the tail's extreme and percentile ('high': max, p99; 'low': min, p1), histogram."""
  values, counts = np.unique(distances, return_counts=True)
  out = {'n': int(distances.size), 'median': float(np.median(distances))}
  if tail == 'high':
    out.update(max=int(distances.max()), p99=int(np.percentile(distances, 99, method='higher')))
  else:
    out.update(min=int(distances.min()), p1=int(np.percentile(distances, 1, method='lower')))
  out['histogram'] = {int(v): int(c) for v, c in zip(values, counts)}
  return out


def measure(num_images: int, num_perturbed: int, seed: int) -> dict:
  """Renders the set, perturbs its first `num_perturbed` images, returns the distance statistics."""
  specs = synthetic.plan(num_images, seed)
  rng = np.random.default_rng([seed, 1])
  hashes, copies = [], {name: [] for name in {**FAMILIES, **SMALL_FAMILIES}}
  for spec in specs:
    image, fmt, _, quality = synthetic.render(spec, seed)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({'quality': quality} if fmt == 'JPEG' else {}))
    pixels = images.decode(buffer.getvalue())
    hashes.append(images.perceptual_hash(pixels))
    if spec.index < num_perturbed:
      for name, family in FAMILIES.items():
        copies[name].append(_distance(hashes[-1], _hash(family(pixels, rng))))
      small = _shrink(pixels, rng)
      small_hash = _hash(_encode(small))
      for name, family in SMALL_FAMILIES.items():
        copies[name].append(_distance(small_hash, _hash(family(small, rng))))
  distances = _hamming_matrix(np.stack(hashes))
  patients = np.array([spec.patient for spec in specs])
  i, j = np.triu_indices(len(specs), 1)
  same = patients[i] == patients[j]
  return {
      'families': {name: _stats(np.array(d), 'high') for name, d in copies.items()},
      'same_patient': _stats(distances[i, j][same], 'low'),
      'different_patient': _stats(distances[i, j][~same], 'low'),
  }


def summarise(results: dict) -> list[str]:
  """The tables as text lines, then the gap between the covered families' copies and distinct images."""
  threshold = duplicates.DEFAULT_NEAR_THRESHOLD
  lines = [f'{"family":32s} {"max":>4s} {"p99":>4s} {"median":>6s}  copies over threshold {threshold}']
  for name, s in results['families'].items():
    over = sum(c for v, c in s['histogram'].items() if int(v) > threshold)
    lines.append(f'{name:32s} {s["max"]:4d} {s["p99"]:4d} {s["median"]:6.1f}  {over} of {s["n"]}'
                 + ('  (not covered)' if name in NOT_COVERED else ''))
  lines.append(f'{"distinct pairs":32s} {"min":>4s} {"p1":>4s} {"median":>6s}  pairs within threshold {threshold}')
  for key in ('same_patient', 'different_patient'):
    s = results[key]
    within = sum(c for v, c in s['histogram'].items() if int(v) <= threshold)
    lines.append(f'{key.replace("_", " "):32s} {s["min"]:4d} {s["p1"]:4d} {s["median"]:6.1f}  {within} of {s["n"]}')
  farthest = max(s['max'] for name, s in results['families'].items() if name not in NOT_COVERED)
  closest = min(results['same_patient']['min'], results['different_patient']['min'])
  lines.append(f'gap: covered copies <= {farthest} bits, distinct pairs >= {closest} bits'
               + (f'; midpoint {(farthest + closest) / 2:g}' if farthest < closest else ': none'))
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_images', type=int, default=3000, help='synthetic images (distinct pairs among all)')
  parser.add_argument('--num_perturbed', type=int, default=300, help='images each family makes a copy of')
  parser.add_argument('--seed', type=int, default=0, help='seeds the images and the perturbations')
  parser.add_argument('--json', default=str(_HERE / 'results' / 'near_duplicates.json'), help='JSON results file')
  args = parser.parse_args()

  start = time.perf_counter()
  results = measure(args.num_images, min(args.num_perturbed, args.num_images), args.seed)
  results = {'command': f'python -m benchmarks.near_duplicates --num_images {args.num_images} --num_perturbed '
                        f'{args.num_perturbed} --seed {args.seed}', 'date': time.strftime('%Y-%m-%d'),
             'threshold': duplicates.DEFAULT_NEAR_THRESHOLD, 'seconds': round(time.perf_counter() - start, 1),
             **results}
  print('\n'.join(summarise(results)))
  print(f'{results["seconds"]} s; wrote {args.json}')
  Path(args.json).write_text(json.dumps(results, indent=1) + '\n')


if __name__ == '__main__':
  main()
