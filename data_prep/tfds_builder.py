"""The `covid_xray` TFDS dataset: planned examples -> TFRecord shards with dataset_info.

TFDS's builder gives us sharded TFRecords, per-split example counts, a
dataset_info.json and per-process reading (`tfds.split_for_jax_process`). Images
are stored as PNG bytes in a plain string feature rather than `tfds.features.Image`
because that feature fixes one channel count per dataset, while we keep grayscale
images one channel and colour images three. The build has already encoded them
(`images.prepare`) into PNG files, which are read one at a time as they are written.
"""

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

CLASS_NAMES = ('non_covid', 'covid')  # Label 0, label 1 (the positive class).
VERSION = '1.0.0'


class CovidXray(tfds.core.GeneratorBasedBuilder):
  """Chest X-rays, COVID-19 (1) vs non-COVID (0), split by patient by `data_prep.build`."""

  VERSION = tfds.core.Version(VERSION)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the Kaggle "covid-xray-dataset" (ahemateja19bec1025) and run
  `python -m data_prep.build --source_dir DATA/DATA --data_dir OUT`; the build
  audits and splits the folders, then writes this dataset.
  """

  def __init__(self, *, examples: Mapping[str, Sequence[Mapping[str, Any]]] = (), **kwargs: Any):
    """`examples[split]` is a list of dicts with png (a PNG file's path), label, patient_id, path."""
    self._examples = examples
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(), dtype=tf.string, doc='PNG, 1 (gray) or 3 (RGB) channels'),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
            'patient_id': tfds.features.Text(),
            'path': tfds.features.Text(doc='relative to the source directory'),
        }),
        supervised_keys=('image', 'label'),
        description='Audited, patient-level splits of a chest X-ray folder dataset; see manifest.json.',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    del dl_manager  # The build step has already read and planned the source folder.
    return {split: self._generate_examples(examples) for split, examples in self._examples.items()}

  def _generate_examples(self, examples: Sequence[Mapping[str, Any]]) -> Iterator[tuple[str, dict]]:
    for example in examples:
      yield example['path'], {
          'image': Path(example['png']).read_bytes(),
          'label': example['label'],
          'patient_id': example['patient_id'],
          'path': example['path'],
      }
