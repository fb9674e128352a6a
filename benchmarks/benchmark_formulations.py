"""Which formulation of an op is fast on this backend: the models' choices, timed side by side.

  python -m benchmarks.benchmark_formulations --batch_size 8 --dtype float32

covid_jax writes six ops in a formulation chosen for speed, not the textbook one
(covid_jax/models/formulations.py chooses per backend; benchmarks/BENCHMARKS.md,
"Formulation choices", says why):

  depthwise  'shifted', a sum of k*k shifted products (CPU), against
             'grouped', a grouped convolution (GPU/TPU)               models/depthwise.py
  max pool   maxima of 'strided_slices' (CPU, and elsewhere where windows
             do not overlap), against 'reduce_window'                models/pooling.py
  avg pool   sums of strided slices (chosen as the max pool's are),
             against reduce_window                                   models/pooling.py
  1x1 conv   a matmul over channels (everywhere), its kernel gradient by
             'blocks' of pixels (CPU, from a size of output) or XLA's
             ('matmul'), against a 1x1 'convolution'                  models/conv.py
  3x3 conv   the kernel gradient as 'im2col' matmuls (CPU, from a size
             of gradient), against XLA's 'native' one                 models/conv.py
  rgb conv   the first layer's forward pass as broadcast 'products' (CPU,
             up to a number of products per output value), against
             XLA's 'native' convolution                              models/conv.py

At shapes the backbones run, each formulation is jitted on the default backend and
timed forward and forward + backward (gradients of the input and the kernel), the
median of --repeats; the formulations take turns. They must agree at HIGHEST
precision, relative to the largest value of each output (output, input gradient,
kernel gradient; the JSON rows hold all three), to 1e-4 in float32 and 1e-1 in
bfloat16 (8 bits: a formulation that accumulates in it is off by a few percent, a
wrong one by far more). Max pools are compared in float32 on inputs with no two
values equal: at a tie each formulation may route the gradient its own way.
Prints a Markdown table that marks the formulation the models choose on this
backend (formulations.for_default_backend(), resolved per case by the rules in
conv.py and pooling.py) and the faster one; --json writes the rows.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from covid_jax.models import conv, depthwise, formulations, pooling, windows

# (where, height = width, channels, kernel size, stride) of depthwise convolutions NASNetLarge runs at 331 px.
DEPTHWISE_CASES = (('nasnet_large stem', 165, 42, 7, 2), ('nasnet_large stem', 165, 42, 5, 2),
                   ('nasnet_large block 1', 42, 168, 5, 1), ('nasnet_large block 1', 42, 168, 3, 1),
                   ('nasnet_large block 2', 21, 336, 5, 1), ('nasnet_large block 3', 11, 672, 3, 1))
# (where, height = width, channels, window, stride) of VALID max pools.
POOL_CASES = (('vgg16 pool 1', 224, 64, 2, 2), ('vgg16 pool 2', 112, 128, 2, 2), ('resnet50 stem', 114, 64, 3, 2))
# (where, height = width, channels, stride, padding) of NASNetLarge's 3x3 average pools at 331 px.
AVG_POOL_CASES = (('nasnet_large stem 1', 167, 42, 2, 'VALID'), ('nasnet_large block 1', 42, 168, 1, 'SAME'),
                  ('nasnet_large block 3', 11, 672, 1, 'SAME'))
# (where, height = width, input channels, output channels) of 1x1 convolutions.
POINTWISE_CASES = (('resnet50 stage 1', 56, 64, 256), ('resnet50 stage 1', 56, 256, 64),
                   ('resnet50 stage 3', 14, 1024, 256), ('nasnet_large block 1', 42, 168, 168))
# (where, height = width, input channels, output channels) of SAME 3x3 convolutions.
CONV_CASES = (('vgg16 block 1', 224, 64, 64), ('vgg16 block 2', 112, 128, 128), ('vgg16 block 4', 28, 512, 512),
              ('resnet50 stage 1', 56, 64, 64))
# (where, height = width, window, stride, padding, output channels) of the first layers, over RGB.
RGB_CONV_CASES = (('vgg16 block 1', 224, 3, 1, 'SAME', 64), ('nasnet_mobile stem', 224, 3, 2, 'VALID', 32),
                  ('nasnet_large stem', 331, 3, 2, 'VALID', 96), ('resnet50 stem', 224, 7, 2, ((3, 3), (3, 3)), 64))
TOLERANCE = {'float32': 1e-4, 'bfloat16': 1e-1}


def depthwise_formulations(stride: int) -> dict[str, Callable]:
  return {name: (lambda x, k, name=name: depthwise.depthwise_conv(x, k, (stride, stride), 'SAME', name))
          for name in ('shifted', 'grouped')}


def pool_formulations(window: int, stride: int) -> dict[str, Callable]:
  return {name: (lambda x, _, name=name: pooling.max_pool(x, window, stride, name))
          for name in ('strided_slices', 'reduce_window')}


def avg_pool_formulations(stride: int, padding: str) -> dict[str, Callable]:
  return {name: (lambda x, _, name=name: pooling.avg_pool(x, 3, stride, padding, name))
          for name in ('strided_slices', 'reduce_window')}


def pointwise_formulations() -> dict[str, Callable]:
  def convolution(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return {'matmul': lambda x, k: jnp.dot(x, k[0, 0]), 'blocks': lambda x, k: conv.pointwise_conv_by_blocks(x, k[0, 0]),
          'convolution': convolution}


def conv_formulations(stride: int = 1, padding: windows.Padding = 'SAME',
                      names: tuple[str, str] = ('im2col', 'native')) -> dict[str, Callable]:
  return {name: (lambda x, k, name=name: conv.conv2d(x, k, (stride, stride), padding, name)) for name in names}


def forward_and_backward(fn: Callable) -> Callable:
  """(x, kernel, cotangent) -> the output and the gradients of x and kernel, as a train step needs them."""
  def run(x, kernel, g):
    y, vjp = jax.vjp(fn, x, kernel)
    return y, *vjp(g.astype(y.dtype))
  return run


def calls_per_sample(fn: Callable[[], object]) -> int:
  """Warms `fn` up and returns how many calls make a ~10 ms sample, so dispatch does not dominate short ones."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return max(1, int(0.01 / max(time.perf_counter() - start, 1e-6)))


def seconds_per_call(fn: Callable[[], object], calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    result = fn()
  jax.block_until_ready(result)
  return (time.perf_counter() - start) / calls


OUTPUTS = ('output', 'input gradient', 'kernel gradient')  # What forward_and_backward returns, in order.


def relative_errors(a: Sequence[jax.Array], b: Sequence[jax.Array]) -> dict[str, float]:
  """Per output (OUTPUTS): the largest difference over the largest magnitude."""
  return {name: float(np.max(np.abs(np.float64(u) - np.float64(v))) / max(np.max(np.abs(np.float64(v))), 1e-30))
          for name, u, v in zip(OUTPUTS, a, b)}


def distinct_values(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """float32 values in random order, no two equal: consecutive bit patterns from 1.0 up (below 2**31).

  Max pooling's gradient is ambiguous at a tie (each formulation may route it its own way), and
  25 million float32 normals held a tie within one window on a GPU.
  """
  count = int(np.prod(shape))
  bits = jax.random.permutation(key, count).astype(jnp.int32) + np.int32(0x3F800000)
  return lax.bitcast_convert_type(bits, jnp.float32).reshape(shape)


def measure_case(op: str, where: str, shapes: tuple, formulations: dict[str, Callable], chosen: str, dtype: str,
                 repeats: int) -> list[dict]:
  """The formulations of one case: agreement with the first, then forward and forward+backward times, taking turns."""
  x_shape, kernel_shape, y_shape = shapes
  keys = jax.random.split(jax.random.key(0), 3)
  x = distinct_values(keys[0], x_shape) if op == 'max pool' else jax.random.normal(keys[0], x_shape)
  inputs = (x, jax.random.normal(keys[1], kernel_shape) /
            np.sqrt(np.prod(kernel_shape[:-1])), jax.random.normal(keys[2], y_shape))
  x, kernel, g = (a.astype(dtype) for a in inputs)
  checked = [a.astype('float32' if op == 'max pool' else dtype) for a in inputs]
  with jax.default_matmul_precision('highest'):
    results = {name: jax.jit(forward_and_backward(fn))(*checked) for name, fn in formulations.items()}
  reference, *others = results.values()
  comparisons = [relative_errors(other, reference) for other in others]
  errors = {output: max(c[output] for c in comparisons) for output in OUTPUTS}  # The case's, on each of its rows.
  calls = {}
  for name, fn in formulations.items():
    forward, both = jax.jit(fn), jax.jit(forward_and_backward(fn))
    calls[name] = {'forward': lambda f=forward: f(x, kernel), 'forward_backward': lambda f=both: f(x, kernel, g)}
  seconds: dict[str, dict[str, list[float]]] = {name: {} for name in formulations}
  for part in ('forward', 'forward_backward'):
    per_sample = {name: calls_per_sample(calls[name][part]) for name in formulations}
    for name in formulations:
      seconds[name][part] = []
    for _ in range(repeats):
      for name in formulations:
        seconds[name][part].append(seconds_per_call(calls[name][part], per_sample[name]))
  rows = [{'op': op, 'where': where, 'input_shape': list(x_shape), 'kernel_shape': list(kernel_shape),
           'dtype': dtype, 'backend': jax.default_backend(), 'formulation': name, 'chosen': name == chosen,
           'forward_ms': 1e3 * statistics.median(seconds[name]['forward']),
           'forward_backward_ms': 1e3 * statistics.median(seconds[name]['forward_backward']),
           'error': max(errors.values()), 'errors': errors}
          for name in formulations]
  fastest = min(rows, key=lambda r: r['forward_backward_ms'])
  for row in rows:
    row['fastest'] = row is fastest
  return rows


Case = tuple[str, str, tuple, dict[str, Callable], str]  # See `all_cases`.


def all_cases(batch_size: int, scale: int = 1, dtype: str = 'float32',
              chosen: formulations.Formulations | None = None) -> list[Case]:
  """(op, where, (x, kernel, output) shapes, formulations, the models' choice) of every case.

  `scale` divides the image sizes; `dtype` is the one the cases run in; `chosen` is what the models are
  given (default: the default backend's), resolved for each case by the rules of conv.py and pooling.py.
  """
  chosen = chosen or formulations.for_default_backend()

  def shrink(cases):
    return [(where, max(size // scale, 8), *rest) for where, size, *rest in cases]

  cases = []
  for where, size, c, k, s in shrink(DEPTHWISE_CASES):
    out = -(-size // s)
    cases.append(('depthwise', f'{where} {k}x{k}/{s}', ((batch_size, size, size, c), (k, k, 1, c),
                                                         (batch_size, out, out, c)), depthwise_formulations(s),
                  chosen.depthwise))
  for where, size, c, w, s in shrink(POOL_CASES):
    out = (size - w) // s + 1
    cases.append(('max pool', f'{where} {w}x{w}/{s}', ((batch_size, size, size, c), (1,),
                                                        (batch_size, out, out, c)), pool_formulations(w, s),
                  pooling.resolve(chosen.pooling, w, s)))
  for where, size, c, s, padding in shrink(AVG_POOL_CASES):
    out = -(-size // s) if padding == 'SAME' else (size - 3) // s + 1
    cases.append(('avg pool', f'{where} 3x3/{s} {padding}', ((batch_size, size, size, c), (1,),
                                                             (batch_size, out, out, c)),
                  avg_pool_formulations(s, padding), pooling.resolve(chosen.pooling, 3, s)))
  for where, size, c_in, c_out in shrink(POINTWISE_CASES):
    output_bytes = batch_size * size * size * c_out * jnp.dtype(dtype).itemsize
    cases.append(('1x1 conv', f'{where} {c_in}->{c_out}', ((batch_size, size, size, c_in), (1, 1, c_in, c_out),
                                                           (batch_size, size, size, c_out)), pointwise_formulations(),
                  conv.resolve_pointwise(chosen.pointwise, output_bytes)))
  for where, size, c_in, c_out in shrink(CONV_CASES):
    x_shape, kernel_shape = (batch_size, size, size, c_in), (3, 3, c_in, c_out)
    flops = conv.kernel_gradient_flops(np.prod(x_shape[:3]), kernel_shape)  # SAME, stride 1: output size = input's.
    cases.append(('3x3 conv', f'{where} {c_in}->{c_out}', (x_shape, kernel_shape, (batch_size, size, size, c_out)),
                  conv_formulations(), conv.resolve(chosen.conv, flops, 9 * c_in)))
  for where, size, k, s, padding, c_out in shrink(RGB_CONV_CASES):
    x_shape, kernel_shape = (batch_size, size, size, 3), (k, k, 3, c_out)
    pads = windows.explicit_pads((size, size), (k, k), (s, s), padding)
    out = (size + sum(pads[0]) - k) // s + 1
    flops = conv.kernel_gradient_flops(batch_size * out * out, kernel_shape)
    cases.append(('rgb conv', f'{where} {k}x{k}/{s}', (x_shape, kernel_shape, (batch_size, out, out, c_out)),
                  conv_formulations(s, padding, ('products', 'native')), conv.resolve(chosen.conv, flops, k * k * 3)))
  return cases


def markdown(rows: list[dict], batch_size: int) -> str:
  device = jax.devices()[0]
  lines = [f'Backend {jax.default_backend()} ({device.device_kind}), batch {batch_size}, '
           f'{rows[0]["dtype"] if rows else ""}; * = the models\' choice here, ! = faster (forward + backward).', '',
           '| op | where | input | formulation | forward ms | fwd+bwd ms | error |',
           '| --- | --- | --- | --- | ---: | ---: | ---: |']
  for r in rows:
    marks = ('*' if r['chosen'] else '') + ('!' if r['fastest'] else '')
    lines.append(f'| {r["op"]} | {r["where"]} | {"x".join(map(str, r["input_shape"]))} | {r["formulation"]}{marks} '
                 f'| {r["forward_ms"]:.3f} | {r["forward_backward_ms"]:.3f} | {r["error"]:.1e} |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--dtype', choices=tuple(TOLERANCE), default='float32')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--ops', default='depthwise,max pool,avg pool,1x1 conv,3x3 conv,rgb conv',
                      help='comma-separated subset')
  parser.add_argument('--scale', type=int, default=1, help='divide every spatial size by this (for quick checks)')
  parser.add_argument('--json', help='also write the rows here')
  args = parser.parse_args(argv)
  ops = args.ops.split(',')
  rows = []
  for op, where, shapes, formulations, chosen in all_cases(args.batch_size, args.scale, args.dtype):
    if op not in ops:
      continue
    rows += measure_case(op, where, shapes, formulations, chosen, args.dtype, args.repeats)
    print(f'{op} {where}: ' + ', '.join(f'{r["formulation"]} {r["forward_backward_ms"]:.2f} ms'
                                         for r in rows[-2:]), file=sys.stderr, flush=True)
  print(markdown(rows, args.batch_size))
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=1))
  disagree = list({(r['op'], r['where']): r for r in rows if r['error'] > TOLERANCE[args.dtype]}.values())
  if disagree:  # After the table, so a long run's timings are not lost.
    raise SystemExit('formulations disagree (> {}): {}'.format(
        TOLERANCE[args.dtype], '; '.join(f'{r["op"]} {r["where"]} {r["error"]:.1e} ('
                                         + ', '.join(f'{k} {v:.1e}' for k, v in r['errors'].items()) + ')'
                                         for r in disagree)))
  return rows


if __name__ == '__main__':
  main()
