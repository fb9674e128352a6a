"""Tests for data_prep.synthetic: layout and names, determinism, no shortcut, learnable lungs."""

import collections
import dataclasses
import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from sklearn import linear_model
from sklearn import model_selection
from sklearn import pipeline
from sklearn import preprocessing
from sklearn import tree

from data_prep import synthetic

REPO_ROOT = pathlib.Path(__file__).parents[1]
NUM_IMAGES = 300
# 300 * 1790 / 3091 = 173.7: the Kaggle set's class balance.
EXPECTED_COUNTS = {0: 126, 1: 174}
NAME_PATTERNS = {
    0: re.compile(r'^(NORMAL2-)?IM-\d{4}-\d{4}\.\w+$'),
    1: re.compile(r'^person\d+_(bacteria|virus)_\d+\.\w+$'),
}
FORMAT_OF_SUFFIX = {'.jpeg': 'JPEG', '.jpg': 'JPEG', '.png': 'PNG'}


@dataclasses.dataclass(frozen=True)
class Record:
  path: pathlib.Path
  label: int
  format: str
  mode: str
  pixels: np.ndarray  # Gray, float in [0, 1], full size.

  @property
  def patient(self) -> str:
    return re.match(r'(person\d+|(NORMAL2-)?IM-\d{4})[-_]', self.path.name).group(1)


def _read(path: pathlib.Path) -> Record:
  with Image.open(path) as image:
    image.load()
    fmt, mode = image.format, image.mode
    pixels = np.asarray(image).astype(np.float64)
  if pixels.ndim == 3:
    pixels = pixels.mean(-1)
  pixels /= 65535 if mode == 'I;16' else 255
  return Record(path, int(path.parent.name), fmt, mode, pixels)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp('synthetic')
  paths = synthetic.generate(root, NUM_IMAGES, seed=0)
  return root, paths


@pytest.fixture(scope='module')
def records(dataset):
  root, _ = dataset
  return [_read(p) for p in sorted(root.glob('*/*'))]


def _cv_accuracy(model, features: np.ndarray, labels: np.ndarray) -> float:
  cv = model_selection.StratifiedKFold(5, shuffle=True, random_state=0)
  return model_selection.cross_val_score(model, features, labels, cv=cv).mean()


def _thumbnails(records: list[Record]) -> np.ndarray:
  """32x32 pixels, standardised per image: what is left once brightness and contrast are gone."""
  thumbs = np.stack([np.asarray(Image.fromarray(r.pixels.astype(np.float32))
                                .resize((32, 32), Image.Resampling.BOX)) for r in records])
  thumbs = thumbs.reshape(len(records), -1)
  return (thumbs - thumbs.mean(1, keepdims=True)) / thumbs.std(1, keepdims=True)


def test_layout_and_counts(dataset):
  root, paths = dataset
  assert sorted(p.name for p in root.iterdir()) == ['0', '1']
  assert sorted(paths) == sorted(root.glob('*/*'))
  assert collections.Counter(int(p.parent.name) for p in paths) == EXPECTED_COUNTS


def test_names_and_patients(records):
  for r in records:
    assert NAME_PATTERNS[r.label].match(r.path.name), r.path
  images = collections.defaultdict(list)
  for r in records:
    images[r.patient].append(r)
  assert all(len({r.label for r in rs}) == 1 for rs in images.values())
  sizes = collections.Counter(len(rs) for rs in images.values())
  assert set(sizes) <= {1, 2, 3, 4, 5}
  several = sum(n for size, n in sizes.items() if size > 1)
  assert 0.2 < several / len(images) < 0.5, sizes
  # Class 0 numbers a patient's images 0001, 0002, ...; class 1 counts images over the class.
  for rs in images.values():
    if rs[0].label == 0:
      assert sorted(int(r.path.stem[-4:]) for r in rs) == list(range(1, len(rs) + 1))
  counters = [int(r.path.stem.rsplit('_', 1)[1]) for r in records if r.label == 1]
  assert len(set(counters)) == len(counters)
  # Numbers 9000 and up stay free for hand-made files in other tests.
  assert all(int(re.search(r'\d+$', patient).group()) < 9000 for patient in images)


def test_formats_and_extensions(records):
  for r in records:
    assert FORMAT_OF_SUFFIX[r.path.suffix.lower()] == r.format, r.path
    assert 200 <= min(r.pixels.shape) and max(r.pixels.shape) <= 600
  kinds = collections.Counter((r.format, r.mode) for r in records)
  assert kinds[('JPEG', 'L')] > 0.6 * len(records), kinds
  assert {('PNG', 'L'), ('PNG', 'I;16')} <= set(kinds), kinds
  assert sum(n for (_, mode), n in kinds.items() if mode == 'RGB') > 0.05 * len(records), kinds
  suffixes = {r.path.suffix for r in records}
  assert {'.jpeg', '.png'} < suffixes and suffixes & {'.JPEG', '.jpg', '.JPG', '.PNG'}
  assert len({r.pixels.shape for r in records}) > 100
  assert any(h != w for h, w in (r.pixels.shape for r in records))


def test_rgb_files_look_gray(records):
  for r in records:
    if r.mode == 'RGB':
      with Image.open(r.path) as image:
        rgb = np.asarray(image).astype(int)
      assert np.abs(rgb - rgb.mean(-1, keepdims=True)).max() <= 4, r.path


def _contents(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob('*/*'))}


def test_same_seed_same_bytes_any_workers(tmp_path):
  synthetic.generate(tmp_path / 'a', 24, seed=3)
  synthetic.generate(tmp_path / 'b', 24, seed=3, workers=2)
  synthetic.generate(tmp_path / 'c', 24, seed=4)
  a, b, c = (_contents(tmp_path / d) for d in 'abc')
  assert len(a) == 24 and a == b
  assert not set(a.values()) & set(c.values())


def test_refuses_to_mix_sets(dataset):
  root, _ = dataset
  with pytest.raises(FileExistsError):
    synthetic.generate(root, 10, seed=1)


@pytest.mark.parametrize('feature', ['mean_intensity', 'width', 'height', 'area', 'format'])
def test_no_shortcut(records, feature):
  """No single acquisition property predicts the label much above the majority class (58%)."""
  columns = {
      'mean_intensity': lambda r: [r.pixels.mean()],
      'width': lambda r: [r.pixels.shape[1]],
      'height': lambda r: [r.pixels.shape[0]],
      'area': lambda r: [r.pixels.size],
      'format': lambda r: [r.format == 'PNG', r.mode == 'RGB', r.mode == 'I;16'],
  }
  features = np.array([columns[feature](r) for r in records], float)
  labels = np.array([r.label for r in records])
  accuracy = _cv_accuracy(tree.DecisionTreeClassifier(max_depth=2), features, labels)
  assert accuracy <= 0.65, accuracy


def test_label_readable_from_pixels(records):
  """A linear model on 32x32 thumbnails finds the opacities: they are not too faint to learn."""
  labels = np.array([r.label for r in records])
  model = pipeline.make_pipeline(preprocessing.StandardScaler(),
                                 linear_model.LogisticRegression(C=0.01, max_iter=500))
  accuracy = _cv_accuracy(model, _thumbnails(records), labels)
  assert accuracy > 0.8, accuracy


def test_patient_images_share_anatomy(records):
  """Images of one patient are more alike than images of two patients, so splits must group them."""
  normal = [r for r in records if r.label == 0]
  thumbs = _thumbnails(normal)
  corr = thumbs @ thumbs.T / thumbs.shape[1]
  patients = np.array([r.patient for r in normal])
  same = patients[:, None] == patients[None, :]
  off_diagonal = ~np.eye(len(normal), dtype=bool)
  within, between = corr[same & off_diagonal].mean(), corr[~same].mean()
  assert within > between + 0.05, (within, between)


def test_cli(tmp_path):
  command = [sys.executable, '-m', 'data_prep.synthetic']
  result = subprocess.run(command + [f'--output_dir={tmp_path}', '--num_images=10', '--seed=1'],
                          capture_output=True, text=True, check=True, cwd=REPO_ROOT)
  assert 'class 0: 4, class 1: 6' in result.stdout, result.stdout
  assert len(list(tmp_path.glob('*/*'))) == 10
  # absl exits with status 1 after --help, so only the text is checked.
  usage = subprocess.run(command + ['--help'], capture_output=True, text=True, cwd=REPO_ROOT).stdout
  assert '--num_images' in usage
