"""Robust decoding of one source file into what the build keeps of it, or a reason it cannot be used.

JPEG and PNG decode with Pillow; DICOM (told by its content, see `dicom`) with pydicom.

Every failure becomes a `Rejected` with a human-readable reason, so the build can
account for every file instead of silently dropping some. The build keeps only an
image's fingerprints and its resized PNG, so no full-size pixels outlive a decode.
"""

import dataclasses
import hashlib
import io
import warnings

import numpy as np
import scipy.fft
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.dcm', '.dicom')
ACCEPTED_FORMATS = ('JPEG', 'PNG')
MIN_SIDE = 32
DEFAULT_MAX_PIXELS = 50_000_000  # Far above any radiograph; below what exhausts memory.
_ROWS = 256  # Rows that `resize_for_storage` rounds at once.

# Truncated files must fail, not decode as grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class Rejected(Exception):
  """A file the build cannot use; the message is the reason recorded in the manifest."""


@dataclasses.dataclass
class Fingerprint:
  """What duplicate detection and the manifest need of an image's file and decoded pixels."""

  file_sha256: str
  pixel_sha256: str
  perceptual_hash: np.ndarray  # Packed bits, see `perceptual_hash`.
  patient_id: str | None = None  # As the file's header states it (DICOM PatientID); None if it states none.


def header_pixels(data: bytes) -> int:
  """Width x height as the file's header states it, read without decoding; 0 if it has no readable header."""
  if _is_dicom(data):
    from data_prep import dicom  # pydicom loads only once a DICOM appears.
    return dicom.header_pixels(data)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # `decode` rejects bombs, with the reason.
      with Image.open(io.BytesIO(data)) as image:
        return image.width * image.height
  except (Image.DecompressionBombError, OSError, SyntaxError, ValueError):
    return 0


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """File bytes -> uint8 pixels: grayscale (H, W), or RGB (H, W, 3) only when the channels differ.

  Applies EXIF orientation; converts CMYK, palette, alpha and 16-bit images; DICOM as `dicom.decode` does.
  Raises Rejected with the reason otherwise.
  """
  return _decode(data, max_pixels)[0]


def _decode(data: bytes, max_pixels: int) -> tuple[np.ndarray, str | None]:
  """`decode`, with the patient id the file's header states (DICOM PatientID) or None."""
  if not data:
    raise Rejected('empty file')
  if _is_dicom(data):
    from data_prep import dicom
    pixels, patient_id = dicom.decode(data, max_pixels)
  else:
    pixels, patient_id = _decode_pillow(data, max_pixels), None
  if min(pixels.shape[:2]) < MIN_SIDE:
    raise Rejected(f'too small: {pixels.shape[1]}x{pixels.shape[0]} pixels (minimum side {MIN_SIDE})')
  return pixels, patient_id


def _is_dicom(data: bytes) -> bool:
  """A DICOM Part 10 file: 'DICM' after the 128-byte preamble (checked here, so that JPEG and PNG need no pydicom)."""
  return data[128:132] == b'DICM'


def _decode_pillow(data: bytes, max_pixels: int) -> np.ndarray:
  """JPEG or PNG bytes -> uint8 pixels, as `decode` describes."""
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
  return _to_uint8(image)


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
    return np.asarray(image if image.mode == 'L' else image.convert('L'))
  rgb = np.asarray(image.convert('RGB'))
  if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
    return np.ascontiguousarray(rgb[..., 0])
  return rgb


def perceptual_hash(pixels: np.ndarray, hash_size: int = 16) -> np.ndarray:
  """DCT hash (pHash) with hash_size**2 bits, packed: robust to re-encoding and slight resizing."""
  # The channels' mean, truncated as a float mean's astype(uint8) does, without a float copy of the image.
  gray = pixels if pixels.ndim == 2 else (pixels.sum(axis=-1, dtype=np.uint16) // 3).astype(np.uint8)
  small = np.asarray(Image.fromarray(gray).resize((4 * hash_size,) * 2, Image.Resampling.BOX),
                     np.float64)
  low = scipy.fft.dctn(small, norm='ortho')[:hash_size, :hash_size].ravel()
  bits = low[1:] > np.median(low[1:])  # Skip the DC term: it only encodes brightness.
  return np.packbits(np.concatenate([[False], bits]))


def prepare(data: bytes, size: int, keep_aspect: bool = False,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Fingerprint, bytes]:
  """Decodes one file (Rejected if unusable): its fingerprint, and its PNG resized for storage.

  Returns no pixels: the full-size image is freed on return, and the PNG is lossless.
  """
  pixels, patient_id = _decode(data, max_pixels)
  pixel_digest = hashlib.sha256(str(pixels.shape).encode())
  pixel_digest.update(pixels)  # The array's own buffer (decode's arrays are C-contiguous): no copy.
  fingerprint = Fingerprint(hashlib.sha256(data).hexdigest(), pixel_digest.hexdigest(), perceptual_hash(pixels),
                            patient_id)
  return fingerprint, encode_png(resize_for_storage(pixels, size, keep_aspect))


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
  values = np.asarray(memoryview(resized))  # TensorFlow's float32 output, read-only and not copied.
  stored = np.empty(values.shape, np.uint8)
  for start in range(0, size, _ROWS):  # A block of rows at a time, so no float copy of the whole image exists.
    stored[start:start + _ROWS] = np.clip(np.round(values[start:start + _ROWS]), 0, 255)
  return stored


def encode_png(pixels: np.ndarray) -> bytes:
  """uint8 (H, W, 1) or (H, W, 3) -> PNG bytes (lossless, so the stored pixels are exact)."""
  buffer = io.BytesIO()
  Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format='PNG')
  return buffer.getvalue()
