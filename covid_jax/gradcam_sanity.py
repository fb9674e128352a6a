"""Sanity checks of saliency maps: do they depend on the model's weights, and do they fall where the disease is?

The model-parameter randomisation test (Adebayo et al. 2018, cascading): the backbone's layers with weights
are re-initialised from the top (the layers nearest the head) down, in steps, and each step's maps are
compared with the trained model's by Spearman rank correlation, image by image. A map method that reads the
model keeps little correlation once the weights it reads are random; edge detectors and input-only maps keep
a high one. On synthetic data, whose generator records each image's opacities and lung fields
(`data_prep.regions`), the share of map mass inside them says where the evidence came from; a uniform map's
share equals the region's share of the image, given beside it.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import stats

from covid_jax.models.classifier import Classifier

# Cascading steps: the share of the backbone's layers with weights re-initialised, from the top.
CASCADE = (('top layer', 0.0), ('top 25%', 0.25), ('top 50%', 0.5), ('all', 1.0))

MapsFn = Callable[[dict[str, Any], np.ndarray], np.ndarray]  # (variables, images) -> (B, S, S) heatmaps.


def layers_top_first(model: Classifier, image_size: int) -> list[str]:
  """The backbone's layers with weights, nearest the head first: the reverse of the order the model calls them
  in (its variables are keyed by name, not by order)."""
  called = []

  def record(next_fun, args, kwargs, context):
    path = context.module.path
    if len(path) > 1 and path[0] == 'backbone' and path[1] not in called:
      called.append(path[1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                                               train=False))
  weighted = set(shapes['params']['backbone'])
  return [layer for layer in reversed(called) if layer in weighted]


# Fresh values of the leaves that are not kernels, by name: BN's scale and variance 1, biases, shifts and means 0.
_FRESH_CONSTANTS = {'scale': 1.0, 'var': 1.0, 'bias': 0.0, 'mean': 0.0}


def fresh_leaf(path: Sequence[str], shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
  """A freshly initialised leaf: kernels He-normal (std sqrt(2 / fan-in)), the rest as `_FRESH_CONSTANTS` says."""
  name = path[-1]
  if name == 'kernel':
    return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(np.float32)
  if name not in _FRESH_CONSTANTS:
    raise ValueError(f'no fresh value for the backbone leaf {"/".join(path)}')
  return np.full(shape, _FRESH_CONSTANTS[name], np.float32)


def randomised(variables: dict[str, Any], layers: Sequence[str], seed: int) -> dict[str, Any]:
  """`variables` with the backbone `layers` (parameters and BN statistics) initialised afresh, drawn with `seed`."""
  rng = np.random.default_rng(seed)
  result = {}
  for collection, tree in variables.items():
    backbone = dict(tree.get('backbone', {}))
    for layer in layers:
      if layer in backbone:
        backbone[layer] = jax.tree_util.tree_map_with_path(
            lambda path, leaf: fresh_leaf([k.key for k in path], np.shape(leaf), rng), backbone[layer])
    result[collection] = {**tree, 'backbone': backbone}
  return result


def rank_correlations(trained: np.ndarray, other: np.ndarray) -> np.ndarray:
  """Spearman's rho of each pair of maps (B, ...), NaN where either map is constant (no rank order)."""
  values = []
  for a, b in zip(trained, other):
    a, b = np.ravel(a), np.ravel(b)
    values.append(np.nan if np.ptp(a) == 0 or np.ptp(b) == 0 else stats.spearmanr(a, b).statistic)
  return np.asarray(values, np.float64)


def randomisation_test(maps_fn: MapsFn, model: Classifier, variables: dict[str, Any], images: np.ndarray,
                       seed: int = 0) -> list[dict[str, Any]]:
  """Each cascading step: layers re-initialised, and the Spearman rho of its maps with the trained model's.

  The new weights are drawn with `seed` (`fresh_leaf`). Maps that are constant (all zero after Grad-CAM's
  ReLU) have no rank order: they are counted, not averaged.
  """
  order = layers_top_first(model, images.shape[1])
  trained = maps_fn(variables, images)
  steps = []
  for name, share in CASCADE:
    count = max(1, round(share * len(order)))
    rho = rank_correlations(trained, maps_fn(randomised(variables, order[:count], seed), images))
    defined = rho[~np.isnan(rho)]
    steps.append({'step': name, 'layers_randomised': count, 'of_layers': len(order), 'first_layer': order[0],
                  'last_layer': order[count - 1], 'spearman_mean': _mean(defined),
                  'spearman_median': float(np.median(defined)) if defined.size else None,
                  'images': int(defined.size), 'constant_maps': int(rho.size - defined.size)})
  return steps


def mass_shares(heatmaps: np.ndarray, masks: Sequence[np.ndarray | None]) -> dict[str, Any]:
  """Share of each map's mass inside its mask (grid masks resized to the maps' side), averaged over images.

  `masks` align with `heatmaps` (B, S, S); None skips an image, as does an empty mask or an all-zero map.
  Returns the mean share, the mean share of the image the masks cover (a uniform map's share) and the count.
  """
  shares, areas = [], []
  for heatmap, mask in zip(heatmaps, masks):
    if mask is None or not mask.any() or heatmap.sum() <= 0:
      continue
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(heatmap.shape[::-1], Image.Resampling.NEAREST),
                         bool)
    shares.append(float(heatmap[resized].sum() / heatmap.sum()))
    areas.append(float(resized.mean()))
  return {'share_of_map_mass': _mean(shares), 'share_of_image': _mean(areas), 'images': len(shares)}


def _mean(values: Sequence[float] | np.ndarray) -> float | None:
  return float(np.mean(values)) if len(values) else None


def summary_lines(report: dict[str, Any]) -> list[str]:
  """Human-readable lines of a sanity report ({'randomisation': steps, 'opacities'/'lungs': shares})."""
  lines = [f'randomisation ({step["step"]}: {step["layers_randomised"]}/{step["of_layers"]} layers): Spearman rho '
           f'mean {_fmt(step["spearman_mean"])} over {step["images"]} maps ({step["constant_maps"]} constant)'
           for step in report.get('randomisation', [])]
  for region in ('opacities', 'lungs'):
    if region in report:
      share = report[region]
      lines.append(f'map mass inside the {region}: {_fmt(share["share_of_map_mass"])} (they cover '
                   f'{_fmt(share["share_of_image"])} of the image) over {share["images"]} images')
  return lines


def _fmt(value: float | None) -> str:
  return 'n/a' if value is None else f'{value:.3f}'
