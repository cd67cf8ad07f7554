#!/usr/bin/env bash
# Creates the virtualenv, installs what portllm needs and builds it (editable, extension included).
# Usage: tools/setup_venv.sh PYTHON VENV [LOCK]
#
# LOCK (default requirements-lock.txt; empty: none) is a pip constraints file: a fresh venv gets
# exactly the tested versions it pins, so an upstream release cannot break `make` overnight. With
# no lock (`make test-latest`), pip takes the newest releases that requirements-dev.txt admits.
#
# Where torch is already installed (the lent GPU machine: CUDA torch and no package registry), the
# venv sees the system's packages, the lock is not used (its torch is not that machine's) and pip
# finds every requirement already satisfied, so nothing is fetched. Elsewhere torch comes from
# `pip install torch==2.13.0` (the CPU wheel on these machines).
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}
LOCK=${3-requirements-lock.txt}

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
    touch "$VENV/.portllm-reuses-installed"
  else
    "$PY" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
CONSTRAINTS=()
UPGRADE=()
if [ -e "$VENV/.portllm-reuses-installed" ]; then
  echo "portllm: using the versions installed on this machine (no lock)"
elif [ -n "$LOCK" ]; then
  [ -f "$LOCK" ] || { echo "portllm: lock file $LOCK not found" >&2; exit 1; }
  echo "portllm: installing the tested versions pinned in $LOCK"
  CONSTRAINTS=(-c "$LOCK")
else
  echo "portllm: installing the newest releases requirements-dev.txt admits (no lock)"
  UPGRADE=(--upgrade)
fi
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  "${PIP[@]}" install -q ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} torch==2.13.0
fi
"${PIP[@]}" install -q ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} ${UPGRADE[@]+"${UPGRADE[@]}"} -r requirements-dev.txt
# compressed-tensors: what transformers loads compressed-tensors FP8 checkpoints with; the tests of
# the port into that format compare against its quantizer and loader. Optional: where it cannot be
# installed (no package registry), those checks skip and say why; nothing else needs it.
"${PIP[@]}" install -q --retries 0 --timeout 15 ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} "compressed-tensors>=0.12" \
  || echo "portllm: compressed-tensors not installed: the checks against its quantizer and loader will skip"
# --no-build-isolation: compile against the torch installed above, not a second one.
"${PIP[@]}" install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c 'import portllm, portllm.ops as o; print("portllm", portllm.__version__, "|", portllm._ext.build_info(), "| backends on cpu:", o.available_backends("cpu"))'
"${PIP[@]}" list --format=freeze 2>/dev/null | grep -iE '^(torch|triton|transformers|peft|accelerate|kernels|safetensors|numpy)==' | tr '\n' ' ' | sed 's/^/portllm: versions: /; s/ $/\n/'
