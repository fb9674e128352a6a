"""predict on a finished run: the model input and probability of the run's own evaluation, every file accounted
for, each bad kind with its reason, and the exit status."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from covid_jax import input_pipeline, predict, restored
from tests import fixtures
from tests.runs import ROOT


@pytest.fixture(scope='module')
def run(trained_run):
  return restored.load(trained_run[0])


def _test_paths(manifest: dict) -> list[str]:
  return [e['path'] for e in manifest['examples'] if e['split'] == 'test']


def _csv(path) -> dict[str, dict[str, str]]:
  with open(path, newline='') as file:
    return {row['path']: row for row in csv.DictReader(file)}


def test_model_input_equals_the_input_pipeline(run, synthetic_source):
  """The source files of the test split, through predict's decode and resize, are the images evaluation reads."""
  size = run.config.model.image_size
  reader = input_pipeline.SplitReader(run.config.data_dir, 'test', size, cache=False)
  want = np.concatenate([np.asarray(b['image'])[np.asarray(b['mask'])] for b in reader.eval_batches(8)])
  build = predict.build_settings(run)
  got = np.stack([predict.model_input(str(synthetic_source.root / p), build, size) for p in reader.example_paths()])
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got.astype(np.float32), want)


def test_probability_equals_the_runs_evaluation(trained_run, run, synthetic_source):
  workdir, _, manifest = trained_run
  rows, _ = predict.predict(run, [str(synthetic_source.root / p) for p in _test_paths(manifest)], progress=False)
  evaluated = _csv(workdir / 'predictions' / 'test.csv')
  threshold = json.loads((workdir / 'test_metrics.json').read_text())['decision']['threshold']
  assert len(rows) == len(evaluated) and all(r.status == predict.OK for r in rows)
  for row in rows:
    want = float(evaluated[str(row.path)[len(str(synthetic_source.root)) + 1:]]['p_covid_calibrated'])
    assert abs(row.p_covid - want) <= 1e-6, row.path
    assert row.prediction == ('covid' if want > threshold else 'non_covid')


def test_every_bad_file_gets_its_reason(run, synthetic_source):
  root = synthetic_source.root
  rows, _ = predict.predict(run, [str(root)], max_pixels=fixtures.MAX_PIXELS, progress=False)
  status = {str(r.path)[len(str(root)) + 1:]: r.status for r in rows}
  on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob('*') if p.is_file())
  assert sorted(status) == on_disk
  for path, reason in fixtures.BAD_FILES.items():
    if path == 'README.md':  # Predict has no class folders: a README is just not an image.
      reason = 'not an image file extension'
    assert reason in status[path], (path, status[path])
    kind = 'skipped' if 'extension' in reason or 'hidden' in reason else 'failed'
    assert status[path].startswith(kind), (path, status[path])
  assert sum(s == predict.OK for s in status.values()) == len(on_disk) - len(fixtures.BAD_FILES)


def test_cli_writes_every_row_and_fails_when_a_file_fails(trained_run, synthetic_source, tmp_path):
  workdir, _, manifest = trained_run
  good = [str(synthetic_source.root / p) for p in _test_paths(manifest)[:3]]
  bad = str(synthetic_source.root / '0/IM-9003-0001.png')  # Empty.
  missing = str(tmp_path / 'nowhere.png')
  output, overlays = tmp_path / 'out.csv', tmp_path / 'gradcam'
  command = [sys.executable, '-m', 'covid_jax.predict', f'--workdir={workdir}', f'--output={output}',
             f'--gradcam={overlays}', *good, bad, missing]
  result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 1, result.stderr[-2000:]
  rows = _csv(output)
  assert sorted(rows) == sorted([*good, bad, missing])
  assert rows[bad]['status'] == 'failed: empty file' and rows[missing]['status'] == 'failed: no such file or folder'
  assert all(rows[p]['status'] == 'ok' and rows[p]['prediction'] in ('covid', 'non_covid') for p in good)
  assert '5 files:' in result.stdout and '2 failed' in result.stdout and str(output) in result.stdout
  assert len(list(overlays.rglob('*.png'))) == len(good)
