"""Helpers for the equivalence tests against Keras (the models themselves: covid_jax.port.keras_models)."""

from typing import Any

import keras
import numpy as np


def randomize_batch_norm(model: keras.Model, seed: int = 0) -> None:
  """Random BN moving statistics, gamma and beta: Keras's initial 0/1 hide epsilon and ordering bugs."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      gamma, beta, mean, var = layer.get_weights()
      layer.set_weights([
          rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
          rng.normal(0.0, 0.2, beta.shape).astype(np.float32),
          rng.normal(0.0, 0.2, mean.shape).astype(np.float32),
          rng.uniform(0.5, 2.0, var.shape).astype(np.float32),
      ])


def relative_error(got: Any, want: Any) -> float:
  """||got - want|| / ||want||, in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))
