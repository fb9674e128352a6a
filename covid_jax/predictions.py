"""A split's predictions as a table, one row per image: its path and patient (from manifest.json), its label
and the model's logits; written as the run's predictions CSV.

The rows follow the order `steps.split_outputs` gathers (the split's file order), and each path is looked up
in the manifest for its patient, so intervals and paired comparisons can resample patients.
"""

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from covid_jax import input_pipeline, metrics
from covid_jax.scoring import Decision, calibrated_probability

COLUMNS = ('path', 'patient_id', 'label', 'p_covid', 'p_covid_calibrated')


@dataclasses.dataclass(frozen=True)
class SplitPredictions:
  """Aligned per-image arrays of one split."""

  path: np.ndarray  # (N,) str, relative to the build's source folder.
  patient_id: np.ndarray  # (N,) str.
  label: np.ndarray  # (N,) int, 1 = COVID.
  logits: np.ndarray  # (N, 2).


def from_outputs(outputs: dict[str, np.ndarray], data_dir: str | os.PathLike, split: str) -> SplitPredictions:
  """`steps.split_outputs`' logits and labels of `split`, with each image's path and patient id."""
  paths = input_pipeline.split_paths(data_dir, split)
  if len(paths) != len(outputs['label']):
    raise ValueError(f'{data_dir} split {split!r} lists {len(paths)} paths but the evaluation gave '
                     f'{len(outputs["label"])} predictions')
  manifest = Path(data_dir) / 'manifest.json'
  patients = {e['path']: str(e['patient_id']) for e in json.loads(manifest.read_text())['examples']}
  missing = [p for p in paths if p not in patients]
  if missing:
    raise ValueError(f'{manifest} lacks {len(missing)} of the split\'s images, e.g. {missing[0]!r}: '
                     'the records and the manifest come from different builds; rebuild the dataset')
  return SplitPredictions(np.asarray(paths), np.asarray([patients[p] for p in paths]),
                          np.asarray(outputs['label'], np.int64), np.asarray(outputs['logits'], np.float64))


def write_csv(path: str | os.PathLike, table: SplitPredictions, decision: Decision | None = None) -> None:
  """The table as CSV (COLUMNS; p_covid_calibrated only with a `decision`), replacing `path` atomically."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  columns = COLUMNS if decision is not None else COLUMNS[:-1]
  values = [table.path, table.patient_id, table.label, metrics.probabilities(table.logits)[:, 1]]
  if decision is not None:
    values.append(calibrated_probability(table.logits, decision.temperature))
  partial = path.with_name(path.name + '.partial')
  with partial.open('w', newline='') as file:
    writer = csv.writer(file)
    writer.writerow(columns)
    for row in zip(*values):
      writer.writerow([f'{v:.9g}' if isinstance(v, float) else v for v in row])
  os.replace(partial, path)
