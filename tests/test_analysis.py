"""Human-ratings analysis: known answers (hand-computed Table 2, Krippendorff's and Shrout & Fleiss's
published examples), agreement with scipy/pingouin, line-numbered errors, and a small end-to-end run."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
from scipy import stats as sps

from fangzhi.cli import main as cli_main
from fangzhi.errors import FangzhiError
from fangzhi.evaluate.analyze import SCORE_FILES, AnalyzeConfig, PowerConfig, analyze, run_power
from fangzhi.evaluate.power import VarianceComponents, simulate_ratings, simulated_power
from fangzhi.evaluate.ratings import read_ratings_file
from fangzhi.evaluate.reliability import icc2, krippendorff_alpha, reliability_table
from fangzhi.evaluate.stats import (
    arm_pairs,
    bootstrap_mean_ci,
    compare_arms,
    compare_pair,
    friedman_test,
    friedman_tests,
    holm,
    signed_rank_test,
)
from fangzhi.evaluate.table import arm_order, half_up, paper_table, summary_table, to_csv_frame

HEADER = "rater,arm,prompt,seed,style,match,detail,beauty"
# Two raters, two image pairs. Image means (style, match, detail, beauty; comprehensive):
#   base p1 (4, 4, 3, 3.5; 3.625)   base p2 (2, 2, 3, 2.5; 2.375)
#   lora p1 (4.5, 5, 4, 4.5; 4.5)   lora p2 (4.5, 4, 4, 3.5; 4.0)
SMALL_ROWS = [
    "A,base,p1,0,3,4,2,3",
    "B,base,p1,0,5,4,4,4",
    "A,base,p2,0,2,3,3,1",
    "B,base,p2,0,2,1,3,4",
    "A,lora,p1,0,5,5,4,4",
    "B,lora,p1,0,4,5,4,5",
    "A,lora,p2,0,4,4,5,3",
    "B,lora,p2,0,5,4,3,4",
]


def write_csv(path, rows, header=HEADER):
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def small_csv(tmp_path):
    return write_csv(tmp_path / "ratings.csv", SMALL_ROWS)


# --- Table 2 ---------------------------------------------------------------------------------


def test_table2_over_images_matches_hand_computation(small_csv):
    ratings, bad = read_ratings_file(small_csv)
    assert len(bad) == 0
    arms = arm_order(ratings, "base")
    table = paper_table(summary_table(ratings, "images", arms), arms)
    # By hand: SD of two values a, b is |a - b| / sqrt(2).
    assert table["base"].tolist() == ["3.0 ± 1.4", "3.0 ± 1.4", "3.0 ± 0.0", "3.0 ± 0.7", "3.00 ± 0.88"]
    assert table["lora"].tolist() == ["4.5 ± 0.0", "4.5 ± 0.7", "4.0 ± 0.0", "4.0 ± 0.7", "4.25 ± 0.35"]


def test_table2_other_units_and_csv(small_csv):
    ratings, _ = read_ratings_file(small_csv)
    arms = ["base", "lora"]
    over_ratings = summary_table(ratings, "ratings", arms).set_index(["score", "arm"])
    # base style ratings 3, 5, 2, 2: mean 3, SS 6, var 6/3 = 2.
    assert over_ratings.loc[("style", "base"), "sd"] == pytest.approx(math.sqrt(2))
    assert over_ratings.loc[("style", "base"), "n"] == 4
    # base per-rating comprehensive 3, 4.25, 2.25, 2.5: SS 2.375, var 2.375/3.
    assert over_ratings.loc[("comprehensive", "base"), "sd"] == pytest.approx(math.sqrt(2.375 / 3))
    over_raters = summary_table(ratings, "raters", arms).set_index(["score", "arm"])
    # rater A's base style mean 2.5, rater B's 3.5.
    assert over_raters.loc[("style", "base"), "sd"] == pytest.approx(math.sqrt(0.5))
    assert over_raters.loc[("style", "base"), "n"] == 2
    csv = to_csv_frame(summary_table(ratings, "images", arms), arms).set_index("key")
    assert csv.loc["comprehensive", ["base_mean", "base_sd", "base_n"]].tolist() == [3.0, 0.88, 2]
    assert csv.loc["comprehensive", "lora_sd"] == 0.35


def test_table_values_round_half_up():
    assert half_up(3.05, 1) == "3.1" and half_up(2.625, 2) == "2.63" and half_up(2.675, 2) == "2.68"
    assert half_up(-0.25, 1) == "-0.3" and half_up(4.0, 2) == "4.00" and half_up(float("nan"), 1) == "–"
    summary = pd.DataFrame([{"score": s, "arm": "base", "mean": 3.05, "sd": 0.25, "n": 2} for s in ("style", "match", "detail", "beauty")] + [{"score": "comprehensive", "arm": "base", "mean": 2.625, "sd": 0.125, "n": 2}])
    assert paper_table(summary, ["base"])["base"].tolist() == ["3.1 ± 0.3"] * 4 + ["2.63 ± 0.13"]
    assert to_csv_frame(summary, ["base"])["base_mean"].tolist() == [3.05] * 4 + [2.63]


def test_parquet_and_extra_columns_give_the_same_ratings(small_csv, tmp_path):
    from_csv, _ = read_ratings_file(small_csv)
    extra = pd.read_csv(small_csv).assign(comment="ok")
    extra.to_parquet(tmp_path / "ratings.parquet")
    from_parquet, _ = read_ratings_file(tmp_path / "ratings.parquet")
    pd.testing.assert_frame_equal(from_csv, from_parquet)


# --- Bad input -------------------------------------------------------------------------------


def test_bad_rows_are_reported_with_file_line_numbers(tmp_path):
    rows = [
        "A,base,p1,0,3,4,2,3",  # line 2 ok
        "A,base,p2,0,0,4,2,3",  # line 3 score 0
        "A,base,p3,0,3,6,2,3",  # line 4 score 6
        "A,base,p4,0,3,4,good,3",  # line 5 text
        ",base,p5,0,3,4,2,3",  # line 6 missing rater
        "A,base,p1,0,3,4,2,3",  # line 7 duplicate of line 2
        "A,base,p6,0,3,4,2.5,3",  # line 8 not an integer
        "B,base,p1,0,3,4,2,3",  # line 9 ok
    ]
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(FangzhiError) as err:
        read_ratings_file(path)
    message = str(err.value)
    assert "7 bad row(s)" in message  # both copies of the duplicate count
    assert "line 3: style is '0'" in message
    assert "line 4: match is '6'" in message
    assert "line 5: detail is 'good'" in message
    assert "line 6: missing rater" in message
    assert "line 7: duplicate" in message and "(copies at line 2, line 7)" in message
    assert "line 8: detail is '2.5'" in message
    assert str(path) in message and "--drop-bad-rows" in message

    with pytest.warns(UserWarning):
        clean, bad = read_ratings_file(path, drop_bad_rows=True)
    # Both copies of the duplicate are dropped: there is no telling which one is right.
    assert len(bad) == 7 and clean["rater"].tolist() == ["B"]


def test_drop_bad_rows_keeps_the_good_ones(tmp_path):
    path = write_csv(tmp_path / "mixed.csv", [*SMALL_ROWS, "C,lora,p1,0,5,5,5,9"])
    with pytest.warns(UserWarning, match="line 10"):
        clean, bad = read_ratings_file(path, drop_bad_rows=True)
    assert len(clean) == len(SMALL_ROWS) and [w for w, _ in bad.problems] == ["line 10"]


def test_blank_line_keeps_line_numbers_and_missing_column_is_named(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text(HEADER + "\nA,base,p1,0,3,4,2,3\n\nA,base,p2,0,7,4,2,3\n", encoding="utf-8")
    with pytest.raises(FangzhiError, match="line 3: empty line\n  line 4: style is '7'"):
        read_ratings_file(path)
    path.write_text("rater,arm,prompt,seed,style,match,detail\nA,base,p1,0,3,4,2\n", encoding="utf-8")
    with pytest.raises(FangzhiError, match="missing column"):
        read_ratings_file(path)


def test_parquet_errors_name_rows(tmp_path):
    frame = pd.read_csv(pd.io.common.StringIO("\n".join([HEADER, *SMALL_ROWS])))
    frame.loc[2, "beauty"] = 6
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(FangzhiError, match="row 3: beauty is '6'"):
        read_ratings_file(tmp_path / "bad.parquet")


# --- Statistics against scipy / pingouin / hand computation ----------------------------------


def paired_sample(n=30, seed=1):
    rng = np.random.default_rng(seed)
    base = rng.integers(1, 6, (n, 4)).mean(axis=1)
    other = np.clip(base + rng.integers(-1, 3, n) * 0.25, 1, 5)
    return base, other


def test_paired_tests_equal_scipy_and_pingouin():
    base, other = paired_sample(n=12)  # ties and zeros among 12 pairs: scipy's exhaustive permutation test
    result = compare_pair(base, other, n_boot=2000, rng=np.random.default_rng(0))
    wilcoxon = sps.wilcoxon(other, base, zero_method="wilcox")
    assert result["wilcoxon_W"] == wilcoxon.statistic and result["wilcoxon_p"] == pytest.approx(wilcoxon.pvalue)
    pg_w = pg.wilcoxon(other, base)
    assert result["rank_biserial"] == pytest.approx(pg_w["RBC"].iloc[0])
    ttest = sps.ttest_rel(other, base)
    assert result["t"] == pytest.approx(ttest.statistic) and result["t_p"] == pytest.approx(ttest.pvalue)
    pg_t = pg.ttest(other, base, paired=True)
    assert result["t_p"] == pytest.approx(pg_t["p_val"].iloc[0])
    # Cohen's dz is t / sqrt(n) for the paired t-test.
    assert result["cohens_dz"] == pytest.approx(ttest.statistic / math.sqrt(len(base)))
    assert result["ci95_low"] < result["mean_diff"] < result["ci95_high"]


@pytest.mark.parametrize("n", [5, 9, 20, 50])
def test_signed_rank_is_scipys_exact_test_without_ties(n):
    diff = np.random.default_rng(n).normal(0.4, 1, n)
    assert signed_rank_test(diff)[1] == pytest.approx(sps.wilcoxon(diff, method="exact").pvalue, rel=1e-9)


def test_signed_rank_beyond_the_exact_range_is_the_tie_corrected_normal_approximation():
    base, other = paired_sample(n=80)
    expected = sps.wilcoxon(other, base, method="asymptotic", correction=False)
    assert signed_rank_test(other - base) == pytest.approx((expected.statistic, expected.pvalue))
    assert signed_rank_test(other - base)[1] == pytest.approx(pg.wilcoxon(other, base, correction=False)["p_val"].iloc[0])


def test_rank_biserial_hand_example_and_all_tied_pairs():
    # d = [1, -2, 3, 0]: zero dropped, ranks of |1|, |2|, |3| are 1, 2, 3: r = (1 + 3 - 2) / 6.
    result = compare_pair(np.array([1.0, 4, 1, 2]), np.array([2.0, 2, 4, 2]), n_boot=200, rng=np.random.default_rng(0))
    assert result["rank_biserial"] == pytest.approx(2 / 6) and result["n_zero_diff"] == 1
    tied = compare_pair(np.ones(5), np.ones(5), n_boot=200, rng=np.random.default_rng(0))
    assert math.isnan(tied["wilcoxon_p"]) and math.isnan(tied["t_p"]) and tied["mean_diff"] == 0


def test_holm_hand_example():
    # sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → monotone max 0.06.
    adjusted = holm(np.array([0.01, 0.04, 0.03, 0.005, np.nan]))
    np.testing.assert_allclose(adjusted[:4], [0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[4])


def test_bootstrap_by_value_counts_matches_ordinary_bootstrap():
    diff = np.random.default_rng(3).integers(-2, 3, 200).astype(float)
    low, high = bootstrap_mean_ci(diff, 20_000, np.random.default_rng(1))
    resamples = np.random.default_rng(2).integers(0, diff.size, (20_000, diff.size))
    ordinary = np.percentile(diff[resamples].mean(axis=1), [2.5, 97.5])
    assert low == pytest.approx(ordinary[0], abs=0.02) and high == pytest.approx(ordinary[1], abs=0.02)


# --- Reliability -----------------------------------------------------------------------------

# Krippendorff (2011) "Computing Krippendorff's alpha-reliability", reliability data with missing values:
# 4 observers × 12 units; published alpha: nominal 0.743, ordinal 0.815, interval 0.849.
KRIPPENDORFF_EXAMPLE = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


def test_krippendorff_alpha_published_example():
    units = [u for row in KRIPPENDORFF_EXAMPLE for u, v in enumerate(row) if v is not None]
    values = [v for row in KRIPPENDORFF_EXAMPLE for v in row if v is not None]
    units, values = np.array(units), np.array(values)
    assert round(krippendorff_alpha(units, values, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(units, values, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(units, values, "interval"), 3) == 0.849


def test_icc_shrout_fleiss_example_and_pingouin():
    # Shrout & Fleiss (1979), Table 2: 6 targets × 4 judges; ICC(2,1) = .29, ICC(2,4) = .62.
    matrix = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float)
    icc_1, icc_k = icc2(matrix)
    assert round(icc_1, 2) == 0.29 and round(icc_k, 2) == 0.62
    rng = np.random.default_rng(5)
    ratings = np.clip(rng.integers(1, 6, (15, 1)) + rng.integers(-1, 2, (15, 3)), 1, 5).astype(float)
    long = pd.DataFrame([(t, r, ratings[t, r]) for t in range(15) for r in range(3)], columns=["t", "r", "y"])
    pg_icc = pg.intraclass_corr(long, targets="t", raters="r", ratings="y").set_index("Type")["ICC"]
    icc_1, icc_k = icc2(ratings)
    # pingouin 0.7 names ICC(2,1) and ICC(2,k) "ICC(A,1)" and "ICC(A,k)" (absolute agreement).
    assert icc_1 == pytest.approx(pg_icc["ICC(A,1)"]) and icc_k == pytest.approx(pg_icc["ICC(A,k)"])


def test_reliability_all_equal_does_not_crash_and_low_alpha_is_flagged():
    same = simulate_ratings(3, 4, 1, seed=0)
    same[["style", "match", "detail", "beauty"]] = 3
    table = reliability_table(same)
    assert table["krippendorff_alpha_ordinal"].isna().all() and table["icc2_k"].isna().all()
    assert table["note"].str.contains("undefined").all() and not table["alpha_flag"].any()
    noisy = simulate_ratings(4, 20, 1, seed=1, components=VarianceComponents(rater_sd=0, prompt_sd=0, seed_sd=0, image_sd=0, rater_arm_sd=0, prompt_arm_sd=0, noise_sd=1.2))
    table = reliability_table(noisy)
    within = table["scope"] != "pooled (all arms)"
    assert table.loc[within, "alpha_flag"].all() and not table.loc[~within, "alpha_flag"].any()


def test_reliability_within_each_arm_is_not_inflated_by_the_arm_difference():
    # Raters agree poorly within each arm, but the LoRA arm is 2 points higher: pooled alpha looks fine.
    components = VarianceComponents(base_mean=2.0, rater_sd=0, prompt_sd=0.2, seed_sd=0, image_sd=0.2, rater_arm_sd=0, prompt_arm_sd=0, noise_sd=0.8)
    ratings = simulate_ratings(4, 30, 1, effect=2.0, seed=2, components=components)
    table = reliability_table(ratings).set_index(["dimension", "scope"])
    for arm in ("base", "lora"):
        units = ratings.loc[ratings["arm"] == arm]
        by_hand = krippendorff_alpha(units.groupby(["prompt", "seed"]).ngroup().to_numpy(), units["style"].to_numpy())
        assert table.loc[("style", arm), "krippendorff_alpha_ordinal"] == pytest.approx(by_hand)
        assert table.loc[("style", arm), "alpha_flag"]
    pooled = table.loc[("style", "pooled (all arms)")]
    assert pooled["krippendorff_alpha_ordinal"] > 0.6 and not pooled["alpha_flag"]


# --- Simulation and power --------------------------------------------------------------------


def test_simulate_ratings_shape_and_effect():
    frame = simulate_ratings(3, ["a", "b"], [0, 7], arms=("base", "lora"), effect=1.5, seed=2)
    assert list(frame.columns) == ["rater", "arm", "prompt", "seed", "style", "match", "detail", "beauty"]
    assert len(frame) == 3 * 2 * 2 * 2 and not frame.duplicated(["rater", "arm", "prompt", "seed"]).any()
    assert frame[["style", "match", "detail", "beauty"]].isin(range(1, 6)).all().all()
    means = frame.groupby("arm")[["style", "beauty"]].mean()
    assert (means.loc["lora"] > means.loc["base"]).all()


def test_power_is_near_alpha_without_effect_and_high_with_a_large_one():
    components = VarianceComponents()
    assert simulated_power(components, 0.0, 4, 16, sims=400, rng=np.random.default_rng(0)) < 0.1
    assert simulated_power(components, 1.0, 4, 16, sims=200, rng=np.random.default_rng(0)) > 0.9


def test_run_power_from_ratings(tmp_path):
    path = tmp_path / "sim.csv"
    simulate_ratings(4, 12, 1, effect=0.5, seed=4).to_csv(path, index=False)
    grid, best, text = run_power(PowerConfig(from_ratings=path, raters=[2, 4], prompts=[8, 32], sims=100, out=tmp_path / "power"))
    assert len(grid) == 4 * 2 * 2 and set(grid["score"]) == {"style", "match", "detail", "beauty"}
    assert "raters" in text and (tmp_path / "power" / "power.json").is_file()
    # More prompts never hurts much: power at 32 prompts ≥ power at 8 (up to simulation noise).
    wide = grid.pivot_table(index=["score", "n_raters"], columns="n_prompts", values="power")
    assert (wide[32] >= wide[8] - 0.1).all()


def test_run_power_from_ratings_without_the_baseline_arm_names_the_arms_found(tmp_path):
    path = tmp_path / "sim.csv"
    simulate_ratings(4, 12, 1, effect=0.5, seed=4).to_csv(path, index=False)
    with pytest.raises(FangzhiError, match="baseline arm 'sdxl'.*arms found: base, lora"):
        run_power(PowerConfig(from_ratings=path, baseline_arm="sdxl", raters=[2], prompts=[8], sims=50, out=tmp_path / "power"))


# --- End to end ------------------------------------------------------------------------------


def study_frame():
    """Simulated main ratings plus one retest and two attention items, in the rating app's layout."""
    frame = simulate_ratings(3, 6, 1, effect=0.8, seed=7).assign(kind="main", expected=np.nan)
    retest = frame.iloc[[0]].assign(kind="retest")
    attention = frame.iloc[[0, 1]].assign(kind="attention", prompt="attention", expected=[frame["style"].iloc[0], 6])
    attention.loc[attention.index[0], ["style", "match", "detail", "beauty"]] = frame["style"].iloc[0]  # all four as asked: passed
    study = pd.concat([frame, retest, attention], ignore_index=True)
    # As the rating app's store returns it: nullable integer `expected`, an opaque image id.
    return study.astype({"expected": "Int64"}).assign(image_id=[f"{i:016x}" for i in range(len(study))])


def test_analyze_end_to_end_with_qc_and_clip(tmp_path):
    frame = study_frame()
    images = frame.loc[frame["kind"] == "main"].drop_duplicates(["arm", "prompt", "seed"])
    clip = images[["arm", "prompt", "seed"]].assign(image_id=range(len(images)), clip_score=np.linspace(0.2, 0.3, len(images)), style_similarity=np.linspace(0.6, 0.4, len(images)))
    clip.to_csv(tmp_path / "clip_scores.csv", index=False)
    config = AnalyzeConfig(out=tmp_path / "out", clip=tmp_path / "clip_scores.csv", bootstrap=200, title_note="simulated")
    out = analyze(config, ratings=frame)
    for name in ["table2.md", "table2.csv", "table2.tex", "comparisons.csv", "mixed_model.csv", "reliability.csv", "per_rater.csv", "per_prompt.csv", "means.png", "distributions.png", "rater_heatmap.png", "clip_vs_human.png", "report.html"]:
        assert (out / name).is_file(), name
    assert {path.name for path in out.iterdir()} <= set(SCORE_FILES)  # what a rerun into the folder replaces
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["counts"]["n_raters"] == 3 and results["counts"]["n_images"] == 12
    assert results["counts"]["n_attention_failures"] == 1 and results["counts"]["n_retest_ratings"] == 1
    assert results["retest"][0]["exact_agreement"] == 1.0
    assert len(results["comparisons"]) == 3 * 5 and len(results["clip_spearman"]) == 2 * 5
    primary = [row for row in results["comparisons"] if row["primary"]]
    assert [row["score"] for row in primary] == ["style", "match", "detail", "beauty", "comprehensive"]
    assert {row["unit"] for row in primary} == {"prompts"} and primary[0]["n_pairs"] == 6
    mixed_rows = results["mixed_model"]
    assert [row["score"] for row in mixed_rows] == ["style", "match", "detail", "beauty"] and all(row["fitted"] for row in mixed_rows)
    assert all(row["ci95_low"] < row["arm_effect"] < row["ci95_high"] for row in mixed_rows)
    assert all("seed within prompt left out: one seed per prompt" in row["simplified"] for row in mixed_rows)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "(simulated)" in html and "3 raters" in html and "1 attention-check failures" in html
    embedded = html.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(embedded).startswith(b"\x89PNG")
    assert "(simulated)" in (out / "table2.md").read_text(encoding="utf-8")
    assert "over images" in (out / "table2.tex").read_text(encoding="utf-8")


def test_cli_prints_table_and_reports_bad_file(tmp_path, small_csv, capsys):
    assert cli_main(["analyze", "--ratings", str(small_csv), "--out", str(tmp_path / "cli"), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "4.25 ± 0.35" in printed and str(tmp_path / "cli") in printed
    bad = write_csv(tmp_path / "bad.csv", ["A,base,p1,0,3,4,2,0"])
    assert cli_main(["analyze", "--ratings", str(bad), "--out", str(tmp_path / "never")]) == 2
    assert "line 2: beauty is '0'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_cli_output_folders_and_files_as_spreadsheets_save_them(tmp_path, small_csv, capsys):
    run = lambda ratings, out: cli_main(["analyze", "--ratings", str(ratings), "--out", str(out), "--bootstrap", "200", "--no-mixed-model"])
    # A three-arm run's friedman.csv does not outlive a two-arm rerun into the same folder; the user's own files stay.
    three = write_csv(tmp_path / "three.csv", SMALL_ROWS + [row.replace(",lora,", ",lora2,") for row in SMALL_ROWS if ",lora," in row])
    out = tmp_path / "out"
    assert run(three, out) == 0 and (out / "friedman.csv").is_file()
    (out / "notes.txt").write_text("mine")
    assert run(small_csv, out) == 0
    assert not (out / "friedman.csv").exists() and (out / "notes.txt").read_text() == "mine" and (out / "table2.md").is_file()
    capsys.readouterr()

    existing = tmp_path / "existing.txt"
    existing.write_text("keep")
    assert run(small_csv, existing) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and existing.read_text() == "keep"

    gbk = tmp_path / "gbk.csv"  # Excel's CSV on Chinese Windows
    gbk.write_bytes(small_csv.read_text().replace("\nA,", "\n张三,").encode("gbk"))
    assert run(gbk, tmp_path / "g") == 2
    error = capsys.readouterr().err
    assert "gbk.csv, line 2: not UTF-8" in error and "GBK" in error

    semicolons = tmp_path / "semicolons.csv"  # Excel's CSV where the decimal mark is a comma
    semicolons.write_text(small_csv.read_text().replace(",", ";"))
    assert run(semicolons, tmp_path / "s") == 2
    assert "separated by ';'" in capsys.readouterr().err

    assert cli_main(["analyze", "--db", str(small_csv), "--out", str(tmp_path / "d")]) == 2
    error = capsys.readouterr().err
    assert "not a rating study" in error and "goes to --ratings" in error

    one_prompt = write_csv(tmp_path / "one.csv", [row for row in SMALL_ROWS if ",p1," in row])
    assert run(one_prompt, tmp_path / "one") == 0
    assert "Only 1 prompt(s)" in capsys.readouterr().err
    assert "Only 1 prompt(s)" in (tmp_path / "one" / "report.html").read_text(encoding="utf-8")


def rated_study_db(tmp_path):
    """A real study DB built through the rating app's own creation and save paths; ann fails her attention check."""
    sample = pytest.importorskip("fangzhi.rating_app.sample")
    from fangzhi.rating_app import store, study

    manifest = sample.write_sample_manifest(tmp_path / "generation", n_prompts=3, size=64)
    db = tmp_path / "study.duckdb"
    study.create_study(manifest, db, ["ann", "bo", "cy"], qc_retest=1, qc_attention=1, seed=1)
    items = store.list_assignments(db)
    rng = np.random.default_rng(0)
    rows = []
    for item in items.itertuples():
        scores = {d: int(rng.integers(1, 6)) for d in ("style", "match", "detail", "beauty")}
        if item.kind == "attention":  # all four as asked, except that ann gets one wrong: she fails
            scores = dict.fromkeys(scores, int(item.expected))
            if item.rater == "ann":
                scores["beauty"] = int(item.expected) % 5 + 1
        rows.append({"rater": item.rater, "position": item.position, **scores})
    store.add_ratings(db, rows)
    return db, items


def test_analyze_reads_a_rating_study_db(tmp_path):
    db, items = rated_study_db(tmp_path)
    out = analyze(AnalyzeConfig(db=db, out=tmp_path / "out", bootstrap=200))
    counts = json.loads((out / "results.json").read_text(encoding="utf-8"))["counts"]
    n_main = int((items["kind"] == "main").sum())
    assert counts["n_main_ratings"] == n_main and counts["n_raters"] == 3
    assert counts["n_attention_items"] == 3 and counts["n_attention_failures"] == 1
    assert counts["n_retest_ratings"] == 3


def test_power_estimates_components_from_a_study_db(tmp_path, capsys):
    db, _ = rated_study_db(tmp_path)
    assert cli_main(["analyze", "power", "--db", str(db), "--raters", "2", "--prompts", "8", "--sims", "50", "--out", str(tmp_path / "pw")]) == 0
    assert f"estimated from {db} by the crossed mixed model" in capsys.readouterr().out
    saved = json.loads((tmp_path / "pw" / "power.json").read_text(encoding="utf-8"))
    assert set(saved["components"]) == {"style", "match", "detail", "beauty"}
    assert all(c["noise_sd"] > 0 for c in saved["components"].values())


def test_cli_power_with_given_components(tmp_path, capsys):
    argv = ["analyze", "power", "--noise-sd", "0.3", "--diff", "1.0", "--sims", "50", "--raters", "2", "--prompts", "8,16", "--out", str(tmp_path / "pw")]
    assert cli_main(argv) == 0
    assert "reach power" in capsys.readouterr().out
    saved = json.loads((tmp_path / "pw" / "power.json").read_text(encoding="utf-8"))
    assert saved["components"]["any dimension"]["noise_sd"] == 0.3 and len(saved["grid"]) == 2
    (tmp_path / "notes.txt").write_text("mine")
    assert cli_main([*argv[:-1], str(tmp_path / "notes.txt")]) == 2  # --out naming a file
    assert "is a file, not a folder" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"


# --- Input read exactly or refused ----------------------------------------------------------


def test_seeds_above_2_to_the_53_stay_distinct(tmp_path):
    big = 2**53
    rows = [f"{r},{arm},p{p},{big + s},{3 + (arm == 'lora')},3,3,3" for r in "AB" for arm in ("base", "lora") for p in range(6) for s in range(2)]
    ratings, _ = read_ratings_file(write_csv(tmp_path / "big.csv", rows))
    assert sorted(set(ratings["seed"].tolist())) == [big, big + 1] and ratings["seed"].dtype == np.int64
    out = analyze(AnalyzeConfig(ratings=tmp_path / "big.csv", out=tmp_path / "out", bootstrap=100, mixed_model=False))
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["counts"]["n_images"] == 2 * 6 * 2


def test_unsigned_64_bit_seeds_are_exact_and_out_of_range_seeds_are_refused(tmp_path):
    top = 2**64 - 1
    ratings, _ = read_ratings_file(write_csv(tmp_path / "u.csv", [f"A,base,p1,{top},3,3,3,3", f"A,base,p1,{top - 1},3,3,3,3"]))
    assert ratings["seed"].tolist() == [top, top - 1] and ratings["seed"].dtype == np.uint64
    # A blank field elsewhere makes pandas read the column as float64; the seeds must still be exact.
    with pytest.raises(FangzhiError) as error:
        read_ratings_file(write_csv(tmp_path / "bad.csv", [f"A,base,p1,{2**64},3,3,3,3", "A,base,p2,-1,3,3,3,3", f"A,base,p3,{2**63},3,3,3,3", "A,base,p4,,3,3,3,3", "A,base,p5,2.5,3,3,3,3"]))
    message = str(error.value)
    assert f"line 2: seed is '{2**64}'; does not fit in 64 bits" in message
    assert "line 4: seed is 9223372036854775808; the file mixes negative seeds" in message
    assert "line 5: seed is empty" in message and "line 6: seed is '2.5'; must be an integer" in message
    ratings, _ = read_ratings_file(write_csv(tmp_path / "neg.csv", ["A,base,p1,-9223372036854775808,3,3,3,3", "A,base,p1,9007199254740993,3,3,3,3", "A,base,p2,,3,3,3,3"]), drop_bad_rows=True)
    assert ratings["seed"].tolist() == [-(2**63), 2**53 + 1]


def test_parquet_float_seeds_above_2_to_the_53_are_refused(tmp_path):
    frame = pd.DataFrame({"rater": ["A", "A"], "arm": ["base", "lora"], "prompt": ["p", "p"], "seed": [1.0, 2.0**60], "style": 3, "match": 3, "detail": 3, "beauty": 3})
    frame.to_parquet(tmp_path / "f.parquet")
    with pytest.raises(FangzhiError, match="row 2: seed is '1152921504606846976'; is stored as a floating-point number"):
        read_ratings_file(tmp_path / "f.parquet")


def test_unknown_kind_values_are_errors_with_line_numbers(tmp_path):
    header = HEADER + ",kind"
    rows = [row + ",main" for row in SMALL_ROWS]
    rows[1] = SMALL_ROWS[1] + ","
    rows[2] = SMALL_ROWS[2] + ",Main"
    with pytest.raises(FangzhiError) as error:
        read_ratings_file(write_csv(tmp_path / "kind.csv", rows, header=header))
    message = str(error.value)
    assert "2 bad row(s)" in message
    assert "line 3: kind is empty; must be one of main, retest, attention" in message
    assert "line 4: kind is 'Main'; must be one of main, retest, attention" in message


def test_arm_names_differing_in_case_are_refused_or_aliased(tmp_path):
    rows = [row.replace(",lora,", ",LoRA,") if i == 4 else row for i, row in enumerate(SMALL_ROWS)]
    path = write_csv(tmp_path / "case.csv", rows)
    with pytest.raises(FangzhiError, match=r"line 6: arm 'LoRA' differs from arm 'lora' only in case; fix the file or pass --arm-alias LoRA=lora"):
        read_ratings_file(path)
    ratings, _ = read_ratings_file(path, arm_alias={"LoRA": "lora"})
    assert sorted(ratings["arm"].unique()) == ["base", "lora"] and len(ratings) == len(SMALL_ROWS)
    assert cli_main(["analyze", "--ratings", str(path), "--out", str(tmp_path / "cli"), "--bootstrap", "100", "--arm-alias", "LoRA=lora", "--no-mixed-model"]) == 0


def test_a_run_without_pairs_is_an_error(tmp_path, capsys):
    only_base = write_csv(tmp_path / "base.csv", [r for r in SMALL_ROWS if ",base," in r])
    assert cli_main(["analyze", "--ratings", str(only_base), "--out", str(tmp_path / "o1")]) == 2
    assert "only the arm 'base' was rated" in capsys.readouterr().err
    disjoint = write_csv(tmp_path / "disjoint.csv", [r.replace(",p", ",q") if ",lora," in r else r for r in SMALL_ROWS])
    assert cli_main(["analyze", "--ratings", str(disjoint), "--out", str(tmp_path / "o2")]) == 2
    assert "no prompt was rated in both the baseline arm 'base' and arm(s) 'lora'" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_power_parameters_are_validated(capsys):
    for argv in (["--raters", "0"], ["--raters", "-2"], ["--noise-sd", "-1"], ["--prompts", "1"], ["--sims", "10"]):
        assert cli_main(["analyze", "power", *argv]) == 2
        assert "invalid configuration" in capsys.readouterr().err


def chinese_study() -> pd.DataFrame:
    ratings = simulate_ratings(3, 6, 1, effect=0.5, seed=3)
    return ratings.assign(rater=ratings["rater"].map({"r00": "王老师", "r01": "李华", "r02": "张三"}))


def test_plots_use_a_cjk_font_when_one_is_installed(tmp_path, recwarn):
    from fangzhi.evaluate.report import find_cjk_font

    if find_cjk_font() is None:
        pytest.skip("no CJK font installed on this machine (Debian: fonts-noto-cjk)")
    analyze(AnalyzeConfig(out=tmp_path / "out", bootstrap=100, mixed_model=False), ratings=chinese_study())
    assert not [w for w in recwarn if "missing from font" in str(w.message) or "fonts-noto-cjk" in str(w.message)]


def test_plots_warn_once_naming_the_package_without_a_cjk_font(tmp_path, monkeypatch, recwarn):
    from fangzhi.evaluate import report

    monkeypatch.setattr(report, "CJK_FONTS", ("No Such Font",))
    analyze(AnalyzeConfig(out=tmp_path / "out", bootstrap=100, mixed_model=False), ratings=chinese_study())
    messages = [str(w.message) for w in recwarn]
    assert sum("apt install fonts-noto-cjk" in m for m in messages) == 1
    assert not [m for m in messages if "missing from font" in m]


# --- More than two arms --------------------------------------------------------------------------


def test_friedman_test_equals_scipy_with_ties():
    rng = np.random.default_rng(5)
    blocks = rng.integers(1, 6, (15, 4)).astype(float)  # integer scores: many ties within a block
    blocks[0] = 3.0  # one block tied throughout
    result = friedman_test(blocks)
    expected = sps.friedmanchisquare(*blocks.T)
    assert result["chi2"] == pytest.approx(expected.statistic) and result["p"] == pytest.approx(expected.pvalue)
    assert result["df"] == 3 and result["kendall_w"] == pytest.approx(expected.statistic / (15 * 3))
    assert math.isnan(friedman_test(np.full((6, 3), 2.0))["p"])  # every block tied: no test


def test_friedman_per_dimension_over_prompts_and_images_equals_scipy():
    arms = ["base", "lora@0.5", "lora@1"]
    ratings = simulate_ratings(3, 8, 2, arms=arms, effect=0.4, seed=6)
    ratings = ratings.loc[~((ratings["arm"] == "lora@1") & (ratings["prompt"] == "p007"))]  # one prompt lacks an arm
    result = friedman_tests(ratings, arms).set_index(["unit", "score"])
    images = ratings.groupby(["arm", "prompt", "seed"])[["style", "match", "detail", "beauty"]].mean()
    for unit, keys in (("prompts", ["prompt"]), ("images", ["prompt", "seed"])):
        means = images.groupby(["arm", *keys]).mean()
        means["comprehensive"] = means.mean(axis=1)
        ps = []
        for score in ["style", "match", "detail", "beauty", "comprehensive"]:
            wide = means[score].unstack("arm")[arms].dropna()
            # Means such as 10/3 reached in different orders differ in the last bit; both sides treat them as ties.
            expected = sps.friedmanchisquare(*np.round(wide.to_numpy(), 9).T)
            row = result.loc[(unit, score)]
            assert row["chi2"] == pytest.approx(expected.statistic) and row["p"] == pytest.approx(expected.pvalue)
            assert row["n_units"] == len(wide) == (7 if unit == "prompts" else 14)
            assert row["n_incomplete"] == (1 if unit == "prompts" else 2)
            ps.append(expected.pvalue)
        assert result.loc[unit, "p_holm"].to_numpy() == pytest.approx(holm(np.array(ps)))


def test_multi_arm_comparisons_are_against_the_reference_and_between_adjacent_arms():
    assert arm_pairs(["base", "a", "b", "c"]) == [("base", "a"), ("base", "b"), ("base", "c"), ("a", "b"), ("b", "c")]
    arms = ["base", "lora@0.5", "lora@1"]
    ratings = simulate_ratings(3, 10, 2, arms=arms, effect={"style": 0.5, "match": 0.2, "detail": 0.0, "beauty": 0.3}, seed=7)
    rows = compare_arms(ratings, "base", arms, n_boot=300, seed=1)
    primary = rows.loc[rows["primary"]]
    assert list(dict.fromkeys(zip(primary["baseline"], primary["arm"]))) == arm_pairs(arms)
    # The adjacent pair is the prompt-level paired comparison of the two LoRA arms.
    prompt_means = ratings.groupby(["arm", "prompt"])[["style", "match", "detail", "beauty"]].mean()
    adjacent = primary.loc[(primary["baseline"] == "lora@0.5") & (primary["score"] == "style")].iloc[0]
    low, high = prompt_means.loc["lora@0.5", "style"], prompt_means.loc["lora@1", "style"]
    expected = compare_pair(low.to_numpy(), high.to_numpy(), n_boot=100, rng=np.random.default_rng(0))  # checked against scipy above
    assert adjacent["n_pairs"] == 10 and adjacent["wilcoxon_p"] == pytest.approx(expected["wilcoxon_p"])
    assert adjacent["wilcoxon_W"] == expected["wilcoxon_W"] and adjacent["rank_biserial"] == pytest.approx(expected["rank_biserial"])
    assert adjacent["mean_diff"] == pytest.approx((high - low).mean())
    # Holm over every score of every pair within a unit (15 tests at the prompt level).
    assert primary["wilcoxon_p_holm"].to_numpy() == pytest.approx(holm(primary["wilcoxon_p"].to_numpy()), nan_ok=True)
    # The first pair's numbers (bootstrap included) are those of a two-arm study of the same arms.
    two_arm = compare_arms(ratings.loc[ratings["arm"] != "lora@1"], "base", arms[:2], n_boot=300, seed=1)
    first = rows.loc[rows["arm"] == "lora@0.5"].reset_index(drop=True)
    columns = ["unit", "score", "mean_diff", "ci95_low", "ci95_high", "wilcoxon_p", "rank_biserial", "cohens_dz"]
    pd.testing.assert_frame_equal(first[columns], two_arm[columns])


def test_cli_three_arm_study_table_order_friedman_and_errors(tmp_path, small_csv, capsys):
    path = tmp_path / "three.csv"
    simulate_ratings(3, 8, 2, arms=("base", "lora@0.5", "lora@1"), effect=0.4, seed=8).to_csv(path, index=False)
    out = tmp_path / "out"
    args = ["analyze", "--ratings", str(path), "--out", str(out), "--bootstrap", "200", "--no-mixed-model"]
    assert cli_main([*args, "--arm-order", "lora@1,lora@0.5"]) == 0
    printed = capsys.readouterr().out
    assert "| Dimension | base | lora@1 | lora@0.5 |" in printed
    friedman = pd.read_csv(out / "friedman.csv")
    assert len(friedman) == 10 and set(friedman["unit"]) == {"prompts", "images"} and (friedman["df"] == 2).all()
    comparisons = pd.read_csv(out / "comparisons.csv")
    assert ("lora@1", "lora@0.5") in set(zip(comparisons["baseline"], comparisons["arm"]))
    assert ("lora@0.5", "lora@1") not in set(zip(comparisons["baseline"], comparisons["arm"]))
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Friedman test across arms (unit: prompts, primary" in html and "Friedman test across the 3 arms" in html
    assert "friedman" in json.loads((out / "results.json").read_text(encoding="utf-8"))

    assert cli_main([*args, "--reference-arm", "sd15"]) == 2
    assert "reference arm 'sd15' is not in the ratings; arms found: base, lora@0.5, lora@1 (name the reference arm with --reference-arm)" in capsys.readouterr().err
    assert cli_main([*args, "--arm-order", "lora@1,lora@2"]) == 2
    assert "arm order lora@1,lora@2: not in the ratings: lora@2; missing: lora@0.5" in capsys.readouterr().err
    assert cli_main([*args, "--reference-arm", "lora@1"]) == 0
    assert "| Dimension | lora@1 | base | lora@0.5 |" in capsys.readouterr().out
    assert AnalyzeConfig(out=out, reference_arm="lora@1").baseline_arm == "lora@1"  # the config file's key

    two_arm = tmp_path / "two"
    assert cli_main(["analyze", "--ratings", str(small_csv), "--out", str(two_arm), "--bootstrap", "200"]) == 0
    assert not (two_arm / "friedman.csv").exists()
    assert "friedman" not in json.loads((two_arm / "results.json").read_text(encoding="utf-8"))
