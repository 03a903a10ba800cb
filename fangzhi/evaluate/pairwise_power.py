"""Simulated pairwise votes and simulation-based power of the pairwise analysis' primary (prompt-level) test.

Vote model, per comparison of arm a with arm b: a's expected score (a win counts 1, a tie 1/2) is the
Bradley–Terry win probability p = 1 / (1 + 10^((elo_b − elo_a)/400)). A tie happens with probability
t = tie_share · 2·min(p, 1 − p) and the rest of the mass is split so that the expected score stays p:
P(a wins) = p − t/2, P(b wins) = 1 − p − t/2. So the ties-as-half Bradley–Terry fit of `pairwise.py`
recovers the simulated Elo differences, whatever the tie share. Optional heterogeneity: every prompt ×
seed unit shifts each arm's Elo by a normal draw (`unit_sd`), which makes the votes on a unit correlated,
as they are in real studies, and is why the analysis bootstraps units rather than votes.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Annotated, Mapping, Sequence

import numpy as np
import pandas as pd
from pydantic import Field, field_validator
from scipy.special import expit, logit

from fangzhi.config import StrictModel
from fangzhi.dimensions import DIMENSION_KEYS
from fangzhi.evaluate import report
from fangzhi.evaluate.pairwise import ELO_PER_LOGIT
from fangzhi.evaluate.pairwise_votes import CHOICES
from fangzhi.evaluate.stats import signed_rank_test
from fangzhi.files import output_folder


def outcome_probabilities(expected_score: np.ndarray, tie_share: float) -> np.ndarray:
    """(..., 3) probabilities of (a wins, tie, b wins) whose expected score for a is `expected_score`."""
    p = np.asarray(expected_score, dtype=float)
    tie = tie_share * 2 * np.minimum(p, 1 - p)
    return np.stack([p - tie / 2, tie, 1 - p - tie / 2], axis=-1)


def simulate_pairwise_votes(
    n_raters: int,
    prompts: int | Sequence[str],
    seeds: int | Sequence[int],
    arms: Sequence[str] = ("base", "lora"),
    elo: Mapping[str, float] | Mapping[str, Mapping[str, float]] | None = None,
    tie_share: float = 0.2,
    unit_sd: float = 0.0,
    repeat_share: float = 0.0,
    repeat_agreement: float = 0.8,
    seed: int = 0,
) -> pd.DataFrame:
    """Long-format votes (rater, prompt, seed, dimension, left, right, choice) from the model above.

    Every rater judges every arm pair of every prompt × seed unit on every dimension, the sides drawn at
    random. `elo` gives each arm's Elo (one mapping for all dimensions, or one per dimension); by default
    arm i gets 1000 + 50·i. `repeat_share` of the votes are asked again with the sides swapped (appended
    after all first votes); a repeat gives the same answer with probability `repeat_agreement`, otherwise
    a fresh draw from the model.
    """
    rng = np.random.default_rng(seed)
    prompt_names = [f"p{i:03d}" for i in range(prompts)] if isinstance(prompts, int) else list(prompts)
    seed_values = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    elo = elo if elo is not None else {arm: 1000.0 + 50.0 * i for i, arm in enumerate(arms)}
    per_dimension = {d: (elo[d] if d in elo else elo) for d in DIMENSION_KEYS}
    strength = np.array([[per_dimension[d][arm] for arm in arms] for d in DIMENSION_KEYS])  # (dims, arms)
    pairs = np.array(list(combinations(range(len(arms)), 2)))
    n_units = len(prompt_names) * len(seed_values)
    shape = (n_raters, n_units, len(pairs), len(DIMENSION_KEYS))
    grid = np.indices(shape).reshape(4, -1)
    rater, unit, pair, dim = grid
    unit_shift = rng.normal(0.0, unit_sd, (n_units, len(DIMENSION_KEYS), len(arms))) if unit_sd > 0 else np.zeros((n_units, len(DIMENSION_KEYS), len(arms)))
    a, b = pairs[pair, 0], pairs[pair, 1]
    gap = strength[dim, a] + unit_shift[unit, dim, a] - strength[dim, b] - unit_shift[unit, dim, b]
    probabilities = outcome_probabilities(expit(gap / ELO_PER_LOGIT), tie_share)
    outcome = _draw(rng, probabilities)  # 0: a wins, 1: tie, 2: b wins
    a_left = rng.random(outcome.size) < 0.5

    n_repeats = int(round(repeat_share * outcome.size))
    repeated = rng.choice(outcome.size, size=n_repeats, replace=False) if n_repeats else np.zeros(0, dtype=np.int64)
    fresh = _draw(rng, probabilities[repeated])
    repeat_outcome = np.where(rng.random(n_repeats) < repeat_agreement, outcome[repeated], fresh)
    rows = np.concatenate([np.arange(outcome.size), repeated])
    outcome = np.concatenate([outcome, repeat_outcome])
    a_left = np.concatenate([a_left, ~a_left[repeated]])

    winner_left = np.where(a_left, outcome == 0, outcome == 2)
    choice = np.where(outcome == 1, CHOICES.index("tie"), np.where(winner_left, CHOICES.index("left"), CHOICES.index("right")))
    arm_names = np.array(arms, dtype=object)
    unit_prompt, unit_seed = np.divmod(unit[rows], len(seed_values))
    return pd.DataFrame(
        {
            "rater": np.array([f"r{i:02d}" for i in range(n_raters)], dtype=object)[rater[rows]],
            "prompt": np.array(prompt_names, dtype=object)[unit_prompt],
            "seed": np.array(seed_values, dtype=np.int64)[unit_seed],
            "dimension": np.array(DIMENSION_KEYS, dtype=object)[dim[rows]],
            "left": arm_names[np.where(a_left, a[rows], b[rows])],
            "right": arm_names[np.where(a_left, b[rows], a[rows])],
            "choice": np.array(CHOICES, dtype=object)[choice],
        }
    )


def _draw(rng: np.random.Generator, probabilities: np.ndarray) -> np.ndarray:
    """One categorical draw per row of (..., 3) probabilities."""
    u = rng.random(probabilities.shape[:-1])
    cumulative = np.cumsum(probabilities, axis=-1)
    return (u[..., None] > cumulative[..., :-1]).sum(axis=-1)


def simulated_preference_power(
    win_rate: float,
    n_comparisons: int,
    n_raters: int,
    tie_share: float = 0.2,
    comparison_sd: float = 0.0,
    sims: int = 1000,
    alpha: float = 0.05,
    rng: np.random.Generator | None = None,
) -> float:
    """Share of `sims` simulated studies whose primary test has p < alpha: each comparison's net preference over
    its raters, (wins − losses)/raters, tested against 0 with the analysis' own Wilcoxon signed-rank test.

    Each study has `n_comparisons` comparisons of the arm pair (prompts, one seed each), each judged by
    `n_raters` raters; a comparison's expected score is `win_rate` shifted on the logit scale by a normal
    draw with SD `comparison_sd` (0: every comparison alike).
    """
    rng = rng or np.random.default_rng(0)
    shift = rng.normal(0.0, comparison_sd, (sims, n_comparisons)) if comparison_sd > 0 else np.zeros((sims, n_comparisons))
    probabilities = outcome_probabilities(expit(logit(win_rate) + shift), tie_share)
    votes = rng.multinomial(n_raters, probabilities)  # (sims, comparisons, 3): wins, ties, losses
    net = (votes[..., 0] - votes[..., 2]) / n_raters
    pvalues = np.array([signed_rank_test(row)[1] for row in net])
    return float(np.mean(np.nan_to_num(pvalues, nan=1.0) < alpha))


class PairwisePowerConfig(StrictModel):
    """Settings of `fangzhi analyze power --mode pairwise`."""

    win_rate: float = Field(
        0.6,
        gt=0,
        lt=1,
        description="expected score of one arm against the other (ties as half) to detect; not 0.5, which is no "
        "preference. The test is two-sided, so a win rate below 0.5 is the same effect as 1 minus it with the arms swapped",
    )
    power: float = Field(0.8, gt=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    raters: list[Annotated[int, Field(ge=1)]] = Field([1, 3, 5], min_length=1)  # raters who judge each comparison
    # Comparisons (prompt × seed units) of the arm pair; the signed-rank test of a single one always gives p = 1.
    comparisons: list[Annotated[int, Field(ge=2)]] = Field([10, 20, 40, 80, 160, 320, 640], min_length=1)
    tie_share: float = Field(0.2, ge=0, lt=1)
    comparison_sd: float = Field(0.0, ge=0)  # SD of the comparison-level logit shift (heterogeneity between units)
    sims: int = Field(1000, ge=50)
    seed: int = 0
    out: Path | None = None

    @field_validator("win_rate")
    @classmethod
    def _an_effect(cls, value: float) -> float:
        if value == 0.5:
            raise ValueError("0.5 is no preference, which no number of comparisons can detect; give the win rate to detect, e.g. 0.6")
        return value


def pairwise_power_grid(config: PairwisePowerConfig) -> pd.DataFrame:
    """Power, and the false-positive rate of the same design at win rate 0.5, for every (raters, comparisons) cell."""
    rng = np.random.default_rng(config.seed)
    rows = []
    for raters in config.raters:
        for comparisons in config.comparisons:
            args = (comparisons, raters, config.tie_share, config.comparison_sd, config.sims, config.alpha, rng)
            rows.append(
                {
                    "n_raters": raters,
                    "n_comparisons": comparisons,
                    "n_votes": raters * comparisons,
                    "power": simulated_preference_power(config.win_rate, *args),
                    # The same design without any preference: the test's own level, which should stay near alpha.
                    "false_positive_rate": simulated_preference_power(0.5, *args),
                }
            )
    return pd.DataFrame(rows)


def run_pairwise_power(config: PairwisePowerConfig) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Power grid, the fewest comparisons reaching the target power per rater count, and a text summary.

    Writes pairwise_power.csv/.json under `config.out` when it is set.
    """
    grid = pairwise_power_grid(config)
    reached = grid.loc[grid["power"] >= config.power].sort_values(["n_raters", "n_comparisons"])
    smallest = reached.groupby("n_raters", sort=False).head(1).reset_index(drop=True)
    lines = [
        f"Power of the pairwise prompt-level test to detect a win rate of {config.win_rate} (ties as half; tie share {config.tie_share}, "
        f"alpha {config.alpha}, {config.sims} simulations; comparison SD {config.comparison_sd}):",
        grid.pivot_table(index="n_raters", columns="n_comparisons", values="power", sort=False).to_string(float_format=lambda v: f"{v:.2f}"),
    ]
    for raters in config.raters:
        hit = smallest.loc[smallest["n_raters"] == raters]
        if hit.empty:
            lines.append(f"{raters} rater(s): no number of comparisons in the grid reaches power {config.power}; add larger --comparisons")
        else:
            row = hit.iloc[0]
            lines.append(f"{raters} rater(s): {int(row.n_comparisons)} comparisons ({int(row.n_votes)} votes) reach power {row.power:.2f} ≥ {config.power}")
    text = "\n".join(lines)
    if config.out is not None:
        out = output_folder(config.out)
        grid.to_csv(out / "pairwise_power.csv", index=False)
        report.write_json(out / "pairwise_power.json", {"config": config.model_dump(mode="json"), "grid": grid, "smallest": smallest, "summary": text})
    return grid, smallest, text
