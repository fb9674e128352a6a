"""data_prep.build: every file accounted for, bad files rejected with reasons, leak-free reproducible splits."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from data_prep import build, split
from tests import fixtures

ROOT = Path(__file__).resolve().parents[1]


def _plan(source: Path, seed: int = 0, **kwargs) -> dict:
  manifest, _ = build.plan(source, build.parse_label_map('0=0,1=1'), build.parse_fractions('64,16,20'), seed, 32,
                           max_pixels=fixtures.MAX_PIXELS, progress=False, **kwargs)
  return manifest


def _run_build(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'data_prep.build', *args], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})


def _tree(root: Path) -> dict[str, bytes]:
  return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def test_overwrite_replaces_only_a_previous_build_and_never_the_source(tmp_path):
  """--overwrite once deleted whatever folder it was given: the source's parent, the source, unrelated files."""
  source = tmp_path / 'collection' / 'images'
  for label in ('0', '1'):
    (source / label).mkdir(parents=True)
    (source / label / 'x.png').write_bytes(b'not read: the output is refused first')
  (tmp_path / 'collection' / 'notes.txt').write_text('unrelated')
  unrelated = tmp_path / 'results'
  unrelated.mkdir()
  (unrelated / 'table.csv').write_text('a,b\n')
  a_file = tmp_path / 'file.txt'
  a_file.write_text('x')
  before = _tree(tmp_path)
  refusals = {
      source.parent: 'is, contains or lies inside the source',
      source: 'is, contains or lies inside the source',
      source / '0' / 'built': 'is, contains or lies inside the source',
      unrelated: 'is not a previous build',
      a_file: 'exists and is not a directory',
  }
  for data_dir, reason in refusals.items():
    result = _run_build('--source_dir', str(source), '--data_dir', str(data_dir), '--overwrite')
    assert result.returncode != 0 and reason in result.stderr, (data_dir, result.stderr)
    assert 'decoding' not in result.stdout + result.stderr  # Refused before any work.
  assert _tree(tmp_path) == before


def test_every_file_is_accounted_for_exactly_once(synthetic_source, built_dataset):
  _, manifest = built_dataset
  on_disk = sorted(p.relative_to(synthetic_source.root).as_posix() for p in synthetic_source.root.rglob('*')
                   if p.is_file())
  listed = [e['path'] for e in manifest['examples']] + [r['path'] for r in manifest['rejected']]
  assert sorted(listed) == on_disk
  assert len(manifest['examples']) == fixtures.NUM_SYNTHETIC + 3  # + exact and near duplicate, unparseable name.


@pytest.mark.parametrize('path,reason', sorted(fixtures.BAD_FILES.items()))
def test_bad_file_is_rejected_with_reason(built_dataset, path, reason):
  _, manifest = built_dataset
  reasons = {r['path']: r['reason'] for r in manifest['rejected']}
  assert reason in reasons[path]


def test_no_patient_or_duplicate_group_crosses_splits(synthetic_source, built_dataset):
  _, manifest = built_dataset
  split_of = {e['path']: e['split'] for e in manifest['examples']}
  splits_of_patient = collections.defaultdict(set)
  for e in manifest['examples']:
    splits_of_patient[e['patient_id']].add(e['split'])
  assert all(len(s) == 1 for s in splits_of_patient.values())
  assert any(len([e for e in manifest['examples'] if e['patient_id'] == p]) > 1 for p in splits_of_patient)
  groups = {(g['kind'], tuple(sorted(g['paths']))) for g in manifest['duplicate_groups']}
  assert ('exact', tuple(sorted(synthetic_source.exact_duplicate))) in groups
  assert ('near', tuple(sorted(synthetic_source.near_duplicate))) in groups
  for _, paths in groups:
    assert len({split_of[p] for p in paths}) == 1


def test_split_fractions_within_two_points(built_dataset):
  _, manifest = built_dataset
  total = len(manifest['examples'])
  for name, target in manifest['split_fractions'].items():
    got = sum(e['split'] == name for e in manifest['examples']) / total
    assert abs(got - target) <= 0.02, (name, got, target)
    for label in (0, 1):
      of_label = [e for e in manifest['examples'] if e['label'] == label]
      assert abs(sum(e['split'] == name for e in of_label) / len(of_label) - target) <= 0.03


def test_counts_match_examples(built_dataset):
  _, manifest = built_dataset
  for name, counts in manifest['counts'].items():
    for label, n in counts.items():
      assert n == sum(e['split'] == name and e['label'] == int(label) for e in manifest['examples'])


def test_patient_ids_and_warnings(synthetic_source, built_dataset):
  _, manifest = built_dataset
  by_path = {e['path']: e for e in manifest['examples']}
  assert by_path['0/NORMAL2-IM-9101-0001.JPEG']['patient_id'] == 'NORMAL2-IM-9101'
  assert by_path[synthetic_source.unparseable]['patient_id'] == f'file:{synthetic_source.unparseable}'
  warnings = '\n'.join(manifest['warnings'])
  assert '1 file names match no known patient-id pattern' in warnings
  covid = [e for e in manifest['examples'] if e['label'] == 1]
  assert f'provenance: {len(covid) - 1} of {len(covid)} COVID-class (label 1) files' in warnings


def test_same_seed_same_manifest_whatever_the_listing_order(synthetic_source, monkeypatch):
  first = _plan(synthetic_source.root)
  real_rglob = Path.rglob
  monkeypatch.setattr(Path, 'rglob', lambda self, pattern: reversed(list(real_rglob(self, pattern))))
  assert _plan(synthetic_source.root) == first


def test_different_seed_different_split(synthetic_source):
  splits = [{e['path']: e['split'] for e in _plan(synthetic_source.root, seed)['examples']} for seed in (0, 1)]
  assert sum(splits[0][p] != splits[1][p] for p in splits[0]) > len(splits[0]) // 4


def test_tfrecord_counts_match_manifest(built_dataset):
  data_dir, manifest = built_dataset
  dataset_dir = data_dir / manifest['dataset_dir']
  info = json.loads((dataset_dir / 'dataset_info.json').read_text())
  for name in split.SPLITS:
    files = sorted(dataset_dir.glob(f'covid_xray-{name}.tfrecord-*'))
    records = sum(1 for _ in tf.data.TFRecordDataset([str(f) for f in files]))
    assert records == sum(manifest['counts'][name].values())
    (entry,) = [s for s in info['splits'] if s['name'] == name]
    assert sum(int(n) for n in entry['shardLengths']) == records


def test_assign_splits_keeps_groups_whole_and_stratifies():
  rng = np.random.default_rng(0)
  groups, labels, start = [], [], 0
  for size in rng.integers(1, 6, 150):
    label = int(rng.random() < 0.58)
    groups.append(list(range(start, start + size)))
    labels += [label] * size
    start += size
  result = split.assign_splits(groups, labels, dict(zip(split.SPLITS, split.DEFAULT_FRACTIONS)), seed=3)
  assert all(len({result[i] for i in g}) == 1 for g in groups)
  for name, target in zip(split.SPLITS, split.DEFAULT_FRACTIONS):
    assert abs(result.count(name) / len(labels) - target) <= 0.02


def test_cli_writes_summary_and_refuses_to_overwrite(synthetic_source, tmp_path):
  out = tmp_path / 'out'
  args = ['--source_dir', str(synthetic_source.root), '--data_dir', str(out), '--image_size', '32',
          f'--max_pixels={fixtures.MAX_PIXELS}']
  first = _run_build(*args)
  assert first.returncode == 0, first.stderr
  assert 'WARNING: provenance:' in first.stdout and 'duplicate groups: 2' in first.stdout
  assert 'decompression bomb' in first.stdout and 'train' in first.stdout
  before = (out / 'manifest.json').read_text()
  again = _run_build(*args, '--seed', '5')
  assert again.returncode != 0 and 'pass --overwrite' in again.stderr
  assert (out / 'manifest.json').read_text() == before
  replaced = _run_build(*args, '--seed', '5', '--overwrite')
  assert replaced.returncode == 0, replaced.stderr
  assert json.loads((out / 'manifest.json').read_text())['seed'] == 5
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_cli_strict_fails_and_writes_nothing(synthetic_source, tmp_path):
  result = _run_build('--source_dir', str(synthetic_source.root), '--data_dir', str(tmp_path / 'out'), '--strict',
                      f'--max_pixels={fixtures.MAX_PIXELS}')
  assert result.returncode != 0 and '--strict' in result.stderr and 'IM-9003-0001.png: empty file' in result.stderr
  assert not list(tmp_path.iterdir())


def _tiny_source(root: Path, folders: dict[str, int]) -> Path:
  from PIL import Image
  for folder, count in folders.items():
    (root / folder).mkdir(parents=True)
    for i in range(count):
      Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48), np.uint8)).save(
          root / folder / f'IM-{len(folder) * 1000 + i:04d}-0001.png')
  return root


@pytest.mark.parametrize('folders,expected', [
    ({'0': 3}, 'class folder {root}/1 is missing'),
    ({'0': 3, '1': 0}, 'class folder {root}/1 is empty'),
])
def test_cli_missing_or_empty_class_folder_is_an_error(tmp_path, folders, expected):
  root = _tiny_source(tmp_path / 'src', folders)
  result = _run_build('--source_dir', str(root), '--data_dir', str(tmp_path / 'out'))
  assert result.returncode != 0 and expected.format(root=root) in result.stderr
  assert not (tmp_path / 'out').exists()


def test_label_map_reads_other_folder_names(tmp_path):
  root = _tiny_source(tmp_path / 'src', {'NORMAL': 6, 'COVID': 6})
  manifest, _ = build.plan(root, build.parse_label_map('NORMAL=0,COVID=1'), build.parse_fractions('50,25,25'), 0, 32,
                           progress=False)
  assert {e['path'].split('/')[0]: e['label'] for e in manifest['examples']} == {'NORMAL': 0, 'COVID': 1}


def test_interrupted_build_leaves_nothing_that_looks_complete(synthetic_source, tmp_path, monkeypatch):
  manifest, to_write = build.plan(synthetic_source.root, build.parse_label_map('0=0,1=1'),
                                  build.parse_fractions('64,16,20'), 0, 32, max_pixels=fixtures.MAX_PIXELS,
                                  progress=False)

  original = build.CovidXray._generate_examples

  def interrupted(self, examples):
    yield from list(original(self, examples))[:5]
    raise KeyboardInterrupt

  monkeypatch.setattr(build.CovidXray, '_generate_examples', interrupted)
  with pytest.raises(KeyboardInterrupt):
    build.write(manifest, to_write, tmp_path / 'out', overwrite=False)
  assert not list(tmp_path.iterdir())
