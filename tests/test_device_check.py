"""scripts/device_check.sh's arguments and its helpers (benchmarks/device_check.py): the share of the card's peak,
the pins a host lacks (its own JAX and TensorFlow builds aside)."""

import subprocess

import pytest

from benchmarks import device_check
from tests import runs


@pytest.mark.parametrize('arguments, message', [
    ([], 'usage'), (['OUT', '--fast'], 'unknown option --fast'),
    (['OUT', '--wheels', '/nonexistent'], 'not a directory'),
])
def test_bad_arguments_exit_2_with_the_reason(arguments, message, tmp_path):
  child = subprocess.run(['bash', 'scripts/device_check.sh', *arguments], cwd=runs.ROOT, capture_output=True,
                         text=True)
  assert child.returncode == 2 and message in child.stderr


def test_the_share_of_peak_is_the_achieved_rate_over_the_data_sheets_peak():
  row = {'backbone': 'vgg16', 'image_size': 224, 'mode': 'train', 'batch_size': 32, 'framework': 'covid_jax',
         'images_per_s': 1000.0, 'gflops_per_s': 98_940.0}
  h100 = device_check.peak_share_table({'rows': [row]}, 'NVIDIA H100 80GB HBM3')
  assert '| vgg16@224 | train | 32 | covid_jax | 1,000.0 | 98,940 | 10.0% |' in h100  # 98.94 of 989.4 TFLOP/s.
  assert '| 98,940 |  |' in device_check.peak_share_table({'rows': [row]}, 'cpu')  # No peak known: no share.
  assert device_check.peak_tflops('NVIDIA H100 PCIe') == 756.0


def test_missing_pins_leave_out_the_hosts_own_builds(monkeypatch):
  monkeypatch.setattr(device_check, 'pins', lambda: {'flax': '0.12.8', 'no-such-package-here': '1.0', 'jax': '0.1',
                                                     'tensorflow-cpu': '2.21.0', 'jax-cuda12-plugin': '0.1'})
  assert device_check.missing() == ['no-such-package-here==1.0']
