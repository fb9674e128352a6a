#!/usr/bin/env bash
# The main job end to end on synthetic data, on a fresh machine: creates .venv,
# installs the pins, generates 3,000 synthetic chest X-rays, builds the audited
# patient-level splits, trains configs/demo.py from random initialisation,
# evaluates the best epoch on test and prints the metrics and where the plots are.
# Re-running reuses the data and resumes (or re-reports) the run in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

if [ ! -f data/synthetic_built/manifest.json ]; then
  rm -rf data/synthetic
  python -m data_prep.synthetic --output_dir data/synthetic --num_images 3000 --seed 0 --workers "$(nproc)"
  python -m data_prep.build --source_dir data/synthetic --data_dir data/synthetic_built --image_size 64
fi
python -m covid_jax.main --config=configs/demo.py --workdir=runs/demo "$@"
