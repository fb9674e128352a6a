"""benchmarks/benchmark.py: a tiny end-to-end run, and the Markdown section it owns."""

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import benchmark

_REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
  markdown, results = tmp_path / 'BENCHMARKS.md', tmp_path / 'out.json'
  markdown.write_text('# Benchmarks\n\nHand-written notes stay.\n')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  subprocess.run([sys.executable, '-m', 'benchmarks.benchmark', '--backbones', 'vgg16@32', '--batch_sizes', '2,4',
                  '--frameworks', 'covid_jax,keras_tensorflow', '--repeats', '2', '--pipeline_images', '0',
                  '--markdown', str(markdown), '--json', str(results)], check=True, env=env, cwd=_REPO)
  data = json.loads(results.read_text())
  # Two batch sizes: the second train cell starts again from the variables the first one's steps donated.
  cells = {(r['mode'], r['batch_size'], r['framework']): r for r in data['rows']}
  assert set(cells) == {(m, b, f) for m in ('inference', 'train') for b in (2, 4)
                        for f in ('covid_jax', 'keras_tensorflow')}
  for (_, batch_size, _), row in cells.items():
    assert len(row['seconds']) == 2
    assert row['images_per_s'] == pytest.approx(batch_size / statistics.median(row['seconds']))
    low, high = row['images_per_s_range']
    assert low <= row['images_per_s'] <= high
    assert row['first_call_s'] > 0 and row['peak_rss_bytes'] > 2**20
  # One FLOP count for both frameworks: their GFLOP/s differ exactly as their times do.
  ours, theirs = cells['train', 4, 'covid_jax'], cells['train', 4, 'keras_tensorflow']
  assert ours['gflops_per_s'] * ours['median_s'] == pytest.approx(theirs['gflops_per_s'] * theirs['median_s'])
  assert set(data['ceilings']) == {'covid_jax', 'keras_tensorflow'}
  text = markdown.read_text()
  assert 'Hand-written notes stay.' in text
  assert '| vgg16@32 | train | 2 |' in text


def test_update_markdown_replaces_only_its_section(tmp_path):
  path = tmp_path / 'B.md'
  begin, end = '<!-- benchmark.py: begin -->', '<!-- benchmark.py: end -->'
  gpu_begin, gpu_end = '<!-- benchmark.py GPU bfloat16: begin -->', '<!-- benchmark.py GPU bfloat16: end -->'
  path.write_text(f'# B\n\nbefore\n\n{begin}\nold table\n{end}\n\nafter\n')
  benchmark.update_markdown(str(path), f'{begin}\nnew table\n{end}\n')
  assert path.read_text() == f'# B\n\nbefore\n\n{begin}\nnew table\n{end}\n\nafter\n'
  # A named section goes after the rest the first time, and is replaced alone afterwards.
  benchmark.update_markdown(str(path), f'{gpu_begin}\ngpu table\n{gpu_end}\n', 'GPU bfloat16')
  benchmark.update_markdown(str(path), f'{gpu_begin}\ngpu table 2\n{gpu_end}\n', 'GPU bfloat16')
  assert path.read_text() == (f'# B\n\nbefore\n\n{begin}\nnew table\n{end}\n\nafter\n\n'
                              f'{gpu_begin}\ngpu table 2\n{gpu_end}\n')


def test_merge_keeps_rows_not_measured_again():
  def row(backbone, framework, images_per_s):
    return {'backbone': backbone, 'image_size': 224, 'mode': 'train', 'batch_size': 8, 'framework': framework,
            'images_per_s': images_per_s}

  def pipe(batch_size, images_per_s):
    return {'image_size': 224, 'batch_size': batch_size, 'cached_images_per_s': images_per_s}
  old = {'commands': ['a'], 'frameworks': ['covid_jax', 'keras_jax'], 'ceilings': {'keras_jax': {}},
         'pipeline': [pipe(8, 100.0), pipe(32, 200.0)],
         'rows': [row('vgg16', 'covid_jax', 1.0), row('vgg16', 'keras_jax', 2.0)]}
  new = {'commands': ['b'], 'frameworks': ['covid_jax'], 'ceilings': {'covid_jax': {}}, 'pipeline': [pipe(32, 300.0)],
         'rows': [row('vgg16', 'covid_jax', 3.0)]}
  merged = benchmark.merge(old, new)
  assert merged['commands'] == ['a', 'b']
  assert sorted((r['framework'], r['images_per_s']) for r in merged['rows']) == [('covid_jax', 3.0), ('keras_jax', 2.0)]
  assert merged['frameworks'] == ['covid_jax', 'keras_jax']
  assert set(merged['ceilings']) == {'covid_jax', 'keras_jax'}
  assert merged['pipeline'] == [pipe(8, 100.0), pipe(32, 300.0)]


def test_merge_gives_a_keras_row_measured_alone_the_flop_count_of_its_cell():
  def run(command, framework, median_s, flops=None):
    row = {'backbone': 'nasnet_large', 'image_size': 224, 'mode': 'train', 'batch_size': 32,
           'framework': framework, 'median_s': median_s, 'flops': flops,
           'gflops_per_s': flops / median_s / 1e9 if flops else None, 'command': command}
    return {'commands': [command], 'frameworks': [framework], 'ceilings': {}, 'pipeline': [], 'rows': [row]}
  merged = benchmark.merge(run('a', 'covid_jax', 30.0, flops=9e11), run('b', 'keras_tensorflow', 18.0))
  rows = {r['framework']: r for r in merged['rows']}
  assert rows['keras_tensorflow']['gflops_per_s'] == pytest.approx(50.0)  # 9e11 FLOP in 18 s.
  assert rows['covid_jax']['gflops_per_s'] == pytest.approx(30.0)
  # Another cell's count is not borrowed.
  other = run('c', 'keras_jax', 10.0)
  other['rows'][0]['batch_size'] = 8
  assert benchmark.merge(merged, other)['rows'][-1]['gflops_per_s'] is None


def test_merge_lists_only_the_commands_whose_rows_remain():
  def run(command, *backbones):
    rows = [{'backbone': b, 'image_size': 224, 'mode': 'train', 'batch_size': 8, 'framework': 'covid_jax',
             'command': command} for b in backbones]
    return {'commands': [command], 'frameworks': ['covid_jax'], 'ceilings': {}, 'pipeline': [], 'rows': rows}
  merged = benchmark.merge(benchmark.merge(run('a', 'vgg16'), run('b', 'resnet50')), run('c', 'vgg16'))
  assert merged['commands'] == ['b', 'c']


@pytest.mark.parametrize('setting, retained', [('true', 1), ('false', 0)])
def test_covid_jax_worker_retains_freed_host_memory_as_asked(tmp_path, monkeypatch, setting, retained):
  from benchmarks import benchmark_worker
  from covid_jax import runtime
  calls = []
  monkeypatch.setattr(runtime, 'retain_freed_memory', lambda: calls.append(True))
  weights = str(tmp_path / 'vgg16.h5')
  benchmark_worker.export_weights('vgg16', 32, weights)
  monkeypatch.setattr(sys, 'argv', ['benchmark_worker.py', '--framework', 'covid_jax', '--backbone', 'vgg16',
                                    '--image_size', '32', '--weights', weights, '--retain_freed_host_memory', setting])
  monkeypatch.setattr(benchmark_worker, 'serve', lambda runner, reply: None)
  monkeypatch.setattr(os, 'dup2', lambda *fds: None)  # Keep pytest's stdout where it is.
  benchmark_worker.main()
  assert len(calls) == retained


def test_rejects_unknown_framework(capsys):
  with pytest.raises(SystemExit):
    benchmark.parse_args(['--frameworks', 'covid_jax,pytorch'])
  assert "unknown 'pytorch'" in capsys.readouterr().err


def test_conv_backward_benchmark_times_ops_that_agree_with_tensorflow():
  """Its XLA ops compute TensorFlow's forward, input and kernel gradients (`measure` raises otherwise)."""
  from benchmarks import benchmark_conv_backward
  seconds = benchmark_conv_backward.measure(batch_size=2, size=9, c_in=3, c_out=5, repeats=2)
  assert set(seconds) == {'xla', 'tensorflow'}
  assert all(set(ops) == set(benchmark_conv_backward.OPS) and min(ops.values()) > 0 for ops in seconds.values())


def test_conv_backward_benchmark_rejects_a_wrong_formulation(monkeypatch):
  from benchmarks import benchmark_conv_backward
  convolve = benchmark_conv_backward._conv
  # A true convolution (flipped kernel) instead of TensorFlow's cross-correlation.
  monkeypatch.setattr(benchmark_conv_backward, '_conv', lambda x, kernel: convolve(x, kernel[::-1, ::-1]))
  with pytest.raises(AssertionError, match='forward'):
    benchmark_conv_backward.measure(batch_size=2, size=9, c_in=3, c_out=5, repeats=1)


def test_first_step_script_times_every_stage_and_sums_them():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-m', 'benchmarks.benchmark_first_step', '--model', 'vgg16', '--image_size',
                        '32', '--batch_size', '2', '--given_backbone'], check=True, capture_output=True, text=True,
                       env=env, cwd=_REPO).stdout.strip().splitlines()
  stages, total = out[-2].split('; total ')
  seconds = dict(part.rsplit(' ', 2)[:2] for part in stages.split(', '))
  assert list(seconds) == ['outline', 'initial variables', 'train state', 'train step', 'first run']
  assert float(total.removesuffix(' s')) == pytest.approx(sum(map(float, seconds.values())), abs=0.35)
  collector = re.fullmatch(r'Python garbage collection within them: ([\d.]+) s, (\d+) full collections', out[-1])
  assert collector and float(collector[1]) < float(total.removesuffix(' s')), out[-1]
