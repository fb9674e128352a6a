"""Grad-CAM (Selvaraju et al. 2017) of the COVID logit from a named feature layer of the backbone, and overlays.

The map of an image is ReLU(sum_k alpha_k A_k), where A is the layer's output and alpha_k the spatial mean of
d(COVID logit)/dA_k, as Keras's Grad-CAM computes it with tf.GradientTape. The COVID logit is the log-odds
of p_covid, z_covid - z_non_covid, which is all the softmax's COVID probability depends on: a two-logit model
may raise p_covid by lowering z_non_covid alone, which a map of z_covid would not show.

The layer is the backbone's output or a submodule of the backbone named as in Keras (`models.registry`: each
backbone's default layer); the gradient with respect to it comes from a hook on that submodule's output
(`flax.linen.intercept_methods`), so the model's own code runs unchanged. Maps are computed in inference mode
(BN on running statistics), so each image's map depends on that image alone.
"""

import functools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import colormaps
from PIL import Image

from covid_jax import gradcam_sanity, reporting
from covid_jax.metrics import CLASS_NAMES
from covid_jax.models import registry
from covid_jax.models.classifier import Classifier

COVID = CLASS_NAMES.index('covid')
# Added after a fused ReLU so that the model's own ReLU, which follows the hooked convolution, passes the
# gradient at zero as Keras's fused activation does; far below float32 resolution of any activation.
_ABOVE_ZERO = 1e-30
# Overlays are drawn at least this many pixels wide, by whole-pixel enlargement.
_OVERLAY_SIDE = 256
_OVERLAY_ALPHA = 0.45


def covid_log_odds(logits: jax.Array) -> jax.Array:
  """(B,) log-odds of COVID of (B, 2) logits: the logit of the softmax's COVID probability."""
  return logits[:, COVID] - logits[:, 1 - COVID]


def feature_layer(model_name: str, override: str | None = None) -> str:
  """The layer Grad-CAM uses for backbone `model_name`: `override` when given, else the registry's."""
  return override or registry.get_spec(model_name).gradcam_layer


def _hook_path(model: Classifier, layer: str) -> tuple[str, ...]:
  """The Flax module path whose output is `layer`'s: the backbone itself for its output layer."""
  spec = registry.get_spec(model.backbone_name)
  return ('backbone',) if layer == spec.output_layer else ('backbone', layer)


def _hooked_apply(model: Classifier, variables: dict[str, Any], images: jax.Array, layer: str,
                  offset: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """(logits, the layer's output); `offset` is added to that output where the model reads it on."""
  path = _hook_path(model, layer)
  fused_relu = registry.get_spec(model.backbone_name).fused_relu and path != ('backbone',)
  seen = []

  def hook(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    out = next_fun(*args, **kwargs)
    if context.method_name != '__call__' or context.module.path != path:
      return out
    if fused_relu:
      out = jax.nn.relu(out) + jnp.asarray(_ABOVE_ZERO, out.dtype)
    seen.append(out)
    return out if offset is None else out + offset.astype(out.dtype)

  with nn.intercept_methods(hook):
    logits = model.apply(variables, images, train=False)
  return logits, (seen[0] if seen else None)


def class_activation_maps(model: Classifier, variables: dict[str, Any], images: jax.Array, layer: str,
                          signed: bool = False) -> tuple[jax.Array, jax.Array]:
  """(maps (B, h, w) float32 at the layer's resolution, logits (B, 2)) of float RGB 0-255 `images`.

  `signed` leaves out Grad-CAM's final ReLU: evidence against COVID stays negative instead of zero.
  """
  _, features = jax.eval_shape(lambda v, x: _hooked_apply(model, v, x, layer, None), variables, images)
  if features is None:
    names = sorted(variables['params'].get('backbone', {}))
    raise ValueError(f'Grad-CAM layer {layer!r} is not a layer of the {model.backbone_name} backbone; '
                     f'its output is {registry.get_spec(model.backbone_name).output_layer!r}, its layers with '
                     f'weights include {names[-5:]}')
  if len(features.shape) != 4:
    raise ValueError(f'Grad-CAM layer {layer!r} gives shape {features.shape}, not a (B, h, w, C) feature map')

  def covid_logit(offset):
    logits, activations = _hooked_apply(model, variables, images, layer, offset)
    return covid_log_odds(logits).sum(), (logits, activations)

  zeros = jnp.zeros(features.shape, jnp.float32)
  gradients, (logits, activations) = jax.grad(covid_logit, has_aux=True)(zeros)
  weights = gradients.mean(axis=(1, 2))
  maps = jnp.einsum('bhwc,bc->bhw', activations.astype(jnp.float32), weights)
  return (maps if signed else jax.nn.relu(maps)), logits


def compiled_maps(model: Classifier, layer: str,
                  signed: bool = False) -> Callable[[dict[str, Any], jax.Array], tuple[jax.Array, jax.Array]]:
  """`class_activation_maps` of `model` at `layer`, jitted: (variables, images) -> (maps, logits)."""
  return jax.jit(functools.partial(class_activation_maps, model, layer=layer, signed=signed))


def resized(maps: np.ndarray, size: int) -> np.ndarray:
  """(B, h, w) maps -> (B, size, size), bilinear."""
  maps = np.asarray(maps, np.float32)
  return np.asarray(jax.image.resize(maps, (maps.shape[0], size, size), 'bilinear'))


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
  """(B, h, w) maps -> (B, size, size), bilinear, each scaled to a maximum of 1 (an all-zero map stays 0)."""
  enlarged = np.maximum(resized(maps, size), 0.0)
  top = enlarged.max(axis=(1, 2), keepdims=True)
  return np.where(top > 0, enlarged / np.where(top > 0, top, 1.0), 0.0)


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
  """uint8 RGB of a (H, W, 3) 0-255 radiograph under a (H, W) [0, 1] heatmap (jet), enlarged for viewing."""
  gray = np.asarray(image, np.float32).mean(axis=-1, keepdims=True) / 255.0
  colours = colormaps['jet'](np.clip(heatmap, 0.0, 1.0))[..., :3]
  blended = (1 - _OVERLAY_ALPHA) * gray + _OVERLAY_ALPHA * colours
  pixels = np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8)
  factor = max(1, math.ceil(_OVERLAY_SIDE / pixels.shape[1]))
  return np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)


def write_overlay(path: str | os.PathLike, image: np.ndarray, heatmap: np.ndarray) -> None:
  """Saves `overlay(image, heatmap)` as a PNG at `path`, creating its folder."""
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(overlay(image, heatmap)).save(path, format='PNG')


def write_run_grid(workdir: str | os.PathLike, model: Classifier, variables: dict[str, Any], images: np.ndarray,
                   labels: np.ndarray, predicted: np.ndarray, count: int = 16, seed: int = 0,
                   layer: str | None = None) -> dict[str, Any]:
  """A finished run's RUN/gradcam_grid.png and RUN/gradcam_sanity.json; returns the sanity report.

  Shows up to `count` test images (`images` uint8 (N, H, W, 3), with their `labels` and `predicted` labels):
  the wrong ones first, up to half of them, then right ones, drawn with `seed`, each with its map. The
  randomisation test (`gradcam_sanity`) runs on the same images.
  """
  variables = jax.device_get(variables)
  rng = np.random.default_rng(seed)
  wrong, right = np.flatnonzero(labels != predicted), np.flatnonzero(labels == predicted)
  shown_wrong = rng.permutation(wrong)[:max(count // 2, count - len(right))]
  chosen = np.sort(np.concatenate([shown_wrong, rng.permutation(right)[:count - len(shown_wrong)]]))
  layer = feature_layer(model.backbone_name, layer)
  batch = np.asarray(images[chosen], np.float32)
  heatmaps = upsample(compiled_maps(model, layer)(variables, batch)[0], images.shape[1])
  reporting.plot_gradcam_grid(images[chosen], heatmaps, labels[chosen], predicted[chosen], chosen,
                              Path(workdir) / 'gradcam_grid.png')
  report = {'images': [int(i) for i in chosen], **sanity_report(model, variables, batch, layer, seed)}
  reporting.write_json(Path(workdir) / 'gradcam_sanity.json', report)
  return report


def sanity_report(model: Classifier, variables: dict[str, Any], images: np.ndarray, layer: str, seed: int = 0,
                  masks: dict[str, Sequence[np.ndarray | None]] | None = None) -> dict[str, Any]:
  """The randomisation test (`gradcam_sanity`) on float RGB 0-255 `images`, and the share of Grad-CAM map mass
  inside each region of `masks` (region name -> a grid mask or None per image).

  The rank correlations compare signed maps (before Grad-CAM's ReLU, enlarged to the images' side): after the
  ReLU, a map of an image without COVID evidence is all zero and has no rank order.
  """
  size = images.shape[1]
  signed = compiled_maps(model, layer, signed=True)
  report = {'layer': layer, 'randomisation': gradcam_sanity.randomisation_test(
      lambda trial, batch: resized(signed(trial, batch)[0], size), model, variables, images, seed)}
  if masks:
    heatmaps = upsample(compiled_maps(model, layer)(variables, images)[0], size)
    report.update({region: gradcam_sanity.mass_shares(heatmaps, found) for region, found in masks.items()})
  return report
