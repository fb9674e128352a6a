"""The saliency sanity checks: the randomisation test on the trained run, map mass in regions, and the regions
the synthetic generator records."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, stats

from covid_jax import gradcam, gradcam_sanity, input_pipeline, restored
from data_prep import regions, synthetic


def test_run_grid_and_randomisation_on_the_trained_model(trained_run, tmp_path):
  """The run's Grad-CAM grid; re-initialising the backbone leaves the trained model's maps little rank order."""
  workdir = trained_run[0]
  run = restored.load(workdir)
  size = run.config.model.image_size
  reader = input_pipeline.SplitReader(run.config.data_dir, 'test', size, cache=False)
  batch = next(reader.eval_batches(32))
  images, labels = np.asarray(batch['image']).astype(np.uint8), np.asarray(batch['label'])
  with open(workdir / 'predictions' / 'test.csv', newline='') as file:
    evaluated = {row['path']: float(row['p_covid_calibrated']) for row in csv.DictReader(file)}
  predicted = run.is_covid([evaluated[p] for p in reader.example_paths()[:32]]).astype(int)
  report = gradcam.write_run_grid(tmp_path, run.model, run.variables, images, labels, predicted, count=8)
  assert (tmp_path / 'gradcam_grid.png').stat().st_size > 0
  assert json.loads((tmp_path / 'gradcam_sanity.json').read_text()) == json.loads(json.dumps(report))
  shown = np.asarray(report['images'])
  wrong = int((labels != predicted).sum())
  assert len(shown) == 8 and (labels[shown] != predicted[shown]).sum() == min(wrong, 4)
  steps = report['randomisation']
  assert [s['step'] for s in steps] == [name for name, _ in gradcam_sanity.CASCADE]
  assert steps[-1]['layers_randomised'] == steps[-1]['of_layers'] and steps[-1]['images'] >= 4
  assert steps[-1]['spearman_mean'] < 0.5, steps


def test_rank_correlations_are_spearmans():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 5, 5)), rng.normal(size=(3, 5, 5))
  b[1] = a[1] ** 3  # Monotone: rank correlation 1.
  b[2] = 0.0  # Constant: no rank order.
  got = gradcam_sanity.rank_correlations(a, b)
  assert got[0] == pytest.approx(stats.spearmanr(a[0].ravel(), b[0].ravel()).statistic)
  assert got[1] == pytest.approx(1.0) and np.isnan(got[2])


def test_mass_shares_by_hand():
  heatmaps = np.zeros((3, 4, 4))
  heatmaps[0, :2, :2] = 1.0  # Mass 4 in the top-left quarter.
  heatmaps[0, 3, 3] = 4.0  # Mass 4 outside it.
  heatmaps[1] = 1.0
  mask = np.zeros((regions.REGION_GRID, regions.REGION_GRID), bool)
  mask[:regions.REGION_GRID // 2, :regions.REGION_GRID // 2] = True  # The top-left quarter.
  got = gradcam_sanity.mass_shares(heatmaps, [mask, mask, None])
  assert got == {'share_of_map_mass': pytest.approx((0.5 + 0.25) / 2), 'share_of_image': pytest.approx(0.25),
                 'images': 2}


def test_regions_file_leaves_the_images_unchanged_and_locates_the_opacities(tmp_path):
  plain = synthetic.generate(tmp_path / 'plain', 16, seed=5)
  recorded = synthetic.generate(tmp_path / 'recorded', 16, seed=5, regions_file=tmp_path / 'regions.json')
  assert [p.read_bytes() for p in plain] == [p.read_bytes() for p in recorded]
  found = regions.read_regions(tmp_path / 'regions.json')
  assert sorted(found) == sorted(p.relative_to(tmp_path / 'recorded').as_posix() for p in recorded)
  grid = regions.REGION_GRID
  for rel, r in found.items():
    with Image.open(tmp_path / 'recorded' / rel) as image:
      width, height = image.size
      pixels = np.asarray(image.convert('F').resize((grid, grid), Image.Resampling.BOX))
    # Air-filled lungs are darker than the tissue around them; opacities are denser (brighter) than the lung around.
    ring = ndimage.binary_dilation(r.lungs, iterations=3) & ~r.lungs
    assert pixels[r.lungs].mean() < pixels[ring].mean(), rel
    if rel.startswith('0/'):
      assert not r.opacities.any() and not r.opacity_centers
      continue
    assert r.opacity_centers and pixels[r.opacities].mean() > pixels[r.lungs & ~r.opacities].mean(), rel
    for x, y, _ in r.opacity_centers:  # Each recorded centre lies at a lung field.
      row, column = min(int(y / height * grid), grid - 1), min(int(x / width * grid), grid - 1)
      assert r.lungs[max(0, row - 3):row + 4, max(0, column - 3):column + 4].any(), (rel, x, y)
