"""Group-preserving, label-stratified, seeded train/val/test assignment."""

from collections.abc import Mapping, Sequence

import numpy as np

SPLITS = ('train', 'val', 'test')
DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)
# What a build's groups are: each patient with its duplicates (no leak), or each image alone (the study's leaky split).
GROUP_BY = ('patient', 'image')


def assign_splits(groups: Sequence[Sequence[int]], labels: Sequence[int], fractions: Mapping[str, float],
                  seed: int) -> list[str]:
  """Split name for each example, keeping every group (patient + duplicates) whole.

  Groups go, largest first with seeded tie-breaking, to the split whose per-label
  shortfall against its target they reduce most: fractions stay close to target
  per label, and a different seed gives a different split.
  """
  names = list(fractions)
  labels = np.asarray(labels)
  classes = np.unique(labels)
  target = np.array([[fractions[s] * np.sum(labels == c) for c in classes] for s in names])
  filled = np.zeros_like(target)
  counts = np.array([[np.sum(labels[list(g)] == c) for c in classes] for g in groups], dtype=float)
  order = np.random.default_rng(seed).permutation(len(groups))
  order = order[np.argsort(-counts[order].sum(1), kind='stable')]
  result = [''] * len(labels)
  for g in order:
    shortfall = target - filled
    gain = (np.minimum(shortfall, counts[g]) - np.maximum(counts[g] - shortfall, 0)).sum(1)
    best = int(np.argmax(gain + 1e-9 * shortfall.sum(1)))
    filled[best] += counts[g]
    for i in groups[g]:
      result[i] = names[best]
  return result
