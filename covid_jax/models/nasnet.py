"""NASNet-A (Zoph et al., CVPR 2018) in Flax, equal to keras.applications NASNet with include_top=False.

Every layer with weights is a top-level submodule named exactly as its Keras
layer, so Keras weights port by name. The two cell types are tables of branch
pairs, read off the paper's Figure 4 and Keras's `_normal_a_cell` /
`_reduction_a_cell`; one interpreter builds both.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from covid_jax.models.batch_norm import BatchNorm
from covid_jax.models.conv import Conv, PointwiseConv
from covid_jax.models.depthwise import DepthwiseConv
from covid_jax.models.formulations import ACCELERATOR, Formulations
from covid_jax.models.pooling import avg_pool, max_pool
from covid_jax.models.windows import Padding, correct_pad, zero_pad

LARGE = dict(penultimate_filters=4032, num_blocks=6, stem_block_filters=96, skip_reduction=True, filter_multiplier=2)
# NASNetMobile's cells run unrolled: with 3 cells per block, the scan's shorter compile does not pay for its
# slower step (see NASNet).
MOBILE = dict(penultimate_filters=1056, num_blocks=4, stem_block_filters=32, skip_reduction=False, filter_multiplier=2,
              scan_cells=False)

_BN_MOMENTUM = 0.9997
_BN_EPSILON = 1e-3
_HE_NORMAL = nn.initializers.he_normal()  # Keras's initializer for NASNet's plain convolutions.
_SCAN_ID = 'scan'  # Block id of the template cell's layers: every Keras cell layer name ends in its cell's id.


def _avg_pool_same(x: jax.Array, formulations: Formulations) -> jax.Array:
  """3x3 stride-1 'same' average, not counting the padding (as Keras)."""
  return avg_pool(x, 3, 1, 'SAME', formulations.pooling)


def _avg_pool_reduce(x: jax.Array, formulations: Formulations) -> jax.Array:
  """3x3 stride-2 average over explicit zero padding (the zeros count)."""
  return avg_pool(zero_pad(x, correct_pad(x.shape, 3)), 3, 2, 'VALID', formulations.pooling)


def _max_pool_reduce(x: jax.Array, formulations: Formulations) -> jax.Array:
  """3x3 stride-2 max over explicit zero padding: zeros can win, unlike Flax's -inf padding."""
  return max_pool(zero_pad(x, correct_pad(x.shape, 3)), 3, 2, formulations.pooling)


def _identity(x: jax.Array, formulations: Formulations) -> jax.Array:
  del formulations  # Unused: every op takes them.
  return x


class _Sep(NamedTuple):
  """A branch that is a separable-conv block, named '<cell>_<name>_<block_id>' as in Keras."""

  kernel: int
  name: str
  stride: int = 1


class _Cell(NamedTuple):
  """A cell: blocks each summing two (input, op) branches, then a concat of named outputs.

  Inputs and outputs are 'h' (the cell input after relu-conv-bn), 'p' (the
  previous cell's input, adjusted to match), or k (the output of block k,
  counted from 1). An op is a `_Sep` or a parameter-free function of the
  tensor and the model's `Formulations`.
  """

  name: str
  blocks: tuple[tuple[tuple[str | int, _Sep | Callable], ...], ...]
  outputs: tuple[str | int, ...]


_NORMAL_CELL = _Cell(
    name='normal',
    blocks=(
        (('h', _Sep(5, 'left1')), ('p', _Sep(3, 'right1'))),
        (('p', _Sep(5, 'left2')), ('p', _Sep(3, 'right2'))),
        (('h', _avg_pool_same), ('p', _identity)),
        (('p', _avg_pool_same), ('p', _avg_pool_same)),
        (('h', _Sep(3, 'left5')), ('h', _identity)),
    ),
    outputs=('p', 1, 2, 3, 4, 5),
)

_REDUCTION_CELL = _Cell(
    name='reduction',
    blocks=(
        (('h', _Sep(5, 'left1', stride=2)), ('p', _Sep(7, 'right1', stride=2))),
        (('h', _max_pool_reduce), ('p', _Sep(7, 'right2', stride=2))),
        (('h', _avg_pool_reduce), ('p', _Sep(5, 'right3', stride=2))),
        ((2, _identity), (1, _avg_pool_same)),
        ((1, _Sep(3, 'left4')), ('h', _max_pool_reduce)),
    ),
    outputs=(2, 3, 4, 5),
)


class SeparableConv(nn.Module):
  """Keras SeparableConv2D without bias: children `depthwise` and `pointwise` (a 1x1 conv)."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = 'SAME'
  formulations: Formulations = ACCELERATOR  # Its depthwise and pointwise fields write the two convolutions.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = DepthwiseConv(self.kernel_size, self.strides, self.padding, formulation=self.formulations.depthwise,
                      dtype=self.dtype, name='depthwise')(x)
    return PointwiseConv(self.features, formulation=self.formulations.pointwise, dtype=self.dtype,
                         name='pointwise')(x)


class _Layers(nn.Module):
  """The layer builders of NASNet's cells, shared by the whole model and by one scanned cell.

  Every layer is created directly under the module, named exactly as its Keras layer.
  """

  formulations: Formulations = ACCELERATOR  # How each op is written; create_backbone passes the backend's.
  dtype: Any = jnp.float32
  axis_name: str | None = None  # Device axis over which training-mode BN statistics are averaged.
  bn_momentum: float = _BN_MOMENTUM  # Keras's; lower it to train from scratch in few steps.

  def _conv(self, x: jax.Array, filters: int, name: str) -> jax.Array:
    return PointwiseConv(filters, formulation=self.formulations.pointwise, dtype=self.dtype, kernel_init=_HE_NORMAL,
                         name=name)(x)

  def _bn(self, x: jax.Array, name: str, train: bool) -> jax.Array:
    return BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=_BN_EPSILON,
                     dtype=self.dtype, axis_name=self.axis_name, name=name)(x)

  def _separable_block(self, x: jax.Array, filters: int, kernel: int, stride: int, block_id: str,
                       train: bool) -> jax.Array:
    """Keras `_separable_conv_block`: twice relu -> separable conv -> BN; only the first may stride."""
    for i, s in ((1, stride), (2, 1)):
      x = nn.relu(x)
      padding = correct_pad(x.shape, kernel) if s == 2 else 'SAME'
      x = SeparableConv(filters, (kernel, kernel), (s, s), padding, formulations=self.formulations, dtype=self.dtype,
                        name=f'separable_conv_{i}_{block_id}')(x)
      x = self._bn(x, f'separable_conv_{i}_bn_{block_id}', train)
    return x

  def _adjust(self, p: jax.Array | None, ip: jax.Array, filters: int, block_id: str, train: bool) -> jax.Array:
    """Keras `_adjust_block`: brings the previous cell's input `p` to the size and width of `ip`."""
    if p is None:
      return ip
    if p.shape[2] != ip.shape[2]:  # Halve the size: two 1x1 convs on the even and the shifted odd pixels.
      p = nn.relu(p)
      even = p[:, ::2, ::2]
      odd = zero_pad(p[:, 1:, 1:], ((0, 1), (0, 1)))[:, ::2, ::2]
      p = jnp.concatenate([self._conv(even, filters // 2, f'adjust_conv_1_{block_id}'),
                           self._conv(odd, filters // 2, f'adjust_conv_2_{block_id}')], axis=-1)
    elif p.shape[-1] != filters:
      p = self._conv(nn.relu(p), filters, f'adjust_conv_projection_{block_id}')
    else:
      return p
    return self._bn(p, f'adjust_bn_{block_id}', train)

  def _cell(self, cell: _Cell, ip: jax.Array, p: jax.Array | None, filters: int, block_id: str,
            train: bool) -> tuple[jax.Array, jax.Array]:
    """One normal or reduction cell; returns (output, ip): the next cell's `p` is this cell's input."""
    p = self._adjust(p, ip, filters, block_id, train)
    h = self._conv(nn.relu(ip), filters, f'{cell.name}_conv_1_{block_id}')
    h = self._bn(h, f'{cell.name}_bn_1_{block_id}', train)
    tensors: dict[str | int, jax.Array] = {'h': h, 'p': p}
    for k, branches in enumerate(cell.blocks, start=1):
      outputs = []
      for source, op in branches:
        if isinstance(op, _Sep):
          sep_id = f'{cell.name}_{op.name}_{block_id}'
          outputs.append(self._separable_block(tensors[source], filters, op.kernel, op.stride, sep_id, train))
        else:
          outputs.append(op(tensors[source], self.formulations))
      tensors[k] = outputs[0] + outputs[1]
    return jnp.concatenate([tensors[k] for k in cell.outputs], axis=-1), ip


class _TemplateNormalCell(_Layers):
  """One normal cell whose layer names end in `_SCAN_ID` instead of a cell number."""

  filters: int = 0

  @nn.compact
  def __call__(self, ip: jax.Array, p: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    return self._cell(_NORMAL_CELL, ip, p, self.filters, _SCAN_ID, train)


class NASNet(_Layers):
  """keras.applications.nasnet.NASNet(include_top=False) with the same arguments, layer names and numbers.

  `formulations` says how each op is written (see formulations.py). With
  `scan_cells`, the normal cells of a block from the second on run as one
  `lax.scan` over their stacked variables, so XLA compiles that cell once per
  block instead of once per cell; the variables keep their Keras names and
  values either way. The scan costs time in each step (its residuals are
  stacked and unstacked), which a block of many cells repays in compile time:
  NASNetLarge keeps it for its 5 cells per scan, NASNetMobile runs unrolled.
  With `remat`, every cell is recomputed in the backward pass instead of keeping
  its activations: far less memory, the same values.
  """

  penultimate_filters: int = 4032
  num_blocks: int = 6
  stem_block_filters: int = 96
  skip_reduction: bool = True
  filter_multiplier: int = 2
  scan_cells: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    fm, n = self.filter_multiplier, self.num_blocks
    if self.penultimate_filters % (24 * fm**2):
      raise ValueError(f'penultimate_filters must be a multiple of 24 * filter_multiplier**2 = {24 * fm**2}, '
                       f'got {self.penultimate_filters}')
    filters = self.penultimate_filters // 24
    if self.remat:  # Static: the cell's table, filters, block id and mode.
      rematted = nn.remat(_Layers._cell, static_argnums=(1, 4, 5, 6))

      def cell(*args):
        return rematted(self, *args, train)
    else:
      cell = functools.partial(self._cell, train=train)

    x = Conv(self.stem_block_filters, (3, 3), (2, 2), padding='VALID', use_bias=False,
             formulation=self.formulations.conv, dtype=self.dtype, kernel_init=_HE_NORMAL, name='stem_conv1')(x)
    x = self._bn(x, 'stem_bn1', train)
    x, p = cell(_REDUCTION_CELL, x, None, filters // fm**2, 'stem_1')
    x, p = cell(_REDUCTION_CELL, x, p, filters // fm, 'stem_2')
    for stage in range(3):
      stage_filters = filters * fm**stage
      if stage:
        x, p_reduced = cell(_REDUCTION_CELL, x, p, stage_filters, f'reduce_{stage * n}')
        p = p if self.skip_reduction else p_reduced
      # Keras numbers normal cells 0..n-1, then n+1..2n after reduce_n, then 2n+1..3n.
      first_id = stage * n + (1 if stage else 0)
      ids = [str(i) for i in range(first_id, first_id + n)]
      # The first cell of a block halves its `p` (a reduction's input); the others only project it.
      scanned = ids[1:] if self.scan_cells and len(ids) > 2 and not self.is_initializing() else []
      for i in ids[:len(ids) - len(scanned)]:
        x, p = cell(_NORMAL_CELL, x, p, stage_filters, i)
      if scanned:
        x, p = self._scanned_normal_cells(x, p, stage_filters, scanned, train)
    return nn.relu(x)

  def _scanned_normal_cells(self, ip: jax.Array, p: jax.Array, filters: int, ids: list[str],
                            train: bool) -> tuple[jax.Array, jax.Array]:
    """Normal cells `ids` in turn, as one lax.scan of a template cell over their stacked variables.

    The first cell's `p` (the block's reduction output) is narrower than the
    later cells' (a normal cell's output, as wide as `ip`). It enters the scan
    zero-padded to that width, and its `adjust_conv_projection` kernel with zero
    rows for the padding, which changes no value: every cell then has one shape.
    """
    template = _TemplateNormalCell(formulations=self.formulations, dtype=self.dtype, axis_name=self.axis_name,
                                   bn_momentum=self.bn_momentum, filters=filters)
    shapes = jax.eval_shape(functools.partial(template.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct(ip.shape, ip.dtype), jax.ShapeDtypeStruct(ip.shape, p.dtype))
    collections = ('params', 'batch_stats')

    def cell_variables(cell_id: str) -> dict[str, Any]:
      return {col: {name: jax.tree.map(_zero_pad_to, self.variables[col][_cell_layer(name, cell_id)], shape)
                    for name, shape in shapes[col].items()}
              for col in collections}

    p = _zero_pad_to(p, jax.ShapeDtypeStruct(ip.shape, p.dtype))

    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[cell_variables(i) for i in ids])

    def step(carry, variables):
      if not train:
        return template.apply(variables, *carry, train=False), None
      carry, updates = template.apply(variables, *carry, train=True, mutable=['batch_stats'])
      return carry, updates['batch_stats']

    if self.remat:
      step = jax.checkpoint(step, prevent_cse=False)  # Inside a scan, CSE cannot defeat the recomputation.
    (x, p), stats = jax.lax.scan(step, (ip, p), stacked)
    if train:
      for k, cell_id in enumerate(ids):
        for name, value in stats.items():
          self.put_variable('batch_stats', _cell_layer(name, cell_id), jax.tree.map(lambda v, k=k: v[k], value))
    return x, p


def _cell_layer(template_name: str, cell_id: str) -> str:
  """The Keras name of a template-cell layer in cell `cell_id` (Keras names end in the cell's id)."""
  return template_name[:-len(_SCAN_ID)] + cell_id


def _zero_pad_to(x: jax.Array, like: Any) -> jax.Array:
  """`x` zero-padded at the end of each axis to the shape of `like` (no copy when the shapes agree)."""
  if x.shape == like.shape:
    return x
  return zero_pad(x, [(0, want - have) for have, want in zip(x.shape, like.shape)], range(x.ndim))
