"""Helpers of scripts/device_check.sh: the environment it finds, the pins it lacks, and the benchmark's share of the
card's peak.

  python -m benchmarks.device_check environment OUT_DIR   # OUT_DIR/environment.json; prints it
  python -m benchmarks.device_check missing                # requirements.txt pins not installed (JAX, TF excluded)
  python -m benchmarks.device_check is_cuda_build          # exit status 0 where JAX has a CUDA plugin installed
  python -m benchmarks.device_check peak_share RESULTS.json OUT.md

The share of peak divides the benchmark's achieved GFLOP/s (XLA's FLOP count of covid_jax's step over each
framework's time) by the card's dense bfloat16 tensor-core peak from its vendor's data sheet (`PEAK_TFLOPS`,
matched by device name); a card not in the table gets no share.
"""

import importlib.metadata
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
# Dense bfloat16 tensor-core TFLOP/s (no sparsity), vendors' data sheets; the first name found in the device's wins.
PEAK_TFLOPS = (('H200', 989.4), ('H100 PCIe', 756.0), ('H100', 989.4), ('A100', 312.0), ('L4', 121.0))
# Pins the host's own builds replace: its CUDA build of JAX, and TensorFlow (absent on many accelerator hosts).
HOST_BUILDS = re.compile(r'^(jax|jaxlib|tensorflow.*|tensorboard.*|jax-cuda.*)$')


def pins() -> dict[str, str]:
  """requirements.txt as {distribution name (normalised): version}."""
  lines = (line.split('#')[0].strip() for line in (_REPO / 'requirements.txt').read_text().splitlines())
  return dict(_normalise(line).split('==') for line in lines if '==' in line)


def _normalise(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def _version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def is_cuda_build() -> bool:
  """Whether this Python's JAX has a CUDA plugin installed (the jax-cudaNN-plugin distributions)."""
  return any(_version(f'jax-cuda{major}-plugin') for major in (12, 13))


def missing() -> list[str]:
  """`name==version` of each pin that is not installed, less the host's own builds (HOST_BUILDS)."""
  return [f'{name}=={version}' for name, version in pins().items()
          if not HOST_BUILDS.match(name) and _version(name) is None]


def environment() -> dict[str, Any]:
  """The JAX found (version beside the pin, CUDA plugin, backend, devices), TensorFlow's and Keras's presence."""
  import jax
  wanted = pins()
  devices = jax.devices()
  plugins = {name: _version(name) for name in ('jax-cuda12-plugin', 'jax-cuda13-plugin', 'jax-cuda12-pjrt',
                                               'jax-cuda13-pjrt', 'libtpu')}
  return {
      'jax': jax.__version__, 'jaxlib': _version('jaxlib'), 'pinned_jax': wanted.get('jax'),
      'plugins': {name: version for name, version in plugins.items() if version},
      'backend': jax.default_backend(), 'device_count': len(devices), 'device_kind': devices[0].device_kind,
      'tensorflow': importlib.util.find_spec('tensorflow') is not None,
      'keras': importlib.util.find_spec('keras') is not None,
      'peak_bf16_tflops': peak_tflops(devices[0].device_kind),
  }


def peak_tflops(device_kind: str) -> float | None:
  return next((peak for name, peak in PEAK_TFLOPS if name.lower() in device_kind.lower()), None)


def peak_share_table(results: dict[str, Any], device_kind: str) -> str:
  """Markdown: each benchmark row's images/s, GFLOP/s and share of the card's peak (blank where unknown)."""
  peak = peak_tflops(device_kind)
  lines = [f'Device: {device_kind}; peak (dense bfloat16): {f"{peak:g} TFLOP/s" if peak else "not in the table"}',
           '', '| backbone | mode | batch | framework | images/s | GFLOP/s | share of peak |',
           '|---|---|---|---|---|---|---|']
  for row in results['rows']:
    rate = row.get('gflops_per_s')
    share = f'{rate / (peak * 1e3):.1%}' if rate and peak else ''
    lines.append(f'| {row["backbone"]}@{row["image_size"]} | {row["mode"]} | {row["batch_size"]} | {row["framework"]} '
                 f'| {row["images_per_s"]:,.1f} | {f"{rate:,.0f}" if rate else ""} | {share} |')
  return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> None:
  command, *args = argv
  if command == 'environment':
    found = environment()
    Path(args[0], 'environment.json').write_text(json.dumps(found, indent=1) + '\n')
    print(json.dumps(found, indent=1))
  elif command == 'missing':
    print('\n'.join(missing()))
  elif command == 'is_cuda_build':
    raise SystemExit(0 if is_cuda_build() else 1)
  elif command == 'peak_share':
    import jax
    table = peak_share_table(json.loads(Path(args[0]).read_text()), jax.devices()[0].device_kind)
    Path(args[1]).write_text(table)
    print(table)
  else:
    raise SystemExit(f'unknown command {command!r}: environment | missing | is_cuda_build | peak_share')


if __name__ == '__main__':
  main(sys.argv[1:])
