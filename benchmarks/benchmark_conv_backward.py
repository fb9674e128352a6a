"""Where a convolution's train step goes: forward, input gradient and kernel gradient, XLA against TensorFlow.

  python -m benchmarks.benchmark_conv_backward --batch_size 8

For every distinct 3x3 convolution of VGG16 at 224 px, times the three
convolutions a train step runs (the forward pass, the gradient with respect to
the input, the gradient with respect to the kernel) in jaxlib's XLA (jitted
`lax.conv_general_dilated` and its VJPs) and in TensorFlow's kernels (`Conv2D`,
`Conv2DBackpropInput`, `Conv2DBackpropFilter`), taking turns, on the same
inputs; and the kernel gradient as covid_jax computes it on the CPU, as matmuls
over im2col patches (`covid_jax.models.conv`), against TensorFlow's again.
Prints a Markdown table of milliseconds and GFLOP/s (median of --repeats), and
checks that both frameworks compute the same gradients. Freed host memory is
kept for reuse, as covid_jax.main does by default.
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from covid_jax import runtime  # noqa: E402

runtime.retain_freed_memory()  # Before the JAX backend starts (see covid_jax.runtime).

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from jax import lax  # noqa: E402

from covid_jax.models import conv  # noqa: E402

# (height = width, input channels, output channels) of VGG16's convolutions at 224 px, each once.
VGG16_CONVOLUTIONS = ((224, 3, 64), (224, 64, 64), (112, 64, 128), (112, 128, 128), (56, 128, 256),
                      (56, 256, 256), (28, 256, 512), (28, 512, 512), (14, 512, 512))
OPS = ('forward', 'input gradient', 'kernel gradient', 'kernel gradient as im2col matmuls')


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def jax_ops(x: np.ndarray, kernel: np.ndarray, g: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
  x, kernel, g = jax.device_put((x, kernel, g))
  forward = jax.jit(_conv)
  d_input = jax.jit(lambda x, k, g: jax.vjp(lambda x: _conv(x, k), x)[1](g)[0])
  d_kernel = jax.jit(lambda x, k, g: jax.vjp(lambda k: _conv(x, k), k)[1](g)[0])
  d_kernel_im2col = jax.jit(lambda x, k, g: jax.vjp(lambda k: conv.conv2d(x, k, (1, 1), 'SAME', 'im2col'), k)[1](g)[0])
  return {'forward': lambda: forward(x, kernel).block_until_ready(),
          'input gradient': lambda: d_input(x, kernel, g).block_until_ready(),
          'kernel gradient': lambda: d_kernel(x, kernel, g).block_until_ready(),
          'kernel gradient as im2col matmuls': lambda: d_kernel_im2col(x, kernel, g).block_until_ready()}


def tensorflow_ops(x: np.ndarray, kernel: np.ndarray, g: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
  x, kernel, g = tf.constant(x), tf.constant(kernel), tf.constant(g)
  strides, padding = [1, 1, 1, 1], 'SAME'
  d_kernel = lambda: tf.raw_ops.Conv2DBackpropFilter(
      input=x, filter_sizes=tf.shape(kernel), out_backprop=g, strides=strides, padding=padding).numpy()
  return {
      'forward': lambda: tf.nn.conv2d(x, kernel, strides, padding).numpy(),
      'input gradient': lambda: tf.raw_ops.Conv2DBackpropInput(
          input_sizes=tf.shape(x), filter=kernel, out_backprop=g, strides=strides, padding=padding).numpy(),
      'kernel gradient': d_kernel,
      'kernel gradient as im2col matmuls': d_kernel,  # TensorFlow's one kernel gradient, timed again beside it.
  }


def measure(batch_size: int, size: int, c_in: int, c_out: int, repeats: int) -> dict[str, dict[str, float]]:
  """Median seconds per op and framework; the frameworks take turns on one op at a time."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch_size, size, size, c_in), np.float32)
  kernel = (rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype(np.float32)
  g = rng.standard_normal((batch_size, size, size, c_out), np.float32)
  frameworks = {'xla': jax_ops(x, kernel, g), 'tensorflow': tensorflow_ops(x, kernel, g)}
  seconds: dict[str, dict[str, float]] = {name: {} for name in frameworks}
  for op in OPS:
    results = {name: np.asarray(ops[op]()) for name, ops in frameworks.items()}  # Warm-up (and compile).
    error = np.max(np.abs(results['xla'] - results['tensorflow'])) / np.max(np.abs(results['tensorflow']))
    if error > 1e-4:
      raise AssertionError(f'{op} at {size}x{size}x{c_in}->{c_out}: XLA and TensorFlow differ by {error:.1e}')
    samples: dict[str, list[float]] = {name: [] for name in frameworks}
    for _ in range(repeats):
      for name, ops in frameworks.items():
        start = time.perf_counter()
        ops[op]()
        samples[name].append(time.perf_counter() - start)
    for name in frameworks:
      seconds[name][op] = statistics.median(samples[name])
  return seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  print('| convolution | ' + ' | '.join(f'{op}: XLA / TF' for op in OPS) + ' |')
  print('|---' * (1 + len(OPS)) + '|')
  for size, c_in, c_out in VGG16_CONVOLUTIONS:
    seconds = measure(args.batch_size, size, c_in, c_out, args.repeats)
    flops = 2 * args.batch_size * size * size * 9 * c_in * c_out
    cells = [f'{1e3 * seconds["xla"][op]:.0f} / {1e3 * seconds["tensorflow"][op]:.0f} ms '
             f'({flops / seconds["xla"][op] / 1e9:.0f} / {flops / seconds["tensorflow"][op] / 1e9:.0f} GFLOP/s)'
             for op in OPS]
    print(f'| {size}x{size}x{c_in} -> {c_out} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
