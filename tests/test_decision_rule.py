"""The decisive experiment's decision rule (`docs/results/decisive/decide.py`, PLAN.md Part A) on
hand-made per-seed numbers, and the exact Student-t quantiles it rests on."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from granular_po.apps.compare.statistics import t_cdf, t_quantile

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "results" / "decisive" / "decide.py"


@pytest.fixture(scope="module")
def rule():
    spec = importlib.util.spec_from_file_location("decide", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["decide"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_t_quantiles_match_the_tables():
    # two-sided 95% (NIST/SEMATECH), one-sided 80%, and the plan's Bonferroni level for 3 comparisons
    assert {df: round(t_quantile(0.975, df), 3) for df in (1, 2, 3, 7, 30)} == \
        {1: 12.706, 2: 4.303, 3: 3.182, 7: 2.365, 30: 2.042}
    assert round(t_quantile(0.80, 7), 3) == 0.896
    assert round(t_quantile(1 - 0.05 / 6, 7), 3) == 3.128
    assert t_quantile(0.025, 7) == pytest.approx(-t_quantile(0.975, 7))
    # df 1 is Cauchy: closed form; df 2 too: F(x) = 1/2 + x / (2 sqrt(2 + x^2))
    for x in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-14)
        assert t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-14)
    with pytest.raises(ValueError):
        t_quantile(1.0, 7)


def seeds(*values):
    return dict(enumerate(values))


def base(response, granular, klall, nll):
    return {"response": seeds(*response), "granular": seeds(*granular), "granular-klall": seeds(*klall),
            "granular-klall-nll": seeds(*nll)}


ZERO = [0.0] * 8
NOISE = [0.3, -0.2, 0.1, -0.4, 0.2, 0.0, -0.1, 0.1]  # mean 0, sd 0.23


def test_corrected_interval_is_3_128_standard_errors(rule):
    diffs = [1.0, 0.5, 1.5, 0.8, 1.2, 0.9, 1.1, 1.0]
    result = rule.decide(base(ZERO, diffs, ZERO, ZERO))
    p = result["vs_response"]["granular"]
    mean = sum(diffs) / 8
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 7) / math.sqrt(8)
    assert p.mean == pytest.approx(mean)
    assert p.corrected == pytest.approx((mean - 3.1276 * se, mean + 3.1276 * se), abs=1e-4)
    assert p.uncorrected == pytest.approx((mean - 2.3646 * se, mean + 2.3646 * se), abs=1e-4)
    assert p.detectable(0.05 / 3) == pytest.approx((3.1276 + 0.8960) * se, abs=1e-4)


def test_an_anchored_arm_above_response_confirms(rule):
    result = rule.decide(base(ZERO, NOISE, [0.9 + n for n in NOISE], NOISE))
    assert result["applied"] and result["conditions"]["confirmed"] == ["granular-klall"]
    assert result["verdict"].startswith("CONFIRMED: granular-klall")


def test_todays_recipe_above_response_confirms_without_the_anchor(rule):
    result = rule.decide(base(ZERO, [0.9 + n for n in NOISE], NOISE, NOISE))
    assert result["verdict"].startswith("CONFIRMED WITHOUT THE ANCHOR")


def test_anchor_repairing_granular_without_beating_response(rule):
    below = [-1.0 + n for n in NOISE]  # today's granular clearly below response
    result = rule.decide(base(ZERO, below, NOISE, NOISE))
    assert result["conditions"]["anchor_mattered"] and result["conditions"]["refuted"]
    assert "THE ANCHOR MATTERED" in result["verdict"] and "REFUTED" in result["verdict"]


def test_small_differences_everywhere_refute(rule):
    result = rule.decide(base(ZERO, NOISE, NOISE, NOISE))
    assert result["verdict"].startswith("REFUTED")


def test_wide_intervals_are_inconclusive(rule):
    wide = [2.0, -2.0, 1.5, -1.5, 2.5, -1.0, 1.0, -2.5]  # mean 0, but +0.5 not excluded
    result = rule.decide(base(ZERO, wide, wide, wide))
    assert not result["conditions"]["refuted"] and result["verdict"] == "INCONCLUSIVE"


def test_fewer_than_eight_seeds_is_not_read_against_the_rule(rule):
    strong = [5.0, 5.1, 4.9]
    result = rule.decide({"response": seeds(0, 0, 0), "granular": seeds(*strong),
                          "granular-klall": seeds(*strong), "granular-klall-nll": seeds(*strong)})
    assert not result["applied"] and result["verdict"].startswith("NOT APPLIED: 3 of 8 seeds")
    assert result["conditions"]["confirmed"]  # what would hold is still shown, but no verdict is drawn


def test_reads_compare_json_and_renders(rule, tmp_path):
    cells = {f"{arm}, AdamW": {str(s): {"forced_margin": v} for s, v in values.items()}
             for arm, values in base(ZERO, NOISE, [0.9 + n for n in NOISE], NOISE).items()}
    (tmp_path / "compare.json").write_text(__import__("json").dumps({"metrics": {"per_seed": cells}}))
    out = tmp_path / "decision.md"
    assert rule.main([str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Seeds: 8 of 8" in text and "**Verdict: CONFIRMED: granular-klall" in text
    assert "| granular-klall - granular |" in text
    cells = {k: {s: {**m, "accuracy": 0.5} for s, m in v.items()} for k, v in cells.items()}
    (tmp_path / "compare.json").write_text(__import__("json").dumps({"metrics": {"per_seed": cells}}))
    assert rule.main([str(tmp_path), "--metric", "accuracy", "--out", str(out)]) == 0
    assert "**Verdict: none: accuracy is secondary" in out.read_text()
    (tmp_path / "compare.json").write_text('{"metrics": {"per_seed": {"response, AdamW": {}}}}')
    with pytest.raises(SystemExit, match="no arm"):
        rule.main([str(tmp_path)])


# ---------------------------------------------------------------- Part B (QA-FEEDBACK): decide_qa.py


@pytest.fixture(scope="module")
def rule_qa(rule):  # decide_qa imports decide's Paired: load decide first
    spec = importlib.util.spec_from_file_location("decide_qa", SCRIPT.with_name("decide_qa.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["decide_qa"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("anchored", "verdict"), [
    ([0.10, 0.12, 0.08], "SUPPORTS H1"),  # mean 0.10, se 0.0115, half-width 4.303 se = 0.050
    ([-0.10, -0.12, -0.08], "CONTRADICTS H1"),
    ([0.10, -0.05, 0.02], "INCONCLUSIVE"),
])
def test_part_b_rule_is_a_95_percent_t_interval_on_2_df(rule_qa, anchored, verdict):
    values = {"response": seeds(0.6, 0.6, 0.6), "granular": seeds(0.7, 0.7, 0.7),
              "granular-klall-nll": seeds(*(0.6 + d for d in anchored))}
    result = rule_qa.decide(values, "granular-klall-nll")
    mean = sum(anchored) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in anchored) / 2) / math.sqrt(3)
    assert result["interval"] == pytest.approx((mean - 4.3027 * se, mean + 4.3027 * se), abs=1e-4)
    assert result["verdict"].startswith(verdict)


def test_part_b_needs_three_seeds_and_reads_compare_json(rule_qa, tmp_path, capsys):
    per_seed = {"response, AdamW": {"0": {"preference_accuracy": 0.6}, "1": {"preference_accuracy": 0.5}},
                "granular, AdamW": {"0": {"preference_accuracy": 0.7}, "1": {"preference_accuracy": 0.6}},
                "granular-klall-nll, AdamW": {"0": {"preference_accuracy": 0.9}, "1": {"preference_accuracy": 0.8}}}
    (tmp_path / "compare.json").write_text(__import__("json").dumps({"metrics": {"per_seed": per_seed}}))
    assert rule_qa.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "anchored arm: granular-klall-nll" in text and "Verdict: NOT APPLIED: 2 of 3 seeds" in text
    assert "| granular-klall-nll - response | 2 | +0.300, +0.300 | +0.300 |" in text
    del per_seed["granular-klall-nll, AdamW"]
    (tmp_path / "compare.json").write_text(__import__("json").dumps({"metrics": {"per_seed": per_seed}}))
    with pytest.raises(SystemExit, match="expected one anchored arm"):
        rule_qa.main([str(tmp_path)])


# ---------------------------------------------------------------- follow-up (PLAN_nll.md): decide_nll.py


@pytest.fixture(scope="module")
def rule_nll(rule):
    spec = importlib.util.spec_from_file_location("decide_nll", SCRIPT.with_name("decide_nll.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["decide_nll"] = module
    spec.loader.exec_module(module)
    return module


SMALL = [0.01, -0.01, 0.02, -0.02, 0.0, 0.01, -0.01, 0.0]  # mean 0, sd 0.013
SPREAD = [n / 4 for n in NOISE[::-1]]  # mean 0, sd 0.058


@pytest.mark.parametrize(("klall_nll", "response_nll", "verdict"), [
    ([0.70 + n for n in SMALL], [0.55 + n for n in SPREAD], "HIGHLIGHTS ADD"),
    ([0.50 + n for n in SMALL], [0.70 + n for n in SPREAD], "RESPONSE + NLL BETTER"),
    ([0.70 + n for n in SMALL], [0.70 + n for n in SPREAD], "THE NLL TERM EXPLAINS"),  # E: +0.2 over response
    ([0.50 + n for n in SMALL], [0.50 + n for n in SPREAD], "INCONCLUSIVE"),  # E spans 0 too
])
def test_follow_up_rule(rule_nll, klall_nll, response_nll, verdict):
    values = {"response": seeds(*[0.5 + n for n in SMALL]), "granular-klall-nll": seeds(*klall_nll),
              "response-nll": seeds(*response_nll)}
    result = rule_nll.decide(values)
    diffs = [a - b for a, b in zip(klall_nll, response_nll)]
    mean = sum(diffs) / 8
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 7) / math.sqrt(8)
    assert result["D_interval"] == pytest.approx((mean - 2.3646 * se, mean + 2.3646 * se), abs=1e-4)
    assert result["verdict"].startswith(verdict)


def test_follow_up_needs_eight_seeds_and_the_new_arm(rule_nll, tmp_path, capsys):
    cell = {str(s): {"accuracy": 0.5} for s in range(3)}
    per_seed = {"response, AdamW": cell, "granular-klall-nll, AdamW": cell, "response-nll, AdamW": cell}
    (tmp_path / "compare.json").write_text(__import__("json").dumps({"metrics": {"per_seed": per_seed}}))
    assert rule_nll.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "Verdict: NOT APPLIED: 3 of 8 seeds" in text and "| D: granular-klall-nll - response-nll | 3 |" in text
    del per_seed["response-nll, AdamW"]
    (tmp_path / "compare.json").write_text(__import__("json").dumps({"metrics": {"per_seed": per_seed}}))
    with pytest.raises(SystemExit, match="no response-nll arm"):
        rule_nll.main([str(tmp_path)])
