"""The study in one command: every (config, seed) pair trained in turn, then the comparison of the backbones.

    python -m covid_jax.study --workdir runs/study \\
        --configs configs/vgg16.py,configs/resnet50.py,configs/nasnet.py --seeds 0,1,2 [--config.key=value ...]

Each run is `python -m covid_jax.main` in a process of its own, in WORKDIR/<config name>/seed_<seed>, with
`--config.seed=<seed>` and the overrides (applied to every run). Every config is parsed first, so a mistyped
key fails before anything trains. A finished run with the same settings is skipped; an interrupted one
resumes from its checkpoints, so rerunning the command after a stop finishes the study. Then
`compare.compare_runs` writes comparison.md, comparison.csv, comparison.png and comparison_grid.png in
WORKDIR and prints the table.
"""

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from covid_jax import runtime


class StudyError(RuntimeError):
  """A run of the study failed or cannot run; the message names it."""


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """The study's own arguments, and the `--config.key=value` overrides (anything else is an error)."""
  parser = argparse.ArgumentParser(prog='python -m covid_jax.study', description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='Study directory: one run directory per (config, seed).')
  parser.add_argument('--configs', required=True, help='Comma-separated config files, e.g. configs/vgg16.py,...')
  parser.add_argument('--seeds', default='0', help='Comma-separated seeds (default 0).')
  parser.add_argument('--grid_seed', type=int, default=0, help='Seed of the test images in comparison_grid.png.')
  args, rest = parser.parse_known_args(argv)
  unknown = [arg for arg in rest if not arg.startswith('--config.')]
  if unknown:
    parser.error(f'unrecognised arguments {unknown}; config overrides are written --config.key=value')
  try:
    args.seeds = [int(seed) for seed in args.seeds.split(',')]
  except ValueError:
    parser.error(f'--seeds takes comma-separated integers, got {args.seeds!r}')
  args.configs = [Path(path) for path in args.configs.split(',')]
  missing = [str(path) for path in args.configs if not path.is_file()]
  if missing:
    parser.error(f'config file(s) not found: {missing}')
  return args, rest


def run_names(configs: Sequence[Path]) -> list[str]:
  """A directory name per config: its file stem, or folder-stem where stems repeat (nasnet, notebook-nasnet)."""
  stems = [path.stem for path in configs]
  names = [stem if stems.count(stem) == 1 else f'{path.parent.name}-{stem}' for path, stem in zip(configs, stems)]
  if len(set(names)) != len(names):
    raise StudyError(f'two --configs would share a run directory: {[str(p) for p in configs]}')
  return names


def load_config(path: Path, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """The config `covid_jax.main` would run for `path` and `overrides`: parsed by the same flag machinery."""
  argv = ['study', f'--config={path}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
  except (AttributeError, KeyError) as e:  # ConfigDict's answer to a mistyped key, with a suggestion.
    suggestion = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', str(e))
    raise StudyError(f'{path}: an override names a key the config does not have ({" ".join(overrides)})'
                     + (f'. {suggestion.group()}' if suggestion else '')) from None
  except (flags.Error, TypeError, ValueError) as e:
    raise StudyError(f'{path}: {e}') from None
  return flag_values.config


def _finished(run_dir: Path, config: ml_collections.ConfigDict) -> bool:
  """True when `run_dir` holds a finished run of `config`: the same settings, where the backend's choice (for
  keys left to it) stands for 'auto'."""
  saved = run_dir / 'config.json'
  if not (run_dir / 'test_metrics.json').is_file() or not saved.is_file():
    return False
  saved_config = json.loads(saved.read_text())
  requested = json.loads(json.dumps(config.to_dict()))
  for key in runtime.RESOLVED_AT_START:
    if requested.get(key) in (None, 'auto'):
      requested[key] = saved_config.get(key)
  return saved_config == requested


def run_study(workdir: Path, configs: Sequence[Path], seeds: Sequence[int], overrides: Sequence[str],
              grid_seed: int = 0) -> list[Path]:
  """Trains what is not finished, then writes the comparison; returns the run directories."""
  plan = []
  for path, name in zip(configs, run_names(configs)):
    for seed in seeds:
      seeded = [*overrides, f'--config.seed={seed}']
      plan.append((name, path, workdir / name / f'seed_{seed}', seeded, load_config(path, seeded)))
  for index, (_, path, run_dir, seeded, config) in enumerate(plan, 1):
    if _finished(run_dir, config):
      print(f'[{index}/{len(plan)}] {run_dir}: finished, skipped', flush=True)
      continue
    print(f'[{index}/{len(plan)}] {run_dir}: python -m covid_jax.main --config={path}', flush=True)
    command = [sys.executable, '-m', 'covid_jax.main', f'--config={path}', f'--workdir={run_dir}', *seeded]
    status = subprocess.run(command).returncode
    if status:
      raise StudyError(f'the run in {run_dir} failed (exit status {status}); fix it and rerun the study, which '
                       'resumes where it stopped')
  from covid_jax import compare  # Its plotting and reading are needed only now.
  run_dirs = [run_dir for _, _, run_dir, _, _ in plan]
  compare.compare_runs(run_dirs, workdir, seed=grid_seed, labels=[name for name, *_ in plan])
  return run_dirs


def main(argv: Sequence[str] | None = None) -> None:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    run_study(Path(args.workdir), args.configs, args.seeds, overrides, args.grid_seed)
  except StudyError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  main()
