"""The exact McNemar test of `saisa reproduce`, against values worked out by hand from the binomial distribution."""

from __future__ import annotations

import pytest

from saisa.experiments.significance import binomial_cdf_half, mcnemar_exact, paired_comparison


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (0, 0, 1.0),
        (-1, 5, 0.0),
        (0, 1, 0.5),
        (1, 4, 5 / 16),  # (1 + 4) / 2^4
        (2, 10, 56 / 1024),  # (1 + 10 + 45) / 2^10
        (10, 10, 1.0),
        (12, 10, 1.0),
    ],
)
def test_binomial_cdf_at_one_half(k, n, expected):
    assert binomial_cdf_half(k, n) == expected


@pytest.mark.parametrize(
    ("first_only", "second_only", "expected"),
    [
        (0, 0, 1.0),  # no discordant pair: no evidence either way
        (1, 9, 22 / 1024),  # 2 * (1 + 10) / 2^10
        (9, 1, 22 / 1024),  # two-sided: symmetric
        (2, 8, 112 / 1024),  # 2 * 56 / 2^10 (scipy.stats.binomtest(2, 10).pvalue = 0.109375)
        (0, 5, 2 / 32),  # 2 * 1 / 2^5: the smallest p five pairs can give
        (5, 5, 1.0),  # 2 * P(X <= 5) > 1 is capped
        (3, 4, 1.0),  # 2 * (1 + 7 + 21 + 35) / 2^7 = 1
    ],
)
def test_exact_mcnemar_two_sided(first_only, second_only, expected):
    assert mcnemar_exact(first_only, second_only) == pytest.approx(expected, rel=1e-15)


def test_exact_mcnemar_does_not_underflow_with_many_pairs():
    p = mcnemar_exact(0, 2000)  # 2 / 2^2000: below the smallest float, but computed exactly it is 0.0, not an error
    assert p == 0.0
    assert 0 < mcnemar_exact(400, 600) < 1e-9  # a 200-pair imbalance in 1000 discordant pairs is far from chance


def test_paired_comparison_pools_seeds_and_keeps_each_seeds_difference():
    seed0 = ({"a": True, "b": True, "c": False, "d": False}, {"a": True, "b": False, "c": False, "d": True})
    seed1 = ({"a": True, "b": True, "c": True, "d": False}, {"a": False, "b": False, "c": True, "d": False})
    result = paired_comparison([seed0[0], seed1[0]], [seed0[1], seed1[1]])
    assert (result["first_only"], result["second_only"], result["pairs"]) == (3, 1, 8)
    assert result["p_value"] == 2 * 5 / 16  # two-sided tail of 1 in 4 at 1/2
    assert [s["accuracy_difference"] for s in result["per_seed"]] == [0.0, 0.5]
    assert [(s["first_only"], s["second_only"]) for s in result["per_seed"]] == [(1, 1), (2, 0)]


def test_paired_comparison_pairs_only_questions_both_answered():
    result = paired_comparison([{"a": True, "b": True}], [{"a": False}])
    assert (result["first_only"], result["second_only"], result["pairs"]) == (1, 0, 1)
    with pytest.raises(ValueError, match="no question in common"):
        paired_comparison([{"a": True}], [{"b": True}])
