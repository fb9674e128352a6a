"""Duplicate groups of hand-made copies of synthetic radiographs: each copy is made from its original, so the truth
(same image or not) does not come from the hash. benchmarks/near_duplicates.py measures the whole families."""

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from data_prep import duplicates, images, synthetic

SEED = 0
# The two closest distinct images of one patient in the quickstart's set (3,000 images, seed 0): 24 bits apart.
SAME_PATIENT = (337, 338)


def _radiograph(index: int, num_images: int = 3000) -> tuple[Image.Image, bytes]:
  """Image `index` of the synthetic set, and its file as the generator writes it."""
  image, fmt, _, quality = synthetic.render(synthetic.plan(num_images, SEED)[index], SEED)
  return image, _file(image, fmt, quality)


def _file(image: Image.Image | np.ndarray, fmt: str = 'PNG', quality: int = 90) -> bytes:
  image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
  buffer = io.BytesIO()
  image.save(buffer, fmt, **({'quality': quality} if fmt == 'JPEG' else {}))
  return buffer.getvalue()


def _groups(*files: bytes) -> list[tuple[str, list[int]]]:
  """Duplicate groups of the files, fingerprinted as `images.prepare` does."""
  decoded = [images.decode(data) for data in files]
  digests = [hashlib.sha256(str(p.shape).encode() + p.tobytes()).hexdigest() for p in decoded]
  return duplicates.find_duplicate_groups(digests, np.stack([images.perceptual_hash(p) for p in decoded]))


@pytest.mark.parametrize('quality', [50, 70])
def test_copy_resized_to_90_percent_and_jpeg_joins_its_original(quality):
  # The reported case: a small original (118x112) whose 90% copy sits 18 bits away at quality 50 (10 at 70).
  image, _ = _radiograph(119, num_images=120)
  original = image.resize((118, 112), Image.Resampling.LANCZOS)
  copy = original.resize((106, 101), Image.Resampling.BILINEAR)
  assert _groups(_file(original), _file(copy, 'JPEG', quality)) == [('near', [0, 1])]


def test_gamma_changed_copy_joins_its_original():
  _, data = _radiograph(2)
  copy = np.round(255 * (images.decode(data) / 255) ** 1.4).astype(np.uint8)
  assert _groups(data, _file(copy)) == [('near', [0, 1])]


def test_16_bit_png_of_an_8_bit_image_is_an_exact_duplicate():
  _, data = _radiograph(3)
  pixels = images.decode(data).astype(np.float64)
  low_byte = np.random.default_rng(0).integers(-128, 128, pixels.shape)  # Decoding to 8 bits rounds it away.
  wide = (pixels * 257 + low_byte).clip(0, 65535).astype(np.uint16)
  assert _groups(data, _file(wide)) == [('exact', [0, 1])]


def test_copy_with_a_small_pad_joins_its_original():
  _, data = _radiograph(0)
  padded = np.pad(images.decode(data), 2)  # A 2-pixel black border on a 600x592 image.
  assert _groups(data, _file(padded)) == [('near', [0, 1])]


def test_distinct_images_of_one_patient_stay_apart():
  specs = synthetic.plan(3000, SEED)
  assert specs[SAME_PATIENT[0]].patient == specs[SAME_PATIENT[1]].patient
  assert _groups(*(_radiograph(i)[1] for i in SAME_PATIENT)) == []


@pytest.mark.parametrize('threshold', [0, 5, 20, 128])
def test_hamming_pairs_matches_a_brute_force_count(threshold):
  rng = np.random.default_rng(threshold)
  hashes = rng.integers(0, 256, (60, 32), dtype=np.uint8)
  flips = np.packbits(rng.random((30, 256)) < rng.uniform(0, 0.1, (30, 1)), axis=1)
  hashes[30:] = hashes[:30] ^ flips  # Near copies, 0 to ~25 bits from their originals.
  expected = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
              if np.unpackbits(np.bitwise_xor(hashes[i], hashes[j])).sum() <= threshold}
  pairs = duplicates.hamming_pairs(hashes, threshold, block=16)  # Several blocks, the last one partial.
  assert len(pairs) == len(set(pairs)) and set(pairs) == expected
