"""covid_jax.tfrecord_reader, held against TensorFlow: a build's splits yield exactly the examples TFDS yields, in
its order; Examples TensorFlow writes (every feature kind, packed or not) parse to their values; damage is named."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from covid_jax import input_pipeline, tfrecord_reader


@pytest.mark.parametrize('split', ['train', 'val', 'test'])
def test_a_builds_split_yields_exactly_what_tfds_yields(built_dataset, split):
  data_dir, _ = built_dataset
  folder = input_pipeline.dataset_dir(data_dir)
  from_tfds = tfds.builder_from_directory(str(folder)).as_dataset(
      split=split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False)).as_numpy_iterator()
  ours = list(tfrecord_reader.split_examples(folder, split))
  want = list(from_tfds)
  assert len(ours) == len(want) > 0
  for got, expected in zip(ours, want):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
      assert got[key] == (value.item() if isinstance(value, np.generic) else value), key


def test_examples_tensorflow_writes_parse_to_their_values(tmp_path):
  features = {'blobs': [b'', b'\x00\xff' * 300], 'ints': [0, -1, 2**62, -(2**63)], 'floats': [0.5, -3.25, 1e30],
              'one': [7]}
  kinds = {'blobs': 'bytes_list', 'ints': 'int64_list', 'floats': 'float_list', 'one': 'int64_list'}
  path = tmp_path / 'examples.tfrecord'
  with tf.io.TFRecordWriter(str(path)) as writer:
    for scale in (1, 2):
      scaled = {name: [v * scale if name in ('floats', 'one') else v for v in values]
                for name, values in features.items()}
      example = tf.train.Example(features=tf.train.Features(feature={
          name: tf.train.Feature(**{kinds[name]: {'value': values}}) for name, values in scaled.items()}))
      writer.write(example.SerializeToString())
  parsed = [tfrecord_reader.parse_example(record) for record in tfrecord_reader.records(path)]
  assert [p['blobs'] for p in parsed] == [features['blobs']] * 2
  assert parsed[0]['ints'] == features['ints'] and parsed[1]['one'] == [14]
  np.testing.assert_array_equal(parsed[1]['floats'], np.float32(features['floats']) * 2)


def test_a_damaged_file_is_named(built_dataset, tmp_path):
  data_dir, _ = built_dataset
  (shard,) = tfrecord_reader.split_files(input_pipeline.dataset_dir(data_dir), 'val')
  data = shard.read_bytes()
  for name, damaged in (('flipped.tfrecord', data[:5] + bytes([data[5] ^ 1]) + data[6:]),
                        ('truncated.tfrecord', data[:-3])):
    (tmp_path / name).write_bytes(damaged)
    with pytest.raises(tfrecord_reader.RecordError, match=name):
      list(tfrecord_reader.records(tmp_path / name))
  with pytest.raises(ValueError, match="split 'validation' not in"):
    tfrecord_reader.split_files(input_pipeline.dataset_dir(data_dir), 'validation')
