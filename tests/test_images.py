"""data_prep.images.decode: every supported encoding decodes to the pixels it holds."""

import io

import numpy as np
import pytest
from PIL import Image

from data_prep import duplicates, images


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


@pytest.fixture
def gray() -> np.ndarray:
  """A gradient with a marked corner, so flips and rotations show."""
  y, x = np.mgrid[0:48, 0:64]
  pixels = (x * 3 + y).astype(np.uint8)
  pixels[:8, :8] = 255
  return pixels


def test_gray_png_is_exact_and_single_channel(gray):
  assert np.array_equal(images.decode(_encode(Image.fromarray(gray), 'PNG')), gray)


def test_sixteen_bit_png_scales_to_eight_bits(gray):
  wide = Image.fromarray(gray.astype(np.uint16) * 257)
  assert wide.mode.startswith('I')
  assert np.array_equal(images.decode(_encode(wide, 'PNG')), gray)


def test_rgb_with_equal_channels_becomes_gray(gray):
  assert np.array_equal(images.decode(_encode(Image.fromarray(gray).convert('RGB'), 'PNG')), gray)


def test_colour_stays_rgb(gray):
  rgb = np.stack([gray, gray // 2, 255 - gray], -1)
  assert np.array_equal(images.decode(_encode(Image.fromarray(rgb), 'PNG')), rgb)


def test_rgba_is_composited_on_black(gray):
  rgba = np.stack([gray, gray, gray, np.full_like(gray, 255)], -1)
  rgba[0, 0, 3] = 0
  want = gray.copy()
  want[0, 0] = 0
  assert np.array_equal(images.decode(_encode(Image.fromarray(rgba), 'PNG')), want)


def test_exif_orientation_is_applied(gray):
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotate 90 CW to display.
  decoded = images.decode(_encode(Image.fromarray(gray), 'JPEG', quality=100, exif=exif))
  want = np.rot90(gray, k=-1)
  assert decoded.shape == want.shape
  assert np.abs(decoded.astype(int) - want).mean() < 2


def test_cmyk_jpeg_decodes_to_its_gray_content(gray):
  decoded = images.decode(_encode(Image.fromarray(gray).convert('CMYK'), 'JPEG', quality=100))
  assert decoded.shape[:2] == gray.shape
  assert np.abs(decoded.astype(int).reshape(48, 64, -1).mean(-1) - gray).mean() < 3


def test_palette_png(gray):
  assert np.array_equal(images.decode(_encode(Image.fromarray(gray).convert('P'), 'PNG')).shape, gray.shape)


@pytest.mark.parametrize('data,reason', [
    (b'', 'empty file'),
    (b'GIF89a not really', 'not an image'),
    (_encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)), 'PNG')[:2000],
     'truncated or corrupt'),
])
def test_unusable_bytes_are_rejected(data, reason):
  with pytest.raises(images.Rejected, match=reason):
    images.decode(data)


def test_pixel_limit_rejects_before_decoding():
  data = _encode(Image.new('L', (400, 300)), 'PNG')
  with pytest.raises(images.Rejected, match='decompression bomb: 400x300'):
    images.decode(data, max_pixels=100_000)


def test_perceptual_hash_survives_reencoding_but_separates_different_images(gray):
  rng = np.random.default_rng(0)
  base = (np.kron(rng.random((12, 16)), np.ones((16, 16))) * 255).astype(np.uint8)
  copy = Image.fromarray(base).resize((240, 180), Image.Resampling.BILINEAR)
  recoded = images.decode(_encode(copy, 'JPEG', quality=70))
  other = (np.kron(rng.random((12, 16)), np.ones((16, 16))) * 255).astype(np.uint8)
  distance = lambda a, b: int(np.unpackbits(images.perceptual_hash(a) ^ images.perceptual_hash(b)).sum())
  assert distance(base, recoded) <= duplicates.DEFAULT_NEAR_THRESHOLD
  assert distance(base, other) > 64
