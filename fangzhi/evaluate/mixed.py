"""Crossed linear mixed model of one score: arm effect with raters and prompts as random factors.

    score ~ 1 + T + (1 | rater) + (0 + T | rater) + (1 | prompt) + (0 + T | prompt) + (1 | prompt:seed) + (1 | image)

with T = 1 for the compared arm and 0 for the baseline: crossed random intercepts for rater and
prompt, seeds nested in prompts, an image term (what all raters see in one image) and random slopes
of arm by rater and by prompt (Barr et al. 2013, "keep it maximal"). This is the data model of
`fangzhi.evaluate.power`, so its estimates feed `analyze power --from-ratings`.

Fitted by REML with the profiled deviance of Bates et al. (2015, lme4) on dense q × q matrices (q:
number of random-effect levels), minimised over the relative SDs with L-BFGS-B. We fit it ourselves
because statsmodels' MixedLM, with crossed factors expressed as one group, needs tens of seconds to
minutes for a few hundred ratings and often fails to converge. What differs from lme4's maximal
model, stated in every result: slopes and intercepts are uncorrelated. The arm effect's p-value and
CI use a t distribution with Satterthwaite's degrees of freedom, as lmerTest reports them: with the
four raters of a typical study, a rater × arm slope leaves only a few df (median 5), and a Wald z test
rejected a true null in 9% of simulated studies where this test rejects 6% (bench/null_calibration.py). Variance-component CIs
are Wald intervals on the SD from the numerical Hessian of the REML deviance. Scores are ordinal
1–5; the linear model is an approximation on that scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import linalg, optimize, sparse, special, stats
from threadpoolctl import threadpool_limits

# Random terms in the order they are dropped when the maximal model does not converge (last first).
TERMS: tuple[str, ...] = ("rater", "prompt", "seed", "image", "prompt_arm", "rater_arm")
TERM_LABELS: dict[str, str] = {
    "rater": "rater intercept", "prompt": "prompt intercept", "seed": "seed within prompt", "image": "image",
    "prompt_arm": "prompt × arm slope", "rater_arm": "rater × arm slope", "residual": "residual",
}
FORMULA = "score ~ arm + (1 + arm | rater) + (1 + arm | prompt) + (1 | prompt:seed) + (1 | image), slopes uncorrelated with intercepts, REML"
Z95 = float(special.ndtri(0.975))
MAX_RANDOM_LEVELS = 1500  # dense q × q Cholesky per deviance evaluation; beyond this the fit takes minutes
APPROXIMATION_NOTE = (
    "Linear mixed model on 1–5 scores: an approximation for ordinal data. Random slopes uncorrelated with intercepts; "
    "arm-effect p and CI from t with Satterthwaite's df; variance-component CIs are Wald intervals on the SD (approximate, none at zero)."
)


@dataclass
class MixedFit:
    """Result of one crossed-model fit (`fitted` False with `note` saying why when it was not fitted)."""

    fitted: bool
    note: str
    n_ratings: int = 0
    arm_effect: float = float("nan")
    se: float = float("nan")
    df: float = float("nan")  # Satterthwaite's degrees of freedom of the arm effect's t statistic
    ci95_low: float = float("nan")
    ci95_high: float = float("nan")
    p: float = float("nan")
    intercept: float = float("nan")
    sd: dict[str, float] = field(default_factory=dict)
    sd_ci95: dict[str, tuple[float, float]] = field(default_factory=dict)
    terms: list[str] = field(default_factory=list)
    simplified: list[str] = field(default_factory=list)
    converged: bool = False


def _design(ratings: pd.DataFrame, baseline_arm: str, other_arm: str) -> tuple[pd.DataFrame, dict[str, sparse.csr_matrix], list[str]]:
    """The two arms' ratings, one sparse indicator block per supported random term, and why others are left out."""
    data = ratings.loc[ratings["arm"].isin([baseline_arm, other_arm])]
    treated = (data["arm"] == other_arm).to_numpy(dtype=float)
    codes = {
        "rater": pd.factorize(data["rater"])[0],
        "prompt": pd.factorize(data["prompt"])[0],
        "seed": data.groupby(["prompt", "seed"], sort=False, observed=True).ngroup().to_numpy(),
        "image": data.groupby(["arm", "prompt", "seed"], sort=False, observed=True).ngroup().to_numpy(),
    }
    codes["rater_arm"], codes["prompt_arm"] = codes["rater"], codes["prompt"]
    levels = {name: int(c.max()) + 1 for name, c in codes.items()}
    n = len(data)
    raters_in_both = data.groupby("rater", observed=True)["arm"].nunique().ge(2).sum()
    unsupported = {
        "rater": levels["rater"] < 2 and "one rater",
        "prompt": levels["prompt"] < 2 and "one prompt",
        "seed": levels["seed"] <= levels["prompt"] and "one seed per prompt (the seed term equals the prompt term)",
        "image": levels["image"] >= n and "one rating per image (the image term equals the residual)",
        "rater_arm": (levels["rater"] < 2 or raters_in_both < 2) and "fewer than two raters rated both arms",
        "prompt_arm": levels["prompt"] < 2 and "one prompt",
    }
    blocks, left_out = {}, []
    for name in TERMS:
        if unsupported[name]:
            left_out.append(f"{TERM_LABELS[name]} left out: {unsupported[name]}")
            continue
        values = treated if name.endswith("_arm") else np.ones(n)
        blocks[name] = sparse.csr_matrix((values, (np.arange(n), codes[name])), shape=(n, levels[name]))
    return data.assign(_treated=treated), blocks, left_out


class _Reml:
    """Profiled REML deviance of y = Xβ + Zb + e for relative SDs θ (one per random term)."""

    def __init__(self, y: np.ndarray, X: np.ndarray, blocks: dict[str, sparse.csr_matrix]):
        Z = sparse.hstack(list(blocks.values()), format="csc")
        self.sizes = [b.shape[1] for b in blocks.values()]
        self.n, self.p = X.shape
        self.ZtZ = (Z.T @ Z).toarray()
        self.ZtX = np.asarray(Z.T @ X)
        self.Zty = np.asarray(Z.T @ y).ravel()
        self.XtX, self.Xty, self.yty = X.T @ X, X.T @ y, float(y @ y)

    def solve(self, theta: np.ndarray) -> tuple[float, float, float, np.ndarray, np.ndarray]:
        """(log|A|, log|X'W⁻¹X|, penalised RSS r², β, (X'W⁻¹X)⁻¹) at θ."""
        lam = np.repeat(theta, self.sizes)
        A = lam[:, None] * self.ZtZ * lam[None, :]
        A[np.diag_indices_from(A)] += 1.0
        L = linalg.cholesky(A, lower=True)
        cu = linalg.solve_triangular(L, lam * self.Zty, lower=True)
        CX = linalg.solve_triangular(L, lam[:, None] * self.ZtX, lower=True)
        XtVX = self.XtX - CX.T @ CX
        Xty = self.Xty - CX.T @ cu
        R = linalg.cholesky(XtVX, lower=True)
        beta = linalg.cho_solve((R, True), Xty)
        r2 = max(self.yty - cu @ cu - beta @ Xty, 1e-12)
        log_a = 2 * np.log(np.diag(L)).sum()
        log_x = 2 * np.log(np.diag(R)).sum()
        return log_a, log_x, r2, beta, linalg.cho_solve((R, True), np.eye(self.p))

    def profiled(self, theta: np.ndarray) -> float:
        try:
            log_a, log_x, r2, _, _ = self.solve(theta)
        except linalg.LinAlgError:  # a step far outside the data's support: tell the optimiser it is worse
            return np.inf
        dof = self.n - self.p
        return log_a + log_x + dof * (1 + np.log(2 * np.pi * r2 / dof))

    def full(self, sds: np.ndarray) -> float:
        """REML deviance (up to a constant) in the SDs of the random terms and, last, the residual SD."""
        sigma = sds[-1]
        log_a, log_x, r2, _, _ = self.solve(sds[:-1] / sigma)
        return log_a + log_x + (self.n - self.p) * np.log(sigma**2) + r2 / sigma**2


def _hessian(f, x: np.ndarray) -> np.ndarray:
    k = len(x)
    steps = 1e-3 * np.maximum(np.abs(x), 0.05)
    H = np.empty((k, k))
    f0 = f(x)
    for i in range(k):
        for j in range(i, k):
            ei, ej = np.eye(k)[i] * steps[i], np.eye(k)[j] * steps[j]
            if i == j:
                H[i, i] = (f(x + ei) - 2 * f0 + f(x - ei)) / steps[i] ** 2
            else:
                H[i, j] = H[j, i] = (f(x + ei + ej) - f(x + ei - ej) - f(x - ei + ej) + f(x - ei - ej)) / (4 * steps[i] * steps[j])
    return H


def fit_crossed(ratings: pd.DataFrame, score: str, baseline_arm: str, other_arm: str) -> MixedFit:
    """Fit the crossed model for one score column; simplify (drop slopes) when the fit fails."""
    # Hundreds of small Cholesky factorisations: multi-threaded BLAS only adds contention
    # (measured 30× slower on a busy 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_crossed(ratings, score, baseline_arm, other_arm)


def _fit_crossed(ratings: pd.DataFrame, score: str, baseline_arm: str, other_arm: str) -> MixedFit:
    data, blocks, left_out = _design(ratings, baseline_arm, other_arm)
    q = sum(b.shape[1] for b in blocks.values())
    if q > MAX_RANDOM_LEVELS:
        return MixedFit(False, f"not fitted: {q} random-effect levels (more than {MAX_RANDOM_LEVELS}; the dense fit would take minutes). The prompt-level test stands.", n_ratings=len(data))
    if data["_treated"].nunique() < 2:
        return MixedFit(False, "not fitted: needs ratings in both arms", n_ratings=len(data))
    y = data[score].to_numpy(dtype=float)
    X = np.column_stack([np.ones(len(y)), data["_treated"].to_numpy()])
    simplified = list(left_out)
    while True:
        model = _Reml(y, X, blocks)
        names = list(blocks)
        start = np.full(len(names), 0.5)
        result = optimize.minimize(model.profiled, start, method="L-BFGS-B", bounds=[(0, None)] * len(names)) if names else None
        converged = result is None or bool(result.success)
        droppable = [name for name in ("rater_arm", "prompt_arm") if name in blocks]
        if converged or not droppable:
            break
        dropped = droppable[0]
        simplified.append(f"{TERM_LABELS[dropped]} dropped: the model with it did not converge ({result.message})")
        blocks = {name: block for name, block in blocks.items() if name != dropped}
    theta = result.x if result is not None else np.zeros(0)
    _, _, r2, beta, xtvx_inv = model.solve(theta)
    sigma = float(np.sqrt(r2 / (model.n - model.p)))
    se = float(sigma * np.sqrt(xtvx_inv[1, 1]))
    effect = float(beta[1])
    sds = {name: float(sigma * t) for name, t in zip(names, theta)}
    sds["residual"] = sigma
    sd_values = np.array([*sds.values()])
    index, covariance = _sd_covariance(model, sd_values)
    sd_ci = _sd_intervals(sd_values, list(sds), index, covariance)
    df = _satterthwaite_df(model, sd_values, index, covariance)
    if not np.isfinite(df):
        simplified.append("Satterthwaite's df could not be computed (the REML Hessian is singular); p and CI are Wald z")
        df = np.inf
    at_zero = [TERM_LABELS[name] for name in names if sds[name] < 1e-4 * sigma]
    if at_zero:
        simplified.append(f"estimated at zero (singular fit; equivalent to leaving out): {', '.join(at_zero)}")
    if not converged:
        simplified.append(f"the simplest model tried did not converge either ({result.message}); the estimates are the optimiser's last point")
    half = float(stats.t.ppf(0.975, df)) * se
    return MixedFit(
        True,
        APPROXIMATION_NOTE,
        n_ratings=len(y),
        arm_effect=effect,
        se=se,
        df=float(df),
        ci95_low=effect - half,
        ci95_high=effect + half,
        p=float(2 * stats.t.sf(abs(effect / se), df)) if se > 0 else float("nan"),
        intercept=float(beta[0]),
        sd=sds,
        sd_ci95=sd_ci,
        terms=names,
        simplified=simplified,
        converged=converged,
    )


def _sd_covariance(model: _Reml, sds: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Asymptotic covariance of the SDs not at zero (2 × inverse Hessian of the REML deviance), with their indices.

    SDs at zero sit on the boundary, where the quadratic approximation does not hold: they are held fixed.
    None when the Hessian is singular or not positive definite.
    """
    index = np.flatnonzero(sds > 1e-3 * sds[-1])

    def deviance(free: np.ndarray) -> float:
        full = sds.copy()
        full[index] = free
        return model.full(full)

    try:
        covariance = 2 * np.linalg.inv(_hessian(deviance, sds[index]))
    except np.linalg.LinAlgError:
        return index, None
    if not np.all(np.isfinite(covariance)) or np.any(np.diag(covariance) <= 0):
        return index, None
    return index, covariance


def _sd_intervals(sds: np.ndarray, names: list[str], index: np.ndarray, covariance: np.ndarray | None) -> dict[str, tuple[float, float]]:
    """Wald 95% intervals on each SD; NaN for an SD at zero (boundary) or without a covariance."""
    intervals = {name: (float("nan"), float("nan")) for name in names}
    if covariance is None:
        return intervals
    for k, i in enumerate(index):
        half = Z95 * np.sqrt(covariance[k, k])
        intervals[names[i]] = (float(max(sds[i] - half, 0.0)), float(sds[i] + half))
    return intervals


def _satterthwaite_df(model: _Reml, sds: np.ndarray, index: np.ndarray, covariance: np.ndarray | None) -> float:
    """Satterthwaite's df of the arm effect: 2 V² / (g' C g), where V is the variance of the estimated effect as a
    function of the SDs, g its gradient at the estimate (central differences) and C the SDs' covariance."""
    if covariance is None:
        return float("nan")

    def effect_variance(free: np.ndarray) -> float:
        full = sds.copy()
        full[index] = free
        *_, xtvx_inv = model.solve(full[:-1] / full[-1])
        return float(full[-1] ** 2 * xtvx_inv[1, 1])

    free = sds[index]
    steps = 1e-4 * np.maximum(np.abs(free), 0.05)
    gradient = np.array([(effect_variance(free + step) - effect_variance(free - step)) / (2 * h) for step, h in zip(np.diag(steps), steps)])
    spread = float(gradient @ covariance @ gradient)
    return 2 * effect_variance(free) ** 2 / spread if spread > 0 else float("nan")


def mixed_table(ratings: pd.DataFrame, baseline_arm: str, arms: list[str], scores: list[str]) -> pd.DataFrame:
    """One row per (other arm, score): arm effect, CI, p, every SD with its CI, and what was simplified."""
    rows = []
    # Count levels before building any design: a million ratings must not pay for a fit it will skip.
    levels = 2 * ratings["rater"].nunique() + 2 * ratings["prompt"].nunique()
    levels += ratings.groupby(["prompt", "seed"], observed=True).ngroups + ratings.groupby(["arm", "prompt", "seed"], observed=True).ngroups
    for other_arm in arms:
        if other_arm == baseline_arm:
            continue
        for score in scores:
            if levels > MAX_RANDOM_LEVELS:
                fit = MixedFit(False, f"not fitted: about {levels} random-effect levels (more than {MAX_RANDOM_LEVELS}; the dense fit would take minutes). The prompt-level test stands.", n_ratings=len(ratings))
            else:
                try:
                    fit = fit_crossed(ratings, score, baseline_arm, other_arm)
                except (linalg.LinAlgError, ValueError) as exc:  # e.g. a singular design: the rest of the report stands
                    fit = MixedFit(False, f"not fitted: {exc}", n_ratings=len(ratings))
            row = {
                "arm": other_arm, "baseline": baseline_arm, "score": score, "fitted": fit.fitted, "n_ratings": fit.n_ratings,
                "arm_effect": fit.arm_effect, "se": fit.se, "df": fit.df, "ci95_low": fit.ci95_low, "ci95_high": fit.ci95_high, "p": fit.p,
                "converged": fit.converged,
            }
            for name in (*TERMS, "residual"):
                row[f"sd_{name}"] = fit.sd.get(name, float("nan"))
                low, high = fit.sd_ci95.get(name, (float("nan"), float("nan")))
                row[f"sd_{name}_ci95_low"], row[f"sd_{name}_ci95_high"] = low, high
            row["simplified"] = "; ".join(fit.simplified)
            row["note"] = fit.note
            rows.append(row)
    return pd.DataFrame(rows)
