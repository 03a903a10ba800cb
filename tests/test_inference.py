"""Inference at the right unit: the prompt-level primary test keeps its false-positive rate where the
image-level test does not, `analyze power` agrees with a brute-force run of the analysis' own test,
and the crossed mixed model recovers known effects and matches statsmodels on a model it can fit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats

from fangzhi.evaluate.mixed import fit_crossed
from fangzhi.evaluate.power import VarianceComponents, simulate_ratings, simulated_power
from fangzhi.evaluate.stats import paired_scores, signed_rank_test

# Seeds and raters share each prompt's own LoRA − base difference (SD 0.5); no true average effect.
PROMPT_ARM = VarianceComponents(rater_arm_sd=0.0, prompt_arm_sd=0.5)


def rejects(ratings: pd.DataFrame, unit: str, alpha: float = 0.05) -> bool:
    pairs, _ = paired_scores(ratings, "base", "lora", unit)
    return signed_rank_test(pairs["style_other"].to_numpy() - pairs["style_base"].to_numpy())[1] < alpha


def test_prompt_level_test_holds_alpha_where_the_image_level_test_does_not():
    sims = 300
    rates = {"prompts": 0, "images": 0}
    for i in range(sims):
        ratings = simulate_ratings(4, 12, 3, effect=0.0, seed=i, components=PROMPT_ARM)
        for unit in rates:
            rates[unit] += rejects(ratings, unit)
    primary, image_level = rates["prompts"] / sims, rates["images"] / sims
    assert 0.02 <= primary <= 0.08, primary
    assert image_level > 0.1, image_level


def test_analyze_power_matches_a_brute_force_run_of_the_primary_test():
    components = VarianceComponents(rater_arm_sd=0.2, prompt_arm_sd=0.3)
    n_raters, n_prompts, n_seeds, diff = 3, 14, 2, 0.6
    power = simulated_power(components, diff, n_raters, n_prompts, n_seeds, sims=4000, rng=np.random.default_rng(0))
    brute_sims = 600
    brute = np.mean(
        [rejects(simulate_ratings(n_raters, n_prompts, n_seeds, effect=diff, seed=50_000 + i, components=components), "prompts") for i in range(brute_sims)]
    )
    assert 0.2 < power < 0.98  # a design where the comparison is informative
    assert power == pytest.approx(brute, abs=0.03)


def continuous_study(truth: dict[str, float], effect: float, n_raters: int, n_prompts: int, n_seeds: int, seed: int) -> pd.DataFrame:
    """Unrounded scores from the crossed model, written out term by term (independent of fangzhi's simulator)."""
    rng = np.random.default_rng(seed)
    rows = []
    rater = rng.normal(0, truth["rater"], n_raters)
    rater_arm = rng.normal(0, truth["rater_arm"], n_raters)
    prompt = rng.normal(0, truth["prompt"], n_prompts)
    prompt_arm = rng.normal(0, truth["prompt_arm"], n_prompts)
    seed_effect = rng.normal(0, truth["seed"], (n_prompts, n_seeds))
    image = rng.normal(0, truth["image"], (2, n_prompts, n_seeds))
    for a, arm in enumerate(("base", "lora")):
        for p in range(n_prompts):
            for s in range(n_seeds):
                for r in range(n_raters):
                    y = 3 + a * (effect + rater_arm[r] + prompt_arm[p]) + rater[r] + prompt[p] + seed_effect[p, s] + image[a, p, s]
                    rows.append((f"r{r}", arm, f"p{p}", s, y + rng.normal(0, truth["residual"])))
    return pd.DataFrame(rows, columns=["rater", "arm", "prompt", "seed", "y"])


def test_mixed_model_recovers_known_effect_and_variance_components():
    truth = {"rater": 0.5, "rater_arm": 0.3, "prompt": 0.5, "prompt_arm": 0.4, "seed": 0.3, "image": 0.3, "residual": 0.6}
    fits = [fit_crossed(continuous_study(truth, 0.5, 8, 30, 3, seed=s), "y", "base", "lora") for s in range(12)]
    assert all(fit.fitted and fit.converged and fit.simplified == [] for fit in fits)
    # Each dataset's CI should hold the truth most of the time, and the estimates should centre on it.
    assert np.mean([fit.ci95_low < 0.5 < fit.ci95_high for fit in fits]) >= 0.75
    assert np.mean([fit.arm_effect for fit in fits]) == pytest.approx(0.5, abs=0.1)
    for name, sd in truth.items():
        covered = np.mean([fit.sd_ci95[name][0] < sd < fit.sd_ci95[name][1] for fit in fits])
        assert covered >= 0.65, (name, covered)
        assert np.mean([fit.sd[name] for fit in fits]) == pytest.approx(sd, abs=0.08), name


def test_mixed_model_satterthwaite_df_is_exact_where_the_paired_t_test_is():
    # One rater, one seed: the arm effect is the mean of the per-prompt differences, and its variance is one
    # mean square, so Satterthwaite's df is exactly prompts − 1 and the test is the paired t-test.
    truth = {"rater": 0.0, "rater_arm": 0.0, "prompt": 0.6, "prompt_arm": 0.5, "seed": 0.0, "image": 0.0, "residual": 0.5}
    data = continuous_study(truth, 0.3, 1, 12, 1, seed=12)
    fit = fit_crossed(data, "y", "base", "lora")
    assert fit.terms == ["prompt", "prompt_arm"]
    wide = data.pivot_table(index="prompt", columns="arm", values="y")
    paired = stats.ttest_rel(wide["lora"], wide["base"])
    low, high = paired.confidence_interval(0.95)
    assert fit.df == pytest.approx(11, abs=1e-2)
    assert fit.p == pytest.approx(paired.pvalue, rel=1e-3)
    assert (fit.ci95_low, fit.ci95_high) == pytest.approx((low, high), abs=1e-4)


def test_mixed_model_holds_its_level_with_four_raters_who_disagree_about_the_lora():
    # The paper's four raters; each rater's and each prompt's own LoRA − base difference has SD 0.3, and
    # no true average effect. A z test on this estimate rejects ~9%, not 5% (bench/null_calibration.py).
    components = VarianceComponents(rater_arm_sd=0.3, prompt_arm_sd=0.3)
    sims = 200
    p = [fit_crossed(simulate_ratings(4, 12, 2, effect=0.0, seed=i, components=components), "style", "base", "lora").p for i in range(sims)]
    assert 0.015 <= np.mean(np.array(p) < 0.05) <= 0.085


def test_mixed_model_equals_statsmodels_on_a_nested_model_it_fits():
    # One rater, three seeds per prompt: prompt intercept, prompt × arm slope and seed-in-prompt,
    # which statsmodels' MixedLM fits with prompt as its group.
    truth = {"rater": 0.0, "rater_arm": 0.0, "prompt": 0.6, "prompt_arm": 0.5, "seed": 0.4, "image": 0.0, "residual": 0.5}
    data = continuous_study(truth, 0.4, 1, 12, 3, seed=3)
    fit = fit_crossed(data, "y", "base", "lora")
    assert fit.terms == ["prompt", "seed", "prompt_arm"]
    assert any("one rater" in text for text in fit.simplified)
    data["treated"] = (data["arm"] == "lora").astype(float)
    model = smf.mixedlm("y ~ treated", data, groups="prompt", re_formula="1", vc_formula={"slope": "0 + treated", "seed": "0 + C(seed)"})
    reference = model.fit(reml=True)
    vc = dict(zip(model.exog_vc.names, np.sqrt(reference.vcomp)))
    assert fit.arm_effect == pytest.approx(reference.fe_params["treated"], abs=1e-4)
    assert fit.se == pytest.approx(reference.bse_fe["treated"], rel=1e-3)
    # statsmodels tests with z; fangzhi with t on Satterthwaite's df, which is about 11 here: the effect is the mean
    # of 12 per-prompt differences (not exactly 11, as the slope on the treated arm gives the arms unequal variances).
    assert fit.arm_effect / fit.se == pytest.approx(reference.tvalues["treated"], rel=1e-3)
    assert fit.df == pytest.approx(11, abs=1)
    assert fit.p == pytest.approx(2 * stats.t.sf(abs(reference.tvalues["treated"]), fit.df), rel=1e-2)
    assert fit.sd["prompt"] == pytest.approx(float(np.sqrt(reference.cov_re.iloc[0, 0])), rel=1e-3)
    assert fit.sd["prompt_arm"] == pytest.approx(vc["slope"], rel=1e-3)
    assert fit.sd["seed"] == pytest.approx(vc["seed"], rel=1e-3)
    assert fit.sd["residual"] == pytest.approx(float(np.sqrt(reference.scale)), rel=1e-3)


def test_mixed_model_hand_checked_balanced_example():
    # Two raters × two prompts × one seed × two arms, complete and balanced, so the REML estimate of the
    # arm effect is the difference of the arm means whatever the variance components:
    # base (2 + 1 + 2.5 + 0.5) / 4 = 1.5, LoRA (3 + 4 + 2.5 + 4.5) / 4 = 3.5, effect 2.0.
    rows = [
        ("a", "base", "p1", 0, 2.0), ("a", "lora", "p1", 0, 3.0), ("a", "base", "p2", 0, 1.0), ("a", "lora", "p2", 0, 4.0),
        ("b", "base", "p1", 0, 2.5), ("b", "lora", "p1", 0, 2.5), ("b", "base", "p2", 0, 0.5), ("b", "lora", "p2", 0, 4.5),
    ]
    fit = fit_crossed(pd.DataFrame(rows, columns=["rater", "arm", "prompt", "seed", "y"]), "y", "base", "lora")
    assert fit.fitted and "seed" not in fit.terms
    assert fit.arm_effect == pytest.approx(2.0, abs=1e-6) and fit.intercept == pytest.approx(1.5, abs=1e-6)


def test_mixed_model_says_why_it_was_not_fitted_on_a_very_large_design():
    from fangzhi.evaluate.mixed import MAX_RANDOM_LEVELS, mixed_table

    ratings = simulate_ratings(2, 10, 100, seed=0)  # 2 × (10 prompts × 100 seeds) images: over the dense limit
    table = mixed_table(ratings, "base", ["base", "lora"], ["style"])
    assert not table["fitted"].iloc[0] and f"more than {MAX_RANDOM_LEVELS}" in table["note"].iloc[0]
