"""External validation: a finished run's model on another built collection, under the run's own decision.

  python -m covid_jax.evaluate --workdir RUN --data_dir OTHER_BUILD [--split test|all] [--name NAME]

The run's best checkpoint scores the collection (built by `data_prep.build`, labels known) with the threshold
and temperature the run chose on its own val split: nothing is refitted on the new images. Written to
RUN/external/NAME/: test_metrics.json (`scoring.score`: patient-level intervals), confusion_matrix.png,
roc_curve.png, calibration.png, predictions.csv and report.md, which sets the run's internal test figures
beside the external ones. Models of COVID radiographs are known to lose much of their accuracy on a second
hospital's images; this is that number.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging

from covid_jax import input_pipeline, metrics, predictions, reporting, restored, scoring, steps

SPLITS = {'test': ('test',), 'all': ('train', 'val', 'test')}
# Rows of the side-by-side table: test_metrics.json key and its label.
_ROWS = (('accuracy', 'accuracy'), ('recall', 'sensitivity (recall)'), ('specificity', 'specificity'),
         ('precision', 'precision'), ('f1', 'F1'), ('roc_auc', 'ROC AUC'), ('pr_auc', 'PR AUC'))


def score_collection(run: restored.TrainedRun, data_dir: str | os.PathLike,
                     splits: Sequence[str]) -> predictions.SplitPredictions:
  """The run's logits on `splits` of the built collection at `data_dir`, with paths and patients, in file order."""
  mesh = input_pipeline.data_mesh()
  state, eval_fn = run.eval_state(mesh), run.eval_fn(mesh)
  tables = []
  for split in splits:
    reader = input_pipeline.SplitReader(data_dir, split, run.config.model.image_size, mesh, cache=False)
    outputs = steps.split_outputs(eval_fn, state, reader, run.config.eval_batch_size)
    tables.append(predictions.from_outputs(outputs, data_dir, split))
  return predictions.SplitPredictions(*(np.concatenate([getattr(t, field) for t in tables])
                                        for field in ('path', 'patient_id', 'label', 'logits')))


def evaluate(workdir: str | os.PathLike, data_dir: str | os.PathLike, split: str = 'test', name: str | None = None,
             checkpoint: str = 'best') -> tuple[dict[str, Any], Path]:
  """Scores and writes the external validation; returns (its metrics, the folder written)."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {", ".join(SPLITS)}, got {split!r}')
  run = restored.load(workdir, checkpoint)
  table = score_collection(run, data_dir, SPLITS[split])
  result = scoring.score(table.label, table.logits, table.patient_id, run.decision, seed=run.config.seed)
  if run.decision is restored.UNDECIDED:
    result['decision']['chosen_on'] = 'nothing (the run recorded no decision: threshold 0.5, no calibration)'
  result.update({'data_dir': str(data_dir), 'split': split, 'num_examples': len(table.label),
                 'num_patients': int(np.unique(table.patient_id).size), 'checkpoint': checkpoint,
                 'decision_source': run.decision_source, 'model': run.config.model.name})
  out = Path(workdir) / 'external' / (name or Path(os.path.abspath(data_dir)).name)
  reporting.write_json(out / 'test_metrics.json', result)
  predictions.write_csv(out / 'predictions.csv', table, run.decision)
  raw = metrics.probabilities(table.logits)[:, 1]
  reporting.plot_confusion_matrix(result['confusion_matrix'], out / 'confusion_matrix.png')
  reporting.plot_roc_curve(table.label, raw, out / 'roc_curve.png')
  reporting.plot_reliability_diagram(table.label, raw, run.covid_probability(table.logits), out / 'calibration.png')
  internal_path = Path(workdir) / 'test_metrics.json'
  internal = json.loads(internal_path.read_text()) if internal_path.is_file() else {}
  (out / 'report.md').write_text(report(internal, result, str(workdir), str(data_dir), split))
  return result, out


def _cell(scores: dict[str, Any], key: str) -> str:
  """'0.931 (0.908-0.947)': the value with its 95% interval where there is one, '-' where there is no value."""
  value = scores.get(key)
  if value is None:
    return '-'
  interval = (scores.get('ci95') or {}).get(key)
  return f'{value:.3f}' + (f' ({interval[0]:.3f}-{interval[1]:.3f})' if interval else '')


def report(internal: dict[str, Any], external: dict[str, Any], workdir: str, data_dir: str, split: str) -> str:
  """report.md: the run's internal test figures beside the external ones, both at the run's threshold."""
  decision = external['decision']
  lines = [
      f'# External validation of {workdir}', '',
      f'Collection: `{data_dir}` (split: {split}), {external["num_examples"]} images of {external["num_patients"]} '
      f'patients; {external["checkpoint"]} checkpoint; model {external["model"]}.',
      f'The run\'s decision, applied unchanged: COVID where the calibrated probability > {decision["threshold"]:.4g} '
      f'(rule {decision["rule"]}), temperature {decision["temperature"]:.4g}; from {external["decision_source"]}.',
      '',
      '| metric | internal test | external |', '|---|---|---|',
      *(f'| {label} | {_cell(internal, key)} | {_cell(external, key)} |' for key, label in _ROWS),
      f'| images | {internal.get("num_examples", "-")} | {external["num_examples"]} |', '',
      f'External intervals: {external["interval_method"]}.',
      f'Internal intervals: {internal.get("interval_method", "as the run records them in test_metrics.json")}.', '',
      f'Majority-class baseline on the external images: accuracy {external["majority_baseline"]["accuracy"]:.3f} '
      f'({external["majority_baseline"]["class"]}).', '',
      '![confusion matrix](confusion_matrix.png) ![ROC curve](roc_curve.png) ![calibration](calibration.png)', '',
  ]
  return '\n'.join(lines)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script, so importing this module never clashes with other flags."""
  flags.DEFINE_string('workdir', None, 'Run directory of a finished run.', required=True)
  flags.DEFINE_string('data_dir', None, 'Another collection, built with data_prep.build.', required=True)
  flags.DEFINE_enum('split', 'test', list(SPLITS), 'Which of its splits to score: test, or all of them.')
  flags.DEFINE_string('name', None, 'Name of the output folder under WORKDIR/external (default: the data_dir\'s '
                      'folder name).')
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint of the run to use.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # The checkpoint library's progress lines are not for this command.
  restored.keep_tensorflow_off_accelerators()
  try:
    result, out = evaluate(FLAGS.workdir, FLAGS.data_dir, FLAGS.split, FLAGS.name, FLAGS.checkpoint)
  except (restored.RunError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  print(reporting.print_metrics_table(result, title=f'external validation on {FLAGS.data_dir} ({FLAGS.split})'))
  print(f'Written to {out} (report.md, test_metrics.json, predictions.csv, confusion_matrix.png, roc_curve.png, '
        'calibration.png)')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
