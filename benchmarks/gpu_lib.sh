# Shared by the device scripts (benchmarks/gpu_throughput.sh, kernels/gpu_check.sh); sourced from the repo root.
# use_wheels FOLDER "MODULES": installs the carried wheels of FOLDER (if any) into /tmp/ckf_site, puts it and the
# repo on PYTHONPATH, and checks that MODULES import; says what is missing (through `summary`) and exits 2 if not.
use_wheels() {
  local wheels=$1 modules=$2
  if ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ckf_site \
      "$wheels"/*.whl || { summary "error: installing $wheels failed"; exit 2; }
    export PYTHONPATH=/tmp/ckf_site:$PWD
  else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -c "import ${modules// /, }" 2>/dev/null || { summary "error: one of $modules is missing: carry $wheels"; exit 2; }
}
