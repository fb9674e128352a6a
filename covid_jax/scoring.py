"""What validation decides (temperature and threshold), and the test metrics scored under that decision.

The decision is made on val alone and applied unchanged to test and to new images, so the test labels
cannot move it. Test metrics come at the chosen threshold and at 0.5 (the study's), each with patient-level
bootstrap intervals (`covid_jax.intervals`), beside calibration before and after temperature scaling and
the majority-class baseline.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from covid_jax import calibration, intervals, metrics, thresholds

_STUDY_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class Decision:
  """What validation decides, applied unchanged to test and to new images."""

  threshold: float  # On the calibrated COVID probability: COVID where p > threshold.
  temperature: float  # Temperature scaling fitted on val (1.0 = none).
  rule: str  # One of thresholds.RULES.
  target: float | None = None  # The target sensitivity, for target_sensitivity.

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'Decision':
    """The decision `to_json` wrote (extra keys such as 'chosen_on' are ignored); a missing key is an error."""
    names = [field.name for field in dataclasses.fields(cls)]
    missing = [name for name in names if name not in d]
    if missing:
      raise ValueError(f'decision lacks {", ".join(missing)}: {d}')
    if d['rule'] not in thresholds.RULES:
      raise ValueError(f'decision rule {d["rule"]!r} is not one of {", ".join(thresholds.RULES)}')
    return cls(**{name: d[name] for name in names})


def calibrated_probability(logits: np.ndarray, temperature: float) -> np.ndarray:
  """(N,) COVID probability of (N, 2) logits divided by `temperature`."""
  if not temperature > 0:
    raise ValueError(f'temperature must be positive, got {temperature}')
  return metrics.probabilities(np.asarray(logits, np.float64) / temperature)[:, 1]


def decide_on_val(labels: np.ndarray, logits: np.ndarray, rule: str, target: float | None) -> Decision:
  """Temperature fitted on these val logits, then the threshold `rule` picks on the calibrated probability."""
  labels = np.asarray(labels)
  temperature = calibration.fit_temperature(labels, logits)
  target = target if rule == 'target_sensitivity' else None
  threshold = thresholds.choose_threshold(labels, calibrated_probability(logits, temperature), rule, target)
  return Decision(threshold=threshold, temperature=temperature, rule=rule, target=target)


def score(labels: np.ndarray, logits: np.ndarray, patient_ids: Sequence, decision: Decision, seed: int,
          bootstrap_samples: int = 1000) -> dict[str, Any]:
  """JSON-ready metrics of (test) `logits` under `decision`, with intervals resampled by patient.

  Top level: `metrics.classification_metrics` at the decision's threshold (on the calibrated probability)
  with 'ci95' (accuracy, precision, recall, specificity, f1, roc_auc, pr_auc) and 'interval_undefined'
  (resamples left out per metric); 'at_threshold_0.5' the same at 0.5; 'interval_method'; 'decision';
  'calibration' (ECE and Brier on this split before and after temperature scaling); 'majority_baseline'.
  """
  labels = np.asarray(labels)
  if np.shape(patient_ids) != labels.shape:
    raise ValueError(f'patient_ids {np.shape(patient_ids)} and labels {labels.shape} differ in shape')
  raw = metrics.probabilities(logits)[:, 1]
  calibrated = calibrated_probability(logits, decision.temperature)
  weights = intervals.patient_weights(patient_ids, bootstrap_samples, seed)
  result = _with_intervals(labels, calibrated, decision.threshold, weights)
  result['at_threshold_0.5'] = _with_intervals(labels, calibrated, _STUDY_THRESHOLD, weights)
  num_patients = np.unique(np.asarray(patient_ids)).size
  result['interval_method'] = (
      f'95% percentile bootstrap over patients: {bootstrap_samples} resamples of the {num_patients} patients '
      f'drawn with replacement, every image of a drawn patient included, seed {seed}; the same resamples for '
      'every metric; resamples where a metric is undefined are left out (counted in interval_undefined)')
  result['decision'] = {**decision.to_json(), 'chosen_on': 'val'}
  result['calibration'] = {
      'temperature': decision.temperature, 'fitted_on': 'val', 'bins': calibration.NUM_BINS,
      'ece_before': calibration.expected_calibration_error(labels, raw),
      'ece_after': calibration.expected_calibration_error(labels, calibrated),
      'brier_before': calibration.brier_score(labels, raw),
      'brier_after': calibration.brier_score(labels, calibrated),
  }
  majority, accuracy = intervals.majority_accuracy(labels, weights)
  result['majority_baseline'] = {'class': metrics.CLASS_NAMES[majority], 'label': majority,
                                 'accuracy': float(np.mean(labels == majority)),
                                 'ci95': intervals.percentile_interval(accuracy)}
  return result


def _with_intervals(labels: np.ndarray, covid_probability: np.ndarray, threshold: float,
                    weights: np.ndarray) -> dict[str, Any]:
  result = metrics.classification_metrics(labels, covid_probability, threshold)
  result['ci95'], result['interval_undefined'] = intervals.intervals(
      intervals.resampled_metrics(labels, covid_probability, threshold, weights))
  return result
