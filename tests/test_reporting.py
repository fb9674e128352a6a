"""covid_jax.reporting: PNGs written, figure contents (titles, colours, markers, counts), strict JSON."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import same_color
from PIL import Image

from covid_jax import reporting

HISTORY = [
    {'epoch': 1, 'train_loss': 0.9, 'train_accuracy': 0.60, 'val_loss': 0.8, 'val_accuracy': 0.65},
    {'epoch': 2, 'train_loss': 0.6, 'train_accuracy': 0.75, 'val_loss': 0.5, 'val_accuracy': 0.80},
    {'epoch': 3, 'train_loss': 0.4, 'train_accuracy': 0.85, 'val_loss': 0.55, 'val_accuracy': 0.78},
]


def _assert_png(path: Path) -> None:
  assert path.stat().st_size > 0
  with Image.open(path) as image:
    assert image.format == 'PNG' and min(image.size) > 100


def _lines(ax) -> dict[str, tuple[list, list]]:
  return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_write_json_keeps_order_and_converts_numpy(tmp_path):
  path = tmp_path / 'run' / 'metrics.json'
  reporting.write_json(path, {'b': np.float32(0.5), 'a': [np.int64(3), np.array([1.0, 2.0])], 'c': None})
  assert path.read_text().startswith('{\n  "b"')
  assert json.loads(path.read_text()) == {'b': 0.5, 'a': [3, [1.0, 2.0]], 'c': None}
  assert [p.name for p in path.parent.iterdir()] == ['metrics.json']


@pytest.mark.parametrize('bad', [math.nan, math.inf, np.float32('nan')])
def test_write_json_refuses_non_finite_naming_the_key(tmp_path, bad):
  path = tmp_path / 'history.json'
  history = [dict(entry) for entry in HISTORY]
  history[1]['val_loss'] = bad
  with pytest.raises(ValueError, match=r'history\[1\]\.val_loss'):
    reporting.write_json(path, {'history': history})
  assert not list(tmp_path.iterdir())


def test_training_curves(tmp_path):
  path = tmp_path / 'curves.png'
  fig = reporting.plot_training_curves(HISTORY, best_epoch=2, path=path)
  _assert_png(path)
  loss, accuracy = fig.axes
  assert loss.get_title() == 'loss' and accuracy.get_title() == 'accuracy'
  for ax, keys in ((loss, ('train_loss', 'val_loss')), (accuracy, ('train_accuracy', 'val_accuracy'))):
    lines = _lines(ax)
    for key in keys:
      assert lines[key.replace('_', ' ')] == ([1, 2, 3], [entry[key] for entry in HISTORY])
    assert lines['best epoch (2)'][0] == [2, 2]
    assert ax.get_legend() is not None


def test_training_curves_extra_keys_and_gaps(tmp_path):
  # Validation every other epoch, a learning-rate schedule: a third panel.
  history = [{'epoch': e, 'train_loss': 1.0 / e, 'train_accuracy': 0.5, 'learning_rate': 1e-3 / e} for e in (1, 2, 3)]
  history[1].update(val_loss=0.7, val_accuracy=0.6, val_roc_auc=0.65)
  fig = reporting.plot_training_curves(history, best_epoch=2, path=tmp_path / 'curves.png')
  assert [ax.get_title() for ax in fig.axes] == ['loss', 'accuracy', 'learning rate']
  assert _lines(fig.axes[1])['val roc auc'] == ([2], [0.65])
  assert _lines(fig.axes[2])['learning rate'][1] == pytest.approx([1e-3, 5e-4, 1e-3 / 3])


def test_confusion_matrix(tmp_path):
  path = tmp_path / 'confusion.png'
  fig = reporting.plot_confusion_matrix([[30, 10], [5, 55]], path)
  _assert_png(path)
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == ['non_covid', 'covid']
  assert [t.get_text() for t in ax.get_yticklabels()] == ['non_covid', 'covid']
  assert ax.get_xlabel() == 'predicted' and ax.get_ylabel() == 'true'
  # Cell (row, column) sits at (x=column, y=row): the count, then its share of the true class.
  cells = {tuple(int(v) for v in text.get_position()[::-1]): text.get_text().split('\n') for text in ax.texts}
  assert cells == {(0, 0): ['30', '75.0%'], (0, 1): ['10', '25.0%'], (1, 0): ['5', '8.3%'], (1, 1): ['55', '91.7%']}


def test_roc_curve(tmp_path):
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
  covid_probability = np.array([0.1, 0.2, 0.7, 0.4, 0.9, 0.8, 0.6, 0.3, 0.55, 0.45])
  path = tmp_path / 'roc.png'
  fig = reporting.plot_roc_curve(labels, covid_probability, path)
  _assert_png(path)
  lines = _lines(fig.axes[0])
  assert lines['chance'] == ([0, 1], [0, 1])
  (label, (fpr, tpr)), = [(k, v) for k, v in lines.items() if k.startswith('AUC')]
  assert label == 'AUC = 0.7917'  # 19 of 24 positive-negative pairs ranked right
  # Hand-traced: above 0.65 one false positive (0.7) and 2 of 6 true positives.
  assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
  assert any(f == pytest.approx(0.25) and t == pytest.approx(2 / 6) for f, t in zip(fpr, tpr))
  assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ['chance', 'AUC = 0.7917']


def test_roc_curve_one_class(tmp_path):
  fig = reporting.plot_roc_curve(np.ones(4, int), np.array([0.2, 0.4, 0.6, 0.8]), tmp_path / 'roc.png')
  _assert_png(tmp_path / 'roc.png')
  assert 'undefined' in fig.axes[0].texts[0].get_text()


def test_prediction_grid(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (5, 16, 16, 3)).astype(np.float32)
  images[0] = 127.6  # gray: the shown pixels are rounded uint8
  labels = [0, 1, 1, 0, 1]
  predictions = [0, 0, 1, 1, 1]
  indices = [17, 3, 250, 42, 8]
  path = tmp_path / 'grid.png'
  fig = reporting.plot_prediction_grid(images, labels, predictions, indices, path, columns=3)
  _assert_png(path)
  assert len(fig.axes) == 5  # the sixth cell of the 2 x 3 grid is removed
  want = [
      ('#17 pred: non_covid / true: non_covid', 'green'),
      ('#3 pred: non_covid / true: covid', 'red'),
      ('#250 pred: covid / true: covid', 'green'),
      ('#42 pred: covid / true: non_covid', 'red'),
      ('#8 pred: covid / true: covid', 'green'),
  ]
  for ax, (title, color) in zip(fig.axes, want):
    assert ax.title.get_text() == title
    assert same_color(ax.title.get_color(), color), title
  shown = np.asarray(fig.axes[0].images[0].get_array())
  assert shown.dtype == np.uint8 and (shown == 128).all()
  np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), np.rint(images[1]).astype(np.uint8))


def test_prediction_grid_single_channel_and_length_check(tmp_path):
  images = np.full((2, 8, 8, 1), 200.0, np.float32)
  fig = reporting.plot_prediction_grid(images, [0, 1], [0, 1], [0, 1], tmp_path / 'grid.png')
  assert fig.axes[0].images[0].get_array().shape == (8, 8)
  assert fig.axes[0].images[0].get_cmap().name == 'gray'
  with pytest.raises(ValueError, match='length'):
    reporting.plot_prediction_grid(images, [0, 1], [0], [0, 1], tmp_path / 'grid.png')


def _metrics(roc_auc):
  return {'accuracy': 0.7, 'precision': 0.8, 'recall': 4 / 6, 'specificity': 0.75, 'f1': 8 / 11,
          'balanced_accuracy': 17 / 24, 'roc_auc': roc_auc, 'confusion_matrix': [[3, 1], [2, 4]],
          'num_examples': 10, 'threshold': 0.5}


def test_metrics_table():
  metrics = _metrics(19 / 24) | {'ci95': {'accuracy': [0.4, 0.9], 'roc_auc': [0.5, 1.0]}}
  lines = reporting.print_metrics_table(metrics, title='test').splitlines()
  assert lines[0].startswith('test (n=10, threshold 0.5')
  assert lines[1].split() == ['accuracy', '0.7000', '95%', 'CI', '[0.4000,', '0.9000]']
  assert lines[3].split() == ['recall', '(sensitivity)', '0.6667']
  assert lines[7].split() == ['roc', 'auc', '0.7917', '95%', 'CI', '[0.5000,', '1.0000]']
  assert [line.split() for line in lines[-3:]] == [['non_covid', 'covid'], ['non_covid', '3', '1'], ['covid', '2', '4']]


def test_metrics_table_undefined_auc():
  text = reporting.print_metrics_table(_metrics(None) | {'ci95': {'accuracy': [0.4, 0.9], 'roc_auc': None}})
  assert 'roc auc               undefined (one class)' in text
