"""Simulated ratings and simulation-based power for planning the next rating study.

Rating model, per dimension, for rater r scoring image (arm a, prompt p, seed s), with T = 1 for
every arm after the baseline and 0 for the baseline:

    latent = base_mean + effect·T
             + rater_r + rater_arm_r·T          rater leniency, and the rater's own taste for the LoRA
             + prompt_p + prompt_arm_p·T        prompt difficulty, and the prompt's own LoRA effect
             + seed_(p,s)                       the seed's composition, shared by both arms of a pair
             + image_(a,p,s)                    what all raters see in this one image
             + noise                            per rating
    score  = clip(round(latent), 1, 5)

with independent normal terms whose SDs are the `VarianceComponents`. The same model is the crossed
mixed model of `fangzhi.evaluate.mixed`, which estimates these SDs from a pilot study.

Power is the share of simulated studies in which the analysis' primary test rejects at `alpha`:
`stats.signed_rank_test` on prompt-level pairs (seeds and raters averaged within prompt and arm),
exact where the analysis is exact.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from pydantic import Field

from fangzhi.config import StrictModel
from fangzhi.dimensions import DIMENSION_KEYS, SCORE_MAX, SCORE_MIN
from fangzhi.errors import FangzhiError
from fangzhi.evaluate.stats import signed_rank_test


class VarianceComponents(StrictModel):
    """SDs of the rating model's random terms (score points on the 1–5 scale) and the baseline mean."""

    base_mean: float = Field(3.2, ge=SCORE_MIN, le=SCORE_MAX)
    rater_sd: float = Field(0.4, ge=0)
    prompt_sd: float = Field(0.4, ge=0)
    seed_sd: float = Field(0.3, ge=0)
    image_sd: float = Field(0.3, ge=0)
    rater_arm_sd: float = Field(0.1, ge=0)
    prompt_arm_sd: float = Field(0.2, ge=0)
    noise_sd: float = Field(0.7, ge=0)


COMPONENT_NAMES: tuple[str, ...] = tuple(name for name in VarianceComponents.model_fields if name != "base_mean")


def _latent_terms(
    rng: np.random.Generator, c: VarianceComponents, effect: float, lead: tuple[int, ...], n_raters: int, n_arms: int, n_prompts: int, n_seeds: int
) -> np.ndarray:
    """Latent scores of shape lead + (raters, arms, prompts, seeds); `lead` stacks independent studies."""
    treated = (np.arange(n_arms) > 0).astype(float)[:, None, None]
    return (
        c.base_mean
        + effect * treated
        + rng.normal(0, c.rater_sd, (*lead, n_raters, 1, 1, 1))
        + rng.normal(0, c.rater_arm_sd, (*lead, n_raters, n_arms, 1, 1)) * treated
        + rng.normal(0, c.prompt_sd, (*lead, 1, 1, n_prompts, 1))
        + rng.normal(0, c.prompt_arm_sd, (*lead, 1, n_arms, n_prompts, 1)) * treated
        + rng.normal(0, c.seed_sd, (*lead, 1, 1, n_prompts, n_seeds))
        + rng.normal(0, c.image_sd, (*lead, 1, n_arms, n_prompts, n_seeds))
        + rng.normal(0, c.noise_sd, (*lead, n_raters, n_arms, n_prompts, n_seeds))
    )


def _to_scores(latent: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(latent), SCORE_MIN, SCORE_MAX)


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
    for dim in DIMENSION_KEYS:
        c = components[dim] if isinstance(components, Mapping) else components
        shift = effect[dim] if isinstance(effect, Mapping) else effect
        latent = _latent_terms(rng, c, shift, (), n_raters, n_arms, n_prompts, n_seeds)
        frame[dim] = _to_scores(latent).astype(np.int64).reshape(-1)
    return frame


def smallest_detectable_prompts(alpha: float) -> int:
    """Fewest prompts with which the two-sided exact signed-rank test can reach p < alpha (smallest p is 2 / 2^n)."""
    n = 1
    while 2 * 0.5**n >= alpha:
        n += 1
    return n


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
    """Share of `sims` simulated two-arm studies whose primary (prompt-level signed-rank) test has p < alpha.

    All studies are drawn at once; each is then tested with the analysis' own test function.
    """
    rng = rng or np.random.default_rng(0)
    latent = _latent_terms(rng, components, diff, (sims,), n_raters, 2, n_prompts, seeds_per_prompt)
    # Raters averaged per image, then images averaged per prompt: the analysis' prompt-level scores.
    prompt_means = _to_scores(latent).mean(axis=1).mean(axis=-1)
    differences = prompt_means[:, 1] - prompt_means[:, 0]
    pvalues = np.array([signed_rank_test(row)[1] for row in differences])
    return float(np.mean(pvalues < alpha))  # NaN (every prompt tied) never rejects


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
    return {score: c.model_dump() for score, c in components.items()}


def estimate_components(ratings: pd.DataFrame, baseline_arm: str) -> dict[str, VarianceComponents]:
    """Per dimension, the model's SDs as the crossed mixed model estimates them from observed (main) ratings.

    A term the data cannot separate (say one seed per prompt) is estimated at 0 and its variance
    stays in the term that absorbs it (prompt, or the residual).
    """
    from fangzhi.evaluate.mixed import fit_crossed

    arms = set(ratings["arm"])
    other_arms = sorted(a for a in arms if a != baseline_arm)
    if baseline_arm not in arms or not other_arms:
        raise FangzhiError(f"power: the ratings need the baseline arm '{baseline_arm}' and one other arm; arms found: {', '.join(sorted(arms))}")
    estimates = {}
    for dim in DIMENSION_KEYS:
        fit = fit_crossed(ratings, dim, baseline_arm, other_arms[0])
        if not fit.fitted:
            raise FangzhiError(f"power: cannot estimate variance components for {dim}: {fit.note}")
        sd = {name: fit.sd.get(name, 0.0) for name in ("rater", "prompt", "seed", "image", "rater_arm", "prompt_arm")}
        base_mean = float(np.clip(ratings.loc[ratings["arm"] == baseline_arm, dim].mean(), SCORE_MIN, SCORE_MAX))
        estimates[dim] = VarianceComponents(
            base_mean=base_mean, noise_sd=fit.sd["residual"], **{f"{name}_sd": value for name, value in sd.items()}
        )
    return estimates
