"""The backend's choice of op formulations: the one place in covid_jax.models that looks at the backend.

Several ops have exact formulations whose speed depends on the backend:
XLA:CPU runs some of its native kernels (a kernel gradient over many pixels,
a convolution over few input channels, a grouped convolution with one channel
per group, the gradient of reduce_window max pooling) far slower than the same
computation written as matmuls over patches, broadcast products, shifted slices
or strided slices, while GPUs and TPUs have fast native kernels. The models
take a `Formulations` and pass each field to its op; they never ask which
backend runs them. benchmarks/BENCHMARKS.md ("Formulation choices") holds the
measurements behind each choice.
"""

import dataclasses

import jax

# The formulations of each op. 'by_size' (convolutions) and 'by_overlap' (pooling) choose per layer at trace
# time, by the rules in conv.py and pooling.py; the others force one formulation.
CONV = ('by_size', 'native', 'im2col', 'products')
POINTWISE = ('by_size', 'matmul', 'blocks')
DEPTHWISE = ('shifted', 'grouped')
POOLING = ('strided_slices', 'reduce_window', 'by_overlap')
ALLOWED: dict[str, tuple[str | bool, ...]] = {
    'conv': CONV, 'pointwise': POINTWISE, 'depthwise': DEPTHWISE, 'pooling': POOLING,
    'separate_update': (True, False),
}


def check(field: str, value: str | bool) -> str | bool:
  """Returns `value` if it is one of `field`'s formulations; raises ValueError naming the allowed ones otherwise."""
  if field not in ALLOWED:
    raise ValueError(f'Unknown formulation field {field!r}; known: {sorted(ALLOWED)}')
  allowed = ALLOWED[field]
  # bool is an int: require the type as well, so that 1 does not pass for True.
  if not any(value == a and type(value) is type(a) for a in allowed):
    raise ValueError(f'Unknown {field} formulation {value!r}; known: {allowed}')
  return value


@dataclasses.dataclass(frozen=True)
class Formulations:
  """How each op is written on the backend that runs the model (frozen and hashable: a Flax module field)."""

  conv: str  # 'by_size' | 'native' | 'im2col' | 'products'
  pointwise: str  # 'by_size' | 'matmul' | 'blocks'
  depthwise: str  # 'shifted' | 'grouped'
  pooling: str  # 'strided_slices' | 'reduce_window' | 'by_overlap'
  separate_update: bool  # train step as two programs (gradients, then the optimiser update)

  def __post_init__(self):
    for field in dataclasses.fields(self):
      check(field.name, getattr(self, field.name))


# XLA:CPU: convolutions chosen by size (see conv.py), the depthwise convolution as shifted products, pools as
# strided slices, and the optimiser update compiled apart from the gradients.
CPU = Formulations(conv='by_size', pointwise='by_size', depthwise='shifted', pooling='strided_slices',
                   separate_update=True)
# GPU/TPU: XLA's native kernels, reduce_window only where pooling windows overlap (see pooling.py), one program.
ACCELERATOR = Formulations(conv='native', pointwise='matmul', depthwise='grouped', pooling='by_overlap',
                           separate_update=False)


def for_platform(platform: str, **forced: str | bool | None) -> Formulations:
  """CPU for 'cpu', ACCELERATOR for any other platform; `forced` values that are not None replace fields.

  Raises ValueError naming an unknown field or value and the allowed ones.
  """
  chosen = CPU if platform == 'cpu' else ACCELERATOR
  forced = {field: value for field, value in forced.items() if value is not None}
  for field, value in forced.items():
    check(field, value)
  return dataclasses.replace(chosen, **forced)


def for_default_backend() -> Formulations:
  """`for_platform` of JAX's default backend."""
  return for_platform(jax.default_backend())
