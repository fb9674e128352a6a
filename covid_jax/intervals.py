"""Percentile bootstrap intervals that resample patients, computed for all resamples at once.

A resample draws the split's patients with replacement, and every image of a drawn patient comes along,
once per draw: images of one patient are not independent, so resampling images would understate the
uncertainty. A resample is therefore a vector of image multiplicities (weights), and each metric is a
weighted statistic evaluated for every resample in one array operation: confusion counts as weighted sums,
ROC AUC as the weighted Mann-Whitney statistic and PR AUC as weighted average precision (scikit-learn's
definition), both over the scores' distinct values. A resample where a metric is undefined (one class
only, an empty denominator) gives NaN; intervals leave those out and count them.
"""

from collections.abc import Callable, Sequence

import numpy as np

from covid_jax import metrics

CONFIDENCE = 0.95
Counts = dict[str, np.ndarray]

# Metrics of the thresholded predictions from the (resampled) confusion counts.
_FROM_COUNTS: dict[str, Callable[[Counts], np.ndarray]] = {
    'accuracy': lambda c: _ratio(c['tp'] + c['tn'], c['tp'] + c['tn'] + c['fp'] + c['fn']),
    'precision': lambda c: _ratio(c['tp'], c['tp'] + c['fp']),
    'recall': lambda c: _ratio(c['tp'], c['tp'] + c['fn']),
    'specificity': lambda c: _ratio(c['tn'], c['tn'] + c['fp']),
    'f1': lambda c: _ratio(2 * c['tp'], 2 * c['tp'] + c['fp'] + c['fn']),
}
METRICS = (*_FROM_COUNTS, 'roc_auc', 'pr_auc')


def patient_weights(patient_ids: Sequence, n: int, seed: int) -> np.ndarray:
  """(n, N) multiplicities of N images in `n` resamples that each draw the patients with replacement."""
  if n < 1:
    raise ValueError(f'the bootstrap needs at least one resample, got {n}')
  patient_ids = np.asarray(patient_ids)
  if patient_ids.ndim != 1 or not patient_ids.size:
    raise ValueError(f'expected a non-empty 1-D sequence of patient ids, got shape {patient_ids.shape}')
  _, patient_of_image = np.unique(patient_ids, return_inverse=True)
  num_patients = int(patient_of_image.max()) + 1
  drawn = np.random.default_rng(seed).integers(0, num_patients, (n, num_patients))
  offset = drawn + num_patients * np.arange(n)[:, None]
  counts = np.bincount(offset.ravel(), minlength=n * num_patients).reshape(n, num_patients)
  return counts[:, patient_of_image].astype(np.float64)


def resampled_metrics(labels: np.ndarray, covid_probability: np.ndarray, threshold: float,
                      weights: np.ndarray) -> dict[str, np.ndarray]:
  """Each of `METRICS` for each resample (rows of `weights`): {name: (n,) values, NaN where undefined}."""
  labels = np.asarray(labels)
  weights = _checked_weights(weights, labels.size)
  predicted = metrics.predict(covid_probability, threshold)
  cells = {'tp': (labels == 1) & (predicted == 1), 'fp': (labels == 0) & (predicted == 1),
           'fn': (labels == 1) & (predicted == 0), 'tn': (labels == 0) & (predicted == 0)}
  counts = {name: weights @ cell for name, cell in cells.items()}
  result = {name: metric(counts) for name, metric in _FROM_COUNTS.items()}
  result['roc_auc'] = weighted_roc_auc(labels, covid_probability, weights)
  result['pr_auc'] = weighted_average_precision(labels, covid_probability, weights)
  return result


def weighted_roc_auc(labels: np.ndarray, covid_probability: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """ROC AUC of each weight row: weighted share of (COVID, non-COVID) pairs ranked right, ties counting half."""
  positive, negative = _weight_per_score(labels, covid_probability, weights)
  negative_below = np.cumsum(negative, axis=1) - negative
  ranked_right = np.sum(positive * (negative_below + negative / 2), axis=1)
  return _ratio(ranked_right, positive.sum(axis=1) * negative.sum(axis=1))


def weighted_average_precision(labels: np.ndarray, covid_probability: np.ndarray,
                               weights: np.ndarray) -> np.ndarray:
  """Average precision of each weight row: sum over distinct thresholds of recall gained x precision there."""
  positive, negative = _weight_per_score(labels, covid_probability, weights)
  positive, negative = positive[:, ::-1], negative[:, ::-1]  # Highest score first.
  true_positives = np.cumsum(positive, axis=1)
  predicted_positive = true_positives + np.cumsum(negative, axis=1)
  precision = np.divide(true_positives, predicted_positive, out=np.zeros_like(true_positives),
                        where=predicted_positive > 0)
  return _ratio(np.sum(positive * precision, axis=1), positive.sum(axis=1))


def majority_accuracy(labels: np.ndarray, weights: np.ndarray) -> tuple[int, np.ndarray]:
  """(the majority label of `labels`, ties to 0; the accuracy of always predicting it in each weight row)."""
  labels = np.asarray(labels)
  weights = _checked_weights(weights, labels.size)
  majority = int(np.argmax(np.bincount(labels, minlength=2)))
  return majority, weights @ (labels == majority) / weights.sum(axis=1)


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> list[float] | None:
  """[low, high] percentiles of the defined (non-NaN) values; None if none is defined."""
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  if not values.size:
    return None
  tail = (1.0 - confidence) / 2
  low, high = np.quantile(values, [tail, 1.0 - tail])
  return [float(low), float(high)]


def intervals(resampled: dict[str, np.ndarray]) -> tuple[dict[str, list[float] | None], dict[str, int]]:
  """(95% percentile interval of each metric, number of resamples where it was undefined and left out)."""
  return ({name: percentile_interval(values) for name, values in resampled.items()},
          {name: int(np.isnan(values).sum()) for name, values in resampled.items()})


def _weight_per_score(labels: np.ndarray, covid_probability: np.ndarray,
                      weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(n, U) total weight of COVID and of non-COVID examples at each of the U distinct scores, lowest first."""
  labels = np.asarray(labels)
  covid_probability = np.asarray(covid_probability, np.float64)
  weights = _checked_weights(weights, labels.size)
  order = np.argsort(covid_probability, kind='stable')
  scores = covid_probability[order]
  starts = np.flatnonzero(np.concatenate([[True], scores[1:] != scores[:-1]]))
  sorted_weights = weights[:, order]
  is_positive = labels[order] == 1
  return (np.add.reduceat(sorted_weights * is_positive, starts, axis=1),
          np.add.reduceat(sorted_weights * ~is_positive, starts, axis=1))


def _checked_weights(weights: np.ndarray, size: int) -> np.ndarray:
  weights = np.atleast_2d(np.asarray(weights, np.float64))
  if weights.shape[1] != size:
    raise ValueError(f'weights cover {weights.shape[1]} examples, the labels {size}')
  return weights


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, NaN where the denominator is 0 (the metric is undefined in that resample)."""
  numerator = np.asarray(numerator, np.float64)
  denominator = np.asarray(denominator, np.float64)
  return np.divide(numerator, denominator, out=np.full(np.broadcast(numerator, denominator).shape, np.nan),
                   where=denominator > 0)
