"""Do the analyses' tests hold their 5% level when there is no effect? Simulated nulls, counted rejections.

- Scores: studies with no true difference between the arms from `fangzhi.evaluate.power.simulate_ratings` (the
  project's rating model, 1–5 integer scores; raters and prompts disagree about the LoRA, SD 0.3 each), each
  fitted with the crossed mixed model (`fit_crossed`): p < 0.05 with Satterthwaite's t (what fangzhi reports) and
  with a Wald z test on the same estimate and SE (what it reported before). With four raters, the typical study,
  the rater × arm slope leaves few degrees of freedom, which a z test ignores.
- Side-by-side votes: studies with equal arms from `simulate_pairwise_votes`, each image favouring one arm or the
  other (SD 200 Elo per prompt × seed unit), analysed with `analyze_pairwise`: the prompt-level test (primary) and
  the sign test on all untied votes (secondary), which counts the votes on one image as independent.

Writes results/bench/null_calibration.json.

    python bench/null_calibration.py [--sims 400]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from fangzhi.evaluate.mixed import fit_crossed
from fangzhi.evaluate.pairwise import analyze_pairwise
from fangzhi.evaluate.pairwise_power import simulate_pairwise_votes
from fangzhi.evaluate.power import VarianceComponents, simulate_ratings

RESULTS = Path(__file__).resolve().parents[1] / "results" / "bench"
COMPONENTS = VarianceComponents(rater_arm_sd=0.3, prompt_arm_sd=0.3)
# (raters, prompts, seeds): the paper's four raters, and a larger panel.
DESIGNS = [(4, 20, 2), (8, 30, 3)]
PAIRWISE_DESIGNS = [(5, 12, 2), (3, 20, 1)]
PAIRWISE_UNIT_SD = 200.0  # Elo


def rate(ps: list[float], sims: int) -> dict:
    rejected = float(np.mean(np.nan_to_num(np.array(ps), nan=1.0) < 0.05))
    return {"rejected_at_0_05": round(rejected, 4), "monte_carlo_se": round(float(np.sqrt(rejected * (1 - rejected) / sims)), 4)}


def null_rejections(n_raters: int, n_prompts: int, n_seeds: int, sims: int) -> dict:
    p_t, p_z, dfs = [], [], []
    for i in range(sims):
        fit = fit_crossed(simulate_ratings(n_raters, n_prompts, n_seeds, effect=0.0, seed=i, components=COMPONENTS), "style", "base", "lora")
        p_t.append(fit.p)
        p_z.append(2 * stats.norm.sf(abs(fit.arm_effect / fit.se)))
        dfs.append(fit.df)

    return {
        "raters": n_raters, "prompts": n_prompts, "seeds": n_seeds, "sims": sims,
        "satterthwaite_t": rate(p_t, sims), "wald_z": rate(p_z, sims),
        "median_df": round(float(np.median(dfs)), 1),
    }


def pairwise_null_rejections(n_raters: int, n_prompts: int, n_seeds: int, sims: int) -> dict:
    p_prompt, p_votes = [], []
    for i in range(sims):
        votes = simulate_pairwise_votes(n_raters, n_prompts, n_seeds, elo={"base": 1000.0, "lora": 1000.0}, unit_sd=PAIRWISE_UNIT_SD, seed=i)
        style = analyze_pairwise(votes, None, n_boot=100).pairs.set_index("dimension").loc["style"]
        p_prompt.append(style["prompt_test_p"])
        p_votes.append(style["sign_test_p"])
    return {
        "raters": n_raters, "prompts": n_prompts, "seeds": n_seeds, "sims": sims, "unit_sd_elo": PAIRWISE_UNIT_SD,
        "prompt_level_test": rate(p_prompt, sims), "vote_level_sign_test": rate(p_votes, sims),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sims", type=int, default=400)
    parser.add_argument("--out", default=str(RESULTS / "null_calibration.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    report = {
        "what": "share of null studies (no true arm effect) whose arm-effect test gives p < 0.05; nominal 0.05",
        "components": COMPONENTS.model_dump(),
        "mixed_model": [null_rejections(*design, args.sims) for design in DESIGNS],
        "pairwise": [pairwise_null_rejections(*design, args.sims) for design in PAIRWISE_DESIGNS],
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
