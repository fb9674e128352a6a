"""data_prep.metadata: patient ids (and labels) from a metadata CSV keep each patient in one split."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from data_prep import build, metadata
from data_prep.scan import BuildError, scan

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {'path': 'imagename', 'patient': 'patientid'}
# UID-named images in class folders, as the covid-chestxray-dataset names them: patient -> images.
PATIENTS = {
    '101': ['1/5e9f0c1a.png', '1/8b2d7e44.png', '1/c0ffee01.png'],
    '102': ['1/0a1b2c3d.png', '1/f00dbabe.png'],
    '103': ['1/9e8d7c6b.png', '1/1234abcd.png', '1/77aa88bb.png'],
    '104': ['1/deadbeef.png', '1/4c4c4c4c.png'],
    '105': ['1/a5a5a5a5.png'],
    '106': ['1/3b3b3b3b.png', '1/e1e1e1e1.png'],
    '201': ['0/6f6f6f6f.png', '0/b7b7b7b7.png', '0/2d2d2d2d.png'],
    '202': ['0/c8c8c8c8.png', '0/0e0e0e0e.png'],
    '203': ['0/d9d9d9d9.png', '0/1f1f1f1f.png', '0/abab0101.png'],
    '204': ['0/cdcd0202.png', '0/efef0303.png'],
    '205': ['0/1a2b0404.png'],
    '206': ['0/3c4d0505.png', '0/5e6f0606.png'],
}


def _png(path: Path, seed: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40), np.uint8)).save(path)


def _csv(path: Path, header: list[str], rows: list[list[str]], encoding: str = 'utf-8') -> Path:
  with open(path, 'w', newline='', encoding=encoding) as f:
    csv.writer(f).writerows([header, *rows])
  return path


def _uid_source(tmp_path: Path) -> tuple[Path, Path]:
  """PATIENTS as class folders 0/ and 1/, and a metadata.csv (outside the source) that lists base names."""
  source = tmp_path / 'src'
  rows = []
  for seed, (patient, rel) in enumerate((p, rel) for p, rels in PATIENTS.items() for rel in rels):
    _png(source / rel, seed)
    rows.append([rel.split('/')[1], patient, 'x'])
  return source, _csv(tmp_path / 'metadata.csv', ['imagename', 'patientid', 'finding'], rows)


def _plan(source: Path, table: metadata.Table, seed: int = 0, label_map: dict | None = None) -> dict:
  manifest, to_write = build.plan(source, label_map, build.parse_fractions('50,25,25'), seed, 32, progress=False,
                                  table=table)
  to_write.close()
  return manifest


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_every_metadata_patient_lies_in_one_split(tmp_path, seed):
  source, csv_file = _uid_source(tmp_path)
  manifest = _plan(source, metadata.load(csv_file, COLUMNS), seed, {'0': 0, '1': 1})
  examples = {e['path']: e for e in manifest['examples']}
  assert sorted(examples) == sorted(rel for rels in PATIENTS.values() for rel in rels)
  for patient, paths in PATIENTS.items():
    assert [examples[rel]['patient_id'] for rel in paths] == [patient] * len(paths)
    assert len({examples[rel]['split'] for rel in paths}) == 1, (patient, [examples[rel]['split'] for rel in paths])
  assert {e['patient_source'] for e in manifest['examples']} == {'metadata'}
  assert {e['label'] for e in manifest['examples'] if e['path'].startswith('1/')} == {1}
  assert manifest['metadata']['file'] == 'metadata.csv' and manifest['metadata']['label_values'] is None
  assert manifest['warnings'] == []
  assert 'patients: 12 (12 from metadata.csv)' in build.summary(manifest)


def test_labels_from_the_file_in_a_flat_folder(tmp_path):
  source = tmp_path / 'images'
  findings = {'a1.png': ('P1', 'COVID-19'), 'a2.png': ('P1', 'COVID-19'), 'b1.png': ('P2', 'No finding'),
              'b2.png': ('P3', 'No finding'), 'c1.png': ('P4', 'COVID-19'), 'd1.png': ('P5', 'Pneumonia'),
              'e1.png': ('P6', 'No finding'), 'f1.png': ('P7', 'COVID-19')}
  for seed, name in enumerate(findings):
    _png(source / name, seed)
  csv_file = _csv(tmp_path / 'metadata.csv', ['patientid', 'finding', 'imagename'],
                  [[patient, finding, name] for name, (patient, finding) in findings.items()])
  table = metadata.from_flags(str(csv_file), 'path=imagename,patient=patientid,label=finding',
                              'COVID-19=1,No finding=0', allow_unlisted=False, label_map_given=False)
  manifest = _plan(source, table)
  assert {e['path']: e['label'] for e in manifest['examples']} == {
      'a1.png': 1, 'a2.png': 1, 'b1.png': 0, 'b2.png': 0, 'c1.png': 1, 'e1.png': 0, 'f1.png': 1}
  assert manifest['rejected'] == [{'path': 'd1.png', 'reason': 'metadata label "Pneumonia" is not in --label_values'}]
  assert manifest['label_map'] is None
  assert manifest['metadata']['label_values'] == {'COVID-19': 1, 'No finding': 0}


def test_relative_paths_tell_files_with_one_base_name_apart(tmp_path):
  table = metadata.load(_csv(tmp_path / 'm.csv', ['imagename', 'patientid'],
                             [['0/x.png', 'A'], ['1/x.png', 'B']]), COLUMNS)
  matched = metadata.match(table, [('0/x.png', 0), ('1/x.png', 1)])
  assert matched.patients == {'0/x.png': 'A', '1/x.png': 'B'} and not matched.rejected and not matched.warnings


@pytest.mark.parametrize('rows,message', [
    ([['x.png', 'A']], "m.csv line 2 names 'x.png', which could be any of 0/x.png, 1/x.png: give paths relative "
                       "to --source_dir in its 'imagename' column"),
    ([['0/x.png', 'A'], ['1/x.png', 'B'], ['y.png', 'C'], ['0/y.png', 'D']],
     'm.csv lines 4, 5 all name 0/y.png but disagree on its patient or label'),
])
def test_ambiguous_rows_are_an_error(tmp_path, rows, message):
  table = metadata.load(_csv(tmp_path / 'm.csv', ['imagename', 'patientid'], rows), COLUMNS)
  with pytest.raises(BuildError) as error:
    metadata.match(table, [('0/x.png', 0), ('0/y.png', 0), ('1/x.png', 1)])
  assert str(error.value) == message


def test_identical_rows_are_not_ambiguous(tmp_path):
  table = metadata.load(_csv(tmp_path / 'm.csv', ['imagename', 'patientid'], [['x.png', 'A'], ['x.png', 'A']]),
                        COLUMNS)
  assert metadata.match(table, [('0/x.png', 0)]).patients == {'0/x.png': 'A'}


def test_unlisted_image_is_rejected_or_its_own_group(tmp_path):
  source, csv_file = _uid_source(tmp_path)
  _png(source / '0' / 'unlisted.png', 99)
  with open(csv_file, 'a', newline='') as f:
    csv.writer(f).writerows([['not_downloaded_1.png', '301', 'x'], ['not_downloaded_2.png', '302', 'x']])
  rows_warning = ("2 of 28 rows of metadata.csv name no image under --source_dir (not downloaded, or rejected "
                  "before decoding), e.g. 'not_downloaded_1.png' (line 28), 'not_downloaded_2.png' (line 29)")
  rejected = _plan(source, metadata.load(csv_file, COLUMNS), label_map={'0': 0, '1': 1})
  assert rejected['rejected'] == [{'path': '0/unlisted.png', 'reason': 'no row in metadata.csv'}]
  assert rejected['warnings'] == [rows_warning]
  kept = _plan(source, metadata.load(csv_file, COLUMNS, allow_unlisted=True), label_map={'0': 0, '1': 1})
  (example,) = [e for e in kept['examples'] if e['path'] == '0/unlisted.png']
  assert example['patient_id'] == 'file:0/unlisted.png' and example['patient_source'] == 'own group'
  assert kept['rejected'] == [] and kept['metadata']['allow_unlisted']
  assert kept['warnings'] == ['1 of 27 images have no row in metadata.csv; each is its own patient group '
                              '(--allow_unlisted), e.g. 0/unlisted.png', rows_warning]
  assert 'patients: 13 (12 from metadata.csv, 1 own group)' in build.summary(kept)


def test_empty_patient_id_rejects_the_image(tmp_path):
  table = metadata.load(_csv(tmp_path / 'm.csv', ['imagename', 'patientid'], [['a.png', ' '], ['b.png', 'B']]),
                        COLUMNS)
  matched = metadata.match(table, [('0/a.png', 0), ('0/b.png', 0)])
  assert matched.rejected == [{'path': '0/a.png', 'reason': 'empty patientid in m.csv line 2'}]
  assert matched.candidates == [('0/b.png', 0)] and matched.patients == {'0/b.png': 'B'}


def test_byte_order_mark_and_quoted_newlines_are_read(tmp_path):
  csv_file = _csv(tmp_path / 'm.csv', ['imagename', 'patientid', 'notes'],
                  [['a.png', 'A', 'two\nlines'], ['b.png', 'B', '']], encoding='utf-8-sig')
  table = metadata.load(csv_file, COLUMNS)
  assert [(row.path, row.patient) for row in table.rows] == [('a.png', 'A'), ('b.png', 'B')]


def test_flat_scan_takes_images_at_any_depth(tmp_path):
  for rel in ('a.png', 'sub/b.png'):
    _png(tmp_path / rel, 0)
  (tmp_path / 'metadata.csv').write_text('x\n')
  assert scan(tmp_path, None) == ([('a.png', None), ('sub/b.png', None)],
                                  [{'path': 'metadata.csv', 'reason': 'not an image file extension (.csv)'}])


@pytest.mark.parametrize('file,columns,values,unlisted,label_map,message', [
    (None, 'path=a,patient=b', None, False, False, '--metadata_columns given without --metadata FILE.csv'),
    (None, None, None, True, False, '--allow_unlisted given without --metadata FILE.csv'),
    ('m.csv', None, None, False, False, '--metadata needs --metadata_columns path=COLUMN,patient=COLUMN'),
    ('m.csv', 'path=imagename', None, False, False, "--metadata_columns 'path=imagename' lacks patient="),
    ('m.csv', 'patient=patientid', None, False, False, "--metadata_columns 'patient=patientid' lacks path="),
    ('m.csv', 'path=a,patient=b,site=c', None, False, False,
     "--metadata_columns entry 'site=c' is not ROLE=COLUMN with ROLE one of path, patient, label"),
    ('m.csv', 'path=a,patient=b,label=c', 'x=1,y=0', False, True,
     '--label_map and label= in --metadata_columns both say where labels come from'),
    ('m.csv', 'path=a,patient=b,label=c', None, False, False, 'label= in --metadata_columns needs --label_values'),
    ('m.csv', 'path=a,patient=b,label=c', 'x=1,y=0', True, False, '--allow_unlisted cannot keep an image'),
    ('m.csv', 'path=a,patient=b', 'x=1,y=0', False, False, '--label_values needs label=COLUMN in --metadata_columns'),
    ('m.csv', 'path=a,patient=b,label=c', 'x=1,y=1', False, False,
     "--label_values 'x=1,y=1' must map at least one value to each of 0 and 1"),
    ('m.csv', 'path=a,patient=b,label=c', 'x=2,y=0', False, False, "--label_values entry 'x=2' is not VALUE=0"),
    ('missing.csv', 'path=a,patient=b', None, False, False, '--metadata {tmp}/missing.csv does not exist'),
    ('latin1.csv', 'path=a,patient=b', None, False, False,
     "--metadata {tmp}/latin1.csv is not UTF-8 text (line 2 holds byte b'\\xe9')"),
    ('m.csv', 'path=imagename,patient=patient_id', None, False, False,
     "--metadata {tmp}/m.csv has no column 'patient_id' (patient= in --metadata_columns); its columns: imagename, "
     "patientid, finding"),
])
def test_bad_metadata_input_is_refused_naming_it(tmp_path, file, columns, values, unlisted, label_map, message):
  _csv(tmp_path / 'm.csv', ['imagename', 'patientid', 'finding'], [['a.png', 'A', 'x']])
  (tmp_path / 'latin1.csv').write_bytes('a,b\nRadiographie_\u00e9.png,A\n'.encode('latin-1'))
  with pytest.raises(BuildError) as error:
    metadata.from_flags(file and str(tmp_path / file), columns, values, unlisted, label_map)
  assert message.format(tmp=tmp_path) in str(error.value)


def test_cli_refuses_a_missing_column_before_decoding(tmp_path, capsys):
  source, csv_file = _uid_source(tmp_path)
  if 'source_dir' not in flags.FLAGS:
    build.define_flags()
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['build', f'--source_dir={source}', f'--data_dir={tmp_path / "out"}', f'--metadata={csv_file}',
                 '--metadata_columns=path=filename,patient=patientid'])
    assert build.main([]) == 1
  output = capsys.readouterr()
  assert (f"error: --metadata {csv_file} has no column 'filename' (path= in --metadata_columns); its columns: "
          'imagename, patientid, finding') in output.err
  assert 'decoding' not in output.out + output.err and not (tmp_path / 'out').exists()


def test_cli_builds_a_flat_uid_folder_with_labels_from_metadata(tmp_path):
  source = tmp_path / 'images'
  rows = []
  for seed, (patient, rel) in enumerate((p, rel) for p, rels in PATIENTS.items() for rel in rels):
    _png(source / rel.split('/')[1], seed)
    rows.append([rel.split('/')[1], patient, 'COVID-19' if rel.startswith('1/') else 'No finding'])
  csv_file = _csv(tmp_path / 'metadata.csv', ['filename', 'patientid', 'finding'], rows)
  result = subprocess.run(
      [sys.executable, '-m', 'data_prep.build', '--source_dir', str(source), '--data_dir', str(tmp_path / 'out'),
       '--image_size', '32', '--metadata', str(csv_file), '--metadata_columns',
       'path=filename,patient=patientid,label=finding', '--label_values', 'COVID-19=1,No finding=0'],
      cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert result.returncode == 0, result.stderr
  assert 'patients: 12 (12 from metadata.csv)' in result.stdout
  manifest = json.loads((tmp_path / 'out' / 'manifest.json').read_text())
  assert {(e['path'], e['patient_id'], e['patient_source'], e['label']) for e in manifest['examples']} == {
      (rel.split('/')[1], patient, 'metadata', int(rel[0])) for patient, rels in PATIENTS.items() for rel in rels}
  split_of = {e['path']: e['split'] for e in manifest['examples']}
  for rels in PATIENTS.values():
    assert len({split_of[rel.split('/')[1]] for rel in rels}) == 1
