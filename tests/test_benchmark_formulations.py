"""benchmarks/benchmark_formulations.py: every case timed in both formulations, and a wrong one caught."""

import jax
import numpy as np
import pytest
from jax import lax

from benchmarks import benchmark_formulations

_QUICK = ['--batch_size', '1', '--scale', '16', '--repeats', '1', '--ops', 'max pool']


def test_times_both_formulations_of_every_case():
  rows = benchmark_formulations.main(_QUICK)
  cases = {}
  for row in rows:
    cases.setdefault(row['where'], []).append(row)
  assert len(cases) == len(benchmark_formulations.POOL_CASES)
  for where, pair in cases.items():
    assert {r['formulation'] for r in pair} == {'strided_slices', 'reduce_window'}, where
    assert sum(r['chosen'] for r in pair) == 1 and sum(r['fastest'] for r in pair) == 1
    assert all(r['forward_ms'] > 0 and r['forward_backward_ms'] > 0 for r in pair)
    # Max pooling selects inputs: the formulations differ only in the order they add overlapping windows' cotangents.
    assert pair[0]['errors']['output'] == 0.0 and pair[0]['error'] < 1e-6


def test_max_pool_inputs_hold_no_ties_and_are_shuffled():
  values = np.asarray(benchmark_formulations.distinct_values(jax.random.key(0), (4, 30, 30, 3)))
  assert values.dtype == np.float32 and values.shape == (4, 30, 30, 3)
  assert np.unique(values).size == values.size
  assert np.isfinite(values).all() and values.min() == 1.0
  flat = values.ravel()
  assert not (np.all(np.diff(flat) > 0) or np.all(np.diff(flat) < 0))


def test_a_formulation_that_computes_something_else_fails(monkeypatch):
  right = benchmark_formulations.pool_formulations

  def wrong(window, stride):  # A window one pixel too small: same output shape, other values.
    forms = right(window, stride)
    forms['reduce_window'] = lambda x, _: lax.reduce_window(
        x[:, :-1, :-1], -float('inf'), lax.max, (1, window - 1, window - 1, 1), (1, stride, stride, 1), 'VALID')
    return forms
  monkeypatch.setattr(benchmark_formulations, 'pool_formulations', wrong)
  with pytest.raises(SystemExit, match=r'formulations disagree.*\(output \d.*\)'):
    benchmark_formulations.main(_QUICK)


def test_times_both_kernel_gradients_of_the_3x3_convolutions():
  rows = benchmark_formulations.main(['--batch_size', '1', '--scale', '16', '--repeats', '1', '--ops', '3x3 conv'])
  assert len(rows) == 2 * len(benchmark_formulations.CONV_CASES)
  assert {r['formulation'] for r in rows} == {'im2col', 'native'}
  assert all(r['error'] <= 1e-4 for r in rows)  # Scaled down, every gradient is small: XLA's own is chosen.
  # Each output is compared on its own; the error is the largest.
  assert all(set(r['errors']) == {'output', 'input gradient', 'kernel gradient'} for r in rows)
  assert all(r['error'] == max(r['errors'].values()) for r in rows)
  assert all(r['errors']['output'] == 0.0 for r in rows)  # One convolution computes both formulations' values.
  assert {r['formulation'] for r in rows if r['chosen']} == {'native'}


def test_times_both_average_pools_of_nasnet():
  rows = benchmark_formulations.main(['--batch_size', '1', '--scale', '8', '--repeats', '1', '--ops', 'avg pool'])
  assert len(rows) == 2 * len(benchmark_formulations.AVG_POOL_CASES)
  assert {r['formulation'] for r in rows} == {'strided_slices', 'reduce_window'}
  assert {r['formulation'] for r in rows if r['chosen']} == {'strided_slices'}  # On this CPU.
  assert all(r['error'] <= 1e-6 for r in rows)


def test_times_both_forward_passes_of_the_first_layers():
  rows = benchmark_formulations.main(['--batch_size', '1', '--scale', '16', '--repeats', '1', '--ops', 'rgb conv'])
  assert len(rows) == 2 * len(benchmark_formulations.RGB_CONV_CASES)
  assert {r['formulation'] for r in rows} == {'products', 'native'}
  assert all(r['error'] <= 1e-5 for r in rows)
  assert all(r['errors']['input gradient'] == 0.0 for r in rows)  # XLA's gradients in both formulations.
  # On this CPU: the 3x3 layers over RGB (27 products per value) take products, ResNet50's 7x7 stem does not.
  chosen = {r['where'].split(' ')[0]: r['formulation'] for r in rows if r['chosen']}
  assert chosen == {'vgg16': 'products', 'nasnet_mobile': 'products', 'nasnet_large': 'products',
                    'resnet50': 'native'}


def test_times_three_formulations_of_the_1x1_convolutions():
  rows = benchmark_formulations.main(['--batch_size', '1', '--scale', '8', '--repeats', '1', '--ops', '1x1 conv'])
  assert len(rows) == 3 * len(benchmark_formulations.POINTWISE_CASES)
  assert {r['formulation'] for r in rows} == {'matmul', 'blocks', 'convolution'}
  assert {r['formulation'] for r in rows if r['chosen']} == {'matmul'}  # Scaled down, every output is small.
  assert all(r['error'] <= 1e-4 for r in rows)
