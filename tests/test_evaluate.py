"""evaluate: on the run's own test split it reproduces the run's test metrics; on a collection it writes the
external report with every split's images."""

import csv
import json

import pytest

from covid_jax import evaluate

# test_metrics.json keys that scoring.score computes from the predictions alone.
SCORED = ('accuracy', 'precision', 'recall', 'specificity', 'f1', 'roc_auc', 'confusion_matrix', 'threshold',
          'ci95', 'at_threshold_0.5', 'calibration', 'majority_baseline', 'decision', 'interval_method')


def _assert_close(got, want, where: str) -> None:
  """Equal JSON trees, numbers to 1e-9 (relative)."""
  if isinstance(want, dict):
    assert sorted(got) == sorted(want), where
    for key in want:
      _assert_close(got[key], want[key], f'{where}.{key}')
  elif isinstance(want, list):
    assert len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_close(g, w, f'{where}[{i}]')
  elif isinstance(want, float):
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12), where
  else:
    assert got == want, where


@pytest.fixture(scope='module')
def own_test_split(trained_run):
  workdir, _, _ = trained_run
  data_dir = json.loads((workdir / 'config.json').read_text())['data_dir']
  return evaluate.evaluate(workdir, data_dir, 'test', name='own_test')


def test_own_test_split_reproduces_the_runs_test_metrics(trained_run, own_test_split):
  workdir, _, _ = trained_run
  internal = json.loads((workdir / 'test_metrics.json').read_text())
  external, out = own_test_split
  assert out == workdir / 'external' / 'own_test'
  written = json.loads((out / 'test_metrics.json').read_text())
  for key in SCORED:
    _assert_close(written[key], internal[key], key)
  assert external['num_examples'] == internal['num_examples']


def test_writes_the_report_plots_and_predictions(trained_run, own_test_split):
  workdir, _, manifest = trained_run
  _, out = own_test_split
  for name in ('report.md', 'confusion_matrix.png', 'roc_curve.png', 'calibration.png'):
    assert (out / name).stat().st_size > 0, name
  with open(out / 'predictions.csv', newline='') as file:
    rows = list(csv.DictReader(file))
  want = {e['path']: e['patient_id'] for e in manifest['examples'] if e['split'] == 'test'}
  assert {r['path']: r['patient_id'] for r in rows} == want
  report = (out / 'report.md').read_text()
  internal = json.loads((workdir / 'test_metrics.json').read_text())
  assert '| metric | internal test | external |' in report
  assert f'| accuracy | {internal["accuracy"]:.3f}' in report


def test_split_all_scores_every_image(trained_run):
  workdir, _, manifest = trained_run
  data_dir = json.loads((workdir / 'config.json').read_text())['data_dir']
  result, out = evaluate.evaluate(workdir, data_dir, 'all', name='everything')
  assert result['num_examples'] == len(manifest['examples'])
  assert result['num_patients'] == len({e['patient_id'] for e in manifest['examples']})
  assert sum(map(sum, result['confusion_matrix'])) == len(manifest['examples'])
