"""A paired significance test of two architectures answering the same questions: the exact McNemar test (a sign test
on the questions exactly one of the two got right), in integer arithmetic so that no tail underflows."""

from __future__ import annotations

from math import comb


def binomial_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if k < 0:
        return 0.0
    return sum(comb(n, i) for i in range(min(k, n) + 1)) / 2**n  # exact integers, one correctly rounded division


def mcnemar_exact(first_only: int, second_only: int) -> float:
    """Two-sided p-value of the exact McNemar test from the discordant counts: questions only the first got right,
    and only the second; 1.0 when there are none."""
    n = first_only + second_only
    return min(1.0, 2 * binomial_cdf_half(min(first_only, second_only), n)) if n else 1.0


def paired_comparison(first: list[dict[str, bool]], second: list[dict[str, bool]]) -> dict:
    """`first` and `second`: per seed, question id -> answered right. The McNemar test pooled over seeds (each seed's
    answers to a question count as a pair), each seed's counts, and its accuracy difference."""
    per_seed = []
    for mine, theirs in zip(first, second, strict=True):
        shared = sorted(mine.keys() & theirs.keys())
        if not shared:
            raise ValueError("the two architectures answered no question in common")
        counts = {
            "first_only": sum(mine[q] and not theirs[q] for q in shared),
            "second_only": sum(theirs[q] and not mine[q] for q in shared),
            "questions": len(shared),
        }
        counts["accuracy_difference"] = (counts["first_only"] - counts["second_only"]) / len(shared)
        counts["p_value"] = mcnemar_exact(counts["first_only"], counts["second_only"])
        per_seed.append(counts)
    first_only = sum(s["first_only"] for s in per_seed)
    second_only = sum(s["second_only"] for s in per_seed)
    return {
        "first_only": first_only,
        "second_only": second_only,
        "pairs": sum(s["questions"] for s in per_seed),
        "p_value": mcnemar_exact(first_only, second_only),
        "per_seed": per_seed,
    }
