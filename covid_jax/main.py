"""Entry point: `python -m covid_jax.main --config=configs/nasnet.py --workdir=RUN [--config.key=value ...]`."""

from covid_jax import host_memory

if __name__ == '__main__':
  host_memory.relaunch_with_thread_caches()  # glibc reads the setting at start: before anything heavy loads.

import os  # noqa: E402

import jax  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from covid_jax import reporting, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, TensorBoard events, plots, test_metrics.json. '
                    'Re-using it resumes the run.')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first (one process per host; the cluster '
                  'is detected from the environment, e.g. TPU pods or SLURM).')
flags.mark_flags_as_required(['config', 'workdir'])


class _LibraryChatter(logging.logging.Filter):
  """Drops the checkpoint library's per-save INFO lines, which bury the training log."""

  def filter(self, record: logging.logging.LogRecord) -> bool:
    return record.levelno > logging.logging.INFO or '/orbax/' not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_LibraryChatter())
  # Before the backend starts (the device queries below), so XLA's threads share the one arena.
  if FLAGS.config.retain_freed_host_memory and not host_memory.retain_freed_memory():
    logging.info('Not glibc: freed host memory goes back to the system as usual.')
  if FLAGS.config.compilation_cache_dir and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(FLAGS.config.compilation_cache_dir))
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  tf.config.set_visible_devices([], 'GPU')
  if FLAGS.multihost:
    jax.distributed.initialize()
  logging.info('JAX process %d of %d; local devices: %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  logging.info('Global devices: %d x %s', jax.device_count(), jax.devices()[0].platform)
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(reporting.print_metrics_table(result, title=f'test metrics (best epoch {result["best_epoch"]})'))
    print(f'Run directory: {FLAGS.workdir} (test_metrics.json, training_curves.png, confusion_matrix.png, '
          'roc_curve.png, prediction_grid.png, tensorboard/)')


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main)
