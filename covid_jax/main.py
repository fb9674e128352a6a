"""Entry point: `python -m covid_jax.main --config=configs/nasnet.py --workdir=RUN [--config.key=value ...]`."""

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from covid_jax import runtime

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, TensorBoard events, plots, test_metrics.json. '
                    'Re-using it resumes the run.')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first (one process per host; the cluster '
                  'is detected from the environment, e.g. TPU pods or SLURM).')
flags.DEFINE_string('coordinator_address', None, 'With --multihost where no cluster is detected (plain hosts): '
                    'host:port of process 0, with --num_processes and --process_id.')
flags.DEFINE_integer('num_processes', None, 'With --coordinator_address: how many processes the run has.')
flags.DEFINE_integer('process_id', None, 'With --coordinator_address: this process\'s index, 0 to num_processes - 1.')
flags.mark_flags_as_required(['config', 'workdir'])
_CLUSTER_FLAGS = ('coordinator_address', 'num_processes', 'process_id')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  given = [name for name in _CLUSTER_FLAGS if FLAGS[name].value is not None]
  if given and (not FLAGS.multihost or len(given) != len(_CLUSTER_FLAGS)):
    raise app.UsageError(f'--{", --".join(_CLUSTER_FLAGS)} go together, with --multihost (given: {given})')
  config = FLAGS.config
  # Before the backend starts (the device queries below) and before TensorFlow loads.
  expected = runtime.expected_platform(jax.config.jax_platforms)
  runtime.configure(config, expected)
  with runtime.quiet_tensorflow_import():
    import tensorflow as tf
    from covid_jax import reporting, train
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  tf.config.set_visible_devices([], 'GPU')
  if FLAGS.multihost:
    jax.distributed.initialize(*(FLAGS[name].value for name in _CLUSTER_FLAGS))
  logging.info('JAX process %d of %d; local devices: %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  device = jax.devices()[0]
  logging.info('Global devices: %d x %s', jax.device_count(), device.platform)
  _warn_if_unexpected(config, expected, device)
  try:
    result = train.train_and_evaluate(config, FLAGS.workdir)
  except train.USER_ERRORS as e:
    raise SystemExit(f'error: {e}') from None
  if jax.process_index() == 0:
    print(reporting.print_metrics_table(result, title=f'test metrics (best epoch {result["best_epoch"]})'))
    print(f'Run directory: {FLAGS.workdir} (report.md first; test_metrics.json, predictions/, the plots, '
          'tensorboard/)')


def _warn_if_unexpected(config: ml_collections.ConfigDict, expected: str, device: jax.Device) -> None:
  """Host-memory retention was set before the backend started, for the platform expected then: say so if it differs."""
  if (expected == 'cpu') != (device.platform == 'cpu'):
    logging.warning('freed host memory was %s expecting %s, but JAX runs on %s: set '
                    '--config.retain_freed_host_memory to choose', 'kept' if config.retain_freed_host_memory
                    else 'returned', expected, device.platform)


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main)
