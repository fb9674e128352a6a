"""Robust decoding of one source file into pixels, or a reason it cannot be used.

Every failure becomes a `Rejected` with a human-readable reason, so the build can
account for every file instead of silently dropping some.
"""

import dataclasses
import hashlib
import io
import warnings

import numpy as np
import scipy.fft
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')
ACCEPTED_FORMATS = ('JPEG', 'PNG')
MIN_SIDE = 32
DEFAULT_MAX_PIXELS = 50_000_000  # Far above any radiograph; below what exhausts memory.

# Truncated files must fail, not decode as grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class Rejected(Exception):
  """A file the build cannot use; the message is the reason recorded in the manifest."""


@dataclasses.dataclass
class Decoded:
  """A decoded image: uint8 (H, W) for grayscale or (H, W, 3) for colour, plus its fingerprints."""

  pixels: np.ndarray
  file_sha256: str
  pixel_sha256: str
  perceptual_hash: np.ndarray  # Packed bits, see `perceptual_hash`.


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """File bytes -> uint8 pixels: grayscale (H, W), or RGB (H, W, 3) only when the channels differ.

  Applies EXIF orientation; converts CMYK, palette, alpha and 16-bit images.
  Raises Rejected with the reason otherwise.
  """
  if not data:
    raise Rejected('empty file')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
      width, height = image.size
      if width * height > max_pixels:
        raise Rejected(f'decompression bomb: {width}x{height} pixels exceeds the limit of {max_pixels}')
      if image.format not in ACCEPTED_FORMATS:
        raise Rejected(f'unsupported image format {image.format} (accepted: {", ".join(ACCEPTED_FORMATS)})')
      image.load()
      image = ImageOps.exif_transpose(image)
  except Rejected:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise Rejected(f'decompression bomb: {e}') from None
  except UnidentifiedImageError:
    raise Rejected('not an image (unrecognised content)') from None
  except (OSError, SyntaxError, ValueError) as e:
    raise Rejected(f'truncated or corrupt image: {e}') from None
  pixels = _to_uint8(image)
  if min(pixels.shape[:2]) < MIN_SIDE:
    raise Rejected(f'too small: {pixels.shape[1]}x{pixels.shape[0]} pixels (minimum side {MIN_SIDE})')
  return pixels


def _to_uint8(image: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 gray (H, W) or RGB (H, W, 3); RGB with equal channels becomes gray."""
  if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    wide = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith('I;16') or wide.max() > 255 else 255.0
    return np.clip(np.round(wide * (255.0 / top)), 0, 255).astype(np.uint8)
  if image.mode == 'F':
    raise Rejected('unsupported floating-point image')
  if 'A' in image.mode or (image.mode == 'P' and 'transparency' in image.info):
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (0, 0, 0, 255))
    image = Image.alpha_composite(background, rgba)
  if image.mode in ('L', '1'):
    return np.asarray(image.convert('L'))
  rgb = np.asarray(image.convert('RGB'))
  if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
    return np.ascontiguousarray(rgb[..., 0])
  return rgb


def perceptual_hash(pixels: np.ndarray, hash_size: int = 16) -> np.ndarray:
  """DCT hash (pHash) with hash_size**2 bits, packed: robust to re-encoding and slight resizing."""
  gray = pixels if pixels.ndim == 2 else pixels.mean(axis=-1)
  small = np.asarray(Image.fromarray(gray.astype(np.uint8)).resize((4 * hash_size,) * 2, Image.Resampling.BOX),
                     np.float64)
  low = scipy.fft.dctn(small, norm='ortho')[:hash_size, :hash_size].ravel()
  bits = low[1:] > np.median(low[1:])  # Skip the DC term: it only encodes brightness.
  return np.packbits(np.concatenate([[False], bits]))


def analyse(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
  """Decodes and fingerprints one file (Rejected if unusable)."""
  pixels = decode(data, max_pixels)
  pixel_digest = hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()
  return Decoded(pixels, hashlib.sha256(data).hexdigest(), pixel_digest, perceptual_hash(pixels))


def resize_for_storage(pixels: np.ndarray, size: int, keep_aspect: bool = False) -> np.ndarray:
  """Resize to size x size uint8, keeping the channel count (a 2-D input gains a channel axis).

  Plain (aspect-distorting) resize as the study did, or with `keep_aspect`
  resize-then-zero-pad. Antialiased bilinear, so large downscales do not alias.
  """
  import tensorflow as tf  # Only the writer needs TensorFlow.

  image = pixels[..., None] if pixels.ndim == 2 else pixels
  if keep_aspect:
    resized = tf.image.resize_with_pad(image, size, size, antialias=True)
  else:
    resized = tf.image.resize(image, (size, size), antialias=True)
  return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)
