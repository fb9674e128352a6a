r"""Synthetic chest X-ray phantoms in the Kaggle "covid-xray-dataset" layout.

The real dataset cannot be downloaded where the tests run, so demos and test
fixtures use these instead: `DIR/0/` (non-COVID) and `DIR/1/` (COVID), file
names in the Kermany paediatric patterns the real set comes from, several
images for some patients (same anatomy, per-image jitter), and the real set's
mix of sizes, JPEG/PNG, 8/16-bit and grayscale/RGB files.

Class 1 differs only by patchy, soft-edged, mostly peripheral and lower-zone
lung opacities. Everything else (size, format, contrast, brightness, the
image's mean intensity) is drawn independently of the label, so a model can
only learn the label from the lungs.

With `regions_file`, the generator also records where each image's opacities and lung fields are
(`Regions`, written as JSON keyed by each file's path under the output folder): the truth a saliency map's
placement is measured against. The file lies beside the output folder, not in it, so a build of the folder
sees only images.

Every image has its own generator, `np.random.default_rng([seed, _IMAGE, i])`
(and every patient its own), so a set is byte-identical for a seed whatever the
number of workers.

  python -m data_prep.synthetic --output_dir /tmp/xray --num_images 600 --seed 0
"""

import collections
import dataclasses
import functools
import math
import multiprocessing
import pathlib
from collections.abc import Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image
from scipy import ndimage
from scipy import special

from data_prep.regions import REGION_GRID, Regions, write_regions

# Class balance of the Kaggle set: 1301 non-COVID, 1790 COVID.
COVID_FRACTION = 1790 / 3091

# Generator domains, so plan, patient and image streams never coincide.
_PLAN, _PATIENT, _IMAGE = 0, 1, 2

# About a third of patients have several images.
_IMAGES_PER_PATIENT = (0.66, 0.16, 0.09, 0.05, 0.04)

# (format, mode, probability): ~83% JPEG, ~17% PNG (a quarter of it 16-bit),
# ~11% RGB files in all.
_ENCODINGS = (
    ('JPEG', 'L', 0.75),
    ('JPEG', 'RGB', 0.08),
    ('PNG', 'L', 0.10),
    ('PNG', 'I;16', 0.04),
    ('PNG', 'RGB', 0.03),
)
_EXTENSIONS = {
    'JPEG': (('.jpeg', '.JPEG', '.jpg', '.JPG'), (0.8, 0.08, 0.08, 0.04)),
    'PNG': (('.png', '.PNG'), (0.85, 0.15)),
}
_MIN_SIDE, _MAX_SIDE = 200, 600
# Patient numbers stay below this (up to ~7000 images a class), so tests can plant
# hand-made files named IM-9xxx or person9xxx without clashing with a patient.
_FREE_NUMBERS = 9000
_RENDER_SIDE = 256
# A pixel belongs to an opacity where the opacity adds at least this share of its full density.
_OPACITY_LEVEL = 0.3


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """One file to write: what the plan decides before any pixel is drawn."""

  index: int  # Global image index: seeds the image's generator.
  patient: int  # Global patient index: seeds the shared anatomy.
  label: int
  stem: str  # File name without extension (the extension follows the format).


def plan(num_images: int, seed: int, covid_fraction: float = COVID_FRACTION) -> list[ImageSpec]:
  """Assigns labels, patients and Kermany-style names; patient ids are unique across the set."""
  if not 0 <= covid_fraction <= 1:
    raise ValueError(f'covid_fraction must lie in [0, 1], got {covid_fraction}')
  rng = np.random.default_rng([seed, _PLAN])
  num_covid = round(num_images * covid_fraction)
  specs = []
  for label, count in ((0, num_images - num_covid), (1, num_covid)):
    sizes = []
    while sum(sizes) < count:
      sizes.append(int(rng.choice(len(_IMAGES_PER_PATIENT), p=_IMAGES_PER_PATIENT)) + 1)
    if sizes:
      sizes[-1] -= sum(sizes) - count
    names = _class0_names(rng, sizes) if label == 0 else _class1_names(rng, sizes)
    first_patient = specs[-1].patient + 1 if specs else 0
    for patient, stems in enumerate(names, start=first_patient):
      specs.extend(ImageSpec(len(specs), patient, label, stem) for stem in stems)
  return specs


def _class0_names(rng: np.random.Generator, sizes: list[int]) -> list[list[str]]:
  """`IM-0553-0001`, `NORMAL2-IM-0123-0002`: patient id, then the patient's image number."""
  normal2 = rng.random(len(sizes)) < 0.3
  ids = np.empty(len(sizes), object)
  for prefix, chosen in (('IM', ~normal2), ('NORMAL2-IM', normal2)):
    if chosen.sum() >= _FREE_NUMBERS:
      raise ValueError(f'{chosen.sum()} {prefix} patients do not fit 4-digit ids below {_FREE_NUMBERS}')
    numbers = rng.choice(np.arange(1, _FREE_NUMBERS), int(chosen.sum()), replace=False)
    ids[chosen] = [f'{prefix}-{n:04d}' for n in numbers]
  return [[f'{pid}-{k + 1:04d}' for k in range(size)] for pid, size in zip(ids, sizes)]


def _class1_names(rng: np.random.Generator, sizes: list[int]) -> list[list[str]]:
  """`person123_bacteria_456`: patient id, kind, then a counter unique over the class."""
  people = rng.choice(np.arange(1, max(2000, 2 * len(sizes))), len(sizes), replace=False)
  counters = np.sort(rng.choice(np.arange(1, max(4000, 3 * sum(sizes))), sum(sizes), replace=False))
  counters = iter(counters.tolist())
  kinds = rng.choice(['bacteria', 'virus'], len(sizes), p=[0.65, 0.35])
  return [[f'person{person}_{kind}_{next(counters)}' for _ in range(size)]
          for person, kind, size in zip(people, kinds, sizes)]


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """A patient's geometry, in body coordinates (x right, y down; the thorax spans about [-1, 1])."""

  center: tuple[float, float]
  zoom: float
  angle: float  # Radians.
  thorax_half_width: float
  lung_x: float  # Lung centres at +-lung_x.
  lung_half_width: float
  lung_top: float
  lung_bottom: float
  dome: float  # Height of the diaphragm domes.
  heart: tuple[float, float, float, float]  # Centre x, centre y, half-width, half-height.
  rib_spacing: float
  rib_phase: float
  clavicle_y: float
  gamma: float
  # Opacities as (x, y, sigma, weight) blobs; empty for class 0.
  lesions: tuple[tuple[float, float, float, float], ...]


def anatomy(seed: int, patient: int, label: int) -> Anatomy:
  """Draws the geometry a patient's images share (and, for class 1, where the opacities sit)."""
  rng = np.random.default_rng([seed, _PATIENT, patient])
  lung_x, lung_hw = rng.uniform(0.42, 0.48), rng.uniform(0.29, 0.35)
  top, bottom = rng.uniform(-0.88, -0.76), rng.uniform(0.5, 0.64)
  a = Anatomy(
      center=tuple(rng.normal(0.0, 0.04, 2).tolist()),
      zoom=rng.uniform(0.85, 1.05),
      angle=math.radians(rng.normal(0.0, 2.0)),
      thorax_half_width=rng.uniform(0.8, 0.9),
      lung_x=lung_x,
      lung_half_width=lung_hw,
      lung_top=top,
      lung_bottom=bottom,
      dome=rng.uniform(0.08, 0.16),
      heart=(rng.uniform(0.12, 0.2), rng.uniform(0.22, 0.32),
             rng.uniform(0.3, 0.38), rng.uniform(0.22, 0.28)),
      rib_spacing=rng.uniform(0.12, 0.15),
      rib_phase=rng.uniform(0.0, 1.0),
      clavicle_y=rng.uniform(-0.86, -0.76),
      gamma=rng.uniform(0.8, 1.25),
      lesions=(),
  )
  if label == 0:
    return a
  sides = [rng.choice([-1, 1])] if rng.random() < 0.45 else [-1, 1]
  extent = rng.uniform(0.7, 1.3)
  lesions = []
  for side in sides:
    for _ in range(1 + min(rng.poisson(1.5), 4)):
      t = rng.beta(3.0, 1.6)  # 0 at the apex, 1 at the base: mostly lower zones.
      r = rng.beta(3.0, 1.4) * (1 if rng.random() < 0.85 else -0.6)  # Mostly lateral.
      x = side * (lung_x + r * 0.8 * _lung_half_width(lung_hw, t))
      y = top + t * (bottom - top)
      lesions.append((x, y, extent * rng.uniform(0.09, 0.18), rng.uniform(0.6, 1.0)))
  return dataclasses.replace(a, lesions=tuple(lesions))


def _lung_half_width(half_width: float, t: np.ndarray | float) -> np.ndarray | float:
  """Lungs widen from a rounded apex (t=0) to the base (t=1); negative above the apex."""
  return half_width * np.sign(t) * np.abs(np.minimum(t, 1.0)) ** 0.35


def _sig(x: np.ndarray, edge: float) -> np.ndarray:
  """A soft step of width ~`edge`: soft-edged masks look like radiographs, hard ones do not."""
  return special.expit(x / edge)


def _bands(phase: np.ndarray) -> np.ndarray:
  """Narrow bright bands at integer `phase`: ribs."""
  return ((1 + np.cos(2 * np.pi * phase)) / 2) ** 6


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
  """Unit-variance-ish noise, smooth on a scale of 1/`cells` of the image (patchy texture)."""
  return _resize(rng.standard_normal((cells, cells)).astype(np.float32), shape)


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Bicubic resize of a float image to (height, width)."""
  resized = Image.fromarray(image.astype(np.float32), 'F')
  return np.asarray(resized.resize(shape[::-1], Image.Resampling.BICUBIC))


def attenuation(a: Anatomy, shape: tuple[int, int], rng: np.random.Generator,
                lesion_amplitude: float) -> np.ndarray:
  """Renders the phantom (brighter = denser) with per-image jitter of position, scale and angle."""
  return _attenuation_and_regions(a, shape, rng, lesion_amplitude)[0]


def _attenuation_and_regions(a: Anatomy, shape: tuple[int, int], rng: np.random.Generator,
                             lesion_amplitude: float) -> tuple[np.ndarray, dict]:
  """`attenuation`, and the lung field, the opacities' density share (both on `shape`) and their centres."""
  h, w = shape
  half = min(h, w) / 2
  u = (np.arange(w, dtype=np.float32) - w / 2) / half
  v = (np.arange(h, dtype=np.float32)[:, None] - h / 2) / half
  # Python floats keep the arithmetic in float32 (NumPy scalars would promote it to float64).
  cx, cy = (np.asarray(a.center) + rng.normal(0.0, 0.03, 2)).tolist()
  zoom = a.zoom * math.exp(rng.normal(0.0, 0.04))
  angle = a.angle + math.radians(rng.normal(0.0, 2.0))
  cos, sin = math.cos(angle), math.sin(angle)
  x = ((u - cx) * cos + (v - cy) * sin) / zoom
  y = (-(u - cx) * sin + (v - cy) * cos) / zoom
  ax = np.abs(x)

  shoulders = 1 + 0.25 * _sig(-y - 0.85, 0.08)
  body = _sig(a.thorax_half_width * shoulders - ax, 0.03)

  t = (y - a.lung_top) / (a.lung_bottom - a.lung_top)
  lungs = np.zeros(shape, np.float32)
  half_width = _lung_half_width(a.lung_half_width, t)
  for side in (-1, 1):
    dx = x - side * a.lung_x
    # Domes peak mid-lung; the right one (image left) sits higher.
    across = np.clip(dx / a.lung_half_width, -1, 1)
    dome = a.lung_bottom - 0.04 * (side < 0) - a.dome * (1 - across**2)
    lungs += _sig(half_width - np.abs(dx), 0.025) * _sig(dome - y, 0.02)

  hx, hy, hw, hh = a.heart
  heart = _sig(1 - ((x - hx) / hw) ** 2 - ((y - hy) / hh) ** 2, 0.12)
  spine = _sig(0.07 - ax, 0.01) * (0.7 + 0.3 * np.cos(2 * np.pi * y / 0.11))
  mediastinum = _sig(0.1 + 0.12 * np.clip(t, 0, 1) ** 2 - np.abs(x - 0.03), 0.03)
  rib_zone = (body * (0.3 + 0.7 * lungs) * _sig(ax - 0.08, 0.02)
              * _sig(y - a.lung_top + 0.15, 0.04) * _sig(a.lung_bottom + 0.05 - y, 0.05))
  posterior = _bands((y - 0.35 * x**2) / a.rib_spacing + a.rib_phase)
  anterior = _bands((y + 0.3 * ax) / (1.3 * a.rib_spacing) + a.rib_phase)
  clavicles = (np.exp(-(((y - a.clavicle_y + 0.35 * ax - 0.25 * x**2) / 0.04) ** 2))
               * _sig(ax - 0.06, 0.02) * _sig(0.65 - ax, 0.05))
  hila = sum(np.exp(-((x - side * 0.22) ** 2 + y**2) / (2 * 0.1**2)) for side in (-1, 1))
  markings = lungs * _smooth_noise(rng, shape, 24)  # Vessels and noise: lungs are never uniform.

  image = (0.05 + 0.45 * body - 0.33 * lungs * (1 - heart) + 0.02 * heart + 0.1 * mediastinum
           + 0.05 * spine + (0.08 * posterior + 0.04 * anterior) * rib_zone
           + 0.08 * clavicles * body + 0.06 * hila + 0.025 * markings)
  regions = {'lungs': lungs, 'opacities': np.zeros(shape, np.float32), 'centers': []}
  if a.lesions:
    blobs = np.zeros(shape, np.float32)
    for lx, ly, sigma, weight in a.lesions:
      lx, ly = np.asarray([lx, ly]) + rng.normal(0.0, 0.025, 2)
      blobs += weight * np.exp(-((x - lx) ** 2 + (y - ly) ** 2) / (2 * sigma**2))
      # Body -> image coordinates: the inverse of the rotation and zoom above, in pixels of `shape`.
      u, v = cx + zoom * (lx * cos - ly * sin), cy + zoom * (lx * sin + ly * cos)
      regions['centers'].append((u * half + w / 2, v * half + h / 2, sigma * zoom * half))
    patches = np.clip(1 + 0.3 * _smooth_noise(rng, shape, 16), 0.5, 1.4)
    image += lesion_amplitude * (1 - np.exp(-2.5 * blobs)) * patches * lungs * (1 - 0.5 * heart)
    regions['opacities'] = (1 - np.exp(-2.5 * blobs)) * lungs
  return image, regions


def _on_grid(values: np.ndarray, level: float) -> np.ndarray:
  """A [0, 1] map -> the REGION_GRID mask of where it reaches `level`."""
  return _resize(values, (REGION_GRID, REGION_GRID)) >= level


def render(spec: ImageSpec, seed: int) -> tuple[Image.Image, str, str, int]:
  """Draws one image; returns it with its format, extension and JPEG quality."""
  return _render(spec, seed)[:4]


def _render(spec: ImageSpec, seed: int) -> tuple[Image.Image, str, str, int, Regions]:
  """`render`, and the image's Regions.

  Acquisition settings are drawn first, in the same order for both classes, so
  they are independent of the label.
  """
  rng = np.random.default_rng([seed, _IMAGE, spec.index])
  width = int(rng.integers(_MIN_SIDE, _MAX_SIDE + 1))
  aspect = 1.0 if rng.random() < 0.25 else np.exp(rng.uniform(-0.25, 0.3))
  height = int(np.clip(round(width * aspect), _MIN_SIDE, _MAX_SIDE))
  fmt, mode, _ = _ENCODINGS[rng.choice(len(_ENCODINGS), p=[e[2] for e in _ENCODINGS])]
  extensions, weights = _EXTENSIONS[fmt]
  extension = str(rng.choice(extensions, p=weights))
  quality = int(rng.integers(80, 96))
  brightness, contrast = rng.uniform(0.38, 0.58), rng.uniform(0.16, 0.24)
  blur = rng.uniform(0.4, 1.5) * min(width, height) / 300
  noise = rng.uniform(0.004, 0.025)
  subtle = rng.random() < 0.15
  lesion_amplitude = rng.uniform(0.12, 0.18) if subtle else rng.uniform(0.3, 0.5)

  a = anatomy(seed, spec.patient, spec.label)
  # Smooth anatomy is rendered at a capped size and upsampled; only the noise needs every pixel.
  scale = min(1.0, _RENDER_SIDE / max(width, height))
  image, drawn = _attenuation_and_regions(a, (round(height * scale), round(width * scale)), rng, lesion_amplitude)
  image = ndimage.gaussian_filter(np.clip(image, 0, None) ** a.gamma, blur * scale)
  image = _resize(image, (height, width))
  # Standardise, then draw brightness and contrast: the opacities must not shift the mean.
  image = brightness + contrast * (image - image.mean()) / image.std()
  image = np.clip(image + rng.normal(0.0, noise, image.shape), 0.0, 1.0)
  centers = tuple((x / scale, y / scale, sigma / scale) for x, y, sigma in drawn['centers'])
  regions = Regions(_on_grid(drawn['lungs'], 0.5), _on_grid(drawn['opacities'], _OPACITY_LEVEL), centers)
  return _to_pil(image, mode), fmt, extension, quality, regions


def _to_pil(image: np.ndarray, mode: str) -> Image.Image:
  """Quantises a [0, 1] image to 8 or 16 bits; RGB files carry three equal channels."""
  if mode == 'I;16':
    return Image.fromarray(np.round(image * 65535).astype(np.uint16))
  gray = np.round(image * 255).astype(np.uint8)
  return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1) if mode == 'RGB' else gray)


def _write(spec: ImageSpec, seed: int, output_dir: pathlib.Path) -> tuple[pathlib.Path, Regions]:
  """Renders and saves one file: the unit of work a pool worker gets."""
  image, fmt, extension, quality, regions = _render(spec, seed)
  path = output_dir / str(spec.label) / (spec.stem + extension)
  image.save(path, fmt, **({'quality': quality} if fmt == 'JPEG' else {}))
  return path, regions


def generate(output_dir: str | pathlib.Path, num_images: int, seed: int,
             covid_fraction: float = COVID_FRACTION, workers: int = 1,
             regions_file: str | pathlib.Path | None = None) -> list[pathlib.Path]:
  """Writes the set under `output_dir/{0,1}/` and returns the paths in plan order.

  With `regions_file`, writes there each image's Regions (`regions.read_regions` reads them). Refuses a non-empty
  class folder: mixing two sets would mix their patients.
  """
  output_dir = pathlib.Path(output_dir)
  for label in (0, 1):
    folder = output_dir / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
      raise FileExistsError(f'{folder} is not empty')
  write = functools.partial(_write, seed=seed, output_dir=output_dir)
  specs = plan(num_images, seed, covid_fraction)
  if workers <= 1:
    written = [write(spec) for spec in specs]
  else:
    # Spawned, not forked: callers may have started threads (JAX, TensorFlow).
    with multiprocessing.get_context('spawn').Pool(workers) as pool:
      written = pool.map(write, specs, chunksize=8)
  if regions_file is not None:
    write_regions(regions_file, {path.relative_to(output_dir).as_posix(): regions for path, regions in written})
  return [path for path, _ in written]


def summary(paths: Sequence[pathlib.Path]) -> str:
  """Counts per class and per (format, mode), read back from the files."""
  classes = collections.Counter(p.parent.name for p in paths)
  kinds = collections.Counter()
  for p in paths:
    with Image.open(p) as image:
      kinds[f'{image.format} {image.mode}'] += 1
  per_class = ', '.join(f'class {c}: {n}' for c, n in sorted(classes.items()))
  per_kind = ', '.join(f'{k}: {n}' for k, n in kinds.most_common())
  return f'{len(paths)} images: {per_class}\n{per_kind}'


def _define_flags() -> None:
  """Defined only when run as a script, so importing this module never clashes with other flags."""
  flags.DEFINE_string('output_dir', None, 'Folder to write DIR/0 and DIR/1 into.', required=True)
  flags.DEFINE_integer('num_images', 600, 'Number of images in both classes together.')
  flags.DEFINE_integer('seed', 0, 'Same seed, same bytes; another seed, another set.')
  flags.DEFINE_float('covid_fraction', COVID_FRACTION,
                     "Fraction of class 1 images (default: the Kaggle set's).")
  flags.DEFINE_integer('workers', 1, 'Processes to render with; the files do not depend on it.')
  flags.DEFINE_string('regions_file', None, 'Also write where each image\'s lungs and opacities are to this JSON '
                      'file (outside --output_dir, which a build reads whole).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  paths = generate(f.output_dir, f.num_images, f.seed, f.covid_fraction, f.workers, f.regions_file)
  print(f'Wrote {f.output_dir}\n{summary(paths)}' + (f'\nRegions in {f.regions_file}' if f.regions_file else ''))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
