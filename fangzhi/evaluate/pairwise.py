"""Side-by-side preference analysis: win rates, sign tests, Bradley–Terry strengths (Elo scale), agreement.

Input is the long pairwise votes format (`pairwise_votes.py`). Per dimension:

- per arm pair: wins / ties / losses, the win rate with a tie counted as half a win, (wins + ties/2)/n,
  with a percentile bootstrap 95% CI over prompt × seed units (the Elo CIs' resamples); the primary test at the unit that is independent, the prompt: each prompt's net
  preference, (wins − losses)/votes over all its seeds and raters, tested against 0 across prompts with the
  Wilcoxon signed-rank test of the score analysis (`stats.signed_rank_test`); and, secondary, the sign test
  (exact binomial, p = 1/2) on the untied votes, which treats votes as independent: votes on one image
  are not, and with 5 raters and images that differ in which arm they favour it rejected a true null in
  18% of simulated studies, where the prompt-level test rejected 2.75% (bench/null_calibration.py). Both Holm-corrected across the four
  dimensions for each arm pair;
- Bradley–Terry strengths by maximum likelihood, a tie counted as half a win for each side, on the Elo
  scale (400·log10 of the odds) with the reference arm fixed at 1000, and percentile bootstrap CIs that
  resample prompt × seed units (all the votes of a resampled unit come with it), not single votes;
- agreement: Krippendorff's alpha (nominal) over raters on each comparison's outcome, and the share of
  swapped-side repeats a rater answered consistently (the same arm preferred, or a tie both times).

Votes are aggregated once into per-unit score matrices; the bootstrap draws unit counts and turns them
into resampled win matrices with one sparse product, and every Bradley–Terry fit (data and resamples,
all dimensions) is one batched Newton solve, so a million votes take a few seconds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import sparse
from scipy import stats as sps
from scipy.special import expit, log_expit

from fangzhi.dimensions import DIMENSION_KEYS, DIMENSIONS
from fangzhi.errors import FangzhiError
from fangzhi.files import output_folder
from fangzhi.evaluate import report
from fangzhi.evaluate.pairwise_votes import CHOICES, group_codes, read_pairwise_file, validate_pairwise_votes
from fangzhi.evaluate.ratings import BadRows
from fangzhi.evaluate.reliability import krippendorff_alpha
from fangzhi.evaluate.stats import holm, signed_rank_test
from fangzhi.evaluate.table import to_latex, to_markdown

PAIRWISE_FILES = ("pairwise_*",)  # every file the preference analysis writes (files.output_folder)

DEFAULT_REFERENCE_ARM = "base"
CI_LEVEL = 0.95
ELO_ANCHOR = 1000.0
ELO_PER_LOGIT = 400.0 / np.log(10.0)  # Elo points per unit of natural log-odds
# Outcome codes relative to the pair's arm order (lower arm code first), so the side shown does not matter.
LOW_WINS, TIE, HIGH_WINS = 0, 1, 2
BOOTSTRAP_CELLS_PER_CHUNK = 4_000_000  # resamples × units drawn at a time (bounds memory for big studies)
DENSE_CELLS = 20_000_000  # units × matrix cells up to which the per-unit score matrix is used dense
DIMENSION_NAMES = {d.key: d.name_en for d in DIMENSIONS}
TABLE_COLUMNS = ["dimension", "arm", "elo", "elo_ci_low", "elo_ci_high", "win_rate_vs_reference", "n_comparisons"]
ELO_NOTE = (
    "Bradley–Terry strengths by maximum likelihood (a tie counts as half a win for each side), on the Elo scale "
    "(400·log10 of the odds of winning) with the reference arm fixed at 1000; 95% CI: percentile bootstrap over "
    "prompt × seed units."
)
METHOD_NOTE = ELO_NOTE + (
    " Win rate: (wins + ties/2)/n with a percentile bootstrap 95% CI over prompt × seed units (the same resamples as "
    "the Elo CIs; a CI over votes would count the votes on one image as independent). Primary test (unit: prompts): each prompt's net preference "
    "(wins − losses)/votes over its seeds and raters, two-sided Wilcoxon signed-rank test against 0 across prompts. "
    "Secondary (unit: votes, which are not independent): exact two-sided binomial sign test (p = 1/2) on the untied votes. "
    "Both Holm-corrected across the four dimensions for each arm pair. Agreement: "
    "Krippendorff's alpha (nominal) over raters on each comparison's outcome (which arm won, or a tie); consistency: "
    "the share of swapped-side repeats in which the rater preferred the same arm (or called a tie both times)."
)


@dataclass
class EncodedVotes:
    """Votes as integer codes; arms are numbered with the reference arm first."""

    arms: list[str]
    dimension: np.ndarray  # index into DIMENSION_KEYS
    low: np.ndarray  # the pair's arm with the lower code
    high: np.ndarray
    outcome: np.ndarray  # LOW_WINS / TIE / HIGH_WINS
    choice: np.ndarray  # index into CHOICES
    unit: np.ndarray  # prompt × seed unit code
    prompt: np.ndarray  # prompt code
    rater: np.ndarray
    rater_names: list[str]
    is_main: np.ndarray  # counts in the analysis
    repeat_of: np.ndarray  # for a swapped-side repeat, the row of the vote it repeats; else -1


def encode_votes(votes: pd.DataFrame, reference_arm: str) -> EncodedVotes:
    """Integer-code validated votes; find the votes that count and the swapped-side repeats.

    With a `kind` column, `main` votes count, `retest` votes are repeats of the main vote on the same
    comparison, and `attention` votes are left out. Without it, the first vote of a rater on a comparison
    (prompt, seed, dimension, arm pair) counts and a later vote with the sides swapped is its repeat.
    """
    left_code = votes["left"].cat.codes.to_numpy().astype(np.int64)
    right_code = votes["right"].cat.codes.to_numpy().astype(np.int64)
    unit = group_codes(votes["prompt"].cat.codes.to_numpy(), votes["seed"].to_numpy())
    rater = votes["rater"].cat.codes.to_numpy().astype(np.int64)
    dimension = votes["dimension"].cat.codes.to_numpy().astype(np.int64)

    comparison = group_codes(rater, unit, dimension, np.minimum(left_code, right_code), np.maximum(left_code, right_code))
    first_row = np.unique(comparison, return_index=True)[1]  # codes are dense, so this maps code -> its first row
    n = len(votes)
    repeat_of = np.full(n, -1, dtype=np.int64)
    if "kind" in votes.columns:
        kind = votes["kind"].to_numpy(dtype=object)
        is_main = kind == "main"
        main_row = np.full(len(first_row), -1, dtype=np.int64)
        main_row[comparison[is_main]] = np.flatnonzero(is_main)
        retest = np.flatnonzero(kind == "retest")
        repeat_of[retest] = main_row[comparison[retest]]
    else:
        is_main = np.zeros(n, dtype=bool)
        is_main[first_row] = True
        repeat_of[~is_main] = first_row[comparison[~is_main]]

    # The arms are those of the counted votes (an arm seen only on attention items is no arm of the study),
    # numbered with the reference arm first.
    categories = np.array(votes["left"].cat.categories, dtype=object)
    used = np.unique(np.concatenate([left_code[is_main], right_code[is_main]]))
    if reference_arm not in categories[used]:
        raise FangzhiError(
            f"reference arm {reference_arm!r} is not among the arms in the votes ({', '.join(categories[used])}); name one with --reference-arm"
        )
    reference_code = int(np.flatnonzero(categories == reference_arm)[0])
    order = [reference_code] + [int(a) for a in used if a != reference_code]
    renumber = np.full(len(categories), -1, dtype=np.int64)  # -1: an arm of uncounted votes only
    renumber[order] = np.arange(len(order))
    left, right = renumber[left_code], renumber[right_code]
    choice = votes["choice"].cat.codes.to_numpy().astype(np.int64)
    left_is_low = left < right
    winner_is_low = np.where(choice == CHOICES.index("left"), left_is_low, ~left_is_low)
    outcome = np.where(choice == CHOICES.index("tie"), TIE, np.where(winner_is_low, LOW_WINS, HIGH_WINS))
    low, high = np.minimum(left, right), np.maximum(left, right)
    return EncodedVotes(
        arms=list(categories[order]),
        dimension=dimension,
        low=low,
        high=high,
        outcome=outcome,
        choice=choice,
        unit=unit,
        prompt=votes["prompt"].cat.codes.to_numpy().astype(np.int64),
        rater=rater,
        rater_names=list(votes["rater"].cat.categories),
        is_main=is_main,
        repeat_of=repeat_of,
    )


def score_matrices(encoded: EncodedVotes) -> sparse.csr_matrix:
    """Per unit, the flattened (dimension, arm i, arm j) matrix of i's score against j (win 1, tie 1/2 each side).

    Shape (units, dimensions·k·k); only main votes count, and only units with a main vote are rows.
    """
    k = len(encoded.arms)
    main = encoded.is_main
    dim, low, high, outcome = (a[main] for a in (encoded.dimension, encoded.low, encoded.high, encoded.outcome))
    used_units, unit = np.unique(encoded.unit[main], return_inverse=True)
    low_score = np.select([outcome == LOW_WINS, outcome == TIE], [1.0, 0.5], 0.0)
    columns = np.concatenate([(dim * k + low) * k + high, (dim * k + high) * k + low])
    rows = np.concatenate([unit, unit])
    data = np.concatenate([low_score, 1.0 - low_score])
    keep = data > 0
    return sparse.csr_matrix((data[keep], (rows[keep], columns[keep])), shape=(len(used_units), len(DIMENSION_KEYS) * k * k))


def mle_exists(wins: np.ndarray) -> np.ndarray:
    """Whether the Bradley–Terry MLE exists for each (..., k, k) score matrix.

    It does exactly when the graph "i scored against j" is strongly connected (Hunter 2004, assumption 1):
    otherwise some group of arms never loses to the rest and its strength runs off to infinity.
    """
    k = wins.shape[-1]
    reach = (wins > 0) | np.eye(k, dtype=bool)
    for _ in range(max(1, int(np.ceil(np.log2(k))))):
        reach = np.matmul(reach.astype(np.float64), reach.astype(np.float64)) > 0
    return reach.all(axis=(-2, -1))


def bradley_terry(wins: np.ndarray, reference: int = 0, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Log-strengths θ (..., k) maximising Σ_ij W_ij log σ(θ_i − θ_j), with θ[reference] = 0.

    `wins[..., i, j]` is arm i's score against arm j (wins plus half the ties). Newton's method with step
    halving on every matrix at once; NaN where the MLE does not exist (`mle_exists`).
    """
    batch_shape, k = wins.shape[:-2], wins.shape[-1]
    scores = wins.reshape(-1, k, k).astype(np.float64)
    totals = scores + scores.transpose(0, 2, 1)
    theta = np.zeros(scores.shape[:2])
    exists = mle_exists(scores)
    free = np.array([i for i in range(k) if i != reference])
    active = np.flatnonzero(exists)
    for _ in range(max_iter):
        if active.size == 0:
            break
        w, n, th = scores[active], totals[active], theta[active]
        p = expit(th[:, :, None] - th[:, None, :])
        gradient = (w - n * p).sum(axis=2)
        weight = n * p * (1.0 - p)
        information = -weight  # the negative Hessian: a weighted graph Laplacian
        information[:, np.arange(k), np.arange(k)] = weight.sum(axis=2)
        step = np.zeros_like(th)
        step[:, free] = np.linalg.solve(information[:, free][:, :, free], gradient[:, free][..., None])[..., 0]
        before = _log_likelihood(w, th)
        scale = np.ones(len(active))
        for _ in range(30):  # the likelihood is concave, so halving finds an ascent step
            worse = _log_likelihood(w, th + scale[:, None] * step) < before - 1e-12 * np.abs(before)
            if not worse.any():
                break
            scale[worse] /= 2
        theta[active] = th + scale[:, None] * step
        active = active[np.abs(scale[:, None] * step).max(axis=1) > tol]
    theta[~exists] = np.nan
    return theta.reshape(*batch_shape, k)


def _log_likelihood(scores: np.ndarray, theta: np.ndarray) -> np.ndarray:
    log_p = log_expit(theta[:, :, None] - theta[:, None, :])
    return np.where(scores > 0, scores * log_p, 0.0).sum(axis=(1, 2))


def to_elo(theta: np.ndarray) -> np.ndarray:
    return ELO_ANCHOR + ELO_PER_LOGIT * theta


def sign_test_p(wins: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Two-sided exact sign test (binomial, p = 1/2) on untied votes; NaN without any untied vote.

    The null distribution is symmetric, so the two-sided p-value is twice the smaller tail (capped at 1),
    which is what `scipy.stats.binomtest` gives for p = 1/2.
    """
    wins, losses = np.asarray(wins, dtype=np.int64), np.asarray(losses, dtype=np.int64)
    n = wins + losses
    p = np.minimum(1.0, 2.0 * sps.binom.cdf(np.minimum(wins, losses), n, 0.5))
    return np.where(n > 0, p, np.nan)


def bootstrap_score_matrices(unit_scores: sparse.csr_matrix, k: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Score matrices (n_boot, dimensions, k, k) of resampled studies, resampling units with replacement.

    Each resample's unit counts come from `rng.integers` + `bincount` (an ordinary bootstrap), in chunks of
    resamples so that resamples × units stays bounded; one matrix product gives all their win matrices.
    """
    n_units = unit_scores.shape[0]
    # A dense product (BLAS) is many times faster than a sparse one while the matrix is small.
    matrix = unit_scores.toarray() if n_units * unit_scores.shape[1] <= DENSE_CELLS else unit_scores
    chunk = max(1, min(n_boot, BOOTSTRAP_CELLS_PER_CHUNK // max(n_units, 1)))
    matrices = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        draws = rng.integers(0, n_units, size=(size, n_units)) + (np.arange(size) * n_units)[:, None]
        counts = np.bincount(draws.ravel(), minlength=size * n_units).reshape(size, n_units)
        matrices.append(np.asarray(counts.astype(np.float64) @ matrix))
    return np.concatenate(matrices).reshape(n_boot, len(DIMENSION_KEYS), k, k)


def outcome_counts(encoded: EncodedVotes) -> np.ndarray:
    """Counts (dimensions, k, k, 3) of main votes by (dimension, lower arm, higher arm, outcome)."""
    k = len(encoded.arms)
    main = encoded.is_main
    index = ((encoded.dimension[main] * k + encoded.low[main]) * k + encoded.high[main]) * 3 + encoded.outcome[main]
    return np.bincount(index, minlength=len(DIMENSION_KEYS) * k * k * 3).reshape(len(DIMENSION_KEYS), k, k, 3)


def prompt_net_preferences(encoded: EncodedVotes) -> tuple[np.ndarray, np.ndarray]:
    """Per (dimension, lower arm, higher arm, prompt): the sum over the prompt's main votes of +1 for a win of the
    higher arm, −1 for a loss, 0 for a tie, and the number of those votes; two (dimensions, k, k, prompts) arrays."""
    k = len(encoded.arms)
    main = encoded.is_main
    prompts = int(encoded.prompt.max()) + 1 if encoded.prompt.size else 0
    shape = (len(DIMENSION_KEYS), k, k, prompts)
    index = ((encoded.dimension[main] * k + encoded.low[main]) * k + encoded.high[main]) * prompts + encoded.prompt[main]
    outcome = encoded.outcome[main]
    net = np.select([outcome == HIGH_WINS, outcome == LOW_WINS], [1.0, -1.0], 0.0)
    size = int(np.prod(shape))
    return np.bincount(index, weights=net, minlength=size).reshape(shape), np.bincount(index, minlength=size).reshape(shape)


def pair_table(counts: np.ndarray, arms: list[str], resampled: np.ndarray, net_sums: np.ndarray, net_votes: np.ndarray) -> pd.DataFrame:
    """One row per dimension × compared arm pair: wins/ties/losses, the win rate with its bootstrap CI (from the
    `resampled` score matrices), the prompt-level test (primary) and the vote-level sign test (secondary), each
    Holm-corrected across dimensions."""
    rows = []
    k = len(arms)
    tail = (1 - CI_LEVEL) / 2 * 100
    for d, dim in enumerate(DIMENSION_KEYS):
        for i in range(k):
            for j in range(i + 1, k):
                low_wins, ties, high_wins = (int(c) for c in counts[d, i, j])
                if low_wins + ties + high_wins:
                    voted = net_votes[d, i, j] > 0
                    per_prompt = net_sums[d, i, j, voted] / net_votes[d, i, j, voted]
                    with np.errstate(invalid="ignore", divide="ignore"):
                        rates = resampled[:, d, j, i] / (resampled[:, d, j, i] + resampled[:, d, i, j])
                    rates = rates[np.isfinite(rates)]  # resamples that drew no vote of this pair have no rate
                    low, high = np.percentile(rates, [tail, 100 - tail]) if rates.size else (np.nan, np.nan)
                    # From the later arm's side, so that against the reference arm the other arm's wins are shown.
                    n = low_wins + ties + high_wins
                    rows.append({
                        "dimension": dim, "arm": arms[j], "versus": arms[i], "wins": high_wins, "ties": ties, "losses": low_wins,
                        "n": n, "win_rate": (high_wins + ties / 2) / n, "win_rate_ci_low": low, "win_rate_ci_high": high,
                        "n_prompts": int(voted.sum()), "net_preference": float(per_prompt.mean()),
                        "prompt_test_p": signed_rank_test(per_prompt)[1], "prompt_test_p_holm": np.nan,
                        "sign_test_p": float(sign_test_p(high_wins, low_wins)), "sign_test_p_holm": np.nan,
                    })
    columns = ["dimension", "arm", "versus", "wins", "ties", "losses", "n", "win_rate", "win_rate_ci_low", "win_rate_ci_high",
               "n_prompts", "net_preference", "prompt_test_p", "prompt_test_p_holm", "sign_test_p", "sign_test_p_holm"]
    table = pd.DataFrame(rows, columns=columns)
    for _, rows_of_pair in table.groupby(["arm", "versus"], sort=False).groups.items():
        for test in ("prompt_test_p", "sign_test_p"):
            table.loc[rows_of_pair, f"{test}_holm"] = holm(table.loc[rows_of_pair, test].to_numpy())
    return table


def agreement_table(encoded: EncodedVotes) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per dimension: Krippendorff's nominal alpha over raters and swapped-side consistency; and consistency per rater."""
    main = encoded.is_main
    k = len(encoded.arms)
    comparison = ((encoded.unit * len(DIMENSION_KEYS) + encoded.dimension) * k + encoded.low) * k + encoded.high
    repeats = np.flatnonzero(encoded.repeat_of >= 0)
    consistent = encoded.outcome[repeats] == encoded.outcome[encoded.repeat_of[repeats]]
    rows = []
    for d, dim in enumerate(DIMENSION_KEYS):
        in_dim = main & (encoded.dimension == d)
        judged = np.bincount(pd.factorize(comparison[in_dim])[0]) if in_dim.any() else np.zeros(0, dtype=np.int64)
        repeat_in_dim = encoded.dimension[repeats] == d
        rows.append(
            {
                "dimension": dim,
                "krippendorff_alpha_nominal": krippendorff_alpha(comparison[in_dim], encoded.outcome[in_dim], level="nominal", value_domain=np.arange(3)),
                "n_comparisons": int(judged.size),
                "n_comparisons_two_raters": int((judged >= 2).sum()),
                "n_repeats": int(repeat_in_dim.sum()),
                "n_consistent": int(consistent[repeat_in_dim].sum()),
            }
        )
    table = pd.DataFrame(rows)
    table["consistency"] = table["n_consistent"] / table["n_repeats"].where(table["n_repeats"] > 0)
    per_rater = pd.DataFrame({"rater": np.array(encoded.rater_names, dtype=object)[encoded.rater[repeats]], "consistent": consistent})
    per_rater = per_rater.groupby("rater", sort=True)["consistent"].agg(n_repeats="size", n_consistent="sum").reset_index()
    per_rater["consistency"] = per_rater["n_consistent"] / per_rater["n_repeats"]
    return table, per_rater.astype({"n_consistent": int})


def strength_table(elo: np.ndarray, boot: np.ndarray, pairs: pd.DataFrame, counts: np.ndarray, arms: list[str]) -> pd.DataFrame:
    """`pairwise_table.csv`: per dimension and arm the Elo, its bootstrap CI, the win rate against the reference, n."""
    tail = (1 - CI_LEVEL) / 2 * 100
    rows = []
    valid = ~np.isnan(boot[:, :, 0])  # resamples with a finite estimate (all arms are NaN otherwise)
    for d, dim in enumerate(DIMENSION_KEYS):
        sample = boot[valid[:, d], d]
        low, high = np.percentile(sample, [tail, 100 - tail], axis=0) if len(sample) else np.full((2, len(arms)), np.nan)
        involved = counts[d].sum(axis=2)
        for a, arm in enumerate(arms):
            direct = pairs.loc[(pairs["dimension"] == dim) & (pairs["arm"] == arm) & (pairs["versus"] == arms[0]), "win_rate"]
            rows.append(
                {
                    "dimension": dim,
                    "arm": arm,
                    "elo": elo[d, a],
                    "elo_ci_low": low[a],
                    "elo_ci_high": high[a],
                    "win_rate_vs_reference": float(direct.iloc[0]) if len(direct) else np.nan,
                    "n_comparisons": int(involved[a, :].sum() + involved[:, a].sum()),
                }
            )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def display_table(strengths: pd.DataFrame, arms: list[str]) -> pd.DataFrame:
    """Dimensions as rows, arms as columns, 'Elo [low, high]' cells (the reference arm is 1000 by definition)."""

    def cell(row) -> str:
        if np.isnan(row.elo):
            return "–"
        if row.arm == arms[0]:
            return "1000 (reference)"
        return f"{row.elo:.0f} [{row.elo_ci_low:.0f}, {row.elo_ci_high:.0f}]"

    cells = {dim: {row.arm: cell(row) for row in part.itertuples()} for dim, part in strengths.groupby("dimension", sort=False)}
    return pd.DataFrame([[cells[d][a] for a in arms] for d in DIMENSION_KEYS], index=[DIMENSION_NAMES[d] for d in DIMENSION_KEYS], columns=arms).rename_axis("Dimension")


def plot_strengths(strengths: pd.DataFrame, arms: list[str], title: str) -> bytes:
    """Elo with its bootstrap CI per arm, one panel per dimension; the dashed line is the reference arm."""
    fig, axes = plt.subplots(1, len(DIMENSION_KEYS), figsize=(3.2 * len(DIMENSION_KEYS), 0.45 * len(arms) + 1.8), sharey=True)
    y = np.arange(len(arms))[::-1]
    for ax, dim in zip(axes, DIMENSION_KEYS):
        part = strengths.loc[strengths["dimension"] == dim].set_index("arm").loc[arms]
        error = np.vstack([part["elo"] - part["elo_ci_low"], part["elo_ci_high"] - part["elo"]])
        ax.errorbar(part["elo"], y, xerr=np.nan_to_num(error), fmt="o", capsize=3)
        ax.axvline(ELO_ANCHOR, color="grey", linestyle="--", linewidth=1)
        ax.set_title(DIMENSION_NAMES[dim])
        ax.set_xlabel("Elo (95% bootstrap CI)")
    axes[0].set_yticks(y, arms)
    fig.suptitle(title, y=1.04)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


@dataclass
class PairwiseResult:
    """Every number of a pairwise analysis, computed before anything is written."""

    source: str
    reference_arm: str
    arms: list[str]
    strengths: pd.DataFrame  # pairwise_table.csv
    pairs: pd.DataFrame
    agreement: pd.DataFrame
    consistency_by_rater: pd.DataFrame
    counts: dict
    notes: list[str]
    title: str
    table_title: str
    figure: bytes
    bad_rows: BadRows | None = field(repr=False, default=None)
    out: Path | None = None

    def sections(self) -> list[tuple[str, str, pd.DataFrame | None]]:
        """(heading, text, table) sections for an HTML report."""
        return [
            ("Pairwise preferences: Bradley–Terry strengths", METHOD_NOTE, self.strengths),
            (
                "Pairwise preferences: arm pairs",
                "Wins, ties and losses of `arm` against `versus`; win rate (ties as half) with a bootstrap 95% CI over prompt × seed units. Primary test, unit: prompts "
                "(net preference per prompt, Wilcoxon signed-rank across prompts, `prompt_test_p`); secondary, unit: votes (sign test on "
                "untied votes, `sign_test_p`; votes on one image are not independent, so it rejects too often).",
                self.pairs,
            ),
            ("Pairwise preferences: agreement and consistency", "Krippendorff's alpha (nominal) over raters per comparison; consistency of swapped-side repeats.", self.agreement),
        ]


def analyze_votes(
    votes: pd.DataFrame,
    source: str,
    reference_arm: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    title_note: str | None = None,
    bad_rows: BadRows | None = None,
) -> PairwiseResult:
    """The whole preference analysis of validated votes (see the module docstring); writes nothing."""
    reference = reference_arm or DEFAULT_REFERENCE_ARM
    encoded = encode_votes(votes, reference)
    arms, k = encoded.arms, len(encoded.arms)
    counts = outcome_counts(encoded)
    unit_scores = score_matrices(encoded)
    resampled = bootstrap_score_matrices(unit_scores, k, n_boot, np.random.default_rng(seed))
    pairs = pair_table(counts, arms, resampled, *prompt_net_preferences(encoded))
    totals = np.asarray(unit_scores.sum(axis=0)).reshape(len(DIMENSION_KEYS), k, k)
    elo = to_elo(bradley_terry(totals))
    boot = to_elo(bradley_terry(resampled))
    strengths = strength_table(elo, boot, pairs, counts, arms)
    agreement, per_rater = agreement_table(encoded)

    notes = []
    for d, dim in enumerate(DIMENSION_KEYS):
        if not counts[d].any():
            notes.append(f"{dim}: no votes")
        elif np.isnan(elo[d]).any():
            notes.append(
                f"{dim}: no Bradley–Terry estimate: some group of arms never lost (or was never compared) against the others, so its strength is unbounded"
            )
        dropped = np.isnan(boot[:, d, 0]).mean()
        if 0 < dropped < 1:
            notes.append(f"{dim}: {dropped:.1%} of bootstrap resamples had no finite estimate and were left out of the CI")
    main = encoded.is_main
    untied = main & (encoded.outcome != TIE)
    counts_summary = {
        "source": source,
        "reference_arm": reference,
        "arms": arms,
        "n_votes": int(len(votes)),
        "n_main_votes": int(main.sum()),
        "n_repeats": int((encoded.repeat_of >= 0).sum()),
        "n_left_out": int((~main & (encoded.repeat_of < 0)).sum()),
        "n_raters": len(encoded.rater_names),
        "n_units": unit_scores.shape[0],
        "n_prompts": int(votes["prompt"].nunique()),
        "tie_share": float((encoded.outcome[main] == TIE).mean()),
        # Left-side bias: with balanced sides this is near 0.5.
        "left_share_of_untied": float((encoded.choice[untied] == CHOICES.index("left")).mean()) if untied.any() else float("nan"),
        "bootstrap_resamples": n_boot,
        "n_bad_rows_dropped": len(bad_rows) if bad_rows is not None else 0,
    }
    title = report.titled("Pairwise preference analysis", title_note)
    table_title = report.titled(f"Bradley–Terry strengths, Elo scale ({reference} = 1000), 95% bootstrap CI", title_note)
    return PairwiseResult(
        source=source,
        reference_arm=reference,
        arms=arms,
        strengths=strengths,
        pairs=pairs,
        agreement=agreement,
        consistency_by_rater=per_rater,
        counts=counts_summary,
        notes=notes,
        title=title,
        table_title=table_title,
        figure=plot_strengths(strengths, arms, table_title),
        bad_rows=bad_rows or BadRows(source),
    )


def analyze_pairwise(
    path_or_frame: str | Path | pd.DataFrame,
    out_dir: str | Path | None,
    reference_arm: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    drop_bad_rows: bool = False,
    title_note: str | None = None,
) -> PairwiseResult:
    """Read (CSV/Parquet path) or validate (DataFrame) pairwise votes, analyse them, and write `out_dir`.

    `reference_arm` defaults to 'base'; a reference arm missing from the votes is an error. With
    `out_dir` None nothing is written. Everything is computed before the first file is written.
    """
    if n_boot < 100:
        raise FangzhiError(f"bootstrap resamples must be at least 100, not {n_boot}")
    if isinstance(path_or_frame, pd.DataFrame):
        positions = [f"row {i}" for i in range(1, len(path_or_frame) + 1)]
        votes, bad = validate_pairwise_votes(path_or_frame, source="pairwise votes table", positions=positions, drop_bad_rows=drop_bad_rows)
        label = "pairwise votes table (in memory)"
    else:
        votes, bad = read_pairwise_file(path_or_frame, drop_bad_rows=drop_bad_rows)
        label = str(path_or_frame)
    result = analyze_votes(votes, label, reference_arm, n_boot, seed, title_note=title_note, bad_rows=bad)
    if out_dir is not None:
        write_pairwise(result, Path(out_dir))
    return result


def write_pairwise(result: PairwiseResult, out: Path) -> None:
    """pairwise_table.csv/.md/.tex, pairwise_pairs.csv, pairwise_agreement.csv, the plot, JSON and an HTML report."""
    output_folder(out, PAIRWISE_FILES)
    display = display_table(result.strengths, result.arms)
    c = result.counts
    note = f"{ELO_NOTE} {c['bootstrap_resamples']} resamples; n = {c['n_main_votes']} votes, {c['n_units']} prompt × seed units, {c['n_raters']} raters."
    result.strengths.to_csv(out / "pairwise_table.csv", index=False)
    (out / "pairwise_table.md").write_text(to_markdown(display, result.table_title, note), encoding="utf-8")
    (out / "pairwise_table.tex").write_text(to_latex(display, result.table_title, note), encoding="utf-8")
    result.pairs.to_csv(out / "pairwise_pairs.csv", index=False)
    result.agreement.to_csv(out / "pairwise_agreement.csv", index=False)
    result.consistency_by_rater.to_csv(out / "pairwise_consistency_by_rater.csv", index=False)
    (out / "pairwise_elo.png").write_bytes(result.figure)
    report.write_json(
        out / "pairwise_results.json",
        {
            "title": result.title,
            "counts": result.counts,
            "method": METHOD_NOTE,
            "strengths": result.strengths,
            "pairs": result.pairs,
            "agreement": result.agreement,
            "consistency_by_rater": result.consistency_by_rater,
            "notes": result.notes,
            "bad_rows": [{"where": w, "reason": r} for w, r in result.bad_rows.problems],
        },
    )
    facts = [
        f"Source: {c['source']}",
        f"Rests on {c['n_raters']} raters, {c['n_main_votes']} votes on {c['n_units']} prompt × seed units ({c['n_prompts']} prompts; arms: {', '.join(result.arms)}).",
        f"Ties: {c['tie_share']:.1%} of votes; left side chosen in {c['left_share_of_untied']:.1%} of untied votes; {c['n_repeats']} swapped-side repeats; {c['n_bad_rows_dropped']} bad rows dropped.",
        *result.notes,
    ]
    report.write_html(out / "pairwise_report.html", result.title, facts, result.table_title, display, note, result.sections(), {"pairwise_elo.png": result.figure})
    result.out = out
