"""DICOM input: display values by the standard's formulas, every unusable file rejected with its reason, and
--patient_from_dicom keeping a patient's images in one split.

The expected gray levels are computed here from DICOM PS3.3 C.11 written out by hand, not by the code under test.
"""

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate

from data_prep import build, images


def _dicom(stored: np.ndarray, *, photometric: str = 'MONOCHROME2', bits_stored: int = 16, patient_id: str = 'P1',
           **attributes) -> bytes:
  """An Explicit VR Little Endian DICOM file holding `stored` as 16-bit unsigned values, with the attributes."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
  meta.MediaStorageSOPInstanceUID = uid.generate_uid()
  meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
  ds = FileDataset(None, {}, file_meta=meta, preamble=b'\0' * 128)
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.PatientID = patient_id
  ds.Rows, ds.Columns = stored.shape[:2]
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
  for name, value in attributes.items():
    setattr(ds, name, value)
  ds.PixelData = stored.astype('<u2').tobytes()
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


def _read(data: bytes) -> FileDataset:
  return pydicom.dcmread(io.BytesIO(data))


def _with(values: dict[tuple[int, int], int], background: int) -> np.ndarray:
  """A 64 x 64 image of `background` with the given pixels set."""
  stored = np.full((64, 64), background, np.uint16)
  for at, value in values.items():
    stored[at] = value
  return stored


def _linear_window(x: float, center: float, width: float) -> int:
  """PS3.3 C.11.2.1.2.1, LINEAR, onto 0..255."""
  if x <= center - 0.5 - (width - 1) / 2:
    return 0
  if x > center - 0.5 + (width - 1) / 2:
    return 255
  return round(((x - (center - 0.5)) / (width - 1) + 0.5) * 255)


# Stored value -> gray for an image whose values span 100..1100 and no window: (x - 100) / 1000 * 255.
MIN_MAX = {100: 0, 1100: 255, 350: 64, 900: 204, 500: 102}
AT = [(0, 0), (0, 1), (5, 7), (40, 3), (63, 63)]  # Where each of MIN_MAX's values goes.


@pytest.mark.parametrize('photometric,invert', [('MONOCHROME2', False), ('MONOCHROME1', True)])
def test_min_max_of_the_stored_values_with_monochrome1_inverted(photometric, invert):
  stored = _with(dict(zip(AT, MIN_MAX)), background=500)
  gray = images.decode(_dicom(stored, photometric=photometric))
  assert gray.dtype == np.uint8 and gray.shape == (64, 64)
  for at, (x, want) in zip(AT, MIN_MAX.items()):
    assert want == round((x - 100) / 1000 * 255)
    assert gray[at] == (255 - want if invert else want), (photometric, at)


def test_twelve_bits_stored_in_sixteen_ignore_the_unused_high_bits():
  values = {(0, 0): 0, (0, 1): 4095, (40, 0): 1000, (40, 1): 3000}
  stored = _with(values, background=2048)
  stored[32:] |= 0xF000  # Junk above bit 11 in half the image (an old overlay): not part of the values.
  gray = images.decode(_dicom(stored, bits_stored=12))
  assert [gray[at] for at in values] == [0, 255, round(1000 / 4095 * 255), round(3000 / 4095 * 255)] == \
      [0, 255, 62, 187]


def test_window_center_width_on_stored_values():
  values = [1000, 1600, 1800, 2000, 2600]
  stored = _with(dict(zip(AT, values)), background=1800)
  gray = images.decode(_dicom(stored, WindowCenter=1800, WindowWidth=600))
  assert [gray[at] for at in AT] == [_linear_window(v, 1800, 600) for v in values] == [0, 43, 128, 213, 255]


def test_rescale_slope_intercept_then_the_first_window():
  values = [400, 512, 560, 700]  # Stored; x = 2 * stored - 1024, so -224, 0, 96, 376.
  stored = _with(dict(zip(AT, values)), background=512)
  gray = images.decode(_dicom(stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                              WindowCenter=[40, 400], WindowWidth=[400, 2000]))
  assert [gray[at] for at in AT[:4]] == [_linear_window(2 * v - 1024, 40, 400) for v in values] == [0, 102, 164, 255]


def _voi_lut(descriptor: list[int], entries: list[int], as_words: bool) -> Dataset:
  """A VOI LUT Sequence item, its data as OW words or US values."""
  item = Dataset()
  item.LUTDescriptor = descriptor
  if as_words:
    item.add_new('LUTData', 'OW', np.asarray(entries, '<u2').tobytes())
  else:
    item.add_new('LUTData', 'US', entries)
  return item


def test_voi_lut_sequence_wins_over_a_window():
  lut = [16 * i for i in range(256)]  # Maps 1000..1255; scaled over its entries' range 0..4080.
  values = [900, 1063, 1100, 5000]
  stored = _with(dict(zip(AT, values)), background=1100)
  gray = images.decode(_dicom(stored, VOILUTSequence=[_voi_lut([256, 1000, 16], lut, as_words=True)],
                              WindowCenter=1000, WindowWidth=10))
  by_hand = [round(lut[min(max(v - 1000, 0), 255)] / 4080 * 255) for v in values]
  assert [gray[at] for at in AT[:4]] == by_hand == [0, 63, 100, 255]


def test_eight_bit_voi_lut_with_more_than_256_entries():
  """pydicom 3.0's apply_voi would index this LUT through uint8, reading entry 44 (300 - 256) for the value 300."""
  values = [0, 300, 4000, 4095]
  stored = _with(dict(zip(AT, values)), background=0)
  gray = images.decode(_dicom(stored, bits_stored=12,
                              VOILUTSequence=[_voi_lut([4096, 0, 8], [i // 16 for i in range(4096)], as_words=False)]))
  assert [gray[at] for at in AT[:4]] == [v // 16 for v in values] == [0, 18, 250, 255]


def test_rle_compressed_decodes_like_uncompressed():
  stored = np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16)
  plain = _dicom(stored, bits_stored=12)
  ds = _read(plain)
  ds.compress(uid.RLELossless)
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  assert np.array_equal(images.decode(buffer.getvalue()), images.decode(plain))


def _jpeg_dicom(jpeg_size: int) -> tuple[bytes, np.ndarray]:
  """A 64 x 64 JPEG Baseline DICOM whose codestream is jpeg_size square, and Pillow's decode of that JPEG."""
  y, x = np.mgrid[0:jpeg_size, 0:jpeg_size]
  buffer = io.BytesIO()
  Image.fromarray((x * 2 + y).astype(np.uint8)).save(buffer, format='JPEG', quality=90)
  ds = _read(_dicom(np.zeros((64, 64), np.uint16)))
  ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
  ds.PixelData = encapsulate([buffer.getvalue()])
  ds['PixelData'].VR = 'OB'
  out = io.BytesIO()
  ds.save_as(out, enforce_file_format=True)
  return out.getvalue(), np.asarray(Image.open(buffer))


def test_jpeg_baseline_decodes_through_pillow():
  data, jpeg = _jpeg_dicom(64)
  low, high = int(jpeg.min()), int(jpeg.max())
  assert np.array_equal(images.decode(data), np.round((jpeg - low) * (255 / (high - low))).astype(np.uint8))


def _compressed_without_decoder() -> bytes:
  ds = _read(_dicom(np.zeros((64, 64), np.uint16)))
  ds.file_meta.TransferSyntaxUID = uid.JPEGLosslessSV1
  ds.PixelData = encapsulate([b'\xff\xd8\xff\xc3 not really a JPEG \xff\xd9'])
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


def _without_pixel_data() -> bytes:
  ds = _read(_dicom(np.zeros((64, 64), np.uint16)))
  for name in ('PixelData', 'Rows', 'Columns', 'SamplesPerPixel', 'PhotometricInterpretation', 'BitsAllocated',
               'BitsStored', 'HighBit', 'PixelRepresentation'):
    delattr(ds, name)
  ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid.BasicTextSRStorage
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


GOOD = _dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
PIXEL_TAG = b'\xe0\x7f\x10\x00'  # (7FE0,0010) Pixel Data, little endian.


@pytest.mark.parametrize('data,reason', [
    (_compressed_without_decoder(), r'DICOM pixel data is compressed \(JPEG Lossless, Non-Hierarchical, First-Order '
     r'Prediction .*transfer syntax 1\.2\.840\.10008\.1\.2\.4\.70\) and no decoder is installed'),
    (_without_pixel_data(), r'DICOM without pixel data \(not an image: Basic Text SR Storage\)'),
    (GOOD[:-1], r'truncated DICOM: element \(7FE0,0010\) needs 8192 bytes'),
    (GOOD[:len(GOOD) // 2], r'truncated DICOM: element \(7FE0,0010\)'),
    (GOOD[:GOOD.index(PIXEL_TAG) + 4], 'truncated or corrupt DICOM: image attributes but no pixel data'),
    (GOOD[:200], 'truncated'),
    (_jpeg_dicom(128)[0], 'corrupt DICOM: the compressed frame is 128x128 pixels but the header says 64x64'),
    (_dicom(np.zeros((64, 64)), photometric='RGB'),
     r'colour or unknown DICOM image \(Photometric Interpretation RGB\)'),
    (_dicom(np.zeros((64, 64)), NumberOfFrames=2), r'multi-frame DICOM \(2 frames\)'),
    (_dicom(np.zeros((16, 64))), 'too small: 64x16 pixels'),
    (_dicom(np.zeros((64, 64)), WindowCenter=10, WindowWidth=0), 'corrupt DICOM: ValueError: The .* Window Width'),
])
def test_unusable_dicom_is_rejected_with_its_reason(data, reason):
  with pytest.raises(images.Rejected, match=reason):
    images.decode(data)


def test_pixel_limit_is_checked_from_the_header():
  data = _dicom(np.zeros((40, 50)))
  assert images.header_pixels(data) == 2000
  with pytest.raises(images.Rejected, match='decompression bomb: 50x40 pixels exceeds the limit of 1999'):
    images.decode(data, max_pixels=1999)


def test_prepare_carries_the_patient_id():
  fingerprint, _ = images.prepare(_dicom(np.zeros((64, 64)), patient_id=' MRN-7 '), 32)
  assert fingerprint.patient_id == 'MRN-7'
  assert images.prepare(_dicom(np.zeros((64, 64)), patient_id=''), 32)[0].patient_id is None


def test_patient_from_dicom_keeps_each_patient_in_one_split(tmp_path: Path):
  rng = np.random.default_rng(0)
  patient_of = {}
  for label in (0, 1):
    (tmp_path / str(label)).mkdir()
    for patient in range(4):
      for view in range(3):
        pid = f'{"AB"[label]}{patient}' if (label, patient, view) != (1, 3, 2) else ''
        rel = f'{label}/img_{patient}{view}.dcm'
        (tmp_path / rel).write_bytes(_dicom(rng.integers(0, 4096, (64, 64)), bits_stored=12, patient_id=pid))
        patient_of[rel] = pid
  manifest, to_write = build.plan(tmp_path, {'0': 0, '1': 1}, build.parse_fractions('34,33,33'), 0, 32,
                                  workers=2, progress=False, patient_from_dicom=True)
  to_write.close()
  examples = {e['path']: e for e in manifest['examples']}
  assert sorted(examples) == sorted(patient_of) and not manifest['rejected']
  for rel, pid in patient_of.items():
    want = (pid, 'DICOM PatientID') if pid else (f'file:{rel}', 'own group')
    assert (examples[rel]['patient_id'], examples[rel]['patient_source']) == want
  for pid in set(patient_of.values()) - {''}:
    assert len({e['split'] for rel, e in examples.items() if patient_of[rel] == pid}) == 1, pid
  assert len({e['split'] for e in examples.values()}) == 3
  assert any(w.startswith('1 images have no DICOM PatientID') for w in manifest['warnings'])
