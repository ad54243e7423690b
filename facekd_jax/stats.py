"""Is a gain more than noise? McNemar's exact test on two models' per-pair decisions, a bootstrap interval of an
accuracy, and the comparison table with both (a thesis-sized gain is 2 to 6 pairs of 6,000).

The decisions are evaluate.verify()["correct"] of each model on the same pairs in the same order.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["mcnemar", "bootstrap_ci", "compare"]


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """McNemar's exact test of two models' per-pair decisions on the same pairs.

    correct_a, correct_b: bool [N] (verify()["correct"] of each model, same pairs in the same order).
    Returns {"b": pairs only A got right, "c": pairs only B got right, "p_value": two-sided exact binomial
    p-value of b vs c under p = 1/2 (1.0 when there is no discordant pair)}.
    """
    a, b_ = np.asarray(correct_a, bool).reshape(-1), np.asarray(correct_b, bool).reshape(-1)
    if a.shape != b_.shape:
        raise ValueError(f"mcnemar: {a.shape[0]} and {b_.shape[0]} decisions: the models must share the pairs")
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    n = b + c
    # Exact integer tail, divided once (Python int / int is correctly rounded at any size).
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return {"b": b, "c": c, "p_value": min(1.0, 2 * tail / 2 ** n)}


def bootstrap_ci(correct: Sequence[bool], *, n_resamples: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of accuracy, resampling pairs with replacement.

    correct: bool [N]. The number right in a resample of N pairs from a 0/1 vector is Binomial(N, mean), so
    resamples are drawn from it directly (the same distribution as index resampling, N times cheaper).
    Returns (low, high) at level 1 - alpha.
    """
    correct = np.asarray(correct, bool).reshape(-1)
    if correct.size == 0:
        raise ValueError("bootstrap_ci: no decisions")
    n = correct.size
    rng = np.random.default_rng(seed)
    accuracies = rng.binomial(n, correct.mean(), size=n_resamples) / n
    low, high = np.quantile(accuracies, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _cell(value, fmt, scale=1.0):
    return "n/a" if value is None else fmt.format(value * scale)


def compare(runs: Mapping[str, Mapping[str, Any]], baseline: str | None = None) -> str:
    """Markdown table of verification results, one row per run.

    runs: name -> {accuracy, accuracy_std, eer, fnmr_at_fmr {"1e-3": ...}, and optionally correct [N] bool,
      params (int), gflops, mb}; missing values print as n/a.
    baseline: a name in runs; adds a column with McNemar's exact p-value of each run against it
      (b = pairs only the baseline got right, c = pairs only the run got right).
    Returns the table (str), accuracy and error rates in %.
    """
    if baseline is not None and baseline not in runs:
        raise KeyError(f"compare: baseline {baseline!r} is not one of the runs {sorted(runs)}")
    header = ["model", "accuracy (%)", "EER (%)", "FNMR@FMR=1e-3 (%)", "params (M)", "GFLOPs", "MB"]
    if baseline is not None:
        header.append(f"p vs {baseline} (b, c)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, run in runs.items():
        acc, std = run.get("accuracy"), run.get("accuracy_std")
        accuracy = "n/a" if acc is None else f"{100 * acc:.3f}" + ("" if std is None else f" ± {100 * std:.3f}")
        params = run.get("params")
        row = [name, accuracy, _cell(run.get("eer"), "{:.2f}", 100),
               _cell((run.get("fnmr_at_fmr") or {}).get("1e-3"), "{:.2f}", 100),
               _cell(None if params is None else params / 1e6, "{:.2f}"),
               _cell(run.get("gflops"), "{:.2f}"), _cell(run.get("mb"), "{:.1f}")]
        if baseline is not None:
            base, mine = runs[baseline].get("correct"), run.get("correct")
            if name == baseline:
                row.append("baseline")
            elif base is None or mine is None or len(base) != len(mine):
                row.append("n/a")
            else:
                test = mcnemar(base, mine)
                row.append(f"{test['p_value']:.3g} ({test['b']}, {test['c']})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
