"""covid_jax.metrics against hand-counted confusion matrices, scikit-learn and SciPy."""

import json

import numpy as np
import pytest
import scipy.special
from sklearn import metrics as sk

from covid_jax import metrics

# Ten examples counted by hand. At threshold 0.5 the predictions are
# [0, 0, 1, 0, 1, 1, 1, 0, 1, 0]: TN = 3 (#0, #1, #3), FP = 1 (#2),
# TP = 4 (#4, #5, #6, #8), FN = 2 (#7, #9).
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
COVID_PROBABILITY = np.array([0.1, 0.2, 0.7, 0.4, 0.9, 0.8, 0.6, 0.3, 0.55, 0.45])
EXPECTED = {
    'accuracy': 7 / 10,
    'precision': 4 / 5,  # TP / (TP + FP)
    'recall': 4 / 6,  # TP / (TP + FN)
    'specificity': 3 / 4,  # TN / (TN + FP)
    'f1': 8 / 11,  # 2TP / (2TP + FP + FN)
    'balanced_accuracy': (4 / 6 + 3 / 4) / 2,
    # Positive-negative pairs ranked right: 0.9 and 0.8 beat all 4 negatives,
    # 0.6, 0.55 and 0.45 beat 3, 0.3 beats 2: 19 of 24.
    'roc_auc': 19 / 24,
    # Average precision: precision at each COVID example from the top (0.9, 0.8, 0.6, 0.55, 0.45, 0.3),
    # each adding 1/6 of recall.
    'pr_auc': (1 / 1 + 2 / 2 + 3 / 4 + 4 / 5 + 5 / 6 + 6 / 8) / 6,
}
EXPECTED_PER_CLASS = {
    # non-COVID as the positive class: TP' = TN = 3, FP' = FN = 2, FN' = FP = 1.
    'non_covid': {'precision': 3 / 5, 'recall': 3 / 4, 'f1': 6 / 9, 'support': 4},
    'covid': {'precision': 4 / 5, 'recall': 4 / 6, 'f1': 8 / 11, 'support': 6},
}


def _logits_of(covid_probability: np.ndarray) -> np.ndarray:
  """Logits whose softmax gives `covid_probability` for class 1."""
  return np.stack([np.zeros_like(covid_probability), scipy.special.logit(covid_probability)], axis=1)


def test_hand_counted_case():
  got = metrics.classification_metrics(LABELS, COVID_PROBABILITY)
  for key, want in EXPECTED.items():
    assert got[key] == pytest.approx(want, abs=1e-12), key
  assert got['confusion_matrix'] == [[3, 1], [2, 4]]
  for name, want in EXPECTED_PER_CLASS.items():
    assert got['per_class'][name] == pytest.approx(want), name
  assert got['num_examples'] == 10 and got['threshold'] == 0.5


def test_matches_sklearn():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  covid_probability = np.clip(0.3 * labels + rng.uniform(0, 0.7, 200), 0, 1)
  predicted = (covid_probability > 0.5).astype(int)
  got = metrics.classification_metrics(labels, covid_probability)
  assert got['accuracy'] == pytest.approx(sk.accuracy_score(labels, predicted))
  assert got['precision'] == pytest.approx(sk.precision_score(labels, predicted))
  assert got['recall'] == pytest.approx(sk.recall_score(labels, predicted))
  assert got['specificity'] == pytest.approx(sk.recall_score(labels, predicted, pos_label=0))
  assert got['f1'] == pytest.approx(sk.f1_score(labels, predicted))
  assert got['balanced_accuracy'] == pytest.approx(sk.balanced_accuracy_score(labels, predicted))
  assert got['roc_auc'] == pytest.approx(sk.roc_auc_score(labels, covid_probability))
  assert got['confusion_matrix'] == sk.confusion_matrix(labels, predicted).tolist()


@pytest.mark.parametrize('decimals', (None, 1))  # Distinct scores, and scores with many ties.
def test_roc_auc_and_pr_auc_match_sklearn(decimals):
  rng = np.random.default_rng(5)
  for size in (2, 7, 60, 500):
    labels = rng.integers(0, 2, size)
    labels[:2] = (0, 1)
    covid_probability = rng.uniform(0, 1, size)
    if decimals is not None:
      covid_probability = covid_probability.round(decimals)
    assert metrics.roc_auc(labels, covid_probability) == pytest.approx(
        sk.roc_auc_score(labels, covid_probability), rel=1e-12, abs=1e-15)
    assert metrics.pr_auc(labels, covid_probability) == pytest.approx(
        sk.average_precision_score(labels, covid_probability), rel=1e-12)


def test_class_names_are_not_swapped():
  # The classes differ clearly (covid precision 0.8, non_covid 0.6): a swapped
  # report would put 0.6 under 'covid'.
  got = metrics.classification_metrics(LABELS, COVID_PROBABILITY)
  report = sk.classification_report(LABELS, (COVID_PROBABILITY > 0.5).astype(int), labels=[0, 1],
                                    target_names=['non_covid', 'covid'], output_dict=True, zero_division=0)
  for name in metrics.CLASS_NAMES:
    for key, report_key in (('precision', 'precision'), ('recall', 'recall'), ('f1', 'f1-score'),
                            ('support', 'support')):
      assert got['per_class'][name][key] == pytest.approx(report[name][report_key]), (name, key)
  assert got['per_class']['covid']['precision'] == got['precision'] == pytest.approx(0.8)
  assert got['per_class']['covid']['recall'] == got['recall']
  assert got['per_class']['non_covid']['recall'] == got['specificity']
  # Confusion row 1 is the true COVID row: its total is the COVID count.
  assert sum(got['confusion_matrix'][1]) == int(LABELS.sum()) == got['per_class']['covid']['support']


def test_threshold():
  # Above 0.65: #2 (0.7, non-COVID), #4 (0.9), #5 (0.8): TP 2, FP 1, FN 4, TN 3.
  got = metrics.classification_metrics(LABELS, COVID_PROBABILITY, threshold=0.65)
  assert got['confusion_matrix'] == [[3, 1], [4, 2]]
  assert got['accuracy'] == pytest.approx(5 / 10)
  assert got['precision'] == pytest.approx(2 / 3)
  assert got['recall'] == pytest.approx(2 / 6)
  assert got['threshold'] == 0.65
  assert got['roc_auc'] == pytest.approx(19 / 24)  # the threshold does not move the AUC


def test_probability_at_threshold_is_non_covid_like_argmax():
  logits = np.array([[1.0, 1.0], [0.0, 1e-6], [2.0, -3.0]])
  got = metrics.from_logits(np.array([0, 1, 0]), logits)
  assert got['confusion_matrix'] == [[2, 0], [0, 1]]
  np.testing.assert_array_equal(metrics.predict(metrics.probabilities(logits)[:, 1]), logits.argmax(axis=1))


def test_zero_division_is_zero():
  # Nothing predicted COVID: precision 0/0 -> 0, and so f1.
  got = metrics.classification_metrics(LABELS, np.full(10, 0.2))
  assert got['precision'] == 0.0 and got['f1'] == 0.0 and got['recall'] == 0.0
  assert got['specificity'] == 1.0 and got['accuracy'] == pytest.approx(0.4)


@pytest.mark.parametrize('label', [0, 1])
def test_single_class(label):
  labels = np.full(5, label)
  got = metrics.classification_metrics(labels, np.array([0.1, 0.9, 0.8, 0.3, 0.7]))
  assert got['roc_auc'] is None
  assert got['pr_auc'] == (None if label == 0 else 1.0)  # Without COVID examples, precision is undefined.
  assert got['accuracy'] == pytest.approx(2 / 5 if label == 0 else 3 / 5)
  assert json.loads(json.dumps(got, allow_nan=False)) == got
  assert sum(map(sum, got['confusion_matrix'])) == 5


def test_result_is_plain_json():
  got = metrics.from_logits(LABELS.astype(np.int32), _logits_of(COVID_PROBABILITY).astype(np.float32))
  assert json.loads(json.dumps(got, allow_nan=False)) == got


def test_from_logits_equals_probabilities():
  got = metrics.from_logits(LABELS, _logits_of(COVID_PROBABILITY))
  want = metrics.classification_metrics(LABELS, COVID_PROBABILITY)
  assert got.pop('roc_auc') == pytest.approx(want.pop('roc_auc'))
  assert got == want


def test_softmax_matches_scipy():
  rng = np.random.default_rng(0)
  logits = np.concatenate([rng.normal(0, 5, (50, 2)), [[1000.0, -1000.0], [-800.0, 800.0], [700.0, 700.0]]])
  got = metrics.probabilities(logits.astype(np.float32))
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, scipy.special.softmax(logits, axis=1), rtol=1e-6, atol=0)
  assert np.isfinite(got).all()


@pytest.mark.parametrize('labels, probability', [
    (np.array([0, 1, 2]), np.array([0.1, 0.2, 0.3])),
    (np.array([0, 1]), np.array([0.1, 0.2, 0.3])),
    (np.array([0, 1]), np.array([0.1, np.nan])),
    (np.array([0, 1]), np.array([0.1, 1.5])),
    (np.array([], int), np.array([])),
])
def test_rejects_bad_input(labels, probability):
  with pytest.raises(ValueError):
    metrics.classification_metrics(labels, probability)


def test_probabilities_rejects_other_shapes():
  with pytest.raises(ValueError, match=r'\(N, 2\)'):
    metrics.probabilities(np.zeros((4, 3)))
