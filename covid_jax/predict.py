"""Predict on new radiographs with a trained run, optionally with Grad-CAM overlays and their sanity check.

  python -m covid_jax.predict --workdir RUN [--checkpoint best|latest] PATH... [--output FILE.csv]
      [--gradcam DIR] [--gradcam_layer LAYER] [--gradcam_sanity] [--regions FILE]

PATHs are files or folders (searched recursively, as the data step scans a source folder). Every file is
decoded and resized by the data step's own code (`data_prep.images`) to the size the run's data was built
at, then fed to the run's model on every local device with the run's evaluation step. The CSV has one row
per file: path, p_covid (calibrated with the run's temperature), prediction at the run's threshold, status
('ok', 'failed: REASON' for a file that cannot be used, 'skipped: REASON' for a folder's hidden, system or
non-image file). A bad file never stops the run; the exit status is 1 when any file failed.
"""

import csv
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from covid_jax import gradcam, gradcam_sanity, reporting, restored
from covid_jax.input_pipeline import AXIS, data_mesh
from covid_jax.metrics import CLASS_NAMES
from data_prep import images, regions, scan

COLUMNS = ('path', 'p_covid', 'prediction', 'status')
OK = 'ok'
# Images the --gradcam_sanity randomisation test uses at most (each cascading step recomputes their maps).
SANITY_IMAGES = 64


@dataclasses.dataclass
class Row:
  """One file's line of the CSV."""

  path: str
  status: str = OK
  p_covid: float | None = None
  prediction: str | None = None


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  """How the run's data was built, which new images must follow: stored side and resize mode."""

  image_size: int
  keep_aspect: bool
  source: str  # Where the settings come from, for the summary.
  max_pixels: int = images.DEFAULT_MAX_PIXELS  # Larger images are refused as decompression bombs.


def build_settings(run: restored.TrainedRun, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> BuildSettings:
  """The run's data build (its manifest.json), or, where that is gone, a plain resize to the model's input."""
  manifest = Path(run.config.data_dir) / 'manifest.json'
  if manifest.is_file():
    saved = json.loads(manifest.read_text())
    return BuildSettings(saved['image_size'], saved['keep_aspect'], str(manifest), max_pixels)
  size = run.config.model.image_size
  return BuildSettings(size, False, f'{manifest} not found: a plain resize to the model input, {size} px', max_pixels)


def collect(paths: Sequence[str]) -> tuple[list[str], list[Row]]:
  """(image files to predict, rows of what is not one), every path sorted; folders are searched recursively.

  A named file is used whatever its extension; a folder's files follow the data step's scan (`data_prep.scan`):
  hidden and system files and other extensions are skipped, with the reason.
  """
  files, rows = [], []
  for given in paths:
    path = Path(given)
    if path.is_dir():
      try:
        candidates, rejected = scan.scan(path, None)
      except scan.BuildError as e:
        rows.append(Row(given, f'failed: {e}'))
        continue
      files += [str(path / rel) for rel, _ in candidates]
      rows += [Row(str(path / r['path']), f'skipped: {r["reason"]}') for r in rejected]
    elif path.is_file():
      files.append(given)
    else:
      rows.append(Row(given, 'failed: no such file or folder'))
  return sorted(set(files)), rows


def model_input(path: str, build: BuildSettings, model_size: int) -> np.ndarray:
  """uint8 (model_size, model_size, 3) as the run's input pipeline reads the built file; Rejected if unusable.

  The build's decode and resize (`data_prep.images`), then, where the model's side differs from the built
  one, the same resize again as the input pipeline's; gray replicated to RGB.
  """
  try:
    data = Path(path).read_bytes()
  except OSError as e:
    raise images.Rejected(f'unreadable: {e.strerror or e}') from None
  stored = images.resize_for_storage(images.decode(data, build.max_pixels), build.image_size, build.keep_aspect)
  if build.image_size != model_size:
    stored = images.resize_for_storage(stored, model_size)
  return np.ascontiguousarray(np.broadcast_to(stored, (model_size, model_size, 3)))


def _decoded(files: Sequence[str], build: BuildSettings, size: int,
             workers: int) -> Iterator[tuple[str, np.ndarray | str]]:
  """(path, pixels or the reason it failed) of each file in order, decoded `workers` at a time."""
  def load(path):
    try:
      return path, model_input(path, build, size)
    except images.Rejected as e:
      return path, f'failed: {e}'
  with futures.ThreadPoolExecutor(workers) as pool:
    yield from pool.map(load, files)


def _batches(decoded: Iterator[tuple[str, np.ndarray | str]], batch_size: int,
             failed: list[Row]) -> Iterator[tuple[list[str], np.ndarray]]:
  """Batches of (paths, uint8 images) of the decodable files; the others go to `failed`."""
  paths, pixels = [], []
  for path, result in decoded:
    if isinstance(result, str):
      failed.append(Row(path, result))
      continue
    paths.append(path)
    pixels.append(result)
    if len(paths) == batch_size:
      yield paths, np.stack(pixels)
      paths, pixels = [], []
  if paths:
    yield paths, np.stack(pixels)


class Predictor:
  """The run's model over every local device: uint8 image batches -> logits."""

  def __init__(self, run: restored.TrainedRun, batch_size: int | None = None):
    self.mesh = data_mesh()
    devices = self.mesh.devices.size
    wanted = batch_size or run.config.eval_batch_size
    self.batch_size = -(-wanted // devices) * devices  # Whole batches per device.
    self._state = run.eval_state(self.mesh)
    self._eval = run.eval_fn(self.mesh)
    self._sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))

  def padded(self, pixels: np.ndarray) -> np.ndarray:
    """N <= batch_size uint8 images as a full float32 batch (zero images after them): one compiled shape."""
    padded = np.zeros((self.batch_size, *pixels.shape[1:]), np.float32)
    padded[:len(pixels)] = pixels
    return padded

  def logits(self, pixels: np.ndarray) -> np.ndarray:
    """(N, 2) float64 logits of N <= batch_size uint8 images."""
    batch = {'image': jax.make_array_from_process_local_data(self._sharding, self.padded(pixels))}
    return np.asarray(jax.device_get(self._eval(self._state, batch)), np.float64)[:len(pixels)]


def predict(run: restored.TrainedRun, paths: Sequence[str], batch_size: int | None = None,
            gradcam_dir: str | None = None, gradcam_layer: str | None = None,
            max_pixels: int = images.DEFAULT_MAX_PIXELS, keep: int = 0,
            progress: bool = True) -> tuple[list[Row], dict[str, np.ndarray]]:
  """One Row per file found under `paths`, sorted by path, and the pixels (path -> uint8) of up to `keep` of
  the images, spread over the sorted files (for the sanity check).

  With `gradcam_dir`, writes each image's Grad-CAM overlay there, under its path below the files' common folder.
  """
  files, rows = collect(paths)
  kept_paths = {files[i] for i in np.unique(np.linspace(0, len(files) - 1, keep).astype(int))} if files else set()
  build = build_settings(run, max_pixels)
  predictor = Predictor(run, batch_size)
  size = run.config.model.image_size
  maps = gradcam.compiled_maps(run.model, gradcam.feature_layer(run.config.model.name, gradcam_layer)) \
      if gradcam_dir else None
  root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]) if files else ''
  kept = {}
  with tqdm(total=len(files), desc='predict', unit='image', disable=not progress) as bar:
    for batch_paths, pixels in _batches(_decoded(files, build, size, os.cpu_count() or 1), predictor.batch_size,
                                        rows):
      probability = run.covid_probability(predictor.logits(pixels))
      for path, p, covid in zip(batch_paths, probability, run.is_covid(probability)):
        rows.append(Row(path, OK, float(p), CLASS_NAMES[int(covid)]))
      if maps is not None:
        heatmaps = gradcam.upsample(maps(run.variables, predictor.padded(pixels))[0][:len(pixels)], size)
        for path, image, heatmap in zip(batch_paths, pixels, heatmaps):
          target = Path(gradcam_dir) / (os.path.relpath(os.path.abspath(path), root) + '.png')
          gradcam.write_overlay(target, image, heatmap)
      kept.update((path, image) for path, image in zip(batch_paths, pixels) if path in kept_paths)
      bar.update(len(batch_paths))
    bar.update(len(files) - bar.n)
  return sorted(rows, key=lambda r: r.path), kept


def write_csv(path: str | os.PathLike, rows: Sequence[Row]) -> None:
  """The rows as CSV (COLUMNS), replacing `path` atomically."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + '.partial')
  with partial.open('w', newline='') as file:
    writer = csv.writer(file)
    writer.writerow(COLUMNS)
    for row in rows:
      writer.writerow([row.path, '' if row.p_covid is None else f'{row.p_covid:.9g}', row.prediction or '',
                       row.status])
  os.replace(partial, path)


def summary(rows: Sequence[Row]) -> str:
  """Counts per prediction, failures and skipped files, with each failure's reason."""
  counts = {name: sum(r.prediction == name for r in rows) for name in CLASS_NAMES}
  failed = [r for r in rows if r.status.startswith('failed')]
  skipped = sum(r.status.startswith('skipped') for r in rows)
  lines = [f'{len(rows)} files: ' + ', '.join(f'{n} {name}' for name, n in counts.items())
           + f', {len(failed)} failed, {skipped} skipped']
  lines += [f'  {r.path}: {r.status}' for r in failed]
  return '\n'.join(lines)


def sanity_check(run: restored.TrainedRun, pixels: dict[str, np.ndarray], layer: str | None,
                 regions_file: str | None, seed: int = 0) -> dict:
  """The randomisation test on the images `pixels` holds (path -> uint8), and with a synthetic set's regions
  file, the share of map mass inside its opacities and lungs (files matched by their path's end)."""
  chosen = sorted(pixels)
  masks = None
  if regions_file:
    known = regions.read_regions(regions_file)
    found = [_find_regions(known, path) for path in chosen]
    masks = {'opacities': [r and r.opacities for r in found], 'lungs': [r and r.lungs for r in found]}
  batch = np.stack([pixels[p] for p in chosen]).astype(np.float32)
  return gradcam.sanity_report(run.model, run.variables, batch, gradcam.feature_layer(run.config.model.name, layer),
                               seed, masks)


def _find_regions(known: dict[str, regions.Regions], path: str) -> regions.Regions | None:
  """The regions recorded for the file whose path ends in a recorded relative path."""
  posix = Path(path).as_posix()
  return next((r for rel, r in known.items() if posix == rel or posix.endswith('/' + rel)), None)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script, so importing this module never clashes with other flags."""
  flags.DEFINE_string('workdir', None, 'Run directory of a finished run.', required=True)
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint of the run to use.')
  flags.DEFINE_string('output', None, 'CSV to write (default: WORKDIR/predict/predictions.csv).')
  flags.DEFINE_integer('batch_size', None, 'Images per step over all devices (default: the run\'s eval_batch_size).')
  flags.DEFINE_string('gradcam', None, 'Folder for a Grad-CAM overlay PNG per image.')
  flags.DEFINE_string('gradcam_layer', None, 'Feature layer for Grad-CAM (default: the backbone\'s, see the registry).')
  flags.DEFINE_integer('max_pixels', images.DEFAULT_MAX_PIXELS, 'Larger images are refused as decompression bombs.')
  flags.DEFINE_bool('gradcam_sanity', False, 'Run the model-parameter randomisation test on the images\' maps.')
  flags.DEFINE_string('regions', None, 'With --gradcam_sanity: a synthetic set\'s regions file (data_prep.synthetic '
                      '--regions_file), for the share of map mass inside the opacities and the lungs.')


def main(argv: Sequence[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError('name at least one file or folder to predict')
  logging.set_verbosity(logging.WARNING)  # The checkpoint library's progress lines are not for this command.
  restored.keep_tensorflow_off_accelerators()
  try:
    run = restored.load(FLAGS.workdir, FLAGS.checkpoint)
  except restored.RunError as e:
    raise SystemExit(f'error: {e}') from None
  output = FLAGS.output or os.path.join(FLAGS.workdir, 'predict', 'predictions.csv')
  rows, pixels = predict(run, argv[1:], FLAGS.batch_size, FLAGS.gradcam, FLAGS.gradcam_layer,
                         FLAGS.max_pixels, keep=SANITY_IMAGES if FLAGS.gradcam_sanity else 0)
  write_csv(output, rows)
  print(summary(rows))
  print(f'Resized as in {build_settings(run).source}; threshold {run.decision.threshold:.4g} on p_covid, '
        f'temperature {run.decision.temperature:.4g} ({run.decision_source}); {run.checkpoint} checkpoint of '
        f'{FLAGS.workdir}')
  print(f'Predictions: {output}' + (f'; Grad-CAM overlays: {FLAGS.gradcam}' if FLAGS.gradcam else ''))
  if FLAGS.gradcam_sanity and pixels:
    report = sanity_check(run, pixels, FLAGS.gradcam_layer, FLAGS.regions)
    target = Path(output).with_name(Path(output).stem + '_gradcam_sanity.json')
    reporting.write_json(target, report)
    print('\n'.join([f'Grad-CAM sanity check ({report["layer"]}), in {target}:',
                     *gradcam_sanity.summary_lines(report)]))
  sys.exit(1 if any(r.status.startswith('failed') for r in rows) else 0)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
