"""Thresholds chosen on val, calibration and the scored test metrics, against hand counts, scikit-learn and SciPy."""

import json

import numpy as np
import pytest
import scipy.special
from sklearn import metrics as sk

from covid_jax import calibration, metrics, reporting, scoring, thresholds

# A hand-made val set, by descending score: 0.9 (1), 0.7 (1), 0.55 (1), 0.4 (0), 0.35 (1), 0.3 (0), 0.2 (0),
# 0.1 (0). Four of each class. Operating points (COVID for the k highest): k=3 has TPR 3/4, FPR 0; k=5 has
# TPR 1, FPR 1/4: both Youden J = 3/4, a tie that goes to the higher threshold, between 0.4 and 0.55.
VAL_LABELS = np.array([0, 0, 0, 1, 0, 1, 1, 1])
VAL_PROBABILITY = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.55, 0.7, 0.9])


def _logits_of(covid_probability: np.ndarray) -> np.ndarray:
  return np.stack([np.zeros_like(covid_probability), scipy.special.logit(covid_probability)], axis=1)


@pytest.mark.parametrize('rule, target, want', [
    ('fixed', None, 0.5),
    ('youden', None, (0.4 + 0.55) / 2),  # k=3, not the tied k=5 at (0.3 + 0.35) / 2.
    ('target_sensitivity', 1.0, (0.3 + 0.35) / 2),  # k=5: all four COVID.
    ('target_sensitivity', 0.8, (0.3 + 0.35) / 2),  # 3/4 falls short of 0.8.
    ('target_sensitivity', 0.75, (0.4 + 0.55) / 2),  # k=3 reaches 3/4 exactly.
    ('target_sensitivity', 0.5, (0.55 + 0.7) / 2),  # k=2.
])
def test_threshold_rules_on_hand_made_val(rule, target, want):
  got = thresholds.choose_threshold(VAL_LABELS, VAL_PROBABILITY, rule, target)
  assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize('decimals', (None, 1))  # Distinct scores, and many ties.
def test_youden_and_target_reproduce_the_val_operating_point_of_sklearn_roc(decimals):
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, 300)
  probability = np.clip(0.35 * labels + rng.uniform(0, 0.65, 300), 0, 1)
  if decimals is not None:
    probability = probability.round(decimals)
  fpr, tpr, sk_thresholds = sk.roc_curve(labels, probability, drop_intermediate=False)
  # scikit-learn predicts positive where p >= its threshold; its thresholds run from high to low, so
  # argmax takes the highest threshold among ties, as the rule asks.
  best = np.argmax(tpr - fpr)
  youden = thresholds.choose_threshold(labels, probability, 'youden')
  np.testing.assert_array_equal(probability > youden, probability >= sk_thresholds[best])
  first_reaching = np.argmax(tpr >= 0.9)
  target = thresholds.choose_threshold(labels, probability, 'target_sensitivity', 0.9)
  np.testing.assert_array_equal(probability > target, probability >= sk_thresholds[first_reaching])


def test_threshold_below_a_zero_score_predicts_it_covid():
  got = thresholds.choose_threshold(np.array([1, 0, 1]), np.array([0.0, 0.0, 0.8]), 'target_sensitivity', 1.0)
  assert (np.array([0.0, 0.8]) > got).all()


@pytest.mark.parametrize('rule, target, labels, match', [
    ('median', None, VAL_LABELS, 'fixed, youden, target_sensitivity'),
    ('target_sensitivity', None, VAL_LABELS, r'threshold.target in \(0, 1\]'),
    ('target_sensitivity', 1.5, VAL_LABELS, r'threshold.target in \(0, 1\]'),
    ('youden', None, np.ones(8, int), 'both classes'),
    ('target_sensitivity', 0.9, np.zeros(8, int), 'COVID examples'),
])
def test_threshold_rules_refuse_bad_input(rule, target, labels, match):
  with pytest.raises(ValueError, match=match):
    thresholds.choose_threshold(labels, VAL_PROBABILITY, rule, target)


@pytest.mark.parametrize('rule, target', [('fixed', None), ('youden', None), ('target_sensitivity', 0.9)])
def test_test_labels_cannot_move_the_decision(rule, target):
  rng = np.random.default_rng(0)
  val_labels, test_labels = rng.integers(0, 2, 200), rng.integers(0, 2, 150)
  val_logits = np.stack([np.zeros(200), 2.0 * (val_labels - 0.5) + rng.normal(0, 1.5, 200)], axis=1)
  test_logits = np.stack([np.zeros(150), 2.0 * (test_labels - 0.5) + rng.normal(0, 1.5, 150)], axis=1)
  patients = np.arange(150) // 2
  decision = scoring.decide_on_val(val_labels, val_logits, rule, target)
  # The same test predictions scored against the true labels, flipped labels and all-COVID labels.
  for labels in (test_labels, 1 - test_labels, np.ones(150, int)):
    got = scoring.score(labels, test_logits, patients, decision, seed=0, bootstrap_samples=20)
    assert got['threshold'] == decision.threshold
    assert got['decision'] == {**decision.to_json(), 'chosen_on': 'val'}
    assert got['calibration']['temperature'] == decision.temperature
  # What the decision is: the rule's threshold on the val probabilities calibrated with the val temperature.
  temperature = calibration.fit_temperature(val_labels, val_logits)
  assert decision.temperature == temperature
  calibrated = scipy.special.softmax(val_logits / temperature, axis=1)[:, 1]
  assert decision.threshold == thresholds.choose_threshold(val_labels, calibrated, rule, target)


def test_ece_hand_computed():
  # 15 bins of width 1/15: 0.05 -> bin 0 (gap |0.05 - 0| = 0.05), 0.1 -> bin 1 (|0.1 - 1| = 0.9),
  # 0.5 and 0.52 -> bin 7 (|0.51 - 0.5| = 0.01, 2 images), 0.95 and 1.0 -> bin 14 (|0.975 - 1| = 0.025, 2).
  labels = np.array([0, 1, 1, 0, 1, 1])
  probability = np.array([0.05, 0.1, 0.5, 0.52, 0.95, 1.0])
  want = (0.05 + 0.9 + 2 * 0.01 + 2 * 0.025) / 6
  assert calibration.expected_calibration_error(labels, probability) == pytest.approx(want, abs=1e-12)
  bins = calibration.reliability_bins(labels, probability)
  assert bins['count'].tolist() == [1, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 2]


def test_brier_matches_sklearn():
  rng = np.random.default_rng(1)
  labels, probability = rng.integers(0, 2, 500), rng.uniform(0, 1, 500)
  assert calibration.brier_score(labels, probability) == pytest.approx(sk.brier_score_loss(labels, probability))


@pytest.mark.parametrize('true_temperature', (0.5, 2.5))
def test_temperature_scaling_recovers_a_known_temperature(true_temperature):
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 3, (20000, 2))
  labels = (rng.uniform(size=20000) < scipy.special.softmax(logits / true_temperature, axis=1)[:, 1]).astype(int)
  assert calibration.fit_temperature(labels, logits) == pytest.approx(true_temperature, rel=0.05)


def test_temperature_scaling_lowers_test_ece_of_an_overconfident_model():
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 2, (4000, 2))
  labels = (rng.uniform(size=4000) < scipy.special.softmax(logits, axis=1)[:, 1]).astype(int)
  overconfident = 3 * logits
  decision = scoring.decide_on_val(labels[:2000], overconfident[:2000], 'fixed', None)
  got = scoring.score(labels[2000:], overconfident[2000:], np.arange(2000), decision, seed=0, bootstrap_samples=10)
  assert decision.temperature == pytest.approx(3, rel=0.1)
  assert got['calibration']['ece_after'] < got['calibration']['ece_before'] / 3
  assert got['calibration']['brier_after'] < got['calibration']['brier_before']


def test_score_keys_and_values_against_sklearn():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 2, 120)
  logits = np.stack([np.zeros(120), 1.5 * (labels - 0.5) + rng.normal(0, 1, 120)], axis=1)
  decision = scoring.Decision(threshold=0.4, temperature=2.0, rule='youden', target=None)
  got = scoring.score(labels, logits, np.arange(120) // 3, decision, seed=1, bootstrap_samples=200)
  calibrated = scipy.special.softmax(logits / 2.0, axis=1)[:, 1]
  predicted = (calibrated > 0.4).astype(int)
  assert got['threshold'] == 0.4
  assert got['accuracy'] == pytest.approx(sk.accuracy_score(labels, predicted))
  assert got['f1'] == pytest.approx(sk.f1_score(labels, predicted))
  assert got['pr_auc'] == pytest.approx(sk.average_precision_score(labels, calibrated))
  at_half = (calibrated > 0.5).astype(int)
  assert got['at_threshold_0.5']['threshold'] == 0.5
  assert got['at_threshold_0.5']['recall'] == pytest.approx(sk.recall_score(labels, at_half))
  for key in ('accuracy', 'recall', 'specificity', 'f1', 'roc_auc', 'pr_auc'):
    for result in (got, got['at_threshold_0.5']):
      low, high = result['ci95'][key]
      assert low <= result[key] <= high, key
  majority = int(labels.sum() * 2 > 120)
  assert got['majority_baseline']['label'] == majority
  assert got['majority_baseline']['accuracy'] == pytest.approx(np.mean(labels == majority))
  assert got['calibration']['brier_before'] == pytest.approx(
      sk.brier_score_loss(labels, scipy.special.softmax(logits, axis=1)[:, 1]))
  assert '200 resamples' in got['interval_method'] and '40 patients' in got['interval_method']
  assert json.loads(json.dumps(got, allow_nan=False)) == got


def test_decision_json_round_trip_and_bad_json():
  decision = scoring.Decision(threshold=0.3, temperature=1.7, rule='target_sensitivity', target=0.95)
  assert scoring.Decision.from_json({**decision.to_json(), 'chosen_on': 'val'}) == decision
  with pytest.raises(ValueError, match='temperature'):
    scoring.Decision.from_json({'threshold': 0.3, 'rule': 'fixed', 'target': None})


def test_calibrated_probability_keeps_decisions_at_one_half():
  logits = np.random.default_rng(6).normal(0, 4, (300, 2))
  for temperature in (0.3, 1.0, 4.0):
    calibrated = scoring.calibrated_probability(logits, temperature)
    np.testing.assert_array_equal(metrics.predict(calibrated), logits.argmax(axis=1))


def test_console_table_shows_intervals_rule_baseline_and_calibration():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 2, 80)
  logits = np.stack([np.zeros(80), 2.0 * (labels - 0.5) + rng.normal(0, 1, 80)], axis=1)
  decision = scoring.Decision(threshold=0.3125, temperature=1.5, rule='target_sensitivity', target=0.95)
  got = scoring.score(labels, logits, np.arange(80), decision, seed=0, bootstrap_samples=50)
  text = reporting.print_metrics_table(got, 'test')
  assert 'threshold 0.3125 by target_sensitivity 0.95, chosen on val' in text.splitlines()[0]
  for key, label in (('recall', 'recall (sensitivity)'), ('pr_auc', 'pr auc')):
    low, high = got['ci95'][key]
    lines = [line for line in text.splitlines() if line.strip().startswith(label)]
    assert len(lines) == 1 and f'95% CI [{low:.4f}, {high:.4f}]' in lines[0], key
  assert f'majority baseline     {got["majority_baseline"]["accuracy"]:.4f}' in text
  assert 'temperature 1.500, fitted on val' in text and 'bootstrap over patients' in text


def test_reliability_diagram_draws_the_ece_bins(tmp_path):
  rng = np.random.default_rng(8)
  labels, before = rng.integers(0, 2, 300), rng.uniform(0, 1, 300)
  after = before ** 2
  fig = reporting.plot_reliability_diagram(labels, before, after, tmp_path / 'calibration.png')
  curve_ax, count_ax = fig.axes
  curves = {line.get_label(): line for line in curve_ax.get_lines()}
  for name, probability in (('before', before), ('after', after)):
    (label,) = [key for key in curves if key.startswith(name)]
    # Independent binning: np.histogram's 15 equal-width bins over [0, 1] (last bin closed).
    counts, _ = np.histogram(probability, bins=15, range=(0, 1))
    sums, _ = np.histogram(probability, bins=15, range=(0, 1), weights=probability)
    covid, _ = np.histogram(probability, bins=15, range=(0, 1), weights=labels)
    filled = counts > 0
    np.testing.assert_allclose(curves[label].get_xdata(), sums[filled] / counts[filled])
    np.testing.assert_allclose(curves[label].get_ydata(), covid[filled] / counts[filled])
    assert f'ECE {calibration.expected_calibration_error(labels, probability):.4f}' in label
  heights = [[bar.get_height() for bar in container] for container in count_ax.containers]
  assert [sum(h) for h in heights] == [300, 300]
  assert (tmp_path / 'calibration.png').stat().st_size > 0
