"""The decision threshold on the COVID probability, chosen on validation predictions only.

Rules: `fixed` (0.5, as the study used), `youden` (the val ROC point with the largest sensitivity +
specificity - 1; ties go to the higher threshold) and `target_sensitivity` (the highest threshold whose val
sensitivity reaches the target). COVID is predicted where the probability is strictly above the threshold
(`metrics.predict`), so each candidate operating point "the k highest distinct val scores are COVID" is
written as a threshold in [next lower distinct score, k-th score): the midpoint of the two, which
reproduces the operating point on val exactly and leaves test scores between them at equal distance.
"""

import numpy as np

RULES = ('fixed', 'youden', 'target_sensitivity')
FIXED_THRESHOLD = 0.5


def choose_threshold(labels: np.ndarray, covid_probability: np.ndarray, rule: str,
                     target: float | None = None) -> float:
  """The threshold `rule` picks on these (validation) labels and COVID probabilities."""
  if rule not in RULES:
    raise ValueError(f'threshold rule {rule!r} is not one of {", ".join(RULES)}')
  if rule == 'fixed':
    return FIXED_THRESHOLD
  thresholds, true_positives, false_positives = operating_points(labels, covid_probability)
  positives = int(np.sum(labels == 1))
  negatives = int(labels.size - positives)
  if rule == 'youden':
    if not positives or not negatives:
      raise ValueError('threshold rule youden needs both classes in the validation labels')
    # Youden's J scaled by positives * negatives: integers, so ties are exact.
    scaled_j = true_positives * negatives - false_positives * positives
    return float(thresholds[np.argmax(scaled_j)])  # argmax takes the first: the highest threshold.
  if target is None or not 0 < target <= 1:
    raise ValueError(f'threshold rule target_sensitivity needs threshold.target in (0, 1], got {target}')
  if not positives:
    raise ValueError('threshold rule target_sensitivity needs COVID examples in the validation labels')
  reached = true_positives / positives >= target
  return float(thresholds[np.argmax(reached)])  # The last point (everything COVID) always reaches it.


def operating_points(labels: np.ndarray, covid_probability: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(thresholds, true positives, false positives) of every operating point, from the highest threshold down.

  Point k predicts COVID for the k highest distinct scores: point 0 predicts none (threshold = the highest
  score), the last predicts all.
  """
  labels = np.asarray(labels)
  covid_probability = np.asarray(covid_probability, np.float64)
  if labels.ndim != 1 or labels.shape != covid_probability.shape or not labels.size:
    raise ValueError(f'expected two non-empty 1-D arrays of equal length, got labels {labels.shape} and '
                     f'probabilities {covid_probability.shape}')
  values, bin_of = np.unique(-covid_probability, return_inverse=True)  # Distinct scores, highest first.
  values = -values
  positives_at = np.bincount(bin_of, weights=labels == 1, minlength=values.size)
  negatives_at = np.bincount(bin_of, weights=labels != 1, minlength=values.size)
  true_positives = np.concatenate([[0], np.cumsum(positives_at)]).astype(np.int64)
  false_positives = np.concatenate([[0], np.cumsum(negatives_at)]).astype(np.int64)
  below_lowest = 0.0 if values[-1] > 0 else np.nextafter(0.0, -1.0)
  lower = np.concatenate([values[1:], [below_lowest]])
  thresholds = np.concatenate([[values[0]], [_between(low, high) for low, high in zip(lower, values)]])
  return thresholds, true_positives, false_positives


def _between(low: float, high: float) -> float:
  """A threshold t with low <= t < high (so p > t holds at high, not at low): their midpoint where it lies so."""
  middle = low + (high - low) / 2
  return float(middle if middle < high else low)
