"""Speed of covid_jax against Keras 3 on the same machine, the same weights and the same inputs.

  python -m benchmarks.benchmark                                  # the full table (long on a CPU)
  python -m benchmarks.benchmark --backbones resnet50 --batch_sizes 8 --repeats 3

For each backbone (NAME or NAME@SIZE) and batch size, and for each mode:

  inference   a jitted forward pass in inference mode (covid_jax's eval step, Keras predict_on_batch)
  train       one full fine-tune step: forward + backward + Adam update, every layer trainable, BN on
              batch statistics (covid_jax's train step, Keras train_on_batch)
  head        one step of the study's first phase: backbone frozen (no gradients, BN in inference
              mode), only the head trains (not in the default --modes)

of the whole classifier (preprocessing, backbone, average pooling, the study's head), in

  covid_jax             the training system's own compiled steps
  keras_tensorflow      Keras 3, TensorFlow backend, jit_compile=False (TensorFlow's own oneDNN kernels)
  keras_tensorflow_xla  Keras 3, TensorFlow backend, Keras's default jit_compile='auto' (XLA)
  keras_jax             Keras 3, JAX backend (XLA)

Each framework runs in its own process (benchmarks/benchmark_worker.py) on the same
seeded backbone weights and inputs. After compilation and one warm-up step, the
frameworks take turns, one timed step each per round, so machine noise hits all
alike; a row reports the median over rounds and the spread (min-max). Also
reported: the first call's time (compilation included), the process's peak
resident memory during the cell, achieved GFLOP/s (XLA's FLOP count of
covid_jax's step divided by each framework's time) next to the matmul and 3x3
convolution GFLOP/s each framework reaches in the same run, and the input
pipeline's images/s. Results go to a Markdown section of --markdown (default
benchmarks/BENCHMARKS.md; replaced between markers, the rest of the file kept)
and to --json (default benchmarks/results/cpu.json). With --merge, the
rows of an earlier --json are kept unless this run measures them again, so slow
backbones can run with fewer frameworks in a separate invocation (a row measured
without covid_jax takes its FLOP count from covid_jax's row of the same cell). Both files are
rewritten after each cell, so a run cut short keeps what it measured.
--section names a section of its own (another machine, another dtype), kept
beside the others in the same Markdown file:

  python -m benchmarks.benchmark --frameworks covid_jax,keras_jax --dtype bfloat16 \
      --section 'GPU H200 bfloat16' --json benchmarks/results/h200_bfloat16.json

covid_jax runs as covid_jax.main does by default on a CPU, keeping freed host memory in one
malloc arena, with glibc's per-thread caches enlarged (covid_jax/runtime.py);
--retain_freed_host_memory false times it as
--config.retain_freed_host_memory=False runs it (what a GPU or TPU run does by default).
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import benchmark_worker
from covid_jax import runtime

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent
_WORKER = [sys.executable, '-m', 'benchmarks.benchmark_worker']
_PIPELINE = [sys.executable, '-m', 'benchmarks.benchmark_input_pipeline']
DEFAULT_BACKBONES = 'vgg16,resnet50,nasnet_mobile,nasnet_large,nasnet_large@331'
_BACKBONE_ORDER = list(dict.fromkeys(b.partition('@')[0] for b in DEFAULT_BACKBONES.split(',')))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--backbones', default=DEFAULT_BACKBONES,
                      help='comma-separated NAME or NAME@SIZE (default size 224)')
  parser.add_argument('--batch_sizes', default='1,8,32', help='comma-separated global batch sizes')
  parser.add_argument('--modes', default='inference,train', help='comma-separated inference, train, head')
  parser.add_argument('--frameworks', default=','.join(benchmark_worker.FRAMEWORKS),
                      help=f'comma-separated subset of {",".join(benchmark_worker.FRAMEWORKS)}')
  parser.add_argument('--repeats', type=int, default=5, help='timed rounds per cell')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--retain_freed_host_memory', choices=('true', 'false'), default='true',
                      help="covid_jax's config.retain_freed_host_memory (one malloc arena that keeps freed memory; "
                           "covid_jax.main's default: true)")
  parser.add_argument('--pipeline_images', type=int, default=1000,
                      help='synthetic images for the input-pipeline measurement (0 skips it)')
  parser.add_argument('--markdown', default=str(_HERE / 'BENCHMARKS.md'), help='Markdown file to update')
  parser.add_argument('--json', default=str(_HERE / 'results' / 'cpu.json'), help='JSON results file')
  parser.add_argument('--merge', action='store_true', help='keep the rows of --json that this run does not redo')
  parser.add_argument('--section', default='', help='name of the Markdown section to write (default: the main one)')
  args = parser.parse_args(argv)
  args.backbones = [_backbone(b) for b in args.backbones.split(',')]
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  args.modes = args.modes.split(',')
  args.frameworks = args.frameworks.split(',')
  for name in args.frameworks:
    if name not in benchmark_worker.FRAMEWORKS:
      parser.error(f'--frameworks: unknown {name!r}; known: {benchmark_worker.FRAMEWORKS}')
  for mode in args.modes:
    if mode not in ('inference', 'train', 'head'):
      parser.error(f'--modes: unknown {mode!r}; known: inference, train, head')
  return args


def _backbone(text: str) -> tuple[str, int]:
  name, _, size = text.partition('@')
  return name, int(size or 224)


class Worker:
  """One framework's process, spoken to one JSON line at a time.

  It starts at once; `wait_until_ready` waits for it to build its model, so several workers build theirs
  side by side.
  """

  def __init__(self, framework: str, backbone: str, image_size: int, weights: str, dtype: str,
               retain_freed_host_memory: str):
    self.framework = framework
    self.process = subprocess.Popen(
        [*_WORKER, '--framework', framework, '--backbone', backbone, '--image_size',
         str(image_size), '--weights', weights, '--dtype', dtype,
         '--retain_freed_host_memory', retain_freed_host_memory],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_worker_env(framework), cwd=_REPO)

  def wait_until_ready(self) -> None:
    self._read()  # {"ready": true}

  def ask(self, **command: Any) -> dict[str, Any]:
    self.process.stdin.write(json.dumps(command) + '\n')
    self.process.stdin.flush()
    return self._read()

  def _read(self) -> dict[str, Any]:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.framework} worker exited with status {self.process.wait()} (its log is above)')
    answer = json.loads(line)
    if 'error' in answer:
      raise RuntimeError(f'{self.framework} worker: {answer["error"]}')
    return answer

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait()


def markers(section: str = '') -> tuple[str, str]:
  """The comments that delimit a section of the Markdown file."""
  name = f'benchmark.py {section}'.strip()
  return f'<!-- {name}: begin -->', f'<!-- {name}: end -->'


def _worker_env(framework: str) -> dict[str, str]:
  # Workers share one accelerator: each takes GPU memory as it needs it, not 75% up front.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', XLA_PYTHON_CLIENT_PREALLOCATE='false')
  env['KERAS_BACKEND'] = benchmark_worker.KERAS_BACKEND.get(framework, 'tensorflow')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # First-call times must include compilation.
  if framework != 'covid_jax' and benchmark_worker.KERAS_BACKEND.get(framework) == 'tensorflow':
    env.setdefault('JAX_PLATFORMS', 'cpu')  # JAX is imported by covid_jax's helpers only.
  if framework == 'covid_jax':  # As covid_jax.main runs (covid_jax/runtime.py).
    env = runtime.with_thread_caches(env) or env
  return env


def export_weights(backbone: str, image_size: int, path: str, frameworks: list[str]) -> None:
  """Seeded Keras weights, written by the first Keras backend the run uses (Keras-JAX if none)."""
  framework = next((f for f in frameworks if f in benchmark_worker.KERAS_BACKEND), 'keras_jax')
  subprocess.run([*_WORKER, '--framework', framework, '--backbone', backbone,
                  '--image_size', str(image_size), '--weights', path, '--export_weights'],
                 check=True, env=_worker_env(framework), cwd=_REPO)


def measure_backbone(backbone: str, image_size: int, args: argparse.Namespace, weights: str,
                     ceilings: dict[str, dict]) -> Iterator[list[dict]]:
  """All cells of one backbone, yielding each cell's rows: every framework alive at once, taking turns.

  Fills `ceilings` (framework -> GFLOP/s) when it is empty.
  """
  workers = [Worker(f, backbone, image_size, weights, args.dtype, args.retain_freed_host_memory)
             for f in args.frameworks]
  try:
    for w in workers:
      w.wait_until_ready()
    if not ceilings:
      ceilings.update({w.framework: w.ask(op='ceilings') for w in workers})
    forward_flops = {}
    if 'covid_jax' in args.frameworks:
      ours = workers[args.frameworks.index('covid_jax')]
      forward_flops = {b: ours.ask(op='flops', batch_size=b)['flops'] for b in args.batch_sizes}
    for mode in args.modes:
      for batch_size in args.batch_sizes:
        flops = forward_flops.get(batch_size)
        if flops and mode == 'train':
          flops *= 3  # Backward ~ 2x forward: the usual estimate.
        first = {w.framework: w.ask(op='setup', mode=mode, batch_size=batch_size)['first_call_s'] for w in workers}
        times: dict[str, list[float]] = {w.framework: [] for w in workers}
        for round_index in range(args.repeats):
          for w in workers[round_index % len(workers):] + workers[:round_index % len(workers)]:
            times[w.framework].append(w.ask(op='step')['seconds'])
        rows = []
        for w in workers:
          seconds = times[w.framework]
          median = statistics.median(seconds)
          rows.append({
              'backbone': backbone, 'image_size': image_size, 'mode': mode, 'batch_size': batch_size,
              'framework': w.framework, 'seconds': seconds, 'median_s': median,
              'images_per_s': batch_size / median, 'images_per_s_range': [batch_size / max(seconds),
                                                                          batch_size / min(seconds)],
              'first_call_s': first[w.framework], 'peak_rss_bytes': w.ask(op='peak')['peak_rss_bytes'],
              'flops': flops, 'gflops_per_s': flops / median / 1e9 if flops else None,
          })
          print(_progress_line(rows[-1]), flush=True)
        yield rows
  finally:
    for w in workers:
      w.close()


def _progress_line(row: dict) -> str:
  return (f'{row["backbone"]}@{row["image_size"]} {row["mode"]} b{row["batch_size"]} {row["framework"]}: '
          f'{row["images_per_s"]:.2f} img/s (first call {row["first_call_s"]:.1f} s)')


def measure_pipeline(num_images: int, image_size: int, batch_sizes: list[int]) -> list[dict]:
  """Cached-epoch images/s of the training input pipeline (benchmarks/benchmark_input_pipeline.py)."""
  rows = []
  with tempfile.TemporaryDirectory() as data_dir:
    for batch_size in batch_sizes:
      out = subprocess.run(
          [*_PIPELINE, '--data_dir', os.path.join(data_dir, 'built'), '--num_images',
           str(num_images), '--image_size', str(image_size), '--batch_size', str(batch_size), '--json'],
          check=True, capture_output=True, text=True, cwd=_REPO, env=_worker_env('covid_jax')).stdout
      rows.append(json.loads(out.strip().splitlines()[-1]))
  return rows


def describe_machine() -> dict[str, Any]:
  cpu = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  gpus = []
  try:
    gpus = subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'], capture_output=True,
                          text=True, check=True).stdout.split('\n')
  except (OSError, subprocess.CalledProcessError):
    pass
  return {'cpu': cpu, 'cpu_cores': os.cpu_count(), 'gpus': [g for g in gpus if g.strip()],
          'python': platform.python_version(), 'versions': _versions()}


def _versions() -> dict[str, str]:
  from importlib import metadata
  packages = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda13-plugin', 'flax', 'keras', 'tensorflow-cpu',
              'tensorflow')
  return {p: metadata.version(p) for p in packages if _installed(metadata, p)}


def _installed(metadata: Any, package: str) -> bool:
  try:
    metadata.version(package)
    return True
  except metadata.PackageNotFoundError:
    return False


def to_markdown(results: dict[str, Any]) -> str:
  m = results['machine']
  begin, end = markers(results.get('section', ''))
  lines = [
      begin,
      '### Training and inference speed: covid_jax vs Keras 3' + (f' ({results["section"]})' if results.get('section')
                                                                  else ''),
      '',
      ', '.join(f'`{c}`' for c in results['commands'])
      + f'; {results["date"]}, on {m["cpu"]} ({m["cpu_cores"]} cores)'
      + (f', GPU: {", ".join(m["gpus"])}' if m['gpus'] else ', no GPU') + f', {results["dtype"]}. '
      + ', '.join(f'{k} {v}' for k, v in m['versions'].items()) + '.',
      '',
      'Images/s: median over rounds (min-max in brackets); the frameworks take turns within each round. '
      '"vs best Keras" is covid_jax\'s images/s over the fastest Keras variant\'s. "first" is the first call '
      '(compilation included), "peak" the process\'s peak resident memory in that cell, GFLOP/s uses XLA\'s FLOP '
      'count of covid_jax\'s forward pass (train: 3x).',
      '',
  ]
  frameworks = results['frameworks']
  header = ['backbone', 'mode', 'batch'] + frameworks + ['vs best Keras']
  lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  cells: dict[tuple, dict[str, dict]] = {}
  for row in sorted(results['rows'], key=_table_order):
    cells.setdefault((row['backbone'], row['image_size'], row['mode'], row['batch_size']), {})[row['framework']] = row
  for (backbone, size, mode, batch), by_framework in cells.items():
    entries = []
    for f in frameworks:
      r = by_framework.get(f)
      low, high = (None, None) if r is None else r['images_per_s_range']
      entries.append('' if r is None else f'{_rate(r["images_per_s"])} ({_rate(low)}-{_rate(high)})')
    keras_best = max((r['images_per_s'] for f, r in by_framework.items() if f != 'covid_jax'), default=None)
    ours = by_framework.get('covid_jax')
    ratio = f'{ours["images_per_s"] / keras_best:.2f}x' if ours and keras_best else ''
    lines.append(f'| {backbone}@{size} | {mode} | {batch} | ' + ' | '.join(entries) + f' | {ratio} |')
  lines += ['', 'First call (s), peak memory (GiB), achieved GFLOP/s:', '']
  header = ['backbone', 'mode', 'batch'] + frameworks
  lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for (backbone, size, mode, batch), by_framework in cells.items():
    entries = []
    for f in frameworks:
      r = by_framework.get(f)
      gflops = f', {r["gflops_per_s"]:,.0f} GFLOP/s' if r and r['gflops_per_s'] else ''
      entries.append('' if r is None else
                     f'{r["first_call_s"]:.1f} s, {r["peak_rss_bytes"] / 2**30:.1f} GiB{gflops}')
    lines.append(f'| {backbone}@{size} | {mode} | {batch} | ' + ' | '.join(entries) + ' |')
  if results['ceilings']:
    n, shape = benchmark_worker.MATMUL_N, 'x'.join(map(str, benchmark_worker.CONV_SHAPE))
    lines += ['', f'Ceilings measured in the same run ({results["dtype"]} GFLOP/s, best of 10): {n}x{n} matmul, '
              '3x3 convolution '
              f'{shape} -> {benchmark_worker.CONV_FEATURES} channels:',
              '', '| framework | matmul | conv 3x3 |', '|---|---|---|']
    for f, c in results['ceilings'].items():
      lines.append(f'| {f} | {c["matmul"]:,.0f} | {c["conv"]:,.0f} |')
  if results['pipeline']:
    lines += ['', 'Input pipeline (cached epochs, augmentation on), images/s:', '',
              '| image size | batch | images/s |', '|---|---|---|']
    for p in results['pipeline']:
      lines.append(f'| {p["image_size"]} | {p["batch_size"]} | {p["cached_images_per_s"]:,.0f} |')
  lines.append(end)
  return '\n'.join(lines) + '\n'


def _table_order(row: dict) -> tuple:
  """Backbones as in the default list, then image size, mode and batch size."""
  known = row['backbone'] in _BACKBONE_ORDER
  return (_BACKBONE_ORDER.index(row['backbone']) if known else len(_BACKBONE_ORDER), row['backbone'],
          row['image_size'], ('inference', 'train', 'head').index(row['mode']), row['batch_size'])


def _rate(images_per_s: float) -> str:
  return f'{images_per_s:,.0f}' if images_per_s >= 1000 else f'{images_per_s:.3g}'


def _cell_key(row: dict) -> tuple:
  return row['backbone'], row['image_size'], row['mode'], row['batch_size'], row['framework']


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
  """`new` plus the rows, ceilings and pipeline figures of `old` that `new` did not measure."""
  redone = {_cell_key(r) for r in new['rows']}
  merged = dict(new)
  rows = [r for r in old['rows'] if _cell_key(r) not in redone] + new['rows']
  remeasured = {(r['image_size'], r['batch_size']) for r in new['pipeline']}
  merged['pipeline'] = [r for r in old['pipeline'] if (r['image_size'], r['batch_size']) not in remeasured]
  merged['pipeline'] += new['pipeline']
  # Only the commands whose rows are still there (all of them if some row does not say which made it).
  used = {r.get('command') for r in rows + merged['pipeline']}
  merged['commands'] = [c for c in dict.fromkeys(old['commands'] + new['commands']) if c in used or None in used]
  merged['rows'] = _with_cell_flops(rows)
  merged['frameworks'] = list(dict.fromkeys(old['frameworks'] + new['frameworks']))
  merged['ceilings'] = {**old['ceilings'], **new['ceilings']}
  return merged


def _with_cell_flops(rows: list[dict]) -> list[dict]:
  """`rows`, a row without a FLOP count given its cell's, where another row of the cell has one.

  The count is XLA's of covid_jax's step, the same for every framework of a cell: a Keras row measured
  in an invocation without covid_jax still gets its GFLOP/s from the covid_jax row of another.
  """
  counts = {_cell_key(r)[:-1]: r['flops'] for r in rows if r.get('flops')}
  filled = []
  for r in rows:
    flops = counts.get(_cell_key(r)[:-1])
    needs = flops and not r.get('flops')
    filled.append(dict(r, flops=flops, gflops_per_s=flops / r['median_s'] / 1e9) if needs else r)
  return filled


def update_markdown(path: str, section: str, name: str = '') -> None:
  """Replaces section `name` between its markers (or appends it), keeping the rest of the file."""
  begin, end = markers(name)
  text = Path(path).read_text() if os.path.exists(path) else '# Benchmarks\n'
  if begin in text and end in text:
    text = text[:text.index(begin)] + section + text[text.index(end) + len(end) + 1:]
  else:
    text = text.rstrip('\n') + '\n\n' + section
  Path(path).write_text(text)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  results: dict[str, Any] = {
      'commands': ['python -m benchmarks.benchmark ' + shlex.join(sys.argv[1:] if argv is None else argv)],
      'date': datetime.date.today().isoformat(), 'machine': describe_machine(), 'dtype': args.dtype,
      'section': args.section, 'frameworks': args.frameworks, 'rows': [], 'ceilings': {}, 'pipeline': [],
  }
  earlier = json.loads(Path(args.json).read_text()) if args.merge and os.path.exists(args.json) else None
  with tempfile.TemporaryDirectory() as tmp:
    for backbone, image_size in args.backbones:
      weights = os.path.join(tmp, f'{backbone}_{image_size}.h5')
      export_weights(backbone, image_size, weights, args.frameworks)
      for rows in measure_backbone(backbone, image_size, args, weights, results['ceilings']):
        results['rows'] += [dict(row, command=results['commands'][0]) for row in rows]
        write(results, earlier, args)
  if args.pipeline_images:
    pipeline = measure_pipeline(args.pipeline_images, 224, args.batch_sizes)
    results['pipeline'] = [dict(row, command=results['commands'][0]) for row in pipeline]
    write(results, earlier, args)
  print(f'wrote {args.markdown} and {args.json}')


def write(results: dict[str, Any], earlier: dict[str, Any] | None, args: argparse.Namespace) -> None:
  """The JSON file and the Markdown section, with what is measured so far (merged into `earlier`)."""
  if earlier is not None:
    results = merge(earlier, results)
  Path(args.json).write_text(json.dumps(results, indent=1) + '\n')
  update_markdown(args.markdown, to_markdown(results), args.section)


if __name__ == '__main__':
  main()
