"""The experiment's figures over seeds: mean ± spread of every accuracy, retention per cell and in
aggregate, the harmful cells, and how well the portability check predicted them.

Definitions (a cell: one seed, task, release and patch type):

* retention R = (acc(θ′+Δ) − acc(θ′)) / (acc(θ+Δ) − acc(θ)), only where the patch gains at least
  ``MIN_GAIN`` on its own base (elsewhere there is nothing to retain, and the ratio is noise);
* aggregate retention, per release and patch type: Σ(acc(θ′+Δ) − acc(θ′)) / Σ(acc(θ+Δ) − acc(θ)) over
  the cells with that gain: a mean weighted by the gain, which no small denominator can blow up;
* harmful: acc(θ′+Δ) < acc(θ′): the port made the release worse than the release alone.
"""

from __future__ import annotations

import math

MIN_GAIN = 0.1


def mean_sd(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "sd": None, "n": 0}
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "sd": sd, "n": len(xs)}


def retention(theta: float, patched: float, evolved: float, ported: float) -> float | None:
    gain = patched - theta
    return (ported - evolved) / gain if gain >= MIN_GAIN else None


def spearman(x: list[float], y: list[float]) -> float | None:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else None


def summarize(seeds: list[dict]) -> dict:
    """The per-seed results of ``seed_run`` (same tasks and releases in each) → the summary."""
    tasks = list(seeds[0]["tasks"])
    nrel = len(seeds[0]["releases"])
    out = {"seeds": [s["seed"] for s in seeds], "tasks": {}, "harmful": [], "retention": {},
           "releases": [{"name": seeds[0]["releases"][k]["name"],
                         "continued_steps": seeds[0]["releases"][k]["continued_steps"],
                         "shift": seeds[0]["releases"][k]["shift"],
                         "relative_weight_change": mean_sd([s["releases"][k]["relative_weight_change"] for s in seeds])}
                        for k in range(nrel)]}
    sums = {(m, k): [0.0, 0.0] for m in ("lora", "pmss") for k in range(nrel)}
    for task in tasks:
        rows = [s["tasks"][task] for s in seeds]
        t = out["tasks"][task] = {key: mean_sd([r[key] for r in rows]) for key in ("theta", "theta+lora", "theta+pmss")}
        t["lr_lora"] = [r["lr_lora"] for r in rows]
        t["lr_pmss"] = [r["lr_pmss"] for r in rows]
        t["releases"] = []
        for k in range(nrel):
            es = [r["releases"][k] for r in rows]
            cell = {key: mean_sd([e[key] for e in es]) for key in ("evolved", "ported_lora", "ported_pmss", "refit")}
            for m in ("lora", "pmss"):
                rs = []
                for s, r, e in zip(seeds, rows, es):
                    R = retention(r["theta"], r[f"theta+{m}"], e["evolved"], e[f"ported_{m}"])
                    rs.append(R)
                    if R is not None:
                        sums[(m, k)][0] += e[f"ported_{m}"] - e["evolved"]
                        sums[(m, k)][1] += r[f"theta+{m}"] - r["theta"]
                    if e[f"ported_{m}"] < e["evolved"]:
                        out["harmful"].append({"seed": s["seed"], "task": task, "release": s["releases"][k]["name"],
                                               "patch": m, "evolved": e["evolved"], "ported": e[f"ported_{m}"]})
                cell[f"R_{m}"] = mean_sd(rs)
                cell[f"harmful_{m}"] = sum(e[f"ported_{m}"] < e["evolved"] for e in es)
            t["releases"].append(cell)
    for m in ("lora", "pmss"):
        out["retention"][m] = [sums[(m, k)][0] / sums[(m, k)][1] if sums[(m, k)][1] else None for k in range(nrel)]
    out["check"] = check_validation([p for s in seeds for p in s["points"]],
                                    [x for s in seeds for x in s["port_seconds"]])
    return out


def check_validation(points: list[dict], port_seconds: list[float]) -> dict:
    """The check against what was measured, over every point of every seed: Spearman ρ of its score with
    the measured retention R; precision and recall of its predicted harm; what its calibrated scale did
    to the harmful ports and to the others; its time against a port's."""
    for p in points:
        p["retention"] = retention(p["theta"], p["theta+patch"], p["evolved"], p["ported"])
        p["retention_calibrated"] = retention(p["theta"], p["theta+patch"], p["evolved"], p["calibrated"])
        p["harmful"] = p["ported"] < p["evolved"]
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    out = {"points": len(points), "seeds": len({p["seed"] for p in points}), "port_seconds_median": med(port_seconds)}
    for tokens in (8, 1):
        both = [p for p in points if p["retention"] is not None and p[f"score_{tokens}"] is not None]
        pred = sum(p[f"harm_{tokens}"] for p in points)
        actual = sum(p["harmful"] for p in points)
        tp = sum(p["harmful"] and p[f"harm_{tokens}"] for p in points)
        out[f"tokens_{tokens}"] = {
            "spearman": spearman([p[f"score_{tokens}"] for p in both], [p["retention"] for p in both]),
            "points": len(both), "harm_predicted": pred, "harmful": actual, "harm_caught": tp,
            "precision": tp / pred if pred else None, "recall": tp / actual if actual else None,
            "seconds_median": med([p[f"seconds_{tokens}"] for p in points])}
    harmful = [p for p in points if p["harmful"]]
    fine = [p for p in points if not p["harmful"] and p["retention"] is not None]
    out["calibration"] = {
        "harmful": len(harmful), "fixed": sum(p["calibrated"] >= p["evolved"] for p in harmful),
        "others": len(fine),
        "others_retention": mean_sd([p["retention"] for p in fine])["mean"],
        "others_retention_calibrated": mean_sd([p["retention_calibrated"] for p in fine])["mean"]}
    return out
