"""Test-wide settings: CPU only, quiet TensorFlow, float32 matmuls at full precision, compilation cache."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# Many tests (and their subprocesses) compile the same small models: a persistent
# compilation cache turns the repeats into loads.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, '.jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


import pytest  # noqa: E402

from tests import fixtures  # noqa: E402


@pytest.fixture(scope='session')
def synthetic_source(tmp_path_factory: pytest.TempPathFactory):
  """A 300-image synthetic set in the Kaggle layout, plus one file of every kind the build must reject."""
  return fixtures.synthetic_source_with_bad_files(tmp_path_factory.mktemp('source'))


@pytest.fixture(scope='session')
def built_dataset(synthetic_source, tmp_path_factory: pytest.TempPathFactory):
  """`synthetic_source` built at 64 px: (data_dir, manifest)."""
  return fixtures.build_dataset(synthetic_source.root, tmp_path_factory.mktemp('built') / 'data', image_size=64)


@pytest.fixture(scope='session')
def trained_run(built_dataset, tmp_path_factory: pytest.TempPathFactory):
  """One tiny finished run on `built_dataset` (64 px, 10 epochs), shared by every test that reads a run's
  outputs (predict, evaluate, compare, report): (workdir, test metrics returned, manifest)."""
  from covid_jax import train
  from tests import runs
  data_dir, manifest = built_dataset
  workdir = tmp_path_factory.mktemp('trained_run')
  # At 64 px the lesions are visible enough for the tiny model to learn in a few epochs.
  # Youden's threshold, so that the run's decision differs from the study's 0.5.
  config = runs.tiny_config(data_dir, num_epochs=10, **{'early_stopping.patience': 10, 'model.image_size': 64,
                                                        'threshold.rule': 'youden', 'gradcam_grid_size': 4})
  return workdir, train.train_and_evaluate(config, str(workdir)), manifest
