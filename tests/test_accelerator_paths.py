"""The GPU/TPU code paths, run on the CPU: with the backend policy forced to the accelerator's choices, each
backbone and the one-program train step give the CPU choices' values (which other tests hold against Keras)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

from covid_jax import model_init, models, state, steps
from covid_jax.input_pipeline import AXIS
from covid_jax.models import formulations
from tests import runs

# The CPU's own choices, with the grouped depthwise form (its gradients compile several times faster here):
# the shifted and grouped forms are compared in tests/test_nasnet.py.
CPU = dataclasses.replace(formulations.for_platform('cpu'), depthwise='grouped')
ACCELERATOR = formulations.for_platform('gpu')


# NASNet's cells are compared in the step test below, within the whole classifier.
@pytest.mark.parametrize('name', ['vgg16', 'resnet50'])
def test_each_backbone_gives_the_cpu_choices_values_and_gradients(name):
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
  outputs = {}
  for which, chosen in (('cpu', CPU), ('accelerator', ACCELERATOR)):
    backbone = models.create_backbone(name, formulations=chosen)
    variables = jax.jit(backbone.init)(jax.random.key(0), images)

    def loss(params, backbone=backbone, variables=variables):
      features = backbone.apply({**variables, 'params': params}, images, train=False)
      return (features * features).mean(), features
    outputs[which] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  (loss_cpu, features_cpu), grads_cpu = outputs['cpu']
  (loss_acc, features_acc), grads_acc = outputs['accelerator']
  np.testing.assert_allclose(features_acc, features_cpu, rtol=1e-4, atol=1e-4 * np.abs(features_cpu).max())
  flat_cpu, flat_acc = traverse_util.flatten_dict(grads_cpu), traverse_util.flatten_dict(grads_acc)
  assert flat_acc.keys() == flat_cpu.keys()
  for path, grad in flat_cpu.items():
    np.testing.assert_allclose(flat_acc[path], grad, rtol=1e-3, atol=1e-4 * np.abs(grad).max() + 1e-12,
                               err_msg='/'.join(path))


@pytest.mark.slow
def test_the_one_program_accelerator_step_gives_the_two_program_cpu_steps_state(tmp_path):
  """One SGD step of the tiny NASNet classifier, BN statistics and dropout included (Adam's first step is about
  lr * sign(gradient), which turns rounding in a near-zero gradient into a whole step)."""
  config = runs.tiny_config(tmp_path, dtype='float32', freeze_backbone=False, optimizer='sgd')
  mesh = jax.make_mesh((1,), (AXIS,), devices=jax.devices()[:1])
  phase = state.make_phases(config)[0]
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  rng = np.random.default_rng(0)
  batch = jax.device_put({'image': rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32),
                          'label': np.array([0, 1, 1, 0], np.int32), 'mask': np.ones(4, bool)}, batch_sharding)
  results = {}
  for chosen in (CPU, ACCELERATOR):
    model = model_init.create_model(config, chosen)
    variables = model_init.initial_variables(model, config)
    start = steps.replicate(state.make_state(model, config, variables, phase, [], steps_per_epoch=10), mesh)
    train_fn, _ = steps.compile_steps(mesh, phase, config, chosen.separate_update)
    assert train_fn.separate_update is chosen.separate_update
    after, scores = train_fn(start, batch, jax.random.key(3))
    results[chosen.separate_update] = jax.device_get((after.params, after.batch_stats, scores))
  two_programs, one_program = results[True], results[False]
  np.testing.assert_allclose(one_program[2]['loss'], two_programs[2]['loss'], rtol=1e-5)
  for tree_cpu, tree_acc in zip(two_programs[:2], one_program[:2]):
    flat_cpu, flat_acc = traverse_util.flatten_dict(tree_cpu), traverse_util.flatten_dict(tree_acc)
    assert flat_acc.keys() == flat_cpu.keys()
    for path, value in flat_cpu.items():
      np.testing.assert_allclose(flat_acc[path], value, rtol=1e-4, atol=1e-5, err_msg='/'.join(path))
