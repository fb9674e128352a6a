"""Where a synthetic image's lung fields and opacities are: what `data_prep.synthetic` records beside its images.

Masks lie on a square REGION_GRID spanning the whole image whatever its aspect, as a plain (non-aspect-keeping)
resize to a model's input maps it, and are stored as base64 packed bits.
"""

import base64
import dataclasses
import json
import pathlib

import numpy as np

REGION_GRID = 64


@dataclasses.dataclass(frozen=True)
class Regions:
  """Where an image's lung fields and opacities are, in its file's pixels and on the REGION_GRID."""

  lungs: np.ndarray  # (REGION_GRID, REGION_GRID) bool, over the whole image.
  opacities: np.ndarray  # (REGION_GRID, REGION_GRID) bool; all False for class 0.
  opacity_centers: tuple[tuple[float, float, float], ...]  # (column, row, sigma) in the file's pixels.

  def to_json(self) -> dict:
    return {'lungs': _pack(self.lungs), 'opacities': _pack(self.opacities),
            'opacity_centers': [dict(zip(('x', 'y', 'sigma'), c)) for c in self.opacity_centers]}

  @classmethod
  def from_json(cls, record: dict) -> 'Regions':
    return cls(_unpack(record['lungs']), _unpack(record['opacities']),
               tuple((c['x'], c['y'], c['sigma']) for c in record['opacity_centers']))


def _pack(mask: np.ndarray) -> str:
  return base64.b64encode(np.packbits(mask.ravel())).decode('ascii')


def _unpack(text: str) -> np.ndarray:
  bits = np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:REGION_GRID**2]
  return bits.astype(bool).reshape(REGION_GRID, REGION_GRID)


def read_regions(path: str | pathlib.Path) -> dict[str, Regions]:
  """The regions file `generate` writes: file path under the output folder -> its Regions."""
  records = json.loads(pathlib.Path(path).read_text())
  return {rel: Regions.from_json(record) for rel, record in records['images'].items()}


def write_regions(path: str | pathlib.Path, regions: dict[str, Regions]) -> None:
  """Writes `regions` (file path under the output folder -> Regions) as `read_regions` reads them."""
  records = {rel: r.to_json() for rel, r in regions.items()}
  pathlib.Path(path).write_text(json.dumps({'grid': REGION_GRID, 'images': records}) + '\n')
