"""Writes requirements-lock.txt: the exact versions `make` installs, read off a venv that passed.

Usage: python tools/write_lock.py VENV [LOCK]   (what `make lock` runs, VENV = .venv-latest)

The lock is a pip constraints file (`pip install -c requirements-lock.txt ...`): it pins every
distribution in VENV except portllm itself and pip. torch loses its local label (2.13.0+cpu ->
2.13.0) so that the pin reads the same for the CPU wheel and any other build of that release.
Written to a temporary file and renamed over the lock, so an interrupted run leaves the old lock.
"""

import datetime
import os
import re
import subprocess
import sys


def main(argv):
    if len(argv) not in (2, 3):
        sys.exit(__doc__)
    venv = argv[1]
    lock = argv[2] if len(argv) == 3 else os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       "requirements-lock.txt")
    py = os.path.join(venv, "bin", "python")
    if not os.access(py, os.X_OK):
        sys.exit(f"write_lock: {py} not found: run `make test-latest` first, which builds {venv}")
    freeze = subprocess.run([py, "-m", "pip", "--disable-pip-version-check", "freeze", "--all",
                             "--exclude-editable"], check=True, capture_output=True, text=True).stdout
    pins = []
    for line in freeze.splitlines():
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line.strip())
        if m is None:
            continue  # comments, editable or direct-URL lines
        name, version = m.groups()
        if name.lower() in ("pip", "portllm"):
            continue
        if name.lower() == "torch":
            version = version.split("+")[0]
        pins.append(f"{name}=={version}")
    pins.sort(key=str.lower)
    versions = subprocess.run([py, "-c", "import sys; print('.'.join(map(str, sys.version_info[:3])))"],
                              check=True, capture_output=True, text=True).stdout.strip()
    header = [
        "# The tested set of versions `make` installs into a fresh .venv (a pip constraints file).",
        f"# Last bumped: {datetime.date.today().isoformat()}, on Python {versions}, by `make lock` after",
        "# `make test-latest` and `make demo VENV=.venv-latest LOCK=` passed (README, \"Versions\").",
        "# To bump: make test-latest && make demo VENV=.venv-latest LOCK= && make lock; commit this file.",
        "# Not used where torch is already installed (the GPU machine): there the installed versions are used.",
    ]
    tmp = f"{lock}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(header + pins) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, lock)
    print(f"wrote {lock}: {len(pins)} pins")


if __name__ == "__main__":
    main(sys.argv)
