"""Classification metrics from gathered predictions, computed once on the host.

The point metrics come from scikit-learn. ROC AUC and the bootstrap's accuracy
are computed with NumPy/SciPy, because the bootstrap evaluates them 1,000 times
and scikit-learn's input validation would cost more than the metrics.

Label 0 is non-COVID and label 1 is COVID, the positive class: `precision`,
`recall` (sensitivity) and `f1` are those of class 1 and `specificity` is the
recall of class 0. A rate with an empty denominator (for example precision when
nothing is predicted COVID) is 0, as with scikit-learn's `zero_division=0`.
Every returned value is a plain Python number, list, dict or None, so the result
goes to JSON as it is (JSON has no NaN: an undefined ROC AUC is None).
"""

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.stats
from sklearn import metrics as sk

CLASS_NAMES = ('non_covid', 'covid')
_LABELS = [0, 1]
_CONFIDENCE = 0.95


def probabilities(logits: np.ndarray) -> np.ndarray:
  """Softmax of (N, 2) logits in float64, shifted by the row maximum so large logits cannot overflow."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[1] != len(CLASS_NAMES):
    raise ValueError(f'expected logits of shape (N, {len(CLASS_NAMES)}), got {logits.shape}')
  exp = np.exp(logits - logits.max(axis=1, keepdims=True))
  return exp / exp.sum(axis=1, keepdims=True)


def predict(covid_probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """Predicted labels: COVID where the probability is strictly above `threshold`.

  Strictly above, so that at 0.5 a tie goes to non-COVID exactly as argmax of
  the logits does.
  """
  return (np.asarray(covid_probability) > threshold).astype(np.int64)


def roc_auc(labels: np.ndarray, covid_probability: np.ndarray) -> float | None:
  """ROC AUC of the COVID probability; None when `labels` hold one class only (AUC is undefined).

  Computed as the Mann-Whitney statistic (tied scores count half), which is the area under the ROC
  curve that scikit-learn integrates; from ranks it is cheap enough for a bootstrap of many resamples.
  """
  positive = np.asarray(labels) == 1
  num_positive = int(positive.sum())
  num_negative = positive.size - num_positive
  if not num_positive or not num_negative:
    return None
  ranks = scipy.stats.rankdata(covid_probability)  # Tied scores share their mean rank.
  return float((ranks[positive].sum() - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative))


def accuracy_at(threshold: float) -> Callable[[np.ndarray, np.ndarray], float]:
  """Accuracy as a function of (labels, covid_probability), for `bootstrap_ci`."""
  return lambda labels, covid_probability: float(np.mean(labels == predict(covid_probability, threshold)))


def bootstrap_ci(labels: np.ndarray,
                 covid_probability: np.ndarray,
                 metric: Callable[[np.ndarray, np.ndarray], float | None],
                 n: int = 1000,
                 seed: int = 0,
                 confidence: float = _CONFIDENCE) -> list[float] | None:
  """Percentile bootstrap interval [low, high] of `metric(labels, covid_probability)`.

  Resamples the examples with replacement `n` times (the same resamples for a
  given seed and size, so intervals of different metrics are paired). Resamples
  where the metric is undefined (it returns None, as `roc_auc` does for a
  single class) are left out; None if no resample was defined.
  """
  labels, covid_probability = _validated(labels, covid_probability)
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(n):
    index = rng.integers(0, labels.size, labels.size)
    value = metric(labels[index], covid_probability[index])
    if value is not None:
      values.append(value)
  if not values:
    return None
  tail = (1.0 - confidence) / 2
  low, high = np.quantile(values, [tail, 1.0 - tail])
  return [float(low), float(high)]


def classification_metrics(labels: np.ndarray,
                           covid_probability: np.ndarray,
                           threshold: float = 0.5,
                           bootstrap_samples: int = 0,
                           seed: int = 0) -> dict[str, Any]:
  """Metrics of COVID-vs-non-COVID predictions, as plain JSON-ready values.

  Args:
    labels: (N,) true labels in {0, 1}, only real examples (padding removed).
    covid_probability: (N,) predicted probability of COVID (label 1).
    threshold: predict COVID where the probability is above this.
    bootstrap_samples: if positive, add 'ci95' with percentile bootstrap
      intervals of accuracy and ROC AUC from this many resamples (the test
      set is small; a point estimate alone hides how uncertain it is).
    seed: seed of the bootstrap resampling.

  Returns:
    accuracy, precision, recall (sensitivity), specificity, f1 (positive class
    COVID), balanced_accuracy, roc_auc (None for one class), confusion_matrix
    [[tn, fp], [fn, tp]] (rows: true non_covid, covid; columns: predicted
    non_covid, covid), per_class {name: {precision, recall, f1, support}},
    num_examples, threshold and, if asked for, ci95 {accuracy, roc_auc:
    [low, high] or None}.
  """
  labels, covid_probability = _validated(labels, covid_probability)
  predicted = predict(covid_probability, threshold)
  precision, recall, f1, support = sk.precision_recall_fscore_support(
      labels, predicted, labels=_LABELS, zero_division=0)
  with warnings.catch_warnings():
    # With one class in `labels`, sklearn warns that predictions hold a class
    # absent from the truth; the score (mean recall over present classes) is right.
    warnings.simplefilter('ignore', UserWarning)
    balanced_accuracy = sk.balanced_accuracy_score(labels, predicted)
  result = {
      'accuracy': float(sk.accuracy_score(labels, predicted)),
      'precision': float(precision[1]),
      'recall': float(recall[1]),
      'specificity': float(recall[0]),
      'f1': float(f1[1]),
      'balanced_accuracy': float(balanced_accuracy),
      'roc_auc': roc_auc(labels, covid_probability),
      'confusion_matrix': sk.confusion_matrix(labels, predicted, labels=_LABELS).tolist(),
      'per_class': {
          name: {'precision': float(precision[i]), 'recall': float(recall[i]), 'f1': float(f1[i]),
                 'support': int(support[i])}
          for i, name in enumerate(CLASS_NAMES)
      },
      'num_examples': int(labels.size),
      'threshold': float(threshold),
  }
  if bootstrap_samples > 0:
    result['ci95'] = {
        name: bootstrap_ci(labels, covid_probability, metric, n=bootstrap_samples, seed=seed)
        for name, metric in (('accuracy', accuracy_at(threshold)), ('roc_auc', roc_auc))
    }
  return result


def from_logits(labels: np.ndarray, logits: np.ndarray, threshold: float = 0.5, **kwargs) -> dict[str, Any]:
  """`classification_metrics` of (N, 2) logits; kwargs go to it (bootstrap_samples, seed)."""
  return classification_metrics(labels, probabilities(logits)[:, 1], threshold, **kwargs)


def split_metrics(outputs: dict[str, np.ndarray], label_smoothing: float, prefix: str) -> dict[str, float]:
  """Loss (against the smoothed targets the run trains on), accuracy and ROC AUC of a split's gathered logits.

  Keys are prefixed ('val_loss', ...); an undefined AUC (one class) is NaN.
  """
  logits = outputs['logits'].astype(np.float64)
  labels = outputs['label']
  targets = np.eye(2)[labels] * (1 - label_smoothing) + label_smoothing / 2
  log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  scores = from_logits(labels, logits)
  return {f'{prefix}_loss': float(-(targets * log_probs).sum(-1).mean()),
          f'{prefix}_accuracy': scores['accuracy'],
          f'{prefix}_roc_auc': scores['roc_auc'] if scores['roc_auc'] is not None else float('nan')}


def _validated(labels: np.ndarray, covid_probability: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both as 1-D arrays of equal, non-zero length; labels in {0, 1}, probabilities finite in [0, 1]."""
  labels = np.asarray(labels)
  covid_probability = np.asarray(covid_probability, np.float64)
  if labels.ndim != 1 or labels.shape != covid_probability.shape or not labels.size:
    raise ValueError(f'expected two non-empty 1-D arrays of equal length, got labels {labels.shape} '
                     f'and probabilities {covid_probability.shape}')
  if not np.isin(labels, _LABELS).all():
    raise ValueError(f'labels must be 0 (non_covid) or 1 (covid), got {np.unique(labels).tolist()}')
  if not (np.isfinite(covid_probability).all() and (covid_probability >= 0).all()
          and (covid_probability <= 1).all()):
    raise ValueError('covid_probability must be finite and within [0, 1]')
  return labels.astype(np.int64), covid_probability
