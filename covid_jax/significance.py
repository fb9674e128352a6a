"""Paired tests of two models on the same test images: the ROC AUC difference and McNemar's test."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats

from covid_jax import intervals

# Below this many discordant pairs McNemar's test uses the exact binomial, above it the chi-square.
EXACT_BELOW = 25


def paired_bootstrap_auc_difference(labels: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, patient_ids: Sequence,
                                    n: int = 1000, seed: int = 0) -> dict[str, Any]:
  """ROC AUC of model A minus that of B on the same images, with a patient-level paired bootstrap.

  Both models are scored on the same resamples of patients (`intervals.patient_weights`), so the
  interval reflects the models' correlation. The two-sided p-value tests "no difference" by centring the
  bootstrap distribution on zero: the share of resampled differences at least as far from the observed one
  as the observed one is from 0, (1 + count) / (1 + defined resamples).
  """
  labels = np.asarray(labels)
  if not labels.shape == np.shape(p_a) == np.shape(p_b) == np.shape(patient_ids):
    raise ValueError(f'labels, p_a, p_b and patient_ids differ in shape: {labels.shape}, {np.shape(p_a)}, '
                     f'{np.shape(p_b)}, {np.shape(patient_ids)}')
  observed = np.ones((1, labels.size))
  difference = float((intervals.weighted_roc_auc(labels, p_a, observed)
                      - intervals.weighted_roc_auc(labels, p_b, observed))[0])
  if np.isnan(difference):
    raise ValueError('ROC AUC is undefined: the labels hold one class only')
  weights = intervals.patient_weights(patient_ids, n, seed)
  resampled = intervals.weighted_roc_auc(labels, p_a, weights) - intervals.weighted_roc_auc(labels, p_b, weights)
  defined = resampled[~np.isnan(resampled)]
  as_extreme = np.sum(np.abs(defined - difference) >= abs(difference) - 1e-12)
  return {'difference': difference, 'ci95': intervals.percentile_interval(resampled),
          'p_value': float((1 + as_extreme) / (1 + defined.size)), 'resamples': n,
          'undefined_resamples': int(n - defined.size), 'seed': seed,
          'method': f'paired percentile bootstrap over patients ({n} resamples, seed {seed}, the same resamples for '
                    'both models); two-sided p-value: the share of resampled differences at least as far from the '
                    'observed difference as it is from 0'}


def mcnemar(labels: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict[str, Any]:
  """McNemar's test of two models' thresholded predictions on the same images.

  Only the discordant images count: b (A right, B wrong) and c (A wrong, B right). With b + c below
  `EXACT_BELOW` the p-value is the exact two-sided binomial one (min(b, c) of b + c at 1/2, doubled, at most
  1) and the statistic is min(b, c); otherwise the chi-square with continuity correction,
  (|b - c| - 1)^2 / (b + c), on one degree of freedom.
  """
  labels, pred_a, pred_b = (np.asarray(x) for x in (labels, pred_a, pred_b))
  if not labels.shape == pred_a.shape == pred_b.shape:
    raise ValueError(f'labels, pred_a and pred_b differ in shape: {labels.shape}, {pred_a.shape}, {pred_b.shape}')
  a_right, b_right = pred_a == labels, pred_b == labels
  only_a, only_b = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
  discordant = only_a + only_b
  if discordant < EXACT_BELOW:
    statistic = float(min(only_a, only_b))
    p_value = min(1.0, 2 * float(scipy.stats.binom.cdf(min(only_a, only_b), discordant, 0.5)))
    method = 'exact binomial (two-sided)'
  else:
    statistic = (abs(only_a - only_b) - 1) ** 2 / discordant
    p_value = float(scipy.stats.chi2.sf(statistic, 1))
    method = 'chi-square with continuity correction'
  return {'a_right_b_wrong': only_a, 'a_wrong_b_right': only_b, 'statistic': float(statistic),
          'p_value': p_value, 'method': method}
