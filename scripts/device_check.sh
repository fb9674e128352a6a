#!/usr/bin/env bash
# One prepared check of a GPU host, its results under OUT_DIR; the stages' limits add up to 8 minutes:
#
#   bash scripts/device_check.sh OUT_DIR [--wheels DIR] [--dry_run]
#
# Stages, each under its own time limit, each reported in OUT_DIR/summary.txt as ok, failed, timed out or
# skipped (with the reason), the log of each in OUT_DIR/<stage>.log:
#   environment  the Python whose JAX is a CUDA build (else .venv's), its versions beside the pins
#                (environment.json); refuses a host whose JAX does not run on a GPU, unless --dry_run
#   wheels       installs the pinned pure-Python packages it lacks from --wheels DIR (no network)
#   tests        the accelerator-choice tests, on the card
#   data, run    python -m covid_jax.main --config=configs/nasnet.py on generated data, random init, every
#                layer trained, one epoch of a few steps (needs TensorFlow, which builds and reads the data)
#   benchmark    train step, batch 32, bfloat16: VGG16, ResNet50, NASNetMobile, NASNetLarge against Keras on
#                JAX where Keras is installed; images/s and share of the card's peak (benchmark.md, peak_share.md)
# --dry_run runs every stage at tiny sizes on whatever backend JAX has (a CPU: a few minutes).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bash scripts/device_check.sh OUT_DIR [--wheels DIR] [--dry_run]" >&2; exit 2; }
out="" wheels="" dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || usage; wheels="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) [ -z "$out" ] || usage; out="$1"; shift ;;
  esac
done
[ -n "$out" ] || usage
[ -z "$wheels" ] || [ -d "$wheels" ] || { echo "--wheels $wheels: not a directory" >&2; exit 2; }
mkdir -p "$out" && out="$(cd "$out" && pwd)"
summary="$out/summary.txt"
: > "$summary"

# stage NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output in NAME.log, its outcome in summary.
stage() {
  local name="$1" limit="$2" started=$SECONDS
  shift 2
  echo "== $name (at most ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$? outcome
  case $rc in
    0) outcome=ok ;;
    124|137) outcome="timed out after ${limit}s" ;;
    *) outcome="failed (exit $rc)" ;;
  esac
  echo "$name: $outcome in $((SECONDS - started))s" | tee -a "$summary"
  tail -n 5 "$out/$name.log"
  return $rc
}
skip() { echo "$1: skipped: $2" | tee -a "$summary"; }

# The Python whose JAX is a CUDA build, else the first that has JAX at all.
python=""
for candidate in ${PYTHON:-} python3 .venv/bin/python; do
  command -v "$candidate" > /dev/null 2>&1 && "$candidate" -c 'import jax' 2> /dev/null || continue
  [ -n "$python" ] || python="$candidate"
  if "$candidate" -m benchmarks.device_check is_cuda_build; then
    python="$candidate"; break
  fi
done
if [ -z "$python" ]; then
  echo "no Python with JAX found (tried ${PYTHON:-} python3 .venv/bin/python)" | tee -a "$summary"
  exit 1
fi
echo "Python: $python" | tee -a "$summary"
export TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
# The tests' conftest hides accelerators unless these are set: here they run on the card.
export JAX_PLATFORMS="" CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-0}"

stage environment 30 "$python" -m benchmarks.device_check environment "$out"
backend=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["backend"])' "$out/environment.json" \
          2> /dev/null || echo unknown)
if [ "$backend" != gpu ] && [ $dry_run = 0 ]; then
  echo "JAX runs on '$backend' here, not a GPU: run with --dry_run for the check's own dry run" | tee -a "$summary"
  exit 1
fi

if [ -n "$wheels" ]; then
  missing=$("$python" -m benchmarks.device_check missing)
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    stage wheels 40 "$python" -m pip install --no-index --find-links "$wheels" $missing
  else
    skip wheels 'every pinned package is installed'
  fi
else
  skip wheels "no --wheels DIR given (missing pins: $("$python" -m benchmarks.device_check missing | tr '\n' ' '))"
fi

has_tensorflow=$("$python" -c 'import importlib.util as u; print(u.find_spec("tensorflow") is not None)')
no_tf='TensorFlow is not importable: the tests'"'"' fixtures and data_prep.build write TFRecords with it, and'
no_tf+=' covid_jax.input_pipeline reads them with it (covid_jax/tfrecord_reader.py reads a build without it, but'
no_tf+=' training does not use it yet)'
if [ $dry_run = 1 ]; then
  tests=(tests/test_backend_policy.py tests/test_prefetch.py -k 'not readers')
  images=60 size=32 batch=8
  model=(--config.model.name=nasnet --config.model.nasnet.penultimate_filters=96 --config.model.nasnet.num_blocks=1
         --config.model.nasnet.stem_block_filters=8 --config.formulations.depthwise=grouped)
  bench=(--backbones vgg16@32 --batch_sizes 2 --repeats 1)
else
  tests=(tests/test_backend_policy.py tests/test_accelerator_paths.py tests/test_formulations.py tests/test_prefetch.py)
  images=240 size=224 batch=32 model=()
  bench=(--backbones vgg16,resnet50,nasnet_mobile,nasnet_large --batch_sizes 32 --repeats 5)
fi

if [ "$has_tensorflow" = True ]; then
  stage tests 60 "$python" -m pytest -q -p no:cacheprovider "${tests[@]}"
  rm -rf "$out/data" "$out/run"
  if stage data 60 bash -c '"$1" -m data_prep.synthetic --output_dir "$2/source" --num_images "$3" --seed 0 &&
      "$1" -m data_prep.build --source_dir "$2/source" --data_dir "$2/built" --image_size "$4"' \
      _ "$python" "$out/data" "$images" "$size"; then
    stage run 140 "$python" -m covid_jax.main --config=configs/nasnet.py --workdir="$out/run" \
      --config.data_dir="$out/data/built" --config.init_from='' --config.freeze_backbone=False \
      --config.num_epochs=1 --config.fine_tune.num_epochs=0 --config.batch_size="$batch" \
      --config.eval_batch_size="$batch" --config.model.image_size="$size" --config.compilation_cache_dir='' \
      "${model[@]}"
  else
    skip run 'the data stage did not finish'
  fi
else
  skip tests "$no_tf"
  skip data "$no_tf"
  skip run "$no_tf"
fi

frameworks=covid_jax
"$python" -c 'import keras' 2> /dev/null && frameworks=covid_jax,keras_jax
stage benchmark 130 "$python" -m benchmarks.benchmark --frameworks "$frameworks" --modes train --dtype bfloat16 \
  --pipeline_images 0 --retain_freed_host_memory false --json "$out/benchmark.json" --markdown "$out/benchmark.md" \
  --section "device check" "${bench[@]}"
if [ -f "$out/benchmark.json" ]; then
  stage peak_share 20 "$python" -m benchmarks.device_check peak_share "$out/benchmark.json" "$out/peak_share.md"
else
  skip peak_share 'the benchmark wrote no results'
fi
echo "Results: $out (summary.txt, environment.json, benchmark.md, peak_share.md, <stage>.log)"
