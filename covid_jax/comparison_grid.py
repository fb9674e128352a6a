"""comparison_grid.png, the study's "model test" figure: the same seeded random test images, each backbone's
prediction under each image, green when right and red when wrong.

The images are read from the build the runs were trained on (config.json's data_dir) the way their evaluation
read them, and matched to the predictions by path.
"""

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from covid_jax import reporting


class _Run(Protocol):
  """What the grid reads of a run (`compare.Run`)."""

  directory: Path
  config: dict[str, Any]
  seed: int
  path: np.ndarray
  label: np.ndarray
  predicted: np.ndarray


def write_comparison_grid(runs: dict[str, _Run], path: str | os.PathLike, seed: int, grid_size: int) -> str | None:
  """comparison_grid.png of one run per backbone on `grid_size` test images all of them scored, drawn with
  `seed`; the images come from the first run's build. Returns why the grid was not drawn, or None."""
  first = next(iter(runs.values()))
  data_dir = first.config.get('data_dir')
  if not data_dir or not (Path(data_dir) / 'manifest.json').is_file():
    return (f'comparison_grid.png not written: {first.directory / "config.json"} names data_dir {data_dir!r}, '
            'which holds no built dataset here')
  paths, images = _test_images(data_dir, first.config['model']['image_size'])
  position = {p: i for i, p in enumerate(paths)}
  scored = [set(run.path) for run in runs.values()]
  shared = [p for p in first.path if p in position and all(p in paths_of_run for paths_of_run in scored)]
  if not shared:
    return f'comparison_grid.png not written: no test image of the runs is in {data_dir}'
  rng = np.random.default_rng(seed)
  drawn = rng.choice(len(shared), min(grid_size, len(shared)), replace=False)
  chosen_paths = sorted((shared[i] for i in drawn), key=position.get)
  predictions = {}
  for name, run in runs.items():
    row_of = {p: i for i, p in enumerate(run.path)}
    predictions[f'{name} (seed {run.seed})'] = [int(run.predicted[row_of[p]]) for p in chosen_paths]
  row_of = {p: i for i, p in enumerate(first.path)}
  indices = [position[p] for p in chosen_paths]
  reporting.plot_comparison_grid(images[indices], [int(first.label[row_of[p]]) for p in chosen_paths], indices,
                                 predictions, path)
  return None


def _test_images(data_dir: str, image_size: int) -> tuple[list[str], np.ndarray]:
  """(paths, images 0-255) of the build's test split in file order, read as the runs' evaluation reads them."""
  from covid_jax import runtime
  with runtime.quiet_tensorflow_import():
    import tensorflow as tf
    from covid_jax import input_pipeline
  if tf.config.list_physical_devices('GPU'):
    tf.config.set_visible_devices([], 'GPU')  # TensorFlow only reads files: keep it off the accelerators.
  reader = input_pipeline.SplitReader(data_dir, 'test', image_size)
  batch_size = reader.mesh.devices.size * 32
  images = [np.asarray(batch['image'])[np.asarray(batch['mask'])] for batch in reader.eval_batches(batch_size)]
  return reader.example_paths(), np.concatenate(images)
