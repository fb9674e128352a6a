"""The backend policy: which formulation each platform gets, forcing one, and the errors that name the choices."""

import dataclasses

import jax
import pytest

from covid_jax import models
from covid_jax.models import formulations, pooling


def test_cpu_and_accelerators_get_their_sets():
  assert formulations.for_platform('cpu') == formulations.CPU == formulations.Formulations(
      conv='by_size', pointwise='by_size', depthwise='shifted', pooling='strided_slices', separate_update=True)
  for platform in ('gpu', 'tpu', 'cuda', 'accelerator'):
    assert formulations.for_platform(platform) == formulations.ACCELERATOR == formulations.Formulations(
        conv='native', pointwise='matmul', depthwise='grouped', pooling='by_overlap', separate_update=False)
  assert formulations.for_default_backend() == formulations.for_platform(jax.default_backend())


def test_forced_values_replace_fields_and_none_keeps_them():
  got = formulations.for_platform('cpu', depthwise='grouped', pooling=None, separate_update=False)
  assert got == dataclasses.replace(formulations.CPU, depthwise='grouped', separate_update=False)
  assert formulations.for_platform('gpu', conv='im2col').conv == 'im2col'


@pytest.mark.parametrize('forced, named', [
    ({'depthwise': 'winograd'}, r"depthwise formulation 'winograd'; known: \('shifted', 'grouped'\)"),
    ({'separate_update': 'yes'}, r"separate_update formulation 'yes'; known: \(True, False\)"),
    ({'pooling': 'auto'}, r"pooling formulation 'auto'; known: \('strided_slices', 'reduce_window', 'by_overlap'\)"),
    ({'attention': 'flash'}, r"formulation field 'attention'; known: \['conv', 'depthwise', 'pointwise', 'pooling'"),
])
def test_unknown_field_or_value_is_named_with_the_allowed_ones(forced, named):
  with pytest.raises(ValueError, match=named):
    formulations.for_platform('cpu', **forced)


def test_a_formulations_value_is_checked_when_built():
  with pytest.raises(ValueError, match="conv formulation 'auto'"):
    dataclasses.replace(formulations.CPU, conv='auto')


@pytest.mark.parametrize('window, stride, want', [(3, 2, 'reduce_window'), (3, 1, 'reduce_window'),
                                                  (2, 2, 'strided_slices'), (3, 3, 'strided_slices')])
def test_accelerator_pools_by_overlap(window, stride, want):
  """reduce_window only where windows overlap; the CPU's strided slices everywhere."""
  assert pooling.resolve(formulations.ACCELERATOR.pooling, window, stride) == want
  assert pooling.resolve(formulations.CPU.pooling, window, stride) == 'strided_slices'


def test_create_backbone_passes_the_default_backends_formulations_unless_given():
  assert models.create_backbone('vgg16').formulations == formulations.for_default_backend()
  forced = formulations.for_platform('cpu', depthwise='grouped')
  assert models.create_backbone('nasnet_mobile', forced).formulations == forced
