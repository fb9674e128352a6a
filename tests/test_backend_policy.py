"""The backend's defaults (covid_jax.runtime): what `auto` means on each platform, as the issue and the study's
mixed precision say; the platform foreseen before JAX starts; each program's compiler options, checked against
XLA's own option parser; and the run record of a resumed `auto` run."""

import logging
import types

import jax
import jax.numpy as jnp
import pytest

from configs import default
from covid_jax import model_init, runtime, steps, train, workdir_checks
from tests import runs


def _config(**values):
  config = default.get_config()
  config.update_from_flattened_dict(values)
  return config


@pytest.mark.parametrize('platform, dtype, want', [
    ('cpu', 'auto', 'float32'), ('gpu', 'auto', 'bfloat16'), ('tpu', 'auto', 'bfloat16'),
    ('gpu', 'float32', 'float32'), ('cpu', 'bfloat16', 'bfloat16'),  # An explicit value wins.
])
def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_the_cpu(platform, dtype, want):
  config = _config(dtype=dtype)
  runtime.apply_backend_defaults(config, platform)
  assert config.dtype == want


@pytest.mark.parametrize('platform, setting, want', [
    ('cpu', None, True), ('gpu', None, False), ('tpu', None, False), ('accelerator', None, False),
    ('gpu', True, True), ('cpu', False, False),  # An explicit value wins.
])
def test_freed_host_memory_is_kept_on_the_cpu_only_unless_set(platform, setting, want):
  assert runtime.retains_host_memory(_config(retain_freed_host_memory=setting), platform) is want


@pytest.mark.parametrize('jax_platforms, plugins, want', [
    ('cpu', ['jax_plugins.xla_cuda12'], 'cpu'),  # JAX's own setting wins over an installed plugin.
    ('cuda,cpu', [], 'gpu'), ('tpu', [], 'tpu'), ('rocm', [], 'gpu'),
    (None, ['jax_plugins.xla_cuda13'], 'accelerator'), (None, ['libtpu'], 'accelerator'), (None, [], 'cpu'),
])
def test_the_platform_is_foreseen_from_jax_platforms_then_the_plugins(jax_platforms, plugins, want):
  assert runtime.expected_platform(jax_platforms, plugins) == want


def test_plugins_are_found_where_jax_looks_for_them(tmp_path, monkeypatch):
  """A module under a `jax_plugins` namespace package on the path is a plugin, as JAX's discovery has it."""
  assert not [p for p in runtime.accelerator_plugins() if p.startswith('jax_plugins.')]  # The CPU venv has none.
  (tmp_path / 'jax_plugins' / 'xla_example').mkdir(parents=True)
  (tmp_path / 'jax_plugins' / 'xla_example' / '__init__.py').write_text('')
  monkeypatch.syspath_prepend(str(tmp_path))
  assert 'jax_plugins.xla_example' in runtime.accelerator_plugins()


_NO_TRITON_GEMM = {'xla_gpu_enable_triton_gemm': False}


@pytest.mark.parametrize('program, platform, model, want', [
    ('train_step', 'gpu', 'nasnet_large', _NO_TRITON_GEMM), ('eval_step', 'gpu', 'nasnet_mobile', _NO_TRITON_GEMM),
    ('train_step', 'gpu', 'nasnet', _NO_TRITON_GEMM),
    ('train_step', 'gpu', 'resnet50', None), ('run_once', 'gpu', 'nasnet_large', None),  # Other GPU programs.
    ('train_step', 'cpu', 'nasnet_large', None), ('train_step', 'tpu', 'nasnet_large', None),  # Off the GPU.
    ('run_once', 'cpu', 'vgg16', {'xla_backend_optimization_level': 1}), ('train_step', 'cpu', 'vgg16', None),
])
def test_compiler_options_reach_only_the_programs_that_need_them(program, platform, model, want):
  assert runtime.compiler_options(program, platform, model) == want


def test_every_option_is_one_xla_accepts_and_a_misspelt_one_is_refused():
  """XLA parses each option by name when it compiles (any backend's options, on the CPU too)."""
  step = jax.jit(lambda x: x @ x).lower(jnp.ones((4, 4)))
  for *_, options in runtime.PROGRAM_OPTIONS:
    assert float(step.compile(compiler_options=options)(jnp.ones((4, 4)))[0, 0]) == 4.0
  with pytest.raises(Exception, match='No such compile option'):
    step.compile(compiler_options={'xla_gpu_enable_triton_gem': False})
  with pytest.raises(ValueError, match='Unknown program'):
    runtime.compiler_options('train', 'gpu', 'nasnet')


def test_a_resumed_auto_run_matches_itself_and_not_another_backends_dtype():
  """The record holds the resolved dtype: an old float32 run resumes under auto on the CPU, not on a GPU."""
  saved = _config(dtype='float32', data_dir='/nonexistent')
  for platform, same in (('cpu', True), ('gpu', False)):
    current = _config(data_dir='/nonexistent')
    runtime.apply_backend_defaults(current, platform)
    if same:
      workdir_checks.check_same_run(workdir_checks.run_record(saved), workdir_checks.run_record(current), 'RUN')
    else:
      with pytest.raises(workdir_checks.WorkdirError, match="dtype: 'float32' in the saved run, 'bfloat16' now"):
        workdir_checks.check_same_run(workdir_checks.run_record(saved), workdir_checks.run_record(current), 'RUN')


def test_the_start_logs_the_backend_dtype_and_formulations_once(caplog):
  config = _config()
  gpu = types.SimpleNamespace(platform='gpu', device_kind='NVIDIA H100 80GB HBM3')
  config.retain_freed_host_memory = runtime.retains_host_memory(config, 'accelerator')
  with caplog.at_level(logging.INFO, logger='absl'):  # Whatever verbosity an earlier test left absl at.
    train.settle_backend(config, gpu)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Backend')]
  assert lines == ['Backend gpu (NVIDIA H100 80GB HBM3): dtype bfloat16, freed host memory returned, formulations '
                   'conv=native, pointwise=matmul, depthwise=grouped, pooling=by_overlap, separate_update=False']
  assert config.dtype == 'bfloat16'


_BOGUS = {'xla_option_that_does_not_exist': True}  # XLA refuses an unknown option: it shows where options go.


@pytest.fixture
def fresh_features_steps():
  steps.compile_features_step.cache_clear()
  yield
  steps.compile_features_step.cache_clear()


def test_compiler_options_reach_the_step_programs_of_the_named_backbones_only(built_dataset, tmp_path, monkeypatch,
                                                                               fresh_features_steps):
  data_dir, _ = built_dataset
  config = runs.tiny_config(data_dir)
  trainer = train.Trainer(config, str(tmp_path))
  variables = model_init.initial_variables(trainer.model, config, outline=trainer.outline)
  train_state = steps.replicate(trainer.new_state(variables, 0), trainer.mesh)
  batch = next(trainer.readers['train'].train_epoch(config.batch_size, 1, config.seed))
  eval_batch = next(trainer.readers['val'].eval_batches(config.eval_batch_size))

  def options_for(backbones):
    monkeypatch.setattr(runtime, 'PROGRAM_OPTIONS', tuple(
        ('cpu', program, backbones, _BOGUS) for program in ('train_step', 'eval_step')))
    steps.compile_features_step.cache_clear()
    train_fn, eval_fn = trainer.compile_steps(trainer.phases[0])
    return {'train step': lambda: train_fn(train_state, batch, jax.random.key(0)),
            'eval step': lambda: eval_fn(train_state, eval_batch),
            'features step': lambda: steps.compile_features_step(trainer.mesh, 'nasnet')(train_state, eval_batch)}

  for name, call in options_for(('nasnet',)).items():
    with pytest.raises(Exception, match='xla_option_that_does_not_exist'):
      call()
  options_for(('vgg16',))['eval step']()  # Another backbone's options stay out of this one's programs.
