"""Patient-level bootstrap intervals and paired tests, against scikit-learn, SciPy and hand-built cases."""

import time

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as sk

from covid_jax import intervals, significance


def _scored_set(n: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  labels[:2] = (0, 1)
  probability = np.clip(0.3 * labels + rng.uniform(0, 0.7, n), 0, 1)
  return labels, probability.round(1) if ties else probability


@pytest.mark.parametrize('ties', (False, True))
def test_weighted_auc_and_average_precision_match_sklearn_sample_weight(ties):
  labels, probability = _scored_set(200, 0, ties)
  weights = np.random.default_rng(1).integers(0, 4, (5, 200)).astype(float)  # Zeros: images not drawn.
  roc = intervals.weighted_roc_auc(labels, probability, weights)
  average_precision = intervals.weighted_average_precision(labels, probability, weights)
  for row in range(5):
    assert roc[row] == pytest.approx(sk.roc_auc_score(labels, probability, sample_weight=weights[row]), rel=1e-12)
    assert average_precision[row] == pytest.approx(
        sk.average_precision_score(labels, probability, sample_weight=weights[row]), rel=1e-12)


def test_resamples_draw_whole_patients_and_each_matches_sklearn_on_the_resampled_images():
  labels, probability = _scored_set(90, 2)
  patients = np.repeat(np.arange(30), 3)[np.random.default_rng(3).permutation(90)]  # 3 images each, shuffled.
  weights = intervals.patient_weights(patients.astype(str), 50, seed=0)
  for row in weights:
    per_patient = [np.unique(row[patients == p]) for p in range(30)]
    assert all(len(w) == 1 for w in per_patient)  # A patient's images come along together.
    assert sum(w[0] for w in per_patient) == 30  # 30 patients drawn with replacement.
  got = intervals.resampled_metrics(labels, probability, 0.5, weights)
  for row in range(0, 50, 7):
    index = np.repeat(np.arange(90), weights[row].astype(int))
    y, p = labels[index], probability[index]
    predicted = (p > 0.5).astype(int)
    want = {'accuracy': sk.accuracy_score(y, predicted), 'precision': sk.precision_score(y, predicted),
            'recall': sk.recall_score(y, predicted), 'specificity': sk.recall_score(y, predicted, pos_label=0),
            'f1': sk.f1_score(y, predicted), 'roc_auc': sk.roc_auc_score(y, p),
            'pr_auc': sk.average_precision_score(y, p)}
    for name, value in want.items():
      assert got[name][row] == pytest.approx(value, rel=1e-12), (name, row)


def test_duplicated_patients_do_not_narrow_the_patient_interval_but_narrow_an_image_level_one():
  labels, probability = _scored_set(200, 4)
  copies = 4
  duplicated_labels, duplicated_probability = np.repeat(labels, copies), np.repeat(probability, copies)
  patients = np.repeat(np.arange(200), copies)  # Same patients, 4 images each.

  def widths(labels, probability, patient_ids):
    resampled = intervals.resampled_metrics(labels, probability, 0.5, intervals.patient_weights(patient_ids, 1000, 0))
    return {name: high - low for name, (low, high) in intervals.intervals(resampled)[0].items()}

  single = widths(labels, probability, np.arange(200))
  by_patient = widths(duplicated_labels, duplicated_probability, patients)
  by_image = widths(duplicated_labels, duplicated_probability, np.arange(200 * copies))
  for name in ('accuracy', 'recall', 'specificity', 'f1', 'roc_auc', 'pr_auc'):
    assert by_patient[name] >= 0.95 * single[name], name
    assert by_image[name] < 0.7 * single[name], name  # About 1 / sqrt(4) of it.


def test_accuracy_interval_matches_binomial_width():
  # One image per patient: the bootstrap of accuracy is the binomial's, half-width 1.96 sqrt(p (1 - p) / n).
  labels = np.arange(600) % 2
  correct = np.arange(600) < 540
  probability = np.where(correct == (labels == 1), 0.8, 0.2)
  resampled = intervals.resampled_metrics(labels, probability, 0.5, intervals.patient_weights(np.arange(600), 1000, 0))
  low, high = intervals.percentile_interval(resampled['accuracy'])
  assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.9 * 0.1 / 600), rel=0.15)
  assert (low + high) / 2 == pytest.approx(0.9, abs=0.005)


def test_undefined_resamples_are_skipped_and_counted():
  # One COVID image among 10 patients: resamples that miss it (about (9/10)^10 = 35%) have no AUC or recall.
  labels = np.array([1] + [0] * 9)
  probability = np.linspace(0.9, 0.0, 10)
  resampled = intervals.resampled_metrics(labels, probability, 0.5, intervals.patient_weights(np.arange(10), 400, 0))
  ci, undefined = intervals.intervals(resampled)
  assert ci['roc_auc'] == [1.0, 1.0] and ci['recall'] == [1.0, 1.0]
  assert undefined['roc_auc'] == undefined['recall'] == pytest.approx(400 * 0.9 ** 10, rel=0.25)
  assert undefined['accuracy'] == 0
  _, undefined_single_class = intervals.intervals(
      intervals.resampled_metrics(np.zeros(10, int), probability, 0.5, intervals.patient_weights(np.arange(10), 20, 0)))
  assert undefined_single_class['roc_auc'] == 20
  assert intervals.percentile_interval(np.full(20, np.nan)) is None


def test_same_seed_same_resamples_and_fast():
  labels, probability = _scored_set(600, 5)
  patients = np.random.default_rng(6).integers(0, 400, 600)
  np.testing.assert_array_equal(intervals.patient_weights(patients, 30, 7), intervals.patient_weights(patients, 30, 7))
  assert not np.array_equal(intervals.patient_weights(patients, 30, 7), intervals.patient_weights(patients, 30, 8))
  start = time.perf_counter()
  intervals.resampled_metrics(labels, probability, 0.5, intervals.patient_weights(patients, 1000, 0))
  assert time.perf_counter() - start < 2.0


def _mcnemar_case(only_a: int, only_b: int, both_right: int = 30, both_wrong: int = 5):
  """Labels and two prediction vectors with the given discordant counts."""
  labels = np.ones(only_a + only_b + both_right + both_wrong, int)
  a_right = np.r_[np.ones(only_a), np.zeros(only_b), np.ones(both_right), np.zeros(both_wrong)].astype(bool)
  b_right = np.r_[np.zeros(only_a), np.ones(only_b), np.ones(both_right), np.zeros(both_wrong)].astype(bool)
  return labels, np.where(a_right, 1, 0), np.where(b_right, 1, 0)


def test_mcnemar_exact_against_scipy_binomtest():
  got = significance.mcnemar(*_mcnemar_case(3, 9))
  assert (got['a_right_b_wrong'], got['a_wrong_b_right']) == (3, 9)
  assert got['p_value'] == pytest.approx(scipy.stats.binomtest(3, 12, 0.5).pvalue, rel=1e-12)
  assert got['method'].startswith('exact')
  assert significance.mcnemar(*_mcnemar_case(0, 0))['p_value'] == 1.0


def test_mcnemar_chi_square_with_continuity_correction():
  got = significance.mcnemar(*_mcnemar_case(10, 25))
  statistic = (abs(10 - 25) - 1) ** 2 / 35  # = 5.6
  assert got['statistic'] == pytest.approx(statistic)
  assert got['p_value'] == pytest.approx(scipy.stats.chi2.sf(statistic, df=1), rel=1e-12)
  assert got['method'].startswith('chi-square')


def test_paired_auc_difference_when_model_a_is_clearly_better():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 2, 400)
  patients = np.arange(400) // 2
  good = np.clip(0.5 * labels + rng.uniform(0, 0.5, 400), 0, 1)
  poor = np.clip(0.1 * labels + rng.uniform(0, 0.9, 400), 0, 1)
  got = significance.paired_bootstrap_auc_difference(labels, good, poor, patients, n=1000, seed=0)
  assert got['difference'] == pytest.approx(sk.roc_auc_score(labels, good) - sk.roc_auc_score(labels, poor))
  assert 0 < got['ci95'][0] < got['difference'] < got['ci95'][1]
  assert got['p_value'] < 0.01
  swapped = significance.paired_bootstrap_auc_difference(labels, poor, good, patients, n=1000, seed=0)
  assert swapped['difference'] == pytest.approx(-got['difference'])
  assert swapped['ci95'] == pytest.approx([-got['ci95'][1], -got['ci95'][0]])
  same = significance.paired_bootstrap_auc_difference(labels, good, good, patients, n=200, seed=0)
  assert same['difference'] == 0 and same['p_value'] == 1.0
