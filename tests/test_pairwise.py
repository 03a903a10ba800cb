"""Pairwise preference analysis: Bradley–Terry against hand solutions and an independent scipy solver,
recovery of simulated strengths, line-numbered validation errors, consistency and Krippendorff's alpha
on constructed votes, the sign test, Wilson interval and power simulation."""

from __future__ import annotations

import json
import math

import krippendorff
import numpy as np
import pandas as pd
import pytest
from scipy import optimize
from scipy import stats as sps
from scipy.special import log_expit
from statsmodels.stats.proportion import proportion_confint

from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.errors import FangzhiError
from fangzhi.evaluate.pairwise import (
    TABLE_COLUMNS,
    analyze_pairwise,
    bradley_terry,
    sign_test_p,
)
from fangzhi.evaluate.pairwise_power import (
    PairwisePowerConfig,
    run_pairwise_power,
    simulate_pairwise_votes,
    simulated_preference_power,
)
from fangzhi.evaluate.pairwise_votes import file_columns, group_codes, is_pairwise_file, read_pairwise_file

HEADER = "rater,prompt,seed,dimension,left,right,choice"


def votes_from_counts(counts: dict[tuple[str, str], tuple[int, int, int]], dimensions=DIMENSION_KEYS) -> pd.DataFrame:
    """Votes giving, per dimension, (wins of a, ties, wins of b) for each (a, b); each vote its own unit and rater."""
    rows = []
    for dim in dimensions:
        for (a, b), (wins_a, ties, wins_b) in counts.items():
            for choice, count in (("left", wins_a), ("tie", ties), ("right", wins_b)):
                rows += [{"left": a, "right": b, "choice": choice, "dimension": dim} for _ in range(count)]
    frame = pd.DataFrame(rows)
    frame["rater"] = "r1"
    frame["prompt"] = "p"
    frame["seed"] = np.arange(len(frame))  # every vote its own prompt × seed unit
    return frame


def elo_of(result, dim="style") -> dict[str, float]:
    part = result.strengths.loc[result.strengths["dimension"] == dim]
    return dict(zip(part["arm"], part["elo"]))


# --- Bradley–Terry --------------------------------------------------------------------------------


def test_bradley_terry_two_arms_with_ties_is_the_odds_of_the_half_tie_score():
    # base: 1 win, 2 ties -> score 2; lora: 3 wins, 2 ties -> score 4; odds 2:1 -> 400·log10(2) Elo.
    result = analyze_pairwise(votes_from_counts({("lora", "base"): (3, 2, 1)}), None, n_boot=100)
    elo = elo_of(result)
    assert elo["base"] == 1000
    assert elo["lora"] == pytest.approx(1000 + 400 * math.log10(2), abs=1e-6)
    pair = result.pairs.iloc[0]
    assert (pair["arm"], pair["versus"], pair["wins"], pair["ties"], pair["losses"], pair["n"]) == ("lora", "base", 3, 2, 1, 6)
    assert pair["win_rate"] == pytest.approx(4 / 6)


def test_bradley_terry_three_arms_exact_fit_by_hand():
    # Strengths 4 : 2 : 1 fit these scores exactly (A beats B 2:1, B beats C 2:1, A beats C 4:1), so the MLE is
    # A = B + 400·log10(2) = C + 400·log10(4). A tie is half a win each side: A–C as 3 wins, 2 ties, 0 losses.
    counts = {("A", "B"): (2, 0, 1), ("B", "C"): (2, 0, 1), ("A", "C"): (3, 2, 0)}
    result = analyze_pairwise(votes_from_counts(counts), None, reference_arm="C", n_boot=100)
    elo = elo_of(result)
    assert elo["C"] == 1000
    assert elo["B"] == pytest.approx(1000 + 400 * math.log10(2), abs=1e-6)
    assert elo["A"] == pytest.approx(1000 + 400 * math.log10(4), abs=1e-6)
    # A cycle of equal scores gives equal strengths.
    cycle = analyze_pairwise(votes_from_counts({("A", "B"): (2, 1, 1), ("B", "C"): (2, 1, 1), ("C", "A"): (2, 1, 1)}), None, reference_arm="A", n_boot=100)
    assert list(elo_of(cycle).values()) == pytest.approx([1000, 1000, 1000], abs=1e-6)


def scipy_bradley_terry(scores: np.ndarray) -> np.ndarray:
    """Independent solver: minimise the negative log-likelihood over θ[1:] with θ[0] = 0 (BFGS)."""
    k = scores.shape[0]

    def negative_log_likelihood(free):
        theta = np.concatenate([[0.0], free])
        return -(scores * log_expit(theta[:, None] - theta[None, :])).sum()

    fit = optimize.minimize(negative_log_likelihood, np.zeros(k - 1), method="BFGS", options={"gtol": 1e-10})
    return np.concatenate([[0.0], fit.x])


def test_bradley_terry_matches_an_independent_scipy_solver_with_ties():
    rng = np.random.default_rng(3)
    arms = ["base", "a", "b", "c"]
    counts = {(arms[i], arms[j]): tuple(int(x) for x in rng.integers(1, 15, size=3)) for i in range(4) for j in range(i + 1, 4)}
    scores = np.zeros((4, 4))
    for (a, b), (wins_a, ties, wins_b) in counts.items():
        i, j = arms.index(a), arms.index(b)
        scores[i, j] += wins_a + ties / 2
        scores[j, i] += wins_b + ties / 2
    expected = 1000 + 400 / math.log(10) * scipy_bradley_terry(scores)
    result = analyze_pairwise(votes_from_counts(counts), None, n_boot=100)
    for dim in DIMENSION_KEYS:
        elo = elo_of(result, dim)
        assert [elo[a] for a in arms] == pytest.approx(expected, abs=1e-3)
    # The batched solver on the raw matrix (several at once, another reference arm) agrees too.
    theta = bradley_terry(np.stack([scores, scores.T]), reference=2)
    assert theta[0] - theta[0, 0] == pytest.approx(scipy_bradley_terry(scores), abs=1e-6)
    assert theta[1] - theta[1, 0] == pytest.approx(scipy_bradley_terry(scores.T), abs=1e-6)


def test_unbounded_strength_is_reported_not_invented():
    # lora never loses: no finite MLE.
    result = analyze_pairwise(votes_from_counts({("lora", "base"): (5, 0, 0)}), None, n_boot=100)
    assert result.strengths["elo"].isna().all()
    assert any("unbounded" in note for note in result.notes)
    assert np.isnan(bradley_terry(np.array([[0.0, 3.0], [0.0, 0.0]]))).all()


# --- Simulated study ----------------------------------------------------------------------------


def test_simulated_strengths_are_recovered_within_bootstrap_cis():
    truth = {"base": 1000.0, "lora@0.5": 1050.0, "lora@1.0": 1120.0}
    votes = simulate_pairwise_votes(6, 30, 4, arms=list(truth), elo=truth, tie_share=0.3, seed=11)
    result = analyze_pairwise(votes, None, n_boot=1000, seed=1)
    table = result.strengths.loc[result.strengths["arm"] != "base"]
    covered = (table["elo_ci_low"] <= table["arm"].map(truth)) & (table["arm"].map(truth) <= table["elo_ci_high"])
    # 8 intervals at 95%: all 8 cover with probability about 0.66 if independent; 7 or more about 0.94.
    assert covered.sum() >= 7, table
    assert (table["elo"] - table["arm"].map(truth)).abs().max() < 40
    assert (table["elo_ci_high"] - table["elo_ci_low"] < 80).all()
    assert (result.strengths["n_comparisons"].loc[result.strengths["arm"] == "base"] == 6 * 120 * 2).all()
    assert result.counts["n_units"] == 120


def test_bootstrap_resamples_prompt_seed_units_not_votes():
    # Strong unit-level heterogeneity makes the votes on one unit correlated: resampling units gives a
    # wider interval than resampling single votes (the same votes, each given its own unit).
    votes = simulate_pairwise_votes(10, 20, 2, arms=("base", "lora"), elo={"base": 1000, "lora": 1080}, unit_sd=200, seed=5)
    by_unit = analyze_pairwise(votes, None, n_boot=1000, seed=2).strengths.set_index(["dimension", "arm"])
    by_vote = analyze_pairwise(votes.assign(seed=np.arange(len(votes))), None, n_boot=1000, seed=2).strengths.set_index(["dimension", "arm"])
    assert by_unit["elo"].to_numpy() == pytest.approx(by_vote["elo"].to_numpy())
    unit_width = (by_unit["elo_ci_high"] - by_unit["elo_ci_low"]).xs("lora", level="arm")
    vote_width = (by_vote["elo_ci_high"] - by_vote["elo_ci_low"]).xs("lora", level="arm")
    assert (unit_width > 1.3 * vote_width).all(), (unit_width, vote_width)


# --- Win rates and sign test -----------------------------------------------------------------------


def test_sign_test_equals_scipy_binomtest():
    for wins, losses in [(7, 3), (0, 5), (12, 12), (30, 11), (1, 0)]:
        assert sign_test_p(wins, losses) == pytest.approx(sps.binomtest(wins, wins + losses, 0.5).pvalue, rel=1e-9)
    assert np.isnan(sign_test_p(0, 0))


def test_win_rate_ci_resamples_units_so_clustered_votes_widen_it():
    # Each vote its own unit: the bootstrap CI is close to the Wilson interval of 130 wins in 200 votes.
    style = analyze_pairwise(votes_from_counts({("lora", "base"): (130, 0, 70)}), None).pairs.set_index("dimension").loc["style"]
    wilson = proportion_confint(130, 200, alpha=0.05, method="wilson")
    assert style["win_rate"] == 0.65 and (style["win_rate_ci_low"], style["win_rate_ci_high"]) == pytest.approx(wilson, abs=0.02)
    # The same votes, 10 per unit with every unit's votes alike (13 units all lora, 7 all base): ten times fewer
    # independent units, so a CI about sqrt(10) times wider, which an interval over votes would not show.
    clustered = votes_from_counts({("lora", "base"): (130, 0, 70)})
    clustered["seed"] = np.concatenate([np.arange(130) // 10, 13 + np.arange(70) // 10]).tolist() * len(DIMENSION_KEYS)
    clustered["rater"] = [f"r{i % 10}" for i in range(200)] * len(DIMENSION_KEYS)  # ten raters on each unit
    wide = analyze_pairwise(clustered, None).pairs.set_index("dimension").loc["style"]
    assert wide["win_rate"] == 0.65
    assert 2.5 < (wide["win_rate_ci_high"] - wide["win_rate_ci_low"]) / (wilson[1] - wilson[0]) < 4.5


def test_sign_test_is_on_untied_votes_and_holm_across_dimensions():
    counts = {("lora", "base"): (9, 5, 2)}
    result = analyze_pairwise(votes_from_counts(counts), None, n_boot=100)
    pairs = result.pairs
    assert len(pairs) == 4
    p = sps.binomtest(9, 11, 0.5).pvalue
    assert pairs["sign_test_p"].to_numpy() == pytest.approx([p] * 4)
    # Holm over four equal p-values multiplies each by 4 (capped at 1).
    assert pairs["sign_test_p_holm"].to_numpy() == pytest.approx([min(1, 4 * p)] * 4)


def test_prompt_level_test_is_the_signed_rank_test_of_each_prompts_net_preference():
    # Three prompts, two seeds, two raters; per prompt lora's (wins − losses)/votes: p1 (3 − 0)/4, p2 (1 − 1)/4, p3 (1 − 2)/4.
    outcomes = {"p1": ["lora", "lora", "lora", "tie"], "p2": ["lora", "base", "tie", "tie"], "p3": ["base", "base", "lora", "tie"],
                "p4": ["lora", "lora", "tie", "lora"], "p5": ["lora", "tie", "tie", "tie"]}
    rows = []
    for prompt, winners in outcomes.items():
        for vote, winner in enumerate(winners):
            left, right = ("base", "lora") if vote % 2 else ("lora", "base")  # sides alternate
            choice = "tie" if winner == "tie" else ("left" if winner == left else "right")
            rows.append({"rater": f"r{vote % 2}", "prompt": prompt, "seed": vote // 2, "dimension": "style", "left": left, "right": right, "choice": choice})
    pair = analyze_pairwise(pd.DataFrame(rows), None, n_boot=100).pairs.set_index("dimension").loc["style"]
    net = np.array([3, 0, -1, 3, 1]) / 4
    assert pair["n_prompts"] == 5 and pair["net_preference"] == pytest.approx(net.mean())
    assert pair["prompt_test_p"] == pytest.approx(sps.wilcoxon(net[net != 0], method="exact").pvalue)
    assert pair["sign_test_p"] == pytest.approx(sps.binomtest(9, 12, 0.5).pvalue)


def test_prompt_level_test_holds_its_level_where_the_vote_level_sign_test_does_not():
    # 5 raters, 12 prompts × 2 seeds, no true preference, but each image favours one arm or the other (SD 200 Elo).
    sims, rejected = 150, {"prompt_test_p": 0, "sign_test_p": 0}
    for i in range(sims):
        votes = simulate_pairwise_votes(5, 12, 2, elo={"base": 1000.0, "lora": 1000.0}, unit_sd=200.0, seed=i)
        style = analyze_pairwise(votes, None, n_boot=100).pairs.set_index("dimension").loc["style"]
        for test in rejected:
            rejected[test] += style[test] < 0.05
    assert rejected["prompt_test_p"] / sims <= 0.085
    assert rejected["sign_test_p"] / sims > 0.12


# --- Agreement and consistency -------------------------------------------------------------------


def test_consistency_of_swapped_repeats_and_nominal_alpha_on_constructed_votes():
    rows = [
        # rater, prompt, seed, dimension, left, right, choice
        ("r1", "p1", 0, "style", "base", "lora", "right"),  # lora
        ("r2", "p1", 0, "style", "lora", "base", "left"),  # lora
        ("r1", "p2", 0, "style", "base", "lora", "tie"),
        ("r2", "p2", 0, "style", "base", "lora", "left"),  # base
        ("r1", "p3", 0, "style", "lora", "base", "left"),  # lora
        ("r2", "p3", 0, "style", "lora", "base", "right"),  # base
        ("r1", "p4", 0, "style", "base", "lora", "left"),  # base
        ("r2", "p4", 0, "style", "base", "lora", "left"),  # base
        # swapped-side repeats of r1's votes: p1 lora again (consistent), p2 tie again (consistent),
        # p3 'left' again, now base (inconsistent), p4 base again (consistent)
        ("r1", "p1", 0, "style", "lora", "base", "left"),
        ("r1", "p2", 0, "style", "lora", "base", "tie"),
        ("r1", "p3", 0, "style", "base", "lora", "left"),
        ("r1", "p4", 0, "style", "lora", "base", "right"),
    ]
    votes = pd.DataFrame(rows, columns=HEADER.split(","))
    result = analyze_pairwise(votes, None, n_boot=100)
    style = result.agreement.set_index("dimension").loc["style"]
    assert (style["n_repeats"], style["n_consistent"], style["consistency"]) == (4, 3, 0.75)
    assert result.counts["n_main_votes"] == 8 and result.counts["n_repeats"] == 4
    # Repeats do not count twice: lora's style record from the 8 first votes is 3 wins, 1 tie, 4 losses.
    pair = result.pairs.set_index("dimension").loc["style"]
    assert (pair["wins"], pair["ties"], pair["losses"]) == (3, 1, 4)
    # Alpha over the first votes, checked with krippendorff's own raters × units input (values: 0 lora, 1 tie, 2 base).
    reliability_data = np.array([[0, 1, 0, 2], [0, 2, 2, 2]], dtype=float)
    expected = krippendorff.alpha(reliability_data=reliability_data, level_of_measurement="nominal")
    assert style["krippendorff_alpha_nominal"] == pytest.approx(expected)
    per_rater = result.consistency_by_rater.set_index("rater")
    assert per_rater.loc["r1", "consistency"] == 0.75
    # With a kind column the retest rows are the repeats (and may keep the sides), attention rows are left out.
    kinded = votes.assign(kind=["main"] * 8 + ["retest"] * 4)
    kinded.loc[11, ["left", "right", "choice"]] = ["base", "lora", "left"]  # same sides, same answer: consistent
    # An attention item shows a blank image the study made: not an arm of the analysis.
    kinded = pd.concat([kinded, pd.DataFrame([("r1", "p9", 0, "style", "blank", "lora", "right", "attention")], columns=kinded.columns)])
    again = analyze_pairwise(kinded, None, n_boot=100)
    assert again.agreement.set_index("dimension").loc["style", "n_consistent"] == 3
    assert again.counts["n_left_out"] == 1 and again.counts["n_main_votes"] == 8
    assert again.arms == ["base", "lora"]
    assert again.strengths.set_index("dimension").loc["style", "elo"].notna().all()
    assert "match: no votes" in again.notes


def test_perfect_agreement_gives_alpha_one():
    rows = [(r, f"p{i}", 0, "beauty", "base", "lora", c) for i, c in enumerate(["left", "right", "tie", "left"]) for r in ("r1", "r2", "r3")]
    result = analyze_pairwise(pd.DataFrame(rows, columns=HEADER.split(",")), None, n_boot=100)
    beauty = result.agreement.set_index("dimension").loc["beauty"]
    assert beauty["krippendorff_alpha_nominal"] == pytest.approx(1.0)
    assert beauty["n_comparisons_two_raters"] == 4
    assert np.isnan(result.agreement.set_index("dimension").loc["style", "krippendorff_alpha_nominal"])


# --- Reading and validation ----------------------------------------------------------------------


def write_votes(path, rows, header=HEADER):
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_bad_votes_are_reported_with_line_numbers(tmp_path):
    path = write_votes(
        tmp_path / "votes.csv",
        [
            "r1,p1,0,style,base,lora,left",  # line 2: fine
            "r1,p1,0,colour,base,lora,left",  # 3
            "r1,p1,0,match,base,lora,L",  # 4
            "r1,p1,0,detail,base,base,tie",  # 5
            "r1,p1,1.5,style,base,lora,left",  # 6
            "r1,p1,18446744073709551616,style,base,lora,left",  # 7: one above the uint64 range
            ",p1,0,beauty,base,lora,left",  # 8
            "",  # 9
            "r1,p1,0,style,base,lora,right",  # 10: the same vote as line 2 again
            "r2,p1,0,style,lora,base,right",  # 11: fine
        ],
    )
    with pytest.raises(FangzhiError) as error:
        read_pairwise_file(path)
    message = str(error.value)
    assert f"{path}: 9 bad row(s)" in message
    for expected in [
        "line 2: duplicate vote: rater r1, prompt p1, seed 0, style, left base, right lora (copies at line 2, line 10)",
        "line 3: dimension is 'colour'; must be one of style, match, detail, beauty",
        "line 4: choice is 'L'; must be one of left, right, tie",
        "line 5: left and right are both arm 'base'",
        "line 6: seed is '1.5'; must be an integer",
        "line 7: seed is '18446744073709551616'; does not fit in 64 bits",
        "line 8: missing rater",
        "line 9: empty line",
        "line 10: duplicate vote: rater r1, prompt p1, seed 0, style, left base, right lora (copies at line 2, line 10)",
    ]:
        assert expected in message, message
    assert "line 11" not in message
    with pytest.warns(UserWarning):
        votes, bad = read_pairwise_file(path, drop_bad_rows=True)
    assert len(votes) == 1 and len(bad) == 9


def test_seeds_are_exact_64_bit_integers_and_kind_duplicates_ignore_sides(tmp_path):
    big = 2**53 + 1  # a float would read it as 2**53
    path = write_votes(tmp_path / "votes.csv", [f"r1,p1,{big},style,base,lora,left", "r1,p1,-9223372036854775808,style,base,lora,tie"])
    votes, _ = read_pairwise_file(path)
    assert votes["seed"].tolist() == [big, -(2**63)]
    # A spreadsheet's byte-order mark does not hide the first column.
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert is_pairwise_file(file_columns(path)) and len(read_pairwise_file(path)[0]) == 2
    kinded = write_votes(
        tmp_path / "kinded.csv",
        [
            "r1,p1,0,style,base,lora,left,checking",
            "r1,p1,0,style,base,lora,left,main",
            "r1,p1,0,style,lora,base,left,main",
            "r1,p1,0,style,lora,base,right,retest",
            "r1,p1,0,match,base,lora,left,",
        ],
        header=HEADER + ",kind",
    )
    with pytest.raises(FangzhiError) as error:
        read_pairwise_file(kinded)
    message = str(error.value)
    assert "line 2: kind is 'checking'; must be one of main, retest, attention" in message
    assert "line 3: duplicate vote: rater r1, prompt p1, seed 0, style, arms base and lora (copies at line 3, line 4)" in message
    assert "line 4: duplicate vote" in message and "line 5" not in message
    assert "line 6: kind is empty; must be one of main, retest, attention" in message


def test_parquet_rows_missing_columns_detection_and_reference_arm(tmp_path):
    votes = votes_from_counts({("lora", "base"): (3, 1, 2)}, dimensions=["style"])
    bad = votes.astype({"seed": float})
    bad.loc[2, "seed"] = 0.5
    bad.to_parquet(tmp_path / "votes.parquet")
    with pytest.raises(FangzhiError, match=r"row 3: seed is '0.5'"):
        read_pairwise_file(tmp_path / "votes.parquet")
    write_votes(tmp_path / "short.csv", ["r1,p1,0,base,lora,left"], header="rater,prompt,seed,left,right,choice")
    assert is_pairwise_file(file_columns(tmp_path / "short.csv"))
    assert not is_pairwise_file("rater,arm,prompt,seed,style,match,detail,beauty".split(","))
    with pytest.raises(FangzhiError, match=r"missing column\(s\) dimension; the header of a pairwise votes file"):
        read_pairwise_file(tmp_path / "short.csv")
    with pytest.raises(FangzhiError, match=r"reference arm 'base' is not among the arms in the votes \(a, b\)"):
        analyze_pairwise(votes.replace({"base": "a", "lora": "b"}), None, n_boot=100)


def test_group_codes_match_pandas_groups_beyond_the_int64_radix():
    # Four columns of 2^16 distinct values: their mixed-radix key would need 64 bits, so it is re-compacted.
    rng = np.random.default_rng(0)
    columns = [rng.permutation(2**16) for _ in range(4)]
    columns = [np.concatenate([c, c[:100]]) for c in columns]  # the first 100 combinations again
    codes = group_codes(*columns)
    expected = pd.DataFrame(dict(enumerate(columns))).groupby(list(range(4)), sort=False).ngroup().to_numpy()
    assert (codes == expected).all() and codes.max() == 2**16 - 1


# --- Outputs ------------------------------------------------------------------------------------


def test_analyze_pairwise_writes_tables_plot_json_and_report(tmp_path):
    votes = simulate_pairwise_votes(3, 6, 2, arms=("base", "lora@0.5", "lora@1.0"), repeat_share=0.1, seed=4)
    path = tmp_path / "votes.csv"
    votes.to_csv(path, index=False)
    from_file = analyze_pairwise(path, tmp_path / "out", n_boot=200, seed=3, title_note="simulated")
    from_frame = analyze_pairwise(votes, None, n_boot=200, seed=3)
    pd.testing.assert_frame_equal(from_file.strengths, from_frame.strengths)
    table = pd.read_csv(tmp_path / "out" / "pairwise_table.csv")
    assert list(table.columns) == TABLE_COLUMNS
    assert len(table) == 4 * 3 and (table.loc[table["arm"] == "base", "elo"] == 1000).all()
    direct = from_file.pairs.query("dimension == 'match' and arm == 'lora@1.0' and versus == 'base'")["win_rate"].item()
    assert table.query("dimension == 'match' and arm == 'lora@1.0'")["win_rate_vs_reference"].item() == pytest.approx(direct)
    markdown = (tmp_path / "out" / "pairwise_table.md").read_text(encoding="utf-8")
    assert "(simulated)" in markdown and "1000 (reference)" in markdown and "| Image–text match |" in markdown
    assert r"\begin{tabular}{lccc}" in (tmp_path / "out" / "pairwise_table.tex").read_text(encoding="utf-8")
    assert (tmp_path / "out" / "pairwise_elo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "out" / "pairwise_results.json").read_text(encoding="utf-8"))
    assert results["counts"]["n_repeats"] == from_file.counts["n_repeats"] > 0
    assert "data:image/png;base64," in (tmp_path / "out" / "pairwise_report.html").read_text(encoding="utf-8")


# --- Power ---------------------------------------------------------------------------------------


def test_power_is_near_alpha_at_no_preference_and_grows_with_comparisons(tmp_path):
    rng = np.random.default_rng(0)
    assert 0.03 < simulated_preference_power(0.5, 200, 3, sims=2000, rng=rng) < 0.07
    low = simulated_preference_power(0.6, 20, 3, sims=1000, rng=rng)
    high = simulated_preference_power(0.6, 200, 3, sims=1000, rng=rng)
    assert low < 0.6 < 0.95 < high
    # Votes on one comparison correlated (comparisons differ in which arm they favour): the level still holds.
    assert 0.03 < simulated_preference_power(0.5, 100, 5, comparison_sd=1.5, sims=2000, rng=rng) < 0.07
    grid, smallest, text = run_pairwise_power(PairwisePowerConfig(raters=[1, 5], comparisons=[20, 80, 320], sims=300, out=tmp_path))
    assert len(grid) == 6 and (tmp_path / "pairwise_power.csv").is_file()
    assert smallest.set_index("n_raters").loc[5, "n_comparisons"] <= smallest.set_index("n_raters").loc[1, "n_comparisons"]
    assert "5 rater(s):" in text


# --- Through the CLI -----------------------------------------------------------------------------


def test_cli_analyze_detects_a_votes_file_and_uses_the_reference_arm(tmp_path, capsys):
    from fangzhi.cli import main

    votes = simulate_pairwise_votes(3, 6, 2, arms=("base", "lora@0.5", "lora@1.0"), elo={"base": 1000, "lora@0.5": 1100, "lora@1.0": 1200}, seed=2)
    path = tmp_path / "votes.csv"
    votes.to_csv(path, index=False)
    assert main(["analyze", "--ratings", str(path), "--out", str(tmp_path / "out"), "--reference-arm", "lora@0.5", "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "Bradley–Terry strengths, Elo scale (lora@0.5 = 1000)" in printed and "200 resamples" in printed
    table = pd.read_csv(tmp_path / "out" / "pairwise_table.csv")
    assert list(table.columns) == TABLE_COLUMNS
    assert (table.loc[table["arm"] == "lora@0.5", "elo"] == 1000).all()
    expected = analyze_pairwise(votes, None, reference_arm="lora@0.5", n_boot=200, seed=0).strengths
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    assert not (tmp_path / "out" / "table2.md").exists()


def test_cli_analyze_bad_votes_file_gives_the_line_and_exit_code_2(tmp_path, capsys):
    from fangzhi.cli import main

    path = write_votes(tmp_path / "votes.csv", ["r1,p1,0,style,base,lora,left", "r1,p1,0,match,base,lora,maybe"])
    assert main(["analyze", "--ratings", str(path), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "line 3: choice is 'maybe'; must be one of left, right, tie" in captured.err
    assert "Traceback" not in captured.err + captured.out and not (tmp_path / "out").exists()

    good = write_votes(tmp_path / "good.csv", ["r1,p1,0,style,base,lora,left", "r1,p1,1,style,lora,base,tie"])
    assert main(["analyze", "--ratings", str(good), "--out", str(tmp_path / "out"), "--reference-arm", "sdxl"]) == 2
    assert "reference arm 'sdxl' is not among the arms in the votes (base, lora); name one with --reference-arm" in capsys.readouterr().err
    assert main(["analyze", "--ratings", str(good), "--out", str(tmp_path / "out"), "--sd-over", "raters", "--no-mixed-model"]) == 2
    assert "is a pairwise votes file; --sd-over, --no-mixed-model apply only to a wide ratings file" in capsys.readouterr().err


def test_cli_analyze_power_pairwise_writes_the_grid_and_rejects_score_flags(tmp_path, capsys):
    from fangzhi.cli import main

    args = ["analyze", "power", "--mode", "pairwise", "--win-rate", "0.65", "--raters", "1,3", "--comparisons", "20,160", "--sims", "200"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "detect a win rate of 0.65" in printed
    grid = pd.read_csv(tmp_path / "pairwise_power.csv")
    assert sorted(zip(grid["n_raters"], grid["n_comparisons"])) == [(1, 20), (1, 160), (3, 20), (3, 160)]
    power = grid.set_index(["n_raters", "n_comparisons"])["power"]
    assert power[(3, 160)] > power[(1, 20)]
    assert main([*args, "--diff", "0.3"]) == 2
    assert "--diff: not used with analyze power --mode pairwise" in capsys.readouterr().err
    assert main(["analyze", "power", "--win-rate", "0.6"]) == 2
    assert "--win-rate: only used with analyze power --mode pairwise" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "key", "message"),
    [
        (["--raters", "0"], "raters.0", "greater than or equal to 1"),
        (["--raters", "3,-2"], "raters.1", "greater than or equal to 1"),
        (["--raters", ","], "raters", "at least 1 item"),
        (["--comparisons", "0"], "comparisons.0", "greater than or equal to 2"),
        (["--comparisons", "1,-5"], "comparisons.0", "greater than or equal to 2"),
        (["--comparisons", ","], "comparisons", "at least 1 item"),
        (["--win-rate", "0.5"], "win_rate", "0.5 is no preference"),
    ],
)
def test_cli_analyze_power_pairwise_refuses_designs_it_cannot_answer(tmp_path, capsys, flags, key, message):
    from fangzhi.cli import main

    assert main(["analyze", "power", "--mode", "pairwise", "--sims", "50", "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert f"key '{key}'" in err and message in err
    assert not (tmp_path / "out").exists()

