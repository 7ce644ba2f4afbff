r"""The CPT loss law: each domain's validation loss at any step of a continual run, under any LR schedule.

**The pre-training law** (Tissue et al. 2024, *Scaling Law with Learning Rate Annealing*, arXiv 2408.11029): after
``s`` steps at learning rates :math:`\eta_1 \dots \eta_s`,

.. math::
    L(s) = L_0 + A \, S_1^{-\alpha} - C \, S_2, \qquad
    S_1 = \sum_{i=1}^{s} \eta_i, \qquad
    S_2 = \sum_{i=1}^{s} m_i, \quad m_i = \lambda\, m_{i-1} + (\eta_{i-1} - \eta_i)

:math:`S_1` is the *forward area* (the LR summed), :math:`S_2` the *annealing area*: every drop of the LR adds to
it, remembered with decay :math:`\lambda` (0.999, the paper's). A rise of the LR (a warmup, a re-warm) subtracts, so
re-warming lifts the loss before the larger LR pays off.

**The continual law** (Wang et al. 2025, *Learning Dynamics in Continual Pre-Training for LLMs*, arXiv 2505.07796,
section 3): the pre-training curve continued through the continual run, plus a distribution-shift term that grows
with the forward area spent on the new data,

.. math::
    L(t) = L_0 + A \,(S_1^{pt} + S_1^{cpt}(t))^{-\alpha} - C \, S_2(t)
           + B \left(1 - (1 + E \, S_1^{cpt}(t))^{-\beta}\right)

where :math:`S_1^{pt}` is the base model's whole pre-training forward area, :math:`S_1^{cpt}(t)` the continual
run's after ``t`` batches, and :math:`S_2(t)` the annealing area of the whole LR sequence (pre-training, then the
continual run: the jump from the last pre-training LR to the first continual one counts). :math:`B > 0` for a
domain the run forgets (upstream), :math:`B < 0` for one it adapts to (downstream); :math:`|B|` is the loss the
shift can move at most. Each domain has its own seven parameters :math:`(L_0, A, \alpha, C, B, E, \beta)`, fitted
on every evaluation of every run given, so one parameter set must explain all the schedules.

**One annealing coefficient.** Wang et al. give the two stages' annealing areas their own coefficients,
:math:`-C_1 S_2^{pt} - C_2 S_2^{cpt}(t)` (a public summary of the paper says so too: the annealing effect is
quantified "with different coefficients for the PT and CPT stages"). Every run fitted here continues one base model,
so :math:`C_1 S_2^{pt}` is the same number in every run and is indistinguishable from :math:`L_0`: one coefficient
:math:`C` on the whole sequence's :math:`S_2` predicts the same curves with one parameter fewer to leave undetermined.
Runs from different base checkpoints would need the two.

**Uncertainty.** Each fit keeps its parameters' covariance (from the Jacobian at the optimum), and every prediction
carries its standard error by the delta method (``Fit.sd``): a number without it is never printed as certain.

Here the areas are in LR x batches with the LR of each batch as the run logged it (``lr-*`` in ``metrics.jsonl``:
the LR batch ``n`` trains at), and the loss at an evaluation after ``n`` batches sees batches ``0 .. n-1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LAMBDA = 0.999  # the annealing area's decay (Tissue et al.'s)
NAMES = ("L0", "A", "alpha", "C", "B", "E", "beta")
# bounds that keep every term finite and each parameter in its role; S1 is in LR x batches
LOWER = np.array([0.0, 0.0, 0.01, 0.0, -20.0, 1e-6, 0.01])
UPPER = np.array([20.0, 1e4, 3.0, 1e6, 20.0, 1e6, 5.0])


SEARCH_POINTS = 1500  # evaluations the starting points are tried on; the best is refined on all


def _every(a: Areas, stride: int) -> Areas:
    return Areas(a.batches[::stride], a.s1[::stride], a.s1_cpt[::stride], a.s2[::stride])


class LawError(ValueError):
    """A fit that cannot be trusted: too few points, or an optimiser that did not converge."""


@dataclass(frozen=True)
class Areas:
    """A run's areas at its evaluations: ``batches`` evaluated, and at each ``s1`` (pre-training + continual),
    ``s1_cpt`` (continual only) and ``s2`` (the whole sequence's annealing area)."""

    batches: np.ndarray
    s1: np.ndarray
    s1_cpt: np.ndarray
    s2: np.ndarray


@dataclass(frozen=True)
class Pretrain:
    """The base model's pre-training in the law's terms: its forward area, annealing area, the momentum ``m`` and
    the LR of its last batch (where the continual run's annealing area picks up)."""

    s1: float
    s2: float
    m: float
    last_lr: float

    @classmethod
    def of(cls, lrs: np.ndarray, lam: float = LAMBDA) -> Pretrain:
        lrs = np.asarray(lrs, dtype=float)
        if len(lrs) == 0:
            return cls(0.0, 0.0, 0.0, 0.0)
        m, s2 = _momentum(np.diff(-lrs, prepend=-lrs[0]), 0.0, lam)  # the first LR has no drop before it
        return cls(float(lrs.sum()), float(s2[-1]), float(m[-1]), float(lrs[-1]))


def _momentum(drops: np.ndarray, m0: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """:math:`m_i = \\lambda m_{i-1} + d_i` from ``m0``, and its running sum :math:`S_2`."""
    from scipy.signal import lfilter

    m, _ = lfilter([1.0], [1.0, -lam], drops, zi=[lam * m0])
    return m, np.cumsum(m)


def areas(lrs: np.ndarray, batches: np.ndarray, pre: Pretrain, lam: float = LAMBDA) -> Areas:
    """The areas after each of ``batches`` batches of a continual run whose batch ``i`` trains at ``lrs[i]``."""
    lrs = np.asarray(lrs, dtype=float)
    batches = np.asarray(batches, dtype=int)
    if len(batches) and (batches.min() < 0 or batches.max() > len(lrs)):
        raise LawError(f"an evaluation at batch {batches.max()} lies past the {len(lrs)} batches whose LR is known")
    drops = np.concatenate([[pre.last_lr - lrs[0]], -np.diff(lrs)]) if len(lrs) else np.empty(0)
    _, s2 = _momentum(drops, pre.m, lam)
    s1_cpt = np.concatenate([[0.0], np.cumsum(lrs)])
    s2 = pre.s2 + np.concatenate([[0.0], s2])
    return Areas(batches, pre.s1 + s1_cpt[batches], s1_cpt[batches], s2[batches])


def predict(params: np.ndarray, a: Areas) -> np.ndarray:
    """The law's loss at each of ``a``'s evaluations (formula above)."""
    l0, big_a, alpha, c, b, e, beta = params
    s1 = np.maximum(a.s1, 1e-12)
    return l0 + big_a * s1**-alpha - c * a.s2 + b * (1.0 - (1.0 + e * a.s1_cpt) ** -beta)


def jacobian(params: np.ndarray, a: Areas) -> np.ndarray:
    """The law's derivatives by each parameter at each evaluation (columns in ``NAMES``' order)."""
    _, big_a, alpha, _, b, e, beta = params
    s1 = np.maximum(a.s1, 1e-12)
    power = s1**-alpha
    shift = 1.0 + e * a.s1_cpt
    decay = shift**-beta
    return np.stack(
        [
            np.ones_like(s1),
            power,
            -big_a * power * np.log(s1),
            -a.s2,
            1.0 - decay,
            b * beta * a.s1_cpt * decay / shift,
            b * decay * np.log(shift),
        ],
        axis=1,
    )


@dataclass
class Fit:
    params: np.ndarray
    stderr: np.ndarray  # from the Jacobian at the optimum: sqrt(diag((J^T J)^-1) * residual variance)
    points: int
    rmse: float
    r2: float
    max_abs: float
    converged: bool = True  # False: the optimiser stopped at its iteration limit (the fit is used, and said so)
    cov: np.ndarray | None = None  # the parameters' covariance (the same estimate as ``stderr``)

    def to_json(self) -> dict:
        return {
            "params": dict(zip(NAMES, map(float, self.params))),
            "stderr": dict(zip(NAMES, map(float, self.stderr))),
            "points": self.points,
            "rmse": self.rmse,
            "r2": self.r2,
            "max_abs_residual": self.max_abs,
            "converged": self.converged,
            "cov": None if self.cov is None else [[float(v) for v in row] for row in self.cov],
        }

    @classmethod
    def from_json(cls, d: dict, where: str) -> Fit:
        try:
            params = np.array([float(d["params"][n]) for n in NAMES])
            stderr = np.array([float(d["stderr"][n]) for n in NAMES])
            fit = cls(
                params, stderr, int(d["points"]), float(d["rmse"]), float(d["r2"]), float(d["max_abs_residual"]),
                bool(d.get("converged", True)),
                None if d.get("cov") is None else np.array(d["cov"], dtype=float),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise LawError(f"{where}: not a fitted law ({exc!r})") from exc
        if not np.all(np.isfinite(params)):
            raise LawError(f"{where}: a parameter is not finite")
        if fit.cov is not None and fit.cov.shape != (len(NAMES), len(NAMES)):
            raise LawError(f"{where}: cov must be {len(NAMES)}x{len(NAMES)}, not {fit.cov.shape}")
        return fit

    def sd(self, a: Areas) -> np.ndarray:
        r"""The prediction's standard error at each of ``a``'s evaluations, from the parameters' covariance by the
        delta method: :math:`\sqrt{g^\top \Sigma g}` with :math:`g` the law's gradient there (``jacobian``). NaN
        for a law written without its covariance; infinite where the fit could not pin a parameter down."""
        if self.cov is None:
            return np.full(len(a.batches), math.nan)
        g = jacobian(self.params, a)
        with np.errstate(invalid="ignore", over="ignore"):
            var = np.einsum("ij,jk,ik->i", g, self.cov, g)
        return np.sqrt(np.where(np.isnan(var), math.inf, np.clip(var, 0.0, None)))


def fit(runs: list[tuple[Areas, np.ndarray]], starts: int = 8, seed: int = 0) -> Fit:
    """One parameter set for every run's evaluations of one domain: bounded least squares (scipy's trust-region
    reflective, a soft-L1 loss against outliers) from ``starts`` starting points; the best converged one wins.
    ``LawError`` when the points are fewer than the parameters, or no start converges."""
    from scipy.optimize import least_squares

    y = np.concatenate([loss for _, loss in runs])
    if len(y) <= len(NAMES):
        raise LawError(f"{len(y)} evaluations cannot fit the law's {len(NAMES)} parameters: log more evaluations")
    if not np.all(np.isfinite(y)):
        raise LawError("a loss to fit is not finite")

    def problem(data):
        def residuals(p: np.ndarray) -> np.ndarray:
            return np.concatenate([predict(p, a) - loss for a, loss in data])

        def jac(p: np.ndarray) -> np.ndarray:
            return np.concatenate([jacobian(p, a) for a, _ in data])

        return residuals, jac

    def solve(data, p0):
        residuals, jac = problem(data)
        return least_squares(
            residuals, p0, jac=jac, bounds=(LOWER, UPPER), loss="soft_l1", f_scale=0.05, x_scale="jac", max_nfev=2000
        )

    # the starts search on at most SEARCH_POINTS evaluations (evenly spaced in each run); the best is then refined on
    # all of them
    stride = max(1, math.ceil(len(y) / SEARCH_POINTS))
    search = [(_every(a, stride), loss[::stride]) for a, loss in runs] if stride > 1 else runs

    rng = np.random.default_rng(seed)
    s1_all = np.concatenate([a.s1 for a, _ in runs])
    scale = float(np.median(s1_all[s1_all > 0])) if np.any(s1_all > 0) else 1.0
    cpt_all = np.concatenate([a.s1_cpt for a, _ in runs])
    cpt_scale = float(np.median(cpt_all[cpt_all > 0])) if np.any(cpt_all > 0) else 1.0  # where the shift acts
    best = None
    for k in range(starts):
        alpha = rng.uniform(0.1, 1.0)
        p0 = np.array([
            max(0.0, y.min() - rng.uniform(0.0, 1.0)),
            rng.uniform(0.1, 2.0) * scale**alpha,
            alpha,
            rng.uniform(0.0, 1.0) * (0.0 if k == 0 else 1.0),
            rng.uniform(-1.0, 1.0) * (y.max() - y.min() + 1e-3),
            rng.uniform(0.1, 10.0) / max(cpt_scale, 1e-9),
            rng.uniform(0.2, 2.0),
        ])  # fmt: skip
        p0 = np.clip(p0, LOWER + 1e-9, UPPER - 1e-9)
        try:
            res = solve(search, p0)
        except (ValueError, FloatingPointError):
            continue
        # a start that ran out of iterations (status 0) still counts, marked unconverged; an error (-1) does not
        if res.status >= 0 and np.all(np.isfinite(res.fun)) and (best is None or _better(res, best)):
            best = res
    if best is not None and stride > 1:
        best = solve(runs, best.x)
    if best is None or best.status < 0 or not np.all(np.isfinite(best.fun)):
        raise LawError("the fit failed from every one of its starting points")
    r = best.fun
    dof = max(1, len(r) - len(NAMES))
    try:
        cov = np.linalg.pinv(best.jac.T @ best.jac) * float(r @ r) / dof
    except np.linalg.LinAlgError:
        cov = np.full((len(NAMES), len(NAMES)), math.inf)
    stderr = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(r @ r) / total if total > 0 else 1.0
    rmse, worst = float(np.sqrt(np.mean(r**2))), float(np.abs(r).max())
    return Fit(best.x, stderr, len(y), rmse, r2, worst, best.status > 0, cov)


def _better(res, best) -> bool:
    """A converged result beats one that ran out of iterations; then the lower cost wins."""
    return (res.status > 0, -res.cost) > (best.status > 0, -best.cost)
