"""Exact and near-duplicate image groups.

Exact: identical decoded pixels. Near: perceptual hashes within a Hamming
distance, which survives re-encoding and slight resizing. Both must stay in one
split, or the test set leaks into training.
"""

from collections.abc import Sequence

import numpy as np

# Of 256 pHash bits: the midpoint of the gap between copies (resized, re-encoded,
# gamma-, contrast-, bit-depth- or colour-changed, and combinations) and distinct images
# (same patient or not) that benchmarks/near_duplicates.py measures. BENCHMARKS.md there
# holds both distributions and the perturbations no threshold covers (pads, crops beyond
# 0.5% of a side). Each hash sets 127 of its bits (ties aside), so distances are even
# and 22 and 23 group the same pairs.
DEFAULT_NEAR_THRESHOLD = 22


class UnionFind:
  """Disjoint sets over 0..n-1 with path halving."""

  def __init__(self, n: int):
    self.parent = list(range(n))

  def find(self, i: int) -> int:
    while self.parent[i] != i:
      self.parent[i] = self.parent[self.parent[i]]
      i = self.parent[i]
    return i

  def union(self, i: int, j: int) -> None:
    ri, rj = self.find(i), self.find(j)
    if ri != rj:
      self.parent[max(ri, rj)] = min(ri, rj)

  def groups(self) -> list[list[int]]:
    """All sets, each sorted, ordered by their smallest member."""
    by_root: dict[int, list[int]] = {}
    for i in range(len(self.parent)):
      by_root.setdefault(self.find(i), []).append(i)
    return sorted(by_root.values())


def hamming_pairs(hashes: np.ndarray, threshold: int, block: int = 512) -> list[tuple[int, int]]:
  """Pairs (i < j) of packed bit hashes whose Hamming distance is <= threshold."""
  popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint16)
  pairs = []
  for start in range(0, len(hashes), block):
    rows = hashes[start:start + block]
    distances = popcount[rows[:, None, :] ^ hashes[None, :, :]].sum(-1)
    for i, j in zip(*np.nonzero(distances <= threshold)):
      if start + i < j:
        pairs.append((int(start + i), int(j)))
  return pairs


def find_duplicate_groups(pixel_digests: Sequence[str], perceptual_hashes: np.ndarray,
                          near_threshold: int = DEFAULT_NEAR_THRESHOLD) -> list[tuple[str, list[int]]]:
  """Groups of >= 2 indices that are duplicates: ('exact', members) or ('near', members).

  A group is 'exact' when all its members have identical pixels, else 'near'.
  """
  sets = UnionFind(len(pixel_digests))
  first_with_digest: dict[str, int] = {}
  for i, digest in enumerate(pixel_digests):
    sets.union(first_with_digest.setdefault(digest, i), i)
  if len(perceptual_hashes):
    for i, j in hamming_pairs(perceptual_hashes, near_threshold):
      sets.union(i, j)
  result = []
  for members in sets.groups():
    if len(members) > 1:
      exact = len({pixel_digests[i] for i in members}) == 1
      result.append(('exact' if exact else 'near', members))
  return result
