"""The decision layer (auditkit/checks/decision.py): closed forms and scipy.stats as the reference."""
import math

import numpy as np
import pytest
from scipy import stats

from auditkit.checks.base import Status
from auditkit.checks.decision import combine, decide, needed_samples


def test_needed_samples_is_the_fewest_pairs_whose_smallest_p_reaches_alpha():
    assert needed_samples(0.01) == 7  # 0.5^7 = 0.0078 <= 0.01 < 0.5^6
    assert needed_samples(0.05) == 5
    assert needed_samples(0.5 ** 10) == 10


def test_seven_pairs_all_in_favour_pass_with_the_exact_signed_rank_p_value():
    values, controls = np.arange(1.0, 8.0) + 1, np.ones(7)
    d = decide(values, controls, effect="difference", min_effect=0.5)
    assert d.status is Status.PASSED
    assert d.p_value == pytest.approx(0.5 ** 7)  # every rank positive: 1 of 2^7 sign patterns
    assert d.effect == pytest.approx(float((values - controls).mean()))
    assert d.ci[0] <= d.effect <= d.ci[1]
    assert d.n == 7 and d.needed == 7


def test_six_pairs_cannot_decide_at_alpha_001():
    d = decide(np.full(6, 2.0), np.ones(6), effect="difference", min_effect=0.1)
    assert d.status is Status.INCONCLUSIVE
    assert "needs at least 7" in d.reason


def test_a_large_but_insignificant_effect_fails_and_a_significant_but_small_one_fails():
    rng = np.random.default_rng(0)
    noisy = rng.normal(0.3, 3.0, size=12)
    d = decide(noisy, np.zeros(12), effect="difference", min_effect=0.1)
    assert d.p_value == pytest.approx(stats.wilcoxon(noisy, alternative="greater").pvalue)
    assert d.status is Status.FAILED and "not significant" in d.reason
    tiny = np.full(30, 0.01) + rng.normal(0, 1e-4, 30)
    d = decide(tiny, np.zeros(30), effect="difference", min_effect=0.1)
    assert d.p_value < 1e-6
    assert d.status is Status.FAILED and "below the minimum" in d.reason


def test_ratio_effect_is_the_geometric_mean_ratio():
    values, controls = np.array([2.0, 4.0, 8.0, 2.0, 4.0, 8.0, 4.0]), np.array([1.0, 2.0, 2.0, 1.0, 1.0, 4.0, 2.0])
    d = decide(values, controls, effect="ratio", min_effect=1.25)
    assert d.effect == pytest.approx(math.exp(np.log(values / controls).mean()))
    assert d.value == pytest.approx(math.exp(np.log(values).mean()))
    assert d.status is Status.PASSED


def test_lower_is_better_mirrors_higher():
    a, b = np.linspace(0.1, 0.4, 9), np.linspace(0.5, 0.9, 9)
    lower = decide(a, b, effect="win_rate", min_effect=0.6, better="lower")
    higher = decide(b, a, effect="win_rate", min_effect=0.6)
    assert (lower.status, lower.effect, lower.p_value) == (higher.status, higher.effect, higher.p_value)
    assert lower.value == pytest.approx(a.mean())  # reported as given, not negated


def test_win_rate_uses_the_exact_binomial_test_and_drops_ties():
    values = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0.5, 0.5])
    controls = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 0.5, 0.5])
    d = decide(values, controls, effect="win_rate", min_effect=0.6)
    assert d.n == 11
    assert d.effect == pytest.approx(8 / 9)
    assert d.p_value == pytest.approx(stats.binomtest(8, 9, 0.5, alternative="greater").pvalue)


def test_all_ties_fail_with_p_one():
    d = decide(np.zeros(10), np.zeros(10), effect="difference", min_effect=0.1)
    assert d.status is Status.FAILED and d.p_value == 1.0


def test_non_finite_pairs_are_not_judged_and_groups_follow_the_kept_samples():
    values = [1.0, float("nan"), 2.0, 3.0]
    d = decide(values, [0.0, 0.0, float("inf"), 1.0], effect="difference", min_effect=0.1, groups=["a", "b", "a", "c"])
    assert d.n == 2
    assert [(g["class"], g["n"]) for g in d.by_class] == [("a", 1), ("c", 1)]


def test_combine_is_intersection_union():
    good = decide(np.full(8, 2.0), np.ones(8), effect="difference", min_effect=0.1)
    bad = decide(np.zeros(8), np.ones(8), effect="difference", min_effect=0.1, value_label="insertion")
    both = combine([good, bad], rule="both")
    assert both.status is Status.FAILED and both.p_value == bad.p_value and "insertion" in both.reason
    undecided = decide(np.full(3, 2.0), np.ones(3), effect="difference", min_effect=0.1)
    assert combine([good, undecided], rule="both").status is Status.INCONCLUSIVE
    assert combine([good, good], rule="both").status is Status.PASSED


def test_a_forced_reason_is_inconclusive_whatever_the_numbers():
    d = decide(np.full(20, 5.0), np.ones(20), effect="difference", min_effect=0.1, inconclusive="boxes too large")
    assert d.status is Status.INCONCLUSIVE and d.reason == "boxes too large"


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="alpha"):
        decide([1.0], [0.0], effect="difference", min_effect=0.0, alpha=0.7)
    with pytest.raises(ValueError, match="pair up"):
        decide([1.0, 2.0], [0.0], effect="difference", min_effect=0.0)
    with pytest.raises(ValueError, match="effect"):
        decide([1.0], [0.0], effect="median", min_effect=0.0)


def test_a_custom_check_decides_with_the_public_rule():
    import auditkit

    class Paired(auditkit.Check):
        kind = "paired-toy"

        def run(self, subject, audit_set):
            decision = auditkit.decide([2.0] * 8, [1.0] * 8, effect="difference", min_effect=0.5)
            return self.decided(decision, metric="margin", message="toy")

    result = Paired().run(None, None)
    assert isinstance(auditkit.decide([1.0], [0.0], effect="difference", min_effect=0.0), auditkit.Decision)
    assert result.status is auditkit.Status.PASSED and result.value == 1.0 and result.threshold == 0.5
    assert result.decision["p_value"] == pytest.approx(0.5 ** 8) and result.message == "toy"
    assert "margin = 1 (needs >= 0.5), p = 0.0039 (alpha 0.01), n = 8" in result.summary()
