#!/usr/bin/env bash
# Creates the virtualenv, installs what portllm needs and builds it (editable, extension included).
# Usage: tools/setup_venv.sh PYTHON VENV
#
# Where torch is already installed (the lent GPU machine: CUDA torch and no package registry), the
# venv sees the system's packages and pip finds every requirement already satisfied, so nothing is
# fetched. Elsewhere torch comes from `pip install torch==2.13.0` (the CPU wheel on these machines).
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c 'import torch' 2>/dev/null; then
    echo "portllm: reusing the installed torch ($("$PY" -c 'import torch; print(torch.__version__)'))"
    # --without-pip: pip and setuptools come from PY too, so that their versions agree with torch.
    "$PY" -m venv --system-site-packages --without-pip "$VENV"
    # PY may itself be a virtualenv (as on the GPU machine), whose packages
    # --system-site-packages does not reach: a .pth file puts them on the path.
    parent=$("$PY" -c 'import sysconfig as s; p = s.get_paths(); print(p["purelib"]); print(p["platlib"])' | sort -u)
    child=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$parent" > "$child/_portllm_parent_env.pth"
  else
    "$PY" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  "${PIP[@]}" install -q torch==2.13.0
fi
"${PIP[@]}" install -q -r requirements-dev.txt
# --no-build-isolation: compile against the torch installed above, not a second one.
"${PIP[@]}" install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c 'import portllm, portllm.ops as o; print("portllm", portllm.__version__, "|", portllm._ext.build_info(), "| backends on cpu:", o.available_backends("cpu"))'
