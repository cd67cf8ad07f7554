"""The benchmark suites declare themselves (benchmarks/suite.py) and run.py knows none by name; the CPU
limit a merge is held against is the fastest pass over W's bytes measured in the same run."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _suites():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    from suite import discover

    return discover()


def test_every_bench_file_declares_a_suite_and_run_py_names_none():
    suites = _suites()
    files = sorted(f for f in os.listdir(BENCH) if f.startswith("bench_") and f.endswith(".py"))
    assert sorted(s.file for s in suites.values()) == files
    assert {"patch_add", "port", "pmss", "serve", "exact", "train"} <= set(suites)
    with open(os.path.join(BENCH, "run.py")) as f:
        run = f.read()
    for name, s in suites.items():
        assert s.file not in run, f"run.py names {s.file}"
        assert all(f'"{op}"' not in run for op in s.ops if op != "port"), f"run.py knows suite {name}'s ops"
    ops = [op for s in suites.values() for op in s.ops]
    assert len(ops) == len(set(ops))


def _row(provider, ms, **kw):
    m, n = 4096, 14336
    nbytes = 2 * m * n * 2
    return dict(op="patch_add_", case="single", m=m, n=n, r=16, factor_dtype="bfloat16", provider=provider,
                median_ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9, **kw)


def test_cpu_limit_is_the_fastest_pass_and_says_which():
    """Xeon-like: the bf16 in-place pass is slow, the integer pass fastest; EPYC-like: the bf16 pass fastest;
    and where the FMA floor is slower than every pass, it is the limit."""
    derive = _suites()["patch_add"].rows
    for passes, want in (({"copy": 17.0, "in-place": 52.0, "in-place int": 13.0}, "in-place int"),
                         ({"copy": 9.0, "in-place": 4.0, "in-place int": 6.0}, "in-place")):
        rows = [_row(p, ms) for p, ms in passes.items()]
        rows += [_row("portllm-cpp", 20.0, isa="avx2"), _row("fma-floor", 1.0, isa="avx2")]
        derive(rows)
        cpp = rows[-2]
        assert cpp["limit_pass"] == want and cpp["limit_ms"] == min(passes.values())
        assert cpp["time_vs_limit"] == round(20.0 / min(passes.values()), 3)
        assert cpp["fraction_of_fastest_pass"] == round(cpp["gbps"] / rows[list(passes).index(want)]["gbps"], 3)
    rows = [_row("in-place", 4.0), _row("portllm-cpp", 30.0, isa="generic"), _row("fma-floor", 25.0, isa="generic")]
    derive(rows)
    assert rows[1]["limit_pass"] == "fma-floor@generic" and rows[1]["time_vs_limit"] == 1.2
