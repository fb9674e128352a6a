"""What a run leaves for people to read: JSON files, PNG plots and a console table.

Figures are built as bare `matplotlib.figure.Figure` objects rendered by Agg, not
through pyplot, so nothing needs a display, no global figure list grows over a
long run, and the caller's own pyplot backend is left alone. Each plot function
saves its PNG and returns the figure.
"""

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as sk

from covid_jax import calibration, metrics, predictions, scoring
from covid_jax.metrics import CLASS_NAMES
from covid_jax.predictions import SplitPredictions

_DPI = 150
CORRECT_COLOR = 'green'
WRONG_COLOR = 'red'

# Panels of the training-curve figure: title and the history keys drawn in it.
# A panel whose keys appear in no history entry is left out.
_CURVE_PANELS = (
    ('loss', ('train_loss', 'val_loss')),
    ('accuracy', ('train_accuracy', 'val_accuracy', 'val_roc_auc')),
    ('learning rate', ('learning_rate',)),
)

# Rows of the console table: metrics key and its label.
_TABLE_ROWS = (
    ('accuracy', 'accuracy'),
    ('precision', 'precision'),
    ('recall', 'recall (sensitivity)'),
    ('specificity', 'specificity'),
    ('f1', 'f1'),
    ('balanced_accuracy', 'balanced accuracy'),
    ('roc_auc', 'roc auc'),
    ('pr_auc', 'pr auc'),
)


def final_report(workdir: str | os.PathLike, outputs: dict[str, np.ndarray], val: SplitPredictions,
                 test: SplitPredictions, decision: scoring.Decision, history: Sequence[dict[str, Any]],
                 details: dict[str, Any], seed: int, grid_size: int, write: bool = True) -> dict[str, Any]:
  """The test metrics of a run's chosen epoch, and (with `write`) the files a finished run leaves.

  `val` and `test` are the splits' predictions; `decision` (threshold and temperature) was made on val alone.
  `outputs` are the test split's gathered outputs with this process's images (`local_*`,
  `steps.split_outputs`), for the image grid; `details` (best epoch, checkpoint, split sizes, ...) join the
  metrics. Writes test_metrics.json, history.json, predictions/{val,test}.csv, training_curves.png,
  confusion_matrix.png, roc_curve.png, calibration.png and prediction_grid.png (`grid_size` test images
  drawn with `seed`) under `workdir`.
  """
  result = scoring.score(test.label, test.logits, test.patient_id, decision, seed=seed)
  result.update(details)
  if not write:
    return result
  workdir = Path(workdir)
  write_json(workdir / 'test_metrics.json', result)
  write_json(workdir / 'history.json', history)
  for split, table in (('val', val), ('test', test)):
    predictions.write_csv(workdir / 'predictions' / f'{split}.csv', table, decision)
  raw = metrics.probabilities(test.logits)[:, 1]
  plot_training_curves(history, result['best_epoch'], workdir / 'training_curves.png')
  plot_confusion_matrix(result['confusion_matrix'], workdir / 'confusion_matrix.png')
  plot_roc_curve(test.label, raw, workdir / 'roc_curve.png')
  plot_reliability_diagram(test.label, raw, scoring.calibrated_probability(test.logits, decision.temperature),
                           workdir / 'calibration.png')
  rng = np.random.default_rng(seed)
  count = min(grid_size, len(outputs['local_label']))
  chosen = np.sort(rng.choice(len(outputs['local_label']), count, replace=False))
  predicted = metrics.predict(scoring.calibrated_probability(outputs['local_logits'][chosen], decision.temperature),
                              decision.threshold)
  plot_prediction_grid(outputs['local_image'][chosen], outputs['local_label'][chosen], predicted, chosen,
                       workdir / 'prediction_grid.png')
  return result


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON (key order kept), replacing `path` atomically.

  NumPy and JAX scalars and arrays become numbers and lists. NaN and infinity
  are refused (they are not JSON) with an error naming where they are.
  """
  obj = _plain(obj)
  bad = next(_non_finite(obj, ''), None)
  if bad is not None:
    raise ValueError(f'{path}: non-finite value {bad[1]} at {bad[0] or "top level"}; JSON has no NaN or infinity')
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + '.partial')
  partial.write_text(json.dumps(obj, indent=2, allow_nan=False) + '\n')
  os.replace(partial, path)


def plot_training_curves(history: Sequence[dict[str, Any]], best_epoch: int, path: str | os.PathLike) -> Figure:
  """Loss and accuracy per epoch, train against validation, with a dashed line at `best_epoch`.

  Each history entry has 'epoch' and any of the keys in `_CURVE_PANELS`; a key
  missing from some entries (validation run every few epochs) is drawn where present.
  """
  panels = [(title, keys) for title, keys in _CURVE_PANELS if any(k in entry for entry in history for k in keys)]
  if not panels:
    raise ValueError(f'no curve to draw: history has none of {[k for _, keys in _CURVE_PANELS for k in keys]}')
  fig = Figure(figsize=(5.5 * len(panels), 4.2), layout='constrained')
  for ax, (title, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
    for key in keys:
      points = [(entry['epoch'], entry[key]) for entry in history if key in entry]
      if points:
        ax.plot(*zip(*points), marker='.', label=key.replace('_', ' '))
    ax.axvline(best_epoch, color='gray', linestyle='--', label=f'best epoch ({best_epoch})')
    ax.set(title=title, xlabel='epoch')
    ax.grid(alpha=0.3)
    ax.legend()
  return _saved(fig, path)


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], path: str | os.PathLike) -> Figure:
  """Counts, with the share of each true class beneath: rows true label, columns predicted label."""
  counts = np.asarray(confusion, np.int64)
  row_totals = counts.sum(axis=1, keepdims=True)
  shares = counts / np.maximum(row_totals, 1)
  fig = Figure(figsize=(4.8, 4.2), layout='constrained')
  ax = fig.subplots()
  image = ax.imshow(shares, cmap='Blues', vmin=0.0, vmax=1.0)
  for (row, column), count in np.ndenumerate(counts):
    ax.text(column, row, f'{count}\n{shares[row, column]:.1%}', ha='center', va='center',
            color='white' if shares[row, column] > 0.5 else 'black')
  ticks = range(len(CLASS_NAMES))
  ax.set(xticks=ticks, yticks=ticks, xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
         xlabel='predicted', ylabel='true', title='confusion matrix')
  fig.colorbar(image, ax=ax, label='share of true class')
  return _saved(fig, path)


def plot_roc_curve(labels: np.ndarray, covid_probability: np.ndarray, path: str | os.PathLike) -> Figure:
  """ROC curve of the COVID probability (COVID positive), AUC in the legend, chance diagonal.

  With one class in `labels` the curve is undefined: the figure says so instead.
  """
  labels = np.asarray(labels)
  fig = Figure(figsize=(4.8, 4.5), layout='constrained')
  ax = fig.subplots()
  ax.plot([0, 1], [0, 1], color='gray', linestyle='--', label='chance')
  if np.unique(labels).size == 2:
    fpr, tpr, _ = sk.roc_curve(labels, covid_probability, pos_label=1)
    ax.plot(fpr, tpr, label=f'AUC = {sk.roc_auc_score(labels, covid_probability):.4f}')
  else:
    ax.text(0.5, 0.5, 'ROC undefined:\none class only', ha='center', va='center')
  ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect='equal', title='ROC (positive: covid)',
         xlabel='false positive rate (1 - specificity)', ylabel='true positive rate (sensitivity)')
  ax.legend(loc='lower right')
  return _saved(fig, path)


def plot_reliability_diagram(labels: np.ndarray, p_before: np.ndarray, p_after: np.ndarray,
                             path: str | os.PathLike) -> Figure:
  """Reliability curves of the COVID probability before and after temperature scaling, with bin counts.

  Top: each non-empty bin's mean predicted probability against its COVID share (`calibration.reliability_bins`,
  the bins the ECE uses), ECE in the legend, the diagonal as perfect calibration. Bottom: images per bin.
  """
  fig = Figure(figsize=(5.2, 6.4), layout='constrained')
  curve_ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  curve_ax.plot([0, 1], [0, 1], color='gray', linestyle='--', label='perfect calibration')
  for offset, (name, probability) in zip((-0.25, 0.25), (('before', p_before), ('after', p_after))):
    bins = calibration.reliability_bins(labels, probability)
    filled = bins['count'] > 0
    ece = calibration.expected_calibration_error(labels, probability)
    curve_ax.plot(bins['mean_probability'][filled], bins['frequency'][filled], marker='o',
                  label=f'{name} temperature scaling (ECE {ece:.4f})')
    width = np.diff(bins['edges'])
    count_ax.bar(bins['edges'][:-1] + width * (0.5 + offset / 2), bins['count'], width=width / 2, label=name)
  curve_ax.set(xlim=(0, 1), ylim=(0, 1.01), ylabel='observed COVID share', title='reliability (positive: covid)')
  curve_ax.legend(loc='upper left', fontsize=8)
  count_ax.set(xlabel='predicted COVID probability', ylabel='images per bin')
  count_ax.legend(fontsize=8)
  return _saved(fig, path)


def plot_comparison(rows: Sequence[dict[str, Any]], metric_names: Sequence[str], path: str | os.PathLike) -> Figure:
  """Each metric's mean per backbone (rows with '<metric>_mean'), error bars its 95% interval; the study's
  reported figures (rows without intervals) as crosses."""
  fig = Figure(figsize=(1.3 * len(metric_names) + 3, 4.5), layout='constrained')
  ax = fig.subplots()
  width = 0.8 / max(1, len(rows))
  for i, row in enumerate(rows):
    x, mean, low, high = [], [], [], []
    for j, name in enumerate(metric_names):
      if row.get(f'{name}_mean') is not None:
        x.append(j - 0.4 + width * (i + 0.5))
        mean.append(row[f'{name}_mean'])
        for bound, values in (('low', low), ('high', high)):
          value = row.get(f'{name}_ci95_{bound}')
          values.append(mean[-1] if value is None else value)
    if not x:
      continue
    errors = np.abs(np.array([low, high]) - np.array(mean))
    reference = row.get('source') != 'this comparison'
    ax.errorbar(x, mean, yerr=errors, fmt='x' if reference else 'o', capsize=3, label=row['backbone'],
                markersize=7 if reference else 5)
  ax.set_xticks(range(len(metric_names)), [name.replace('_', ' ') for name in metric_names])
  ax.set(ylabel='test value (mean over seeds, 95% interval)', title='backbones compared')
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))
  return _saved(fig, path)


def plot_comparison_grid(images: np.ndarray, labels: Sequence[int], indices: Sequence[int],
                         predictions: dict[str, Sequence[int]], path: str | os.PathLike, columns: int = 4) -> Figure:
  """Test images (K, H, W, 3) 0-255 titled with their index and truth; under each, one line per model with
  its prediction, green when right and red when wrong. `predictions` maps model name -> (K,) labels."""
  rows = max(1, math.ceil(len(images) / columns))
  fig = Figure(figsize=(2.8 * columns, (2.6 + 0.22 * len(predictions)) * rows), layout='constrained')
  axes = fig.subplots(rows, columns, squeeze=False).ravel()
  for k, (ax, image) in enumerate(zip(axes, images)):
    pixels = np.clip(np.rint(np.asarray(image, np.float32)), 0, 255).astype(np.uint8)
    ax.imshow(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, cmap='gray', vmin=0, vmax=255)
    ax.set_title(f'#{indices[k]} true: {CLASS_NAMES[labels[k]]}', fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    for line, (name, predicted) in enumerate(predictions.items()):
      right = predicted[k] == labels[k]
      ax.text(0.5, -0.04 - 0.1 * line, f'{name}: {CLASS_NAMES[predicted[k]]}', transform=ax.transAxes,
              ha='center', va='top', fontsize=7, color=CORRECT_COLOR if right else WRONG_COLOR)
  for ax in axes[len(images):]:
    ax.remove()
  return _saved(fig, path)


def plot_prediction_grid(images: np.ndarray,
                         labels: Sequence[int],
                         predictions: Sequence[int],
                         indices: Sequence[int],
                         path: str | os.PathLike,
                         columns: int = 4) -> Figure:
  """Shown examples with their test index, prediction and truth; green title if right, red if wrong.

  `images` (K, H, W, 3 or 1) float RGB 0-255, `labels`, `predictions` and
  `indices` (their positions in the test split, for the titles) are aligned:
  one entry per example shown.
  """
  if not len(images) == len(labels) == len(predictions) == len(indices):
    raise ValueError(f'images, labels, predictions and indices differ in length: '
                     f'{len(images)}, {len(labels)}, {len(predictions)}, {len(indices)}')
  rows = max(1, math.ceil(len(images) / columns))
  fig = Figure(figsize=(2.6 * columns, 2.9 * rows), layout='constrained')
  axes = fig.subplots(rows, columns, squeeze=False).ravel()
  for ax, image, label, prediction, index in zip(axes, images, labels, predictions, indices):
    pixels = np.clip(np.rint(np.asarray(image, np.float32)), 0, 255).astype(np.uint8)
    ax.imshow(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, cmap='gray', vmin=0, vmax=255)
    ax.set_title(f'#{index} pred: {CLASS_NAMES[prediction]} / true: {CLASS_NAMES[label]}', fontsize=8,
                 color=CORRECT_COLOR if prediction == label else WRONG_COLOR)
    ax.set_axis_off()
  for ax in axes[len(images):]:
    ax.remove()
  return _saved(fig, path)


def print_metrics_table(metrics: dict[str, Any], title: str = 'metrics') -> str:
  """`classification_metrics` or `scoring.score` output as a short console table; returns the text (log or print it).

  With `score`'s keys it also shows the threshold rule, the intervals' method, the majority-class baseline
  and the calibration.
  """
  intervals = metrics.get('ci95', {})
  lines = [f'{title} (n={metrics["num_examples"]}, threshold {metrics["threshold"]:.4g}{_rule_text(metrics)}, '
           'positive: covid)']
  for key, label in (row for row in _TABLE_ROWS if row[0] in metrics):
    value = metrics[key]
    text = 'undefined (one class)' if value is None else f'{value:.4f}'
    if intervals.get(key):
      text += f'  95% CI {_interval_text(intervals[key])}'
    lines.append(f'  {label:<22}{text}')
  if 'majority_baseline' in metrics:
    baseline = metrics['majority_baseline']
    lines.append(f'  {"majority baseline":<22}{baseline["accuracy"]:.4f}  95% CI {_interval_text(baseline["ci95"])}'
                 f'  (accuracy of always predicting {baseline["class"]})')
  if 'calibration' in metrics:
    c = metrics['calibration']
    lines.append(f'  {"calibration":<22}ECE {c["ece_before"]:.4f} -> {c["ece_after"]:.4f}, Brier '
                 f'{c["brier_before"]:.4f} -> {c["brier_after"]:.4f} (temperature {c["temperature"]:.3f}, '
                 f'fitted on {c["fitted_on"]})')
  if 'interval_method' in metrics:
    lines.append(f'  intervals: {metrics["interval_method"]}')
  width = max(len(name) for name in CLASS_NAMES) + 2
  lines.append('  confusion matrix (rows true, columns predicted)')
  lines.append('  ' + ' ' * width + ''.join(f'{name:>{width}}' for name in CLASS_NAMES))
  for name, row in zip(CLASS_NAMES, metrics['confusion_matrix']):
    lines.append(f'  {name:<{width}}' + ''.join(f'{count:>{width}}' for count in row))
  return '\n'.join(lines)


def _rule_text(metrics: dict[str, Any]) -> str:
  """', rule[ target], chosen on val' from `score`'s decision; '' without one."""
  decision = metrics.get('decision')
  if not decision:
    return ''
  target = f' {decision["target"]:g}' if decision.get('target') is not None else ''
  return f' by {decision["rule"]}{target}, chosen on {decision.get("chosen_on", "val")}'


def _interval_text(interval: Sequence[float] | None) -> str:
  return 'undefined' if interval is None else f'[{interval[0]:.4f}, {interval[1]:.4f}]'


def _saved(fig: Figure, path: str | os.PathLike) -> Figure:
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=_DPI)
  return fig


def _plain(obj: Any) -> Any:
  """Dicts, lists and tuples rebuilt with NumPy/JAX scalars and arrays as Python numbers and lists."""
  if isinstance(obj, dict):
    return {key: _plain(value) for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(value) for value in obj]
  if isinstance(obj, np.generic) or hasattr(obj, '__array__'):
    return np.asarray(obj).tolist()
  return obj


def _non_finite(obj: Any, where: str) -> Iterator[tuple[str, float]]:
  """(location, value) of each NaN or infinity in a plain JSON-like object, e.g. ('history[3].val_loss', nan)."""
  if isinstance(obj, dict):
    for key, value in obj.items():
      yield from _non_finite(value, f'{where}.{key}' if where else str(key))
  elif isinstance(obj, list):
    for i, value in enumerate(obj):
      yield from _non_finite(value, f'{where}[{i}]')
  elif isinstance(obj, float) and not math.isfinite(obj):
    yield where, obj


def plot_gradcam_grid(images: np.ndarray, heatmaps: np.ndarray, labels: Sequence[int], predictions: Sequence[int],
                      indices: Sequence[int], path: str | os.PathLike, columns: int = 4) -> Figure:
  """Each image beside its Grad-CAM map of the COVID logit (jet over the radiograph), titled with its test
  index, prediction and truth: green when right, red when wrong.

  `images` (K, H, W, 3) 0-255, `heatmaps` (K, H, W) in [0, 1], and the rest are aligned: one entry per example.
  """
  if not len(images) == len(heatmaps) == len(labels) == len(predictions) == len(indices):
    raise ValueError(f'images, heatmaps, labels, predictions and indices differ in length: {len(images)}, '
                     f'{len(heatmaps)}, {len(labels)}, {len(predictions)}, {len(indices)}')
  rows = max(1, math.ceil(len(images) / columns))
  fig = Figure(figsize=(4.4 * columns, 2.5 * rows), layout='constrained')
  axes = fig.subplots(rows, 2 * columns, squeeze=False).reshape(-1, 2)
  for (plain, mapped), image, heatmap, label, prediction, index in zip(axes, images, heatmaps, labels, predictions,
                                                                        indices):
    gray = np.asarray(image, np.float32).mean(axis=-1)
    for ax in (plain, mapped):
      ax.imshow(gray, cmap='gray', vmin=0, vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
    mapped.imshow(heatmap, cmap='jet', vmin=0.0, vmax=1.0, alpha=0.45)
    plain.set_title(f'#{index} pred: {CLASS_NAMES[prediction]} / true: {CLASS_NAMES[label]}', fontsize=8, loc='left',
                    color=CORRECT_COLOR if prediction == label else WRONG_COLOR)
  for ax in axes[len(images):].ravel():
    ax.remove()
  return _saved(fig, path)
