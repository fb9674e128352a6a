"""The records of a built dataset read without TensorFlow: TFRecord framing and tf.train.Example in plain Python.

`data_prep.build` writes each split as TFDS TFRecord shards; training only
reads them, so a host without TensorFlow (often an accelerator host, where it
is the heaviest package) can still read a build. `split_examples` yields a
split's examples in file order, as TFDS's `as_dataset(shuffle_files=False)`
yields them: features as bytes, integers or floats by their stored kind (TFDS
keeps Text and PNG bytes as bytes, ClassLabel as int64).

A TFRecord is: length (uint64, little-endian), masked CRC-32C of the length,
the record, masked CRC-32C of the record. The length's checksum is verified (it
catches a truncated or misaligned file); the record's is not, which pure Python
would take seconds per hundred MB for: a record that is not a valid Example is
an error, and a PNG carries its own checksums.
"""

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

Example = dict[str, list[bytes] | list[int] | list[float]]

_CASTAGNOLI = 0x82F63B78  # CRC-32C's polynomial, reversed.
_CRC_TABLE = []
for _byte in range(256):
  _crc = _byte
  for _ in range(8):
    _crc = (_crc >> 1) ^ _CASTAGNOLI if _crc & 1 else _crc >> 1
  _CRC_TABLE.append(_crc)
_MASK_DELTA = 0xA282EAD8
# Wire types of the protobuf encoding.
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


class RecordError(ValueError):
  """A file is not a well-formed TFRecord of tf.train.Example records; the message names the file."""


def masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: CRC-32C (Castagnoli), rotated right by 15 bits plus a constant."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def records(path: str | os.PathLike) -> Iterator[bytes]:
  """The records of one TFRecord file, in order; RecordError on a bad length checksum or a truncated record."""
  with open(path, 'rb') as f:
    while header := f.read(12):
      if len(header) < 12:
        raise RecordError(f'{path}: truncated record header')
      length, length_crc = struct.unpack('<QI', header)
      if masked_crc32c(header[:8]) != length_crc:
        raise RecordError(f'{path}: bad length checksum: not a TFRecord file, or damaged')
      record = f.read(length)
      if len(record) < length or len(f.read(4)) < 4:
        raise RecordError(f'{path}: truncated record')
      yield record


def _varint(buffer: memoryview, position: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = buffer[position]
    position += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, position
    shift += 7


def _fields(buffer: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
  """(field number, wire type, value) of each field of a protobuf message; a value is an int or the bytes."""
  position = 0
  while position < len(buffer):
    key, position = _varint(buffer, position)
    number, kind = key >> 3, key & 7
    if kind == _VARINT:
      value, position = _varint(buffer, position)
    elif kind == _LENGTH_DELIMITED:
      size, position = _varint(buffer, position)
      value, position = buffer[position:position + size], position + size
    elif kind in (_FIXED32, _FIXED64):
      size = 4 if kind == _FIXED32 else 8
      value, position = buffer[position:position + size], position + size
    else:
      raise ValueError(f'protobuf wire type {kind} is not used by tf.train.Example')
    yield number, kind, value


def _int64s(buffer: memoryview) -> list[int]:
  """An Int64List's values, packed or not, as signed 64-bit integers."""
  values = []
  for _, kind, value in _fields(buffer):
    if kind == _VARINT:
      values.append(value)
    else:
      position = 0
      while position < len(value):
        item, position = _varint(value, position)
        values.append(item)
  return [v - (1 << 64) if v >= 1 << 63 else v for v in values]


def _floats(buffer: memoryview) -> list[float]:
  """A FloatList's values, packed or not."""
  data = b''.join(bytes(value) for _, _, value in _fields(buffer))
  return list(struct.unpack(f'<{len(data) // 4}f', data))


def _feature(buffer: memoryview) -> list[bytes] | list[int] | list[float]:
  """A tf.train.Feature: bytes_list (1), float_list (2) or int64_list (3)."""
  for number, _, value in _fields(buffer):
    if number == 1:
      return [bytes(item) for _, _, item in _fields(value)]
    if number == 2:
      return _floats(value)
    if number == 3:
      return _int64s(value)
  return []


def parse_example(record: bytes) -> Example:
  """A serialized tf.train.Example -> {feature name: its values}."""
  example = {}
  for number, _, features in _fields(memoryview(record)):
    if number != 1:
      continue
    for entry_number, _, entry in _fields(features):
      if entry_number != 1:
        continue
      parts = {part_number: value for part_number, _, value in _fields(entry)}
      example[bytes(parts.get(1, b'')).decode()] = _feature(parts.get(2, memoryview(b'')))
  return example


def split_files(dataset_dir: str | os.PathLike, split: str) -> list[Path]:
  """The shards of `split` in order, as the build's dataset_info.json names them."""
  info_file = Path(dataset_dir) / 'dataset_info.json'
  info = json.loads(info_file.read_text())
  splits = {entry['name']: entry for entry in info.get('splits', [])}
  if split not in splits:
    raise ValueError(f'split {split!r} not in {info_file}; it has {sorted(splits)}')
  count = len(splits[split]['shardLengths'])
  template = splits[split].get('filepathTemplate', '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}')
  return [Path(dataset_dir) / template.format(DATASET=info['name'], SPLIT=split,
                                              FILEFORMAT=info.get('fileFormat', 'tfrecord'),
                                              SHARD_X_OF_Y=f'{i:05d}-of-{count:05d}') for i in range(count)]


def split_examples(dataset_dir: str | os.PathLike, split: str) -> Iterator[dict[str, bytes | int | float]]:
  """Every example of `split` in file order, each feature's single value (bytes, int or float)."""
  for path in split_files(dataset_dir, split):
    for index, record in enumerate(records(path)):
      try:
        example = parse_example(record)
      except (ValueError, IndexError) as e:
        raise RecordError(f'{path}: record {index} is not a tf.train.Example ({e})') from None
      yield {name: values[0] for name, values in example.items() if len(values) == 1}
