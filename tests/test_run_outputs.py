"""What a finished run leaves beside its checkpoints: the predictions CSVs and report.md, checked against the
manifest, scikit-learn and the run's own config."""

import collections
import csv
import json
import shlex
from pathlib import Path

import numpy as np
from sklearn import metrics as sk

from covid_jax import study


def _rows(path: Path) -> list[dict[str, str]]:
  with path.open(newline='') as file:
    return list(csv.DictReader(file))


def test_predictions_list_every_image_of_the_split_once_with_its_patient_and_label(trained_run):
  workdir, _, manifest = trained_run
  for split in ('val', 'test'):
    rows = _rows(workdir / 'predictions' / f'{split}.csv')
    assert list(rows[0]) == ['path', 'patient_id', 'label', 'p_covid', 'p_covid_calibrated']
    expected = {e['path']: (e['patient_id'], e['label']) for e in manifest['examples'] if e['split'] == split}
    assert {r['path']: (r['patient_id'], int(r['label'])) for r in rows} == expected
    assert len(rows) == len(expected)


def test_test_metrics_are_those_of_the_test_predictions_at_both_thresholds(trained_run):
  workdir, result, _ = trained_run
  rows = _rows(workdir / 'predictions' / 'test.csv')
  labels = np.array([int(r['label']) for r in rows])
  raw = np.array([float(r['p_covid']) for r in rows])
  calibrated = np.array([float(r['p_covid_calibrated']) for r in rows])
  written = json.loads((workdir / 'test_metrics.json').read_text())
  assert written['accuracy'] == result['accuracy']
  assert written['accuracy'] == sk.accuracy_score(labels, calibrated > written['threshold'])
  assert written['f1'] == sk.f1_score(labels, calibrated > written['threshold'])
  # At 0.5 temperature scaling changes no prediction: the raw and calibrated probabilities agree on the side.
  assert written['at_threshold_0.5']['accuracy'] == sk.accuracy_score(labels, raw > 0.5)
  assert np.array_equal(raw > 0.5, calibrated > 0.5)
  assert np.isclose(written['roc_auc'], sk.roc_auc_score(labels, raw), atol=1e-9)


def test_report_names_the_data_warnings_patients_metrics_and_a_command_that_rebuilds_the_config(trained_run):
  workdir, result, manifest = trained_run
  report = (workdir / 'report.md').read_text()
  for warning in manifest['warnings']:
    assert warning in report
  patients = collections.defaultdict(set)
  for example in manifest['examples']:
    patients[example['split']].add(example['patient_id'])
  for split, counts in manifest['counts'].items():
    images = sum(int(n) for n in counts.values())
    assert f'| {split} | ' in report and f' | {images} | {len(patients[split])} |' in report
  assert f'{result["accuracy"]:.4f}' in report and f'{result["decision"]["threshold"]:.4f}' in report
  for image in ('training_curves.png', 'calibration.png', 'confusion_matrix.png', 'gradcam_grid.png'):
    assert f']({image})' in report and (workdir / image).stat().st_size > 0
  sanity = json.loads((workdir / 'gradcam_sanity.json').read_text())
  assert len(sanity['images']) == 4
  assert f'all {sanity["randomisation"][-1]["spearman_mean"]:.4f}' in report
  command = report.split('```bash\n', 1)[1].split('\n```', 1)[0]
  args = shlex.split(command)
  assert args[:4] == ['python', '-m', 'covid_jax.main', '--config=configs/default.py']
  rebuilt = study.load_config(Path('configs/default.py'), [a for a in args if a.startswith('--config.')])
  assert json.loads(json.dumps(rebuilt.to_dict())) == json.loads((workdir / 'config.json').read_text())
