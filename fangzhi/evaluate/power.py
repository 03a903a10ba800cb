"""Simulated ratings and simulation-based power for planning the next rating study.

Rating model, per dimension, for rater r scoring image (arm a, prompt p, seed s):

    latent = base_mean + effect·[a is not the baseline] + rater_r + pair_(p,s) + image_(a,p,s) + noise
    score  = clip(round(latent), 1, 5)

with independent normal terms: rater leniency (rater_sd), a prompt × seed effect shared by both arms
of a pair (pair_sd, which is what makes the paired design efficient), an image-specific effect shared
by all raters of that image (image_sd), and per-rating noise (noise_sd).

Power is the share of simulated studies in which the primary test (Wilcoxon signed-rank on
image-level pairs, averaged over raters) rejects at `alpha`. The simulation uses the test's
tie-corrected normal approximation throughout (what the analysis itself uses beyond 13 pairs), so that
thousands of studies are tested in one vectorized call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from fangzhi.dimensions import DIMENSION_KEYS, SCORE_MAX, SCORE_MIN
from fangzhi.errors import FangzhiError


@dataclass(frozen=True)
class VarianceComponents:
    base_mean: float = 3.2
    rater_sd: float = 0.4
    pair_sd: float = 0.5
    image_sd: float = 0.3
    noise_sd: float = 0.7


def simulate_ratings(
    n_raters: int,
    prompts: int | Sequence[str],
    seeds: int | Sequence[int],
    arms: Sequence[str] = ("base", "lora"),
    effect: float | Mapping[str, float] = 0.3,
    seed: int = 0,
    components: VarianceComponents | Mapping[str, VarianceComponents] = VarianceComponents(),
) -> pd.DataFrame:
    """Wide-format ratings (rater, arm, prompt, seed, style, match, detail, beauty) from the model above.

    `prompts`/`seeds` are a count or explicit labels; `effect` (one number or one per dimension) is
    added to every arm after the first, which is the baseline. Every rater scores every image.
    """
    prompt_names = [f"p{i:03d}" for i in range(prompts)] if isinstance(prompts, int) else list(prompts)
    seed_values = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    rng = np.random.default_rng(seed)
    n_arms, n_prompts, n_seeds = len(arms), len(prompt_names), len(seed_values)
    shape = (n_raters, n_arms, n_prompts, n_seeds)
    grid = np.indices(shape).reshape(4, -1)
    frame = pd.DataFrame(
        {
            "rater": np.array([f"r{i:02d}" for i in range(n_raters)])[grid[0]],
            "arm": np.array(arms, dtype=object)[grid[1]],
            "prompt": np.array(prompt_names, dtype=object)[grid[2]],
            "seed": np.array(seed_values, dtype=np.int64)[grid[3]],
        }
    )
    is_treated = (np.arange(n_arms) > 0)[:, None, None]
    for dim in DIMENSION_KEYS:
        c = components[dim] if isinstance(components, Mapping) else components
        shift = effect[dim] if isinstance(effect, Mapping) else effect
        latent = (
            c.base_mean
            + shift * is_treated
            + rng.normal(0, c.rater_sd, (n_raters, 1, 1, 1))
            + rng.normal(0, c.pair_sd, (1, 1, n_prompts, n_seeds))
            + rng.normal(0, c.image_sd, (1, n_arms, n_prompts, n_seeds))
            + rng.normal(0, c.noise_sd, shape)
        )
        frame[dim] = np.clip(np.rint(latent), SCORE_MIN, SCORE_MAX).astype(np.int64).reshape(-1)
    return frame


def estimate_components(ratings: pd.DataFrame, baseline_arm: str) -> dict[str, VarianceComponents]:
    """Method-of-moments variance components per dimension from observed ratings.

    Rater, image and noise variances come from the two-way ANOVA mean squares of each arm's
    images × raters matrix (images every rater scored), averaged over arms; the pair variance is the
    covariance of the two arms' image means over (prompt, seed) pairs. Estimates on the rounded 1–5
    scale, so the simulation is an approximation of the study, not a replay.
    """
    from fangzhi.evaluate.reliability import two_way_mean_squares

    other_arms = [a for a in ratings["arm"].unique() if a != baseline_arm]
    if baseline_arm not in set(ratings["arm"]) or not other_arms:
        raise FangzhiError(f"power: the ratings need the baseline arm '{baseline_arm}' and one other arm")
    other_arm = sorted(other_arms)[0]
    estimates = {}
    for dim in DIMENSION_KEYS:
        rater_var, image_var, noise_var, arm_means = [], [], [], {}
        for arm in (baseline_arm, other_arm):
            part = ratings.loc[ratings["arm"] == arm]
            matrix = part.pivot_table(index=["prompt", "seed"], columns="rater", values=dim, aggfunc="mean", observed=True).dropna()
            if matrix.shape[0] < 2 or matrix.shape[1] < 2:
                raise FangzhiError(f"power: arm '{arm}' needs at least 2 raters who all scored at least 2 images to estimate variance components")
            ms = two_way_mean_squares(matrix.to_numpy())
            rater_var.append(max((ms["ms_cols"] - ms["ms_error"]) / ms["n"], 0.0))
            image_var.append(max((ms["ms_rows"] - ms["ms_error"]) / ms["k"], 0.0))
            noise_var.append(ms["ms_error"])
            arm_means[arm] = matrix.mean(axis=1)
        joined = pd.concat(arm_means, axis=1, join="inner")
        pair_var = float(np.clip(np.cov(joined.iloc[:, 0], joined.iloc[:, 1])[0, 1], 0.0, np.mean(image_var))) if len(joined) > 2 else 0.0
        estimates[dim] = VarianceComponents(
            base_mean=float(ratings.loc[ratings["arm"] == baseline_arm, dim].mean()),
            rater_sd=float(np.sqrt(np.mean(rater_var))),
            pair_sd=float(np.sqrt(pair_var)),
            image_sd=float(np.sqrt(np.mean(image_var) - pair_var)),
            noise_sd=float(np.sqrt(np.mean(noise_var))),
        )
    return estimates


def simulated_power(
    components: VarianceComponents,
    diff: float,
    n_raters: int,
    n_prompts: int,
    seeds_per_prompt: int = 1,
    sims: int = 500,
    alpha: float = 0.05,
    rng: np.random.Generator | None = None,
) -> float:
    """Share of `sims` simulated two-arm studies whose image-level Wilcoxon test has p < alpha.

    All studies are drawn at once as a (sims, raters, images, arms) array and tested along one axis.
    """
    rng = rng or np.random.default_rng(0)
    n_images = n_prompts * seeds_per_prompt
    c = components
    latent = (
        c.base_mean
        + diff * np.array([0.0, 1.0])
        + rng.normal(0, c.rater_sd, (sims, n_raters, 1, 1))
        + rng.normal(0, c.pair_sd, (sims, 1, n_images, 1))
        + rng.normal(0, c.image_sd, (sims, 1, n_images, 2))
        + rng.normal(0, c.noise_sd, (sims, n_raters, n_images, 2))
    )
    image_means = np.clip(np.rint(latent), SCORE_MIN, SCORE_MAX).mean(axis=1)
    differences = image_means[..., 1] - image_means[..., 0]
    testable = np.count_nonzero(differences, axis=1) > 0
    pvalues = np.ones(sims)
    if testable.any():
        pvalues[testable] = sps.wilcoxon(differences[testable], axis=1, zero_method="wilcox", method="asymptotic").pvalue
    return float(np.mean(pvalues < alpha))


def power_grid(
    components: Mapping[str, VarianceComponents],
    diff: float,
    raters: Sequence[int],
    prompts: Sequence[int],
    seeds_per_prompt: int = 1,
    sims: int = 500,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Power for every (score, raters, prompts) cell of the grid."""
    rng = np.random.default_rng(seed)
    rows = []
    for score, c in components.items():
        for k in raters:
            for p in prompts:
                power = simulated_power(c, diff, k, p, seeds_per_prompt, sims, alpha, rng)
                rows.append({"score": score, "n_raters": k, "n_prompts": p, "n_ratings": 2 * k * p * seeds_per_prompt, "power": power})
    return pd.DataFrame(rows)


def smallest_designs(grid: pd.DataFrame, target_power: float) -> pd.DataFrame:
    """Per score, the design with the fewest ratings that reaches the target power (none if no cell does)."""
    reached = grid.loc[grid["power"] >= target_power].sort_values(["n_ratings", "n_raters"])
    return reached.groupby("score", sort=False).head(1).reset_index(drop=True)


def components_as_dict(components: Mapping[str, VarianceComponents]) -> dict[str, dict[str, float]]:
    return {score: asdict(c) for score, c in components.items()}
