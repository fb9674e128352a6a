"""Compares finished runs: one row per backbone over its seeds, paired tests between backbones, and figures.

    python -m covid_jax.compare RUN... --output DIR [--seed 0] [--grid_size 8]

Each RUN is a finished run directory (config.json, test_metrics.json, predictions/test.csv). Runs group by
backbone: runs whose configs differ only in `seed` form one group, named by `model.name` (where two groups
share a model, by it and the settings that tell them apart). Writes comparison.md, comparison.csv,
comparison_paired.csv, comparison.png and comparison_grid.png to DIR and prints the table.

Every metric is recomputed from predictions/test.csv at the run's own threshold (chosen on its val), on the
calibrated probability where the file has it. A backbone's cells are the mean ± sd over its seeds and a 95%
interval of that mean: a percentile bootstrap over patients, where each resample draws the patients with
replacement once and applies the same draw to every seed's run.
"""

import argparse
import csv
import dataclasses
import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covid_jax import intervals, metrics, runtime, significance, workdir_checks

with runtime.quiet_tensorflow_import():  # The figures' modules import the input pipeline, hence TensorFlow.
  from covid_jax import comparison_grid, reporting

METRICS = ('accuracy', 'f1', 'precision', 'recall', 'specificity', 'roc_auc', 'pr_auc')
# The study's published test accuracy and F1 (one run each, image-level split, threshold 0.5).
STUDY_REPORTED = (('VGG16', 0.9709, 0.97), ('ResNet50', 0.8788, 0.85), ('NASNetLarge', 0.9806, 0.98))
STUDY_SOURCE = "the study's reported numbers: one run, image-level split (patients leak), threshold 0.5"
INTERVAL_METHOD = ('mean ± sd over seeds [95% interval of the mean over seeds: percentile bootstrap over '
                   'patients, {n} resamples, seed {seed}, the same patient draw applied to every seed\'s run]')
_PREDICTION_COLUMNS = ('path', 'patient_id', 'label', 'p_covid')


class CompareError(ValueError):
  """A run directory cannot be compared; the message names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished run's settings and test predictions, aligned per image."""

  directory: Path
  config: dict[str, Any]
  seed: int
  threshold: float
  path: np.ndarray
  patient_id: np.ndarray
  label: np.ndarray
  covid_probability: np.ndarray  # Calibrated where the CSV has it, the probability the threshold applies to.

  @property
  def predicted(self) -> np.ndarray:
    return metrics.predict(self.covid_probability, self.threshold)


def read_run(directory: str | Path) -> Run:
  """The run in `directory`, checked: a missing file, key or column is an error naming it."""
  directory = Path(directory)
  config = _read_json(directory / 'config.json')
  scores = _read_json(directory / 'test_metrics.json')
  for file, data, key in ((directory / 'config.json', config, 'seed'),
                          (directory / 'test_metrics.json', scores, 'threshold')):
    if key not in data:
      raise CompareError(f'{file} has no {key!r}')
  if not isinstance(config.get('model'), dict) or 'name' not in config['model']:
    raise CompareError(f'{directory / "config.json"} has no model.name')
  table = _read_predictions(directory / 'predictions' / 'test.csv')
  calibrated = 'p_covid_calibrated' in table
  if not calibrated and scores['threshold'] != 0.5:
    raise CompareError(f'{directory / "predictions" / "test.csv"} has no p_covid_calibrated, but the run\'s '
                       f'threshold {scores["threshold"]} applies to the calibrated probability')
  return Run(directory, config, int(config['seed']), float(scores['threshold']), table['path'],
             table['patient_id'], table['label'].astype(np.int64),
             table['p_covid_calibrated' if calibrated else 'p_covid'].astype(np.float64))


def group_runs(runs: Sequence[Run], labels: Mapping[Path, str] | None = None) -> dict[str, list[Run]]:
  """Runs whose configs differ only in seed, each group's runs sorted by seed; named by `labels` (run directory ->
  name, e.g. the study's config names) where given, else by backbone name."""
  groups: dict[str, list[Run]] = {}
  for run in runs:
    groups.setdefault(json.dumps({k: v for k, v in run.config.items() if k != 'seed'}, sort_keys=True), []).append(run)
  names = [labels[group[0].directory] if labels else group[0].config['model']['name'] for group in groups.values()]
  named = {}
  for group, name in zip(groups.values(), names):
    if names.count(name) > 1:
      name = f'{name} ({_distinguishing(group[0].config, [g[0].config for g in groups.values()])})'
    seeds = [run.seed for run in group]
    if len(set(seeds)) != len(seeds):
      raise CompareError(f'{name}: two runs with the same settings and seed: '
                         f'{[str(run.directory) for run in group]}')
    named[name] = sorted(group, key=lambda run: run.seed)
  return named


def backbone_row(name: str, runs: Sequence[Run], n: int, seed: int) -> dict[str, Any]:
  """One backbone: per metric the mean and sd over seeds and the bootstrap interval of the mean."""
  row = {'backbone': name, 'source': 'this comparison', 'seeds': len(runs),
         'test_images': ' / '.join(sorted({str(run.label.size) for run in runs}))}
  patients = np.unique(np.concatenate([run.patient_id for run in runs]))
  patient_weights = intervals.patient_weights(patients, n, seed)  # One "image" per patient: the draw counts.
  point, resampled = [], []
  for run in runs:
    point.append(metrics.classification_metrics(run.label, run.covid_probability, run.threshold))
    weights = patient_weights[:, np.searchsorted(patients, run.patient_id)]
    resampled.append(intervals.resampled_metrics(run.label, run.covid_probability, run.threshold, weights))
  for metric in METRICS:
    values = np.array([np.nan if scores[metric] is None else scores[metric] for scores in point])
    interval = intervals.percentile_interval(np.mean([r[metric] for r in resampled], axis=0))
    row[f'{metric}_mean'] = _number(np.mean(values))
    row[f'{metric}_sd'] = _number(np.std(values, ddof=1)) if len(runs) > 1 else None
    row[f'{metric}_ci95_low'], row[f'{metric}_ci95_high'] = interval if interval else (None, None)
  return row


def reference_rows() -> list[dict[str, Any]]:
  """The study's published accuracy and F1 as rows of the table, marked as such."""
  return [{'backbone': f'{name} (study, reported)', 'source': STUDY_SOURCE, 'seeds': 1, 'test_images': '',
           'accuracy_mean': accuracy, 'f1_mean': f1} for name, accuracy, f1 in STUDY_REPORTED]


def paired_rows(groups: dict[str, list[Run]], n: int, seed: int) -> list[dict[str, Any]]:
  """Each pair of backbones, per seed both ran: paired bootstrap of the ROC AUC difference and McNemar."""
  rows = []
  for (name_a, runs_a), (name_b, runs_b) in itertools.combinations(groups.items(), 2):
    by_seed_b = {run.seed: run for run in runs_b}
    for a in runs_a:
      if a.seed not in by_seed_b:
        continue
      b = _aligned(a, by_seed_b[a.seed])
      auc = significance.paired_bootstrap_auc_difference(a.label, a.covid_probability, b.covid_probability,
                                                         a.patient_id, n, seed)
      test = significance.mcnemar(a.label, a.predicted, b.predicted)
      rows.append({'a': name_a, 'b': name_b, 'seed': a.seed, 'test_images': int(a.label.size),
                   'roc_auc_a': metrics.roc_auc(a.label, a.covid_probability),
                   'roc_auc_b': metrics.roc_auc(b.label, b.covid_probability),
                   'roc_auc_difference': auc['difference'], 'difference_ci95_low': auc['ci95'][0],
                   'difference_ci95_high': auc['ci95'][1], 'difference_p_value': auc['p_value'],
                   'difference_method': auc['method'],
                   'mcnemar_a_right_b_wrong': test['a_right_b_wrong'],
                   'mcnemar_a_wrong_b_right': test['a_wrong_b_right'], 'mcnemar_statistic': test['statistic'],
                   'mcnemar_p_value': test['p_value'], 'mcnemar_method': test['method']})
  return rows


def compare_runs(run_dirs: Sequence[str | Path], output_dir: str | Path, seed: int = 0,
                 bootstrap_samples: int = 1000, grid_size: int = 8,
                 labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Writes the comparison of `run_dirs` to `output_dir`, prints its table, and returns its rows.

  `seed` draws the bootstrap resamples and the grid's test images; `labels` (one per run directory) names the
  groups. The rows are comparison.csv's: one per backbone, then the study's reported figures.
  """
  if not run_dirs:
    raise CompareError('no run directories to compare')
  runs = [read_run(directory) for directory in run_dirs]
  groups = group_runs(runs, dict(zip((run.directory for run in runs), labels)) if labels else None)
  rows = [backbone_row(name, runs, bootstrap_samples, seed) for name, runs in groups.items()] + reference_rows()
  paired = paired_rows(groups, bootstrap_samples, seed)
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  _write_csv(output_dir / 'comparison.csv', rows)
  _write_csv(output_dir / 'comparison_paired.csv', paired)
  table = markdown_table(rows, bootstrap_samples, seed)
  (output_dir / 'comparison.md').write_text(_markdown(groups, table, paired))
  reporting.plot_comparison(rows, METRICS, output_dir / 'comparison.png')
  note = comparison_grid.write_comparison_grid({name: runs[0] for name, runs in groups.items()},
                                                output_dir / 'comparison_grid.png', seed, grid_size)
  print(table)
  if note:
    print(note)
  return rows


def markdown_table(rows: Sequence[dict[str, Any]], n: int, seed: int) -> str:
  """The rows as a Markdown table: each cell mean ± sd [interval low, high]."""
  lines = ['| backbone | seeds | ' + ' | '.join(METRICS) + ' |', '|' + '---|' * (len(METRICS) + 2)]
  for row in rows:
    lines.append(f'| {row["backbone"]} | {row["seeds"]} | ' + ' | '.join(_cell(row, m) for m in METRICS) + ' |')
  lines += ['', f'Cells: {INTERVAL_METHOD.format(n=n, seed=seed)}.', f'Rows "(study, reported)": {STUDY_SOURCE}.']
  return '\n'.join(lines)


def _cell(row: dict[str, Any], name: str) -> str:
  mean = row.get(f'{name}_mean')
  if mean is None:
    return '—'
  text = f'{mean:.4f}'
  if row.get(f'{name}_sd') is not None:
    text += f' ± {row[f"{name}_sd"]:.4f}'
  if row.get(f'{name}_ci95_low') is not None:
    text += f' [{row[f"{name}_ci95_low"]:.4f}, {row[f"{name}_ci95_high"]:.4f}]'
  return text


def _markdown(groups: dict[str, list[Run]], table: str, paired: Sequence[dict[str, Any]]) -> str:
  lines = ['# Backbone comparison', '', table, '', '## Runs', '']
  lines += [f'- {name}: ' + ', '.join(f'{run.directory} (seed {run.seed}, threshold {run.threshold:.4g})'
                                      for run in runs) for name, runs in groups.items()]
  lines += ['', '## Paired comparisons (same seed, same test images)', '']
  if not paired:
    lines.append('No two backbones share a seed: nothing to pair.')
  else:
    lines += ['| A | B | seed | images | ROC AUC A − B [95% CI] | p | McNemar: only A right / only B right | p |',
              '|---|---|---|---|---|---|---|---|']
    lines += [f'| {r["a"]} | {r["b"]} | {r["seed"]} | {r["test_images"]} | {r["roc_auc_difference"]:+.4f} '
              f'[{r["difference_ci95_low"]:+.4f}, {r["difference_ci95_high"]:+.4f}] | {r["difference_p_value"]:.4g} | '
              f'{r["mcnemar_a_right_b_wrong"]} / {r["mcnemar_a_wrong_b_right"]} | {r["mcnemar_p_value"]:.4g} |'
              for r in paired]
    lines += ['', f'ROC AUC difference: {paired[0]["difference_method"]}.', '',
              f'McNemar: exact binomial below {significance.EXACT_BELOW} discordant images, chi-square with '
              'continuity correction otherwise (each row\'s method in comparison_paired.csv).']
  return '\n'.join(lines) + '\n'


def _aligned(a: Run, b: Run) -> Run:
  """`b` reordered to `a`'s images; the test sets must hold the same paths with the same labels."""
  if set(a.path) != set(b.path):
    only = sorted(map(str, set(a.path) ^ set(b.path)))
    raise CompareError(f'{a.directory} and {b.directory} (seed {a.seed}) have different test sets: '
                       f'{len(only)} paths in one only, e.g. {only[0]!r}; paired tests need the same test images')
  order = np.argsort(b.path)[np.searchsorted(np.sort(b.path), a.path)]
  if not np.array_equal(b.label[order], a.label):
    raise CompareError(f'{a.directory} and {b.directory}: the same test images carry different labels')
  return dataclasses.replace(b, path=b.path[order], patient_id=b.patient_id[order], label=b.label[order],
                             covid_probability=b.covid_probability[order])


def _distinguishing(config: dict[str, Any], others: Sequence[dict[str, Any]]) -> str:
  """'key=value, ...' for the (flattened) settings of `config` that not all of `others` share, at most three."""
  flat, flat_others = workdir_checks.flatten(config), [workdir_checks.flatten(other) for other in others]
  keys = [k for k in sorted(flat) if k != 'seed' and any(other.get(k) != flat[k] for other in flat_others)]
  return ', '.join(f'{k}={flat[k]}' for k in keys[:3]) + (', …' if len(keys) > 3 else '')


def _read_json(path: Path) -> dict[str, Any]:
  if not path.is_file():
    raise CompareError(f'{path} is missing: compare reads finished runs only')
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CompareError(f'{path} is not valid JSON: {e}') from None


def _read_predictions(path: Path) -> dict[str, np.ndarray]:
  """predictions/test.csv as columns (path, patient_id as str; the rest as float)."""
  if not path.is_file():
    raise CompareError(f'{path} is missing: compare reads finished runs only')
  with path.open(newline='') as file:
    rows = list(csv.DictReader(file))
  columns = rows[0].keys() if rows else []
  missing = [c for c in _PREDICTION_COLUMNS if c not in columns]
  if missing:
    raise CompareError(f'{path} lacks column(s) {", ".join(missing)}' + ('' if rows else ' (no rows)'))
  table = {'path': np.array([r['path'] for r in rows]), 'patient_id': np.array([r['patient_id'] for r in rows])}
  for column in ('label', 'p_covid', 'p_covid_calibrated'):
    if column in columns:
      try:
        table[column] = np.array([float(r[column]) for r in rows])
      except ValueError as e:
        raise CompareError(f'{path}: column {column}: {e}') from None
  if len(np.unique(table['path'])) != len(rows):
    raise CompareError(f'{path} lists an image more than once')
  if not np.isin(table['label'], (0, 1)).all():
    raise CompareError(f'{path}: labels must be 0 or 1')
  return table


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
  columns = list(dict.fromkeys(key for row in rows for key in row))
  with path.open('w', newline='') as file:
    writer = csv.DictWriter(file, columns)
    writer.writeheader()
    writer.writerows(rows)


def _number(value: float) -> float | None:
  return None if np.isnan(value) else float(value)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m covid_jax.compare', description=__doc__.split('\n\n')[0])
  parser.add_argument('runs', nargs='+', help='Finished run directories.')
  parser.add_argument('--output', required=True, help='Directory for comparison.{md,csv,png} and the grid.')
  parser.add_argument('--seed', type=int, default=0, help='Seed of the bootstrap and of the grid\'s test images.')
  parser.add_argument('--grid_size', type=int, default=8, help='Test images in comparison_grid.png.')
  parser.add_argument('--bootstrap_samples', type=int, default=1000, help='Bootstrap resamples.')
  args = parser.parse_args(argv)
  try:
    compare_runs(args.runs, args.output, args.seed, args.bootstrap_samples, args.grid_size)
  except CompareError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  main(sys.argv[1:])
