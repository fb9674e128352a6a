"""Classification metrics from gathered predictions, computed once on the host.

The point metrics come from scikit-learn, except ROC AUC, computed from ranks
(SciPy) because every validation pass computes it. Intervals, resampled by
patient, are `covid_jax.intervals`'; the scored test metrics `covid_jax.scoring`'.

Label 0 is non-COVID and label 1 is COVID, the positive class: `precision`,
`recall` (sensitivity) and `f1` are those of class 1 and `specificity` is the
recall of class 0. A rate with an empty denominator (for example precision when
nothing is predicted COVID) is 0, as with scikit-learn's `zero_division=0`.
Every returned value is a plain Python number, list, dict or None, so the result
goes to JSON as it is (JSON has no NaN: an undefined ROC AUC is None).
"""

import warnings
from typing import Any

import numpy as np
import scipy.stats
from sklearn import metrics as sk

CLASS_NAMES = ('non_covid', 'covid')
_LABELS = [0, 1]


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
  curve that scikit-learn integrates, from ranks without scikit-learn's input checks.
  """
  positive = np.asarray(labels) == 1
  num_positive = int(positive.sum())
  num_negative = positive.size - num_positive
  if not num_positive or not num_negative:
    return None
  ranks = scipy.stats.rankdata(covid_probability)  # Tied scores share their mean rank.
  return float((ranks[positive].sum() - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative))


def pr_auc(labels: np.ndarray, covid_probability: np.ndarray) -> float | None:
  """Average precision of the COVID probability (scikit-learn's PR AUC); None when `labels` hold no COVID."""
  if not np.any(np.asarray(labels) == 1):
    return None
  return float(sk.average_precision_score(labels, covid_probability))


def classification_metrics(labels: np.ndarray,
                           covid_probability: np.ndarray,
                           threshold: float = 0.5) -> dict[str, Any]:
  """Metrics of COVID-vs-non-COVID predictions, as plain JSON-ready values.

  Args:
    labels: (N,) true labels in {0, 1}, only real examples (padding removed).
    covid_probability: (N,) predicted probability of COVID (label 1).
    threshold: predict COVID where the probability is above this.

  Returns:
    accuracy, precision, recall (sensitivity), specificity, f1 (positive class
    COVID), balanced_accuracy, roc_auc (None for one class), pr_auc (None
    without COVID examples), confusion_matrix
    [[tn, fp], [fn, tp]] (rows: true non_covid, covid; columns: predicted
    non_covid, covid), per_class {name: {precision, recall, f1, support}},
    num_examples and threshold. Intervals: `intervals`, `scoring.score`.
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
      'pr_auc': pr_auc(labels, covid_probability),
      'confusion_matrix': sk.confusion_matrix(labels, predicted, labels=_LABELS).tolist(),
      'per_class': {
          name: {'precision': float(precision[i]), 'recall': float(recall[i]), 'f1': float(f1[i]),
                 'support': int(support[i])}
          for i, name in enumerate(CLASS_NAMES)
      },
      'num_examples': int(labels.size),
      'threshold': float(threshold),
  }
  return result


def from_logits(labels: np.ndarray, logits: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
  """`classification_metrics` of (N, 2) logits."""
  return classification_metrics(labels, probabilities(logits)[:, 1], threshold)


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
