"""covid_jax.compare on run directories written by hand (and once on the tiny trained run), against
scikit-learn, SciPy and hand computation."""

import csv
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from matplotlib.colors import same_color
from PIL import Image
from sklearn import metrics as sk

from covid_jax import compare, reporting


def _write_run(directory: Path, name: str, seed: int, labels, probability, threshold: float = 0.5,
               paths=None, patients=None, **config) -> Path:
  """A finished run's three files, as the trainer writes them."""
  paths = paths if paths is not None else [f'{label}/img_{i}.jpeg' for i, label in enumerate(labels)]
  patients = patients if patients is not None else [f'person{i // 2}' for i in range(len(labels))]
  (directory / 'predictions').mkdir(parents=True)
  config = {'model': {'name': name, 'image_size': 64}, 'seed': seed, 'data_dir': str(directory.parent / 'no_build'),
            **config}
  (directory / 'config.json').write_text(json.dumps(config))
  (directory / 'test_metrics.json').write_text(json.dumps({'threshold': threshold}))
  with (directory / 'predictions' / 'test.csv').open('w', newline='') as file:
    writer = csv.writer(file)
    writer.writerow(['path', 'patient_id', 'label', 'p_covid', 'p_covid_calibrated'])
    for row in zip(paths, patients, labels, probability, probability):
      writer.writerow(row)
  return directory


def _read_csv(path: Path) -> list[dict[str, str]]:
  with path.open(newline='') as file:
    return list(csv.DictReader(file))


def test_hand_computed_mean_and_sd_over_seeds(tmp_path, capsys):
  labels = [0, 0, 1, 1]
  # Seed 0 gets 3 of 4 right (0.7 on a non-COVID image), seed 1 gets 2 of 4 (0.6 and 0.4 wrong).
  runs = [_write_run(tmp_path / 'a0', 'vgg16', 0, labels, [0.1, 0.7, 0.8, 0.9]),
          _write_run(tmp_path / 'a1', 'vgg16', 1, labels, [0.1, 0.6, 0.4, 0.9])]
  rows = compare.compare_runs(runs, tmp_path / 'out', bootstrap_samples=50)
  row = rows[0]
  assert row['backbone'] == 'vgg16' and row['seeds'] == 2
  assert row['accuracy_mean'] == pytest.approx((3 / 4 + 2 / 4) / 2)
  assert row['accuracy_sd'] == pytest.approx(np.sqrt(2 * 0.125 ** 2))  # Sample sd of 0.75 and 0.5.
  assert row['recall_mean'] == pytest.approx((1 + 1 / 2) / 2)
  assert row['specificity_mean'] == pytest.approx(1 / 2)
  assert '0.6250 ± 0.1768 [' in capsys.readouterr().out
  assert '0.6250 ± 0.1768 [' in (tmp_path / 'out' / 'comparison.md').read_text()


def _two_backbones(tmp_path: Path, seeds=(0, 1, 2)) -> tuple[list[Path], dict]:
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 60)
  truth = {}
  runs = []
  for name, signal in (('vgg16', 0.4), ('resnet50', 0.2)):
    for seed in seeds:
      probability = np.clip(signal * labels + rng.uniform(0, 1 - signal, 60), 0, 1).round(6)
      threshold = 0.45 if name == 'vgg16' else 0.5
      runs.append(_write_run(tmp_path / f'{name}_{seed}', name, seed, labels, probability, threshold))
      truth[name, seed] = (probability, threshold)
  return runs, {'labels': labels, 'probability': truth}


def test_numbers_against_sklearn_and_scipy(tmp_path):
  runs, truth = _two_backbones(tmp_path)
  labels = truth['labels']
  rows = compare.compare_runs(runs, tmp_path / 'out', bootstrap_samples=300)
  by_name = {row['backbone']: row for row in rows}
  for name in ('vgg16', 'resnet50'):
    per_seed = {'accuracy': [], 'f1': [], 'precision': [], 'recall': [], 'roc_auc': [], 'pr_auc': []}
    for seed in (0, 1, 2):
      probability, threshold = truth['probability'][name, seed]
      predicted = (probability > threshold).astype(int)
      per_seed['accuracy'].append(sk.accuracy_score(labels, predicted))
      per_seed['f1'].append(sk.f1_score(labels, predicted))
      per_seed['precision'].append(sk.precision_score(labels, predicted))
      per_seed['recall'].append(sk.recall_score(labels, predicted))
      per_seed['roc_auc'].append(sk.roc_auc_score(labels, probability))
      per_seed['pr_auc'].append(sk.average_precision_score(labels, probability))
    row = by_name[name]
    assert row['seeds'] == 3
    for metric, values in per_seed.items():
      assert row[f'{metric}_mean'] == pytest.approx(statistics.mean(values)), (name, metric)
      assert row[f'{metric}_sd'] == pytest.approx(statistics.stdev(values)), (name, metric)
      assert row[f'{metric}_ci95_low'] <= row[f'{metric}_mean'] <= row[f'{metric}_ci95_high'], (name, metric)
  reference = {row['backbone']: row for row in rows if row['source'] != 'this comparison'}
  assert reference['VGG16 (study, reported)']['accuracy_mean'] == 0.9709
  assert reference['ResNet50 (study, reported)']['f1_mean'] == 0.85
  assert reference['NASNetLarge (study, reported)']['accuracy_mean'] == 0.9806
  csv_rows = {row['backbone']: row for row in _read_csv(tmp_path / 'out' / 'comparison.csv')}
  assert float(csv_rows['vgg16']['accuracy_mean']) == pytest.approx(by_name['vgg16']['accuracy_mean'])
  assert 'image-level split' in csv_rows['VGG16 (study, reported)']['source']

  paired = _read_csv(tmp_path / 'out' / 'comparison_paired.csv')
  assert [(r['a'], r['b'], r['seed']) for r in paired] == [('vgg16', 'resnet50', str(s)) for s in (0, 1, 2)]
  for row in paired:
    seed = int(row['seed'])
    (p_a, t_a), (p_b, t_b) = truth['probability']['vgg16', seed], truth['probability']['resnet50', seed]
    want = sk.roc_auc_score(labels, p_a) - sk.roc_auc_score(labels, p_b)
    assert float(row['roc_auc_difference']) == pytest.approx(want)
    assert float(row['difference_ci95_low']) < want < float(row['difference_ci95_high'])
    a_right, b_right = (p_a > t_a) == labels, (p_b > t_b) == labels
    only_a, only_b = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
    assert (int(row['mcnemar_a_right_b_wrong']), int(row['mcnemar_a_wrong_b_right'])) == (only_a, only_b)
    if only_a + only_b < 25:
      want_p = scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
    else:
      want_p = scipy.stats.chi2.sf((abs(only_a - only_b) - 1) ** 2 / (only_a + only_b), 1)
    assert float(row['mcnemar_p_value']) == pytest.approx(want_p)
  markdown = (tmp_path / 'out' / 'comparison.md').read_text()
  assert '## Paired comparisons' in markdown and 'McNemar' in markdown and "study's reported numbers" in markdown
  with Image.open(tmp_path / 'out' / 'comparison.png') as image:
    assert image.format == 'PNG'


def test_paired_tests_refuse_different_test_sets(tmp_path):
  labels, probability = [0, 1, 0, 1], [0.2, 0.8, 0.3, 0.7]
  runs = [_write_run(tmp_path / 'a', 'vgg16', 0, labels, probability),
          _write_run(tmp_path / 'b', 'resnet50', 0, labels, probability,
                     paths=['0/img_0.jpeg', '1/img_1.jpeg', '0/img_2.jpeg', 'other'])]
  with pytest.raises(compare.CompareError, match=r"different test sets: 2 paths in one only, e.g. '1/img_3.jpeg'"):
    compare.compare_runs(runs, tmp_path / 'out', bootstrap_samples=10)


def test_pairs_by_path_not_by_row_order(tmp_path):
  labels, probability = np.array([0, 1, 0, 1, 1, 0]), np.array([0.2, 0.8, 0.6, 0.7, 0.4, 0.1])
  paths = [f'img_{i}' for i in range(6)]
  patients = [f'p{i}' for i in range(6)]
  order = np.array([5, 3, 1, 0, 2, 4])
  runs = [_write_run(tmp_path / 'a', 'vgg16', 0, labels, probability, paths=paths, patients=patients),
          _write_run(tmp_path / 'b', 'resnet50', 0, labels[order], probability[order],
                     paths=[paths[i] for i in order], patients=[patients[i] for i in order])]
  compare.compare_runs(runs, tmp_path / 'out', bootstrap_samples=20)
  (row,) = _read_csv(tmp_path / 'out' / 'comparison_paired.csv')
  assert float(row['roc_auc_difference']) == 0  # The same predictions, listed in another order.
  assert (row['mcnemar_a_right_b_wrong'], row['mcnemar_a_wrong_b_right']) == ('0', '0')


def test_groups_sharing_a_model_name_are_told_apart(tmp_path):
  labels, probability = [0, 1, 0, 1], [0.2, 0.8, 0.3, 0.7]
  runs = [_write_run(tmp_path / 'a', 'vgg16', 0, labels, probability, preprocessing='keras'),
          _write_run(tmp_path / 'b', 'vgg16', 0, labels, probability, preprocessing='notebook')]
  rows = compare.compare_runs(runs, tmp_path / 'out', bootstrap_samples=10)
  assert [row['backbone'] for row in rows[:2]] == ['vgg16 (preprocessing=keras)', 'vgg16 (preprocessing=notebook)']
  # The study names its groups after their config files.
  rows = compare.compare_runs(runs, tmp_path / 'out', bootstrap_samples=10, labels=['vgg16', 'notebook-vgg16'])
  assert [row['backbone'] for row in rows[:2]] == ['vgg16', 'notebook-vgg16']


@pytest.mark.parametrize('damage, match', [
    (lambda d: (d / 'test_metrics.json').unlink(), r'test_metrics.json is missing'),
    (lambda d: (d / 'config.json').write_text('{"seed": 0}'), r'config.json has no model.name'),
    (lambda d: (d / 'predictions' / 'test.csv').write_text('path,label\nx,1\n'), r'test.csv lacks column'),
    (lambda d: (d / 'test_metrics.json').write_text('{"threshold": 0.5'), r'test_metrics.json is not valid JSON'),
])
def test_bad_run_directories_are_named(tmp_path, damage, match):
  run = _write_run(tmp_path / 'a', 'vgg16', 0, [0, 1], [0.2, 0.8])
  damage(run)
  with pytest.raises(compare.CompareError, match=match):
    compare.compare_runs([run], tmp_path / 'out')


def test_command_line(tmp_path, capsys):
  run = _write_run(tmp_path / 'a', 'vgg16', 0, [0, 1, 1, 0], [0.2, 0.8, 0.3, 0.1])
  compare.main([str(run), '--output', str(tmp_path / 'out'), '--bootstrap_samples', '20'])
  out = capsys.readouterr().out
  assert '| vgg16 | 1 | 0.7500' in out and 'comparison_grid.png not written' in out
  with pytest.raises(SystemExit, match=r'error: .*config.json is missing'):
    compare.main([str(tmp_path / 'nothing'), '--output', str(tmp_path / 'out')])


def test_grid_colours_each_models_prediction(tmp_path):
  images = np.zeros((3, 8, 8, 3))
  predictions = {'vgg16': [1, 0, 1], 'resnet50': [0, 0, 1]}
  fig = reporting.plot_comparison_grid(images, [1, 1, 0], [4, 9, 12], predictions, tmp_path / 'grid.png')
  axes = [ax for ax in fig.axes if ax.get_images()]
  assert [ax.get_title() for ax in axes] == ['#4 true: covid', '#9 true: covid', '#12 true: non_covid']
  colours = [[same_color(t.get_color(), 'green') for t in ax.texts] for ax in axes]
  assert colours == [[True, False], [False, False], [False, False]]
  assert [t.get_text() for t in axes[0].texts] == ['vgg16: covid', 'resnet50: non_covid']


def test_grid_from_the_trained_run_as_two_backbones(trained_run, tmp_path, capsys):
  workdir, _, _ = trained_run
  runs = []
  for name in ('first', 'second'):
    run = tmp_path / name
    (run / 'predictions').mkdir(parents=True)
    for file in ('config.json', 'test_metrics.json', 'predictions/test.csv'):
      shutil.copy(workdir / file, run / file)
    config = json.loads((run / 'config.json').read_text())
    config['model']['name'] = name
    (run / 'config.json').write_text(json.dumps(config))
    runs.append(run)
  rows = compare.compare_runs(runs, tmp_path / 'out', bootstrap_samples=100, grid_size=6)
  assert 'not written' not in capsys.readouterr().out
  assert rows[0]['accuracy_mean'] == rows[1]['accuracy_mean']
  with Image.open(tmp_path / 'out' / 'comparison_grid.png') as image:
    assert image.format == 'PNG' and min(image.size) > 300
  (paired,) = _read_csv(tmp_path / 'out' / 'comparison_paired.csv')
  assert float(paired['roc_auc_difference']) == 0 and float(paired['difference_p_value']) == 1
