"""DICOM Part 10 files -> the uint8 grayscale the build stores, and the PatientID each file states.

`images` sends here what holds 'DICM' after the 128-byte preamble. The display pipeline of DICOM PS3.3 C.11:
stored values -> Modality LUT (or Rescale Slope/Intercept) -> VOI LUT (or the first Window Center/Width; else the
image's own min-max) -> 0..255, MONOCHROME1 inverted so that bone is bright as in MONOCHROME2. Only single-frame
grayscale images are accepted; anything else, and pixel data that no installed decoder can decompress, is rejected
with the reason. No pixel is decoded before the header has passed the pixel limit.
"""

import io
import warnings

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut, apply_windowing, get_decoder

from data_prep.images import Rejected

_GRAY = ('MONOCHROME1', 'MONOCHROME2')
_UNDEFINED = 0xFFFFFFFF  # The length of an element read up to its delimiter.


def header_pixels(data: bytes) -> int:
  """Rows x Columns as the header states them, read without the pixel data; 0 if unreadable."""
  try:
    ds = _read(data, stop_before_pixels=True)
    return int(ds.Rows) * int(ds.Columns)
  except Exception:  # Values convert lazily, and a malformed one can fail in any way: no readable header.
    return 0


def decode(data: bytes, max_pixels: int) -> tuple[np.ndarray, str | None]:
  """File bytes -> (uint8 grayscale (H, W), its PatientID or None if empty). Raises Rejected with the reason."""
  ds = _read(data)
  try:
    _check_header(ds, len(data), max_pixels)
    pixels = _to_uint8(ds.pixel_array, ds)
    return pixels, str(ds.get('PatientID') or '').strip() or None
  except Rejected:
    raise
  except Exception as e:  # pydicom on untrusted bytes: a malformed value or pixel data can fail in any way.
    raise Rejected(f'corrupt DICOM: {type(e).__name__}: {e}') from None


def _read(data: bytes, stop_before_pixels: bool = False) -> pydicom.FileDataset:
  """The parsed file, its elements still raw (Rejected if pydicom cannot parse it)."""
  try:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
  except Exception as e:  # Malformed input reaches pydicom's parser as struct, key and encoding errors alike.
    raise Rejected(f'corrupt DICOM: {type(e).__name__}: {e}') from None


def _check_header(ds: pydicom.FileDataset, size: int, max_pixels: int) -> None:
  """Rejects, before any pixel is decoded, what the header shows to be unusable."""
  if not ds.keys():
    raise Rejected('truncated or empty DICOM: no data elements after the file meta information')
  last = ds.get_item(max(ds.keys()))
  if isinstance(last, RawDataElement) and last.length != _UNDEFINED and last.value_tell + last.length > size:
    # pydicom reads a value that the file's end cuts short without complaint.
    raise Rejected(f'truncated DICOM: element {last.tag} needs {last.length} bytes at offset {last.value_tell}, '
                   f'the file ends at {size}')
  if 'PixelData' not in ds:
    if 'Rows' in ds:
      raise Rejected('truncated or corrupt DICOM: image attributes but no pixel data')
    sop_class = ds.get('SOPClassUID')
    raise Rejected(f'DICOM without pixel data (not an image: {getattr(sop_class, "name", sop_class) or "unknown"})')
  syntax = ds.file_meta.get('TransferSyntaxUID')
  if syntax is not None and syntax.is_compressed:
    try:
      available = get_decoder(syntax).is_available
    except NotImplementedError:
      available = False
    if not available:
      raise Rejected(f'DICOM pixel data is compressed ({syntax.name}, transfer syntax {syntax}) and no decoder '
                     'is installed')
  photometric = str(ds.get('PhotometricInterpretation', '')).strip()
  if photometric not in _GRAY:
    raise Rejected(f'colour or unknown DICOM image (Photometric Interpretation {photometric or "missing"}); '
                   f'accepted: {", ".join(_GRAY)}')
  frames = int(ds.get('NumberOfFrames') or 1)
  if frames != 1:
    raise Rejected(f'multi-frame DICOM ({frames} frames); only single images are accepted')
  rows, columns = int(ds.get('Rows') or 0), int(ds.get('Columns') or 0)
  if rows * columns > max_pixels:
    raise Rejected(f'decompression bomb: {columns}x{rows} pixels exceeds the limit of {max_pixels}')
  if syntax is not None and syntax.is_encapsulated and syntax != uid.RLELossless:
    _check_codestream_size(ds, rows, columns)


def _check_codestream_size(ds: pydicom.Dataset, rows: int, columns: int) -> None:
  """Rejects a JPEG or JPEG 2000 frame whose own header states another size than Rows x Columns.

  Pillow decodes the codestream at its own size, so a small DICOM header could otherwise hide a bomb.
  """
  frame = next(generate_frames(ds.PixelData, number_of_frames=1))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # The size is compared below.
    with Image.open(io.BytesIO(frame), formats=('JPEG', 'JPEG2000')) as image:
      width, height = image.size
  if (width, height) != (columns, rows):
    raise Rejected(f'corrupt DICOM: the compressed frame is {width}x{height} pixels but the header says '
                   f'{columns}x{rows}')


def _to_uint8(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
  """Stored values -> uint8 display gray: modality, then VOI stage, scaled over the VOI output's range."""
  values = apply_modality_lut(stored, ds)
  lut = _voi_lut(ds)
  if lut is not None:  # As pydicom's apply_voi_lut, a VOI LUT wins over a window.
    entries, first = lut
    values = entries[np.clip(np.rint(values) - first, 0, len(entries) - 1).astype(np.intp)]
    low, high = entries.min(), entries.max()  # Descriptors often overstate the LUT's bits.
  elif 'WindowCenter' in ds and 'WindowWidth' in ds:
    values = apply_windowing(values, ds)  # The first window; output between what it maps -inf and +inf to.
    low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
  else:
    low, high = values.min(), values.max()
  span = float(high) - float(low)
  scaled = (values - float(low)) * (255.0 / span) if span else np.zeros(values.shape)
  gray = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
  return 255 - gray if ds.PhotometricInterpretation.strip() == 'MONOCHROME1' else gray


def _voi_lut(ds: pydicom.Dataset) -> tuple[np.ndarray, int] | None:
  """The first VOI LUT's entries and the first value it maps, or None without one.

  Read here rather than through pydicom 3.0's apply_voi, which indexes an 8-bit LUT through uint8 and so wraps
  inputs past 255.
  """
  items = ds.get('VOILUTSequence')
  if not items or 'LUTDescriptor' not in items[0] or 'LUTData' not in items[0]:
    return None
  count, first = int(items[0].LUTDescriptor[0]) or 2 ** 16, int(items[0].LUTDescriptor[1])
  data = items[0].LUTData
  if isinstance(data, bytes):  # OW: 16-bit words whatever the entries' bits (PS3.3 C.11.2.1.1).
    entries = np.frombuffer(data, '<u2' if ds.original_encoding[1] else '>u2')
  else:
    entries = np.atleast_1d(np.asarray(data, np.int64))
  if len(entries) != count:
    raise ValueError(f'the VOI LUT holds {len(entries)} entries, its descriptor says {count}')
  return entries.astype(np.float64), first
