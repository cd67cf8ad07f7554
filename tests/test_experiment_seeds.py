"""run_seeds, the demo's runner of one process per seed: a seed that fails or ends without its results
stops the run with its last lines, and no other seed's process outlives it. The seed processes are
stand-ins (a few lines of Python each), not the experiment."""

import json
import os
import subprocess
import sys

import pytest

from portllm.experiment import run

FAKE = r"""
import json, os, sys, time
d, s = sys.argv[-3], int(sys.argv[-2])
print(f"  [seed {s}] starting", flush=True)
if s == 1:
    print("something went wrong in seed 1", flush=True)
    sys.exit(3)
if s == 2:
    sys.exit(0)  # ends well, writes nothing
if s == 9:
    time.sleep(600)
os.makedirs(d, exist_ok=True)
with open(os.path.join(d, "seed.json"), "w") as f:
    json.dump({"seed": s}, f)
"""


@pytest.fixture
def fake_seeds(monkeypatch, tmp_path):
    started = []
    real = subprocess.Popen

    def popen(cmd, **kw):
        assert cmd[1:3] == ["-m", "portllm.experiment.seed_run"]
        p = real([sys.executable, "-c", FAKE] + cmd[3:], **kw)
        started.append(p)
        return p

    monkeypatch.setattr(run.subprocess, "Popen", popen)
    return started


def test_results_in_seed_order(fake_seeds, tmp_path):
    lines = []
    out = run.run_seeds(str(tmp_path), [4, 0, 3], quick=True, log=lines.append)
    assert [r["seed"] for r in out] == [4, 0, 3]
    assert sorted(lines) == [f"  [seed {s}] starting" for s in (0, 3, 4)]
    assert all(p.poll() is not None and p.stdout.closed for p in fake_seeds)


def test_a_failed_seed_stops_the_run_and_no_seed_outlives_it(fake_seeds, tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)seed 1 failed:.*something went wrong in seed 1"):
        run.run_seeds(str(tmp_path), [9, 1], quick=True, log=lambda *_: None)
    assert len(fake_seeds) == 2
    assert all(p.poll() is not None for p in fake_seeds)  # seed 9 (sleeping 600 s) was killed and reaped
    assert all(p.stdout.closed for p in fake_seeds)


def test_a_seed_without_results_is_named(fake_seeds, tmp_path):
    with pytest.raises(RuntimeError, match=r"seed 2 ended without its results .*seed-2.*seed\.json"):
        run.run_seeds(str(tmp_path), [0, 2], quick=True, log=lambda *_: None)
    assert os.path.exists(tmp_path / "seed-0" / "seed.json")
    assert json.loads((tmp_path / "seed-0" / "seed.json").read_text()) == {"seed": 0}
