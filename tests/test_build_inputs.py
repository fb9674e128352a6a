"""data_prep.build: a bad flag is an `error:` naming it, before any decoding; provenance survives --label_map."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from data_prep import build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """Three 40x40 PNGs per class: enough that a build that went ahead would decode."""
  root = tmp_path_factory.mktemp('src')
  for folder in ('0', '1'):
    (root / folder).mkdir()
    for i in range(3):
      Image.fromarray(np.random.default_rng(10 * int(folder) + i).integers(0, 255, (40, 40), np.uint8)).save(
          root / folder / f'IM-{folder}{i:03d}-0001.png')
  return root


def _main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
  """Runs build.main in this process with `args`; returns (status, stdout + stderr)."""
  if 'source_dir' not in flags.FLAGS:
    build.define_flags()
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['build', *args])
    status = build.main([])
  captured = capsys.readouterr()
  return status, captured.out + captured.err


@pytest.mark.parametrize('text,message', [
    ('100,0,0', "--split '100,0,0' leaves val and test empty"),
    ('64,0,20', "--split '64,0,20' leaves val empty"),
    ('nan,1,1', "--split 'nan,1,1' needs three positive finite numbers for train,val,test"),
    ('inf,1,1', "--split 'inf,1,1' needs three positive finite numbers for train,val,test"),
    ('-1,1,1', "--split '-1,1,1' needs three positive finite numbers for train,val,test"),
    ('64,36', "--split '64,36' needs three positive finite numbers for train,val,test"),
    ('1,1,1,1', "--split '1,1,1,1' needs three positive finite numbers for train,val,test"),
    ('a,b,c', "--split 'a,b,c' is not three comma-separated numbers"),
])
def test_bad_split_is_refused(text, message):
  with pytest.raises(build.BuildError) as error:
    build.parse_fractions(text)
  assert str(error.value) == message


def test_split_is_normalised():
  assert build.parse_fractions('64,16,20') == build.parse_fractions('0.64,0.16,0.2') == {
      'train': 0.64, 'val': 0.16, 'test': 0.2}


@pytest.mark.parametrize('text,message', [
    ('0=0,0=1,1=1', "--label_map names folder '0' twice"),
    ('0=0,0=0,1=1', "--label_map names folder '0' twice"),
    ('=0,1=1', "--label_map entry '=0' has an empty folder name"),
    (' =0,1=1', "--label_map entry '=0' has an empty folder name"),
    ('a/b=0,1=1', "--label_map folder 'a/b' must be a folder directly inside --source_dir, not hidden"),
    ('.x=0,1=1', "--label_map folder '.x' must be a folder directly inside --source_dir, not hidden"),
    ('0=2,1=1', "--label_map entry '0=2' is not FOLDER=0 or FOLDER=1"),
    ('0=0,1=0', "--label_map '0=0,1=0' must map at least one folder to each of 0 and 1"),
])
def test_bad_label_map_is_refused(text, message):
  with pytest.raises(build.BuildError) as error:
    build.parse_label_map(text)
  assert str(error.value) == message


def test_provenance_warning_survives_swapped_labels():
  kermany = ['0/IM-0001-0001.jpeg', '0/NORMAL2-IM-0002-0001.jpeg', '0/other.png',
             '1/person1_virus_1.jpeg', '1/person2_bacteria_3.jpeg']
  pneumonia = 'pneumonia set (personN_bacteria_M / personN_virus_M)'
  normal = 'NORMAL set (IM-NNNN-NNNN / NORMAL2-IM-NNNN-NNNN)'
  assert build._provenance_warnings([(rel, int(rel[0])) for rel in kermany]) == [
      f'provenance: 2 of 2 COVID-class (label 1) files are named like the Kermany/Mooney paediatric {pneumonia}: '
      'this class is most likely paediatric bacterial/viral pneumonia, not COVID-19. Results measure '
      'pneumonia-vs-normal, not COVID detection.',
      f'provenance: 2 of 3 non-COVID (label 0) files are named like the Kermany/Mooney paediatric {normal}.',
  ]
  assert build._provenance_warnings([(rel, 1 - int(rel[0])) for rel in kermany]) == [
      f'provenance: 2 of 3 COVID-class (label 1) files are named like the Kermany/Mooney paediatric {normal}: '
      'normal radiographs labelled COVID; is --label_map swapped?',
      f'provenance: 2 of 2 non-COVID (label 0) files are named like the Kermany/Mooney paediatric {pneumonia}: '
      'pneumonia labelled non-COVID; is --label_map swapped?',
  ]


@pytest.mark.parametrize('args,message', [
    (['--split=100,0,0'], "error: --split '100,0,0' leaves val and test empty"),
    (['--split=nan,1,1'], "error: --split 'nan,1,1' needs three positive finite numbers"),
    (['--label_map=0=0,0=1,1=1'], "error: --label_map names folder '0' twice"),
    (['--image_size=0'], 'error: --image_size is 0; it must be at least 32'),
    (['--image_size=-5'], 'error: --image_size is -5; it must be at least 32'),
    (['--max_pixels=-1'], 'error: --max_pixels is -1; it must be at least 1024'),
    (['--near_duplicate_threshold=-1'], 'error: --near_duplicate_threshold is -1; it must be at least 0'),
    (['--seed=-1'], 'error: --seed is -1; it must be at least 0'),
])
def test_bad_flag_is_an_error_before_any_work(source, tmp_path, capsys, args, message):
  status, output = _main(capsys, f'--source_dir={source}', f'--data_dir={tmp_path / "out"}', *args)
  assert status == 1 and message in output, output
  assert 'decoding' not in output and not (tmp_path / 'out').exists()


def test_output_path_that_is_a_file_is_refused_first(source, tmp_path, capsys):
  (tmp_path / 'out').write_text('x')
  status, output = _main(capsys, f'--source_dir={source}', f'--data_dir={tmp_path / "out"}', '--split=1,0,0')
  assert status == 1 and f'error: output path {tmp_path / "out"} exists and is not a directory' in output
  assert 'decoding' not in output


def test_cli_exit_status(source, tmp_path):
  result = subprocess.run([sys.executable, '-m', 'data_prep.build', '--source_dir', str(source), '--data_dir',
                           str(tmp_path / 'out'), '--image_size', '8'], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert result.returncode == 1 and 'error: --image_size is 8; it must be at least 32' in result.stderr
  assert 'decoding' not in result.stdout + result.stderr
