"""Calibration of the COVID probability: reliability bins, ECE, Brier score and temperature scaling.

ECE here is that of the predicted COVID probability against the observed COVID frequency (not of the
max-probability confidence): 15 equal-width bins over [0, 1] (the last one closed), each bin's
|mean probability - COVID share| weighted by its share of the examples. The reliability diagram draws the
same bins. Temperature scaling divides both logits by one scalar T > 0, fitted on val by minimising the
negative log-likelihood; it keeps the sign of the logit difference, so decisions at 0.5 do not change.
"""

import numpy as np
import scipy.optimize
import scipy.special

NUM_BINS = 15
# Search range of the temperature, as log T: T from 0.01 to 100.
_LOG_TEMPERATURE_BOUNDS = (np.log(1e-2), np.log(1e2))


def reliability_bins(labels: np.ndarray, covid_probability: np.ndarray,
                     num_bins: int = NUM_BINS) -> dict[str, np.ndarray]:
  """Per equal-width bin: 'count', 'mean_probability' and 'frequency' (the COVID share; NaN where empty), 'edges'."""
  labels = np.asarray(labels, np.float64)
  covid_probability = np.asarray(covid_probability, np.float64)
  bin_of = np.minimum((covid_probability * num_bins).astype(np.int64), num_bins - 1)
  count = np.bincount(bin_of, minlength=num_bins)
  with np.errstate(invalid='ignore', divide='ignore'):
    mean_probability = np.bincount(bin_of, weights=covid_probability, minlength=num_bins) / count
    frequency = np.bincount(bin_of, weights=labels, minlength=num_bins) / count
  return {'edges': np.linspace(0.0, 1.0, num_bins + 1), 'count': count, 'mean_probability': mean_probability,
          'frequency': frequency}


def expected_calibration_error(labels: np.ndarray, covid_probability: np.ndarray, num_bins: int = NUM_BINS) -> float:
  """ECE of the COVID probability (see the module docstring) over `num_bins` equal-width bins."""
  bins = reliability_bins(labels, covid_probability, num_bins)
  filled = bins['count'] > 0
  gaps = np.abs(bins['mean_probability'][filled] - bins['frequency'][filled])
  return float(np.sum(bins['count'][filled] * gaps) / np.sum(bins['count']))


def brier_score(labels: np.ndarray, covid_probability: np.ndarray) -> float:
  """Mean squared difference between the COVID probability and the label."""
  return float(np.mean((np.asarray(covid_probability, np.float64) - np.asarray(labels)) ** 2))


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
  """The T minimising the mean NLL of softmax(logits / T) on these labels (bounded search over log T)."""
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels, np.int64)
  if logits.ndim != 2 or logits.shape != (labels.size, 2):
    raise ValueError(f'expected (N, 2) logits for N = {labels.size} labels, got {logits.shape}')
  chosen = logits[np.arange(labels.size), labels]

  def nll(log_temperature: float) -> float:
    scaled = np.exp(-log_temperature)
    return float(np.mean(scipy.special.logsumexp(logits * scaled, axis=1) - chosen * scaled))

  result = scipy.optimize.minimize_scalar(nll, bounds=_LOG_TEMPERATURE_BOUNDS, method='bounded',
                                          options={'xatol': 1e-6})
  return float(np.exp(result.x))
