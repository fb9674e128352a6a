# Sourced by the scripts: creates .venv if needed, installs the requirements of the chosen accelerator when
# they changed since the last install, and activates the environment.
# COVID_JAX_ACCELERATOR picks them: cpu (default) requirements.txt, cuda12 requirements-gpu.txt,
# cuda13 requirements-gpu-cuda13.txt, tpu requirements-tpu.txt (each holds the CPU pins).
PYTHON="${PYTHON:-python3}"
case "${COVID_JAX_ACCELERATOR:-cpu}" in
  cpu) requirements=requirements.txt ;;
  cuda12) requirements=requirements-gpu.txt ;;
  cuda13) requirements=requirements-gpu-cuda13.txt ;;
  tpu) requirements=requirements-tpu.txt ;;
  *)
    echo "COVID_JAX_ACCELERATOR=${COVID_JAX_ACCELERATOR}: unknown; one of cpu, cuda12, cuda13, tpu" >&2
    return 2 2>/dev/null || exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
# The CPU set's stamp is requirements.txt's digest; an accelerator's covers its file as well.
stamped=(requirements.txt)
if [ "$requirements" != requirements.txt ]; then
  stamped+=("$requirements")
fi
want=$(cat "${stamped[@]}" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet -r "$requirements"
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
