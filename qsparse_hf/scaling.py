"""The inference-optimal scaling law of sparsely-activated LLMs (Q-Sparse, Sec. 3).

    L(N, S) = E + A(S) / N^α,      A(S) = B + C · exp(β / (1 − S))

N is the total parameter count, S the sparsity ratio. With a fixed budget of activated parameters
``N_a = (1 − S) · N`` the loss is ``E + A(S) · ((1 − S) / N_a)^α``, so the best sparsity S* minimises
``A(S) · (1 − S)^α`` and does not depend on the budget; the best model then has ``N = N_a / (1 − S*)`` parameters.

About the paper's constants: it prints E = 1.86, B = 0.01, C = 1.89, α = 0.10, β = 0.05 (rounded) and states
S* = 45.58 % (full precision) and 61.25 % (1.58-bit). With the printed, rounded constants S* comes out at 50.24 %,
not 45.58 %: S* is very sensitive to β. `PAPER_CONSTANTS` holds the printed values as they are;
`CALIBRATED_FULL_PRECISION` and `CALIBRATED_1_58_BIT` keep E, B, C, α and solve β (0.05468 and 0.03894) so that S*
equals the stated optima. The 1.58-bit constants are not printed at all: its calibrated law reproduces S*, but its
absolute losses are those of the full-precision fit and mean nothing.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "ScalingLaw",
    "PAPER_CONSTANTS",
    "CALIBRATED_FULL_PRECISION",
    "CALIBRATED_1_58_BIT",
    "law_for",
    "fit_scaling_law",
    "optimal_sparsity",
    "best_config_for_budget",
    "plot_scaling_law",
]


@dataclass(frozen=True)
class ScalingLaw:
    """``L(N, S) = E + (B + C·exp(β/(1−S))) / N^α``.

    Example:
        >>> round(PAPER_CONSTANTS.loss(7e9, 0.4), 4)
        2.0739
    """

    E: float
    B: float
    C: float
    alpha: float
    beta: float

    def amplitude(self, sparsity):
        """A(S) = B + C·exp(β / (1 − S))."""
        sparsity = np.asarray(sparsity, dtype=float)
        if np.any((sparsity < 0) | (sparsity >= 1)):
            raise ValueError("sparsity must lie in [0, 1)")
        return self.B + self.C * np.exp(self.beta / (1.0 - sparsity))

    def loss(self, params, sparsity):
        """Predicted loss of a model with ``params`` total parameters at sparsity ``sparsity``."""
        params = np.asarray(params, dtype=float)
        if np.any(params <= 0):
            raise ValueError("params must be positive")
        out = self.E + self.amplitude(sparsity) / params**self.alpha
        return float(out) if np.ndim(out) == 0 else out

    def loss_at_budget(self, activated_params, sparsity):
        """Predicted loss at a fixed number of activated parameters ``N_a = (1 − S)·N``."""
        sparsity = np.asarray(sparsity, dtype=float)
        return self.loss(np.asarray(activated_params, dtype=float) / (1.0 - sparsity), sparsity)


PAPER_CONSTANTS = ScalingLaw(E=1.86, B=0.01, C=1.89, alpha=0.10, beta=0.05)
CALIBRATED_FULL_PRECISION = ScalingLaw(E=1.86, B=0.01, C=1.89, alpha=0.10, beta=0.0546804)
CALIBRATED_1_58_BIT = ScalingLaw(E=1.86, B=0.01, C=1.89, alpha=0.10, beta=0.0389354)


def law_for(precision: str = "full", calibrated: bool = True) -> ScalingLaw:
    """The law for ``precision`` ``"full"`` or ``"1.58"``: calibrated to the paper's S* by default.

    Example:
        >>> round(optimal_sparsity(law_for("1.58")), 4)
        0.6125
    """
    if precision not in ("full", "1.58"):
        raise ValueError(f"precision must be 'full' or '1.58', got {precision!r}")
    if not calibrated:
        if precision == "1.58":
            raise ValueError("the paper prints no constants for 1.58-bit models; use calibrated=True")
        return PAPER_CONSTANTS
    return CALIBRATED_FULL_PRECISION if precision == "full" else CALIBRATED_1_58_BIT


def optimal_sparsity(law: ScalingLaw, tol: float = 1e-10) -> float:
    """Inference-optimal sparsity S* = argmin over S of ``A(S)·(1 − S)^α`` (independent of the budget).

    Example:
        >>> round(optimal_sparsity(PAPER_CONSTANTS), 4), round(optimal_sparsity(CALIBRATED_FULL_PRECISION), 4)
        (0.5024, 0.4558)
    """
    from scipy.optimize import minimize_scalar

    def log_objective(s: float) -> float:
        return math.log(law.B + law.C * math.exp(law.beta / (1.0 - s))) + law.alpha * math.log(1.0 - s)

    # The objective is unimodal on [0, 1): log(1 − S) pulls toward sparse, exp(β/(1 − S)) blows up near 1.
    result = minimize_scalar(log_objective, bounds=(0.0, 1.0 - 1e-6), method="bounded", options={"xatol": tol})
    return float(result.x)


def best_config_for_budget(law: ScalingLaw, activated_params: float) -> dict[str, float]:
    """Best total size, sparsity and predicted loss for a budget of activated parameters.

    Example:
        >>> cfg = best_config_for_budget(CALIBRATED_FULL_PRECISION, 4e9)
        >>> round(cfg["sparsity"], 4), round(cfg["params"] / 1e9, 2)
        (0.4558, 7.35)
    """
    if activated_params <= 0:
        raise ValueError(f"activated_params must be positive, got {activated_params}")
    sparsity = optimal_sparsity(law)
    params = activated_params / (1.0 - sparsity)
    return {
        "sparsity": sparsity,
        "params": params,
        "activated_params": float(activated_params),
        "loss": law.loss(params, sparsity),
        "dense_loss_same_budget": law.loss(activated_params, 0.0),
    }


def _huber(residual: np.ndarray, delta: float) -> np.ndarray:
    abs_r = np.abs(residual)
    return np.where(abs_r <= delta, 0.5 * residual**2, delta * (abs_r - 0.5 * delta))


def fit_scaling_law(params, sparsity, loss, delta: float = 1e-3, inits: list[ScalingLaw] | None = None) -> ScalingLaw:
    """Fit the law to observed ``(N, S, loss)`` points as the paper does: L-BFGS on a Huber loss (``delta``) of
    ``log L_pred − log L_obs``, from a grid of starting points (the best fit wins).

    Example:
        >>> N, S = np.meshgrid([3e8, 7e8, 1.3e9, 3e9, 7e9], [0.0, 0.3, 0.5, 0.6, 0.7, 0.8])
        >>> truth = CALIBRATED_FULL_PRECISION
        >>> fit = fit_scaling_law(N.ravel(), S.ravel(), truth.loss(N.ravel(), S.ravel()))
        >>> abs(optimal_sparsity(fit) - 0.4558) < 0.005
        True
    """
    from scipy.optimize import minimize

    params = np.asarray(params, dtype=float)
    sparsity = np.asarray(sparsity, dtype=float)
    observed = np.asarray(loss, dtype=float)
    if not (params.shape == sparsity.shape == observed.shape) or params.ndim != 1:
        raise ValueError("params, sparsity and loss must be 1-D arrays of equal length")
    if params.size < 5:
        raise ValueError(f"fitting 5 constants needs at least 5 points, got {params.size}")
    if len(np.unique(sparsity)) < 3 or len(np.unique(params)) < 2:
        raise ValueError("points must span at least 3 sparsity values and 2 model sizes")
    log_observed = np.log(observed)
    log_params = np.log(params)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        E, B, C, alpha, beta = theta
        growth = np.exp(beta / (1.0 - sparsity))
        amplitude = B + C * growth
        decay = np.exp(-alpha * log_params)  # N^-α
        predicted = E + amplitude * decay
        residual = np.log(predicted) - log_observed
        # Analytic gradient: Huber'(r) / pred · ∂pred/∂θ, summed over points.
        weight = np.clip(residual, -delta, delta) / predicted
        d_pred = np.stack([np.ones_like(decay), decay, growth * decay, -amplitude * log_params * decay,
                           C * growth / (1.0 - sparsity) * decay])
        return float(_huber(residual, delta).sum()), d_pred @ weight

    bounds = [(1e-3, observed.min()), (0.0, 10.0), (1e-4, 100.0), (1e-3, 1.0), (1e-4, 1.0)]
    if inits is None:
        inits = [ScalingLaw(E, B, C, a, b) for E, B, C, a, b in itertools.product(
            (0.9 * observed.min(),), (0.0, 0.1), (0.5, 2.0, 8.0), (0.05, 0.3), (0.02, 0.1)
        )]
    best = None
    for init in inits:
        x0 = np.clip(list(asdict(init).values()), [b[0] for b in bounds], [b[1] for b in bounds])
        result = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000})
        if best is None or result.fun < best.fun:
            best = result
    return ScalingLaw(*map(float, best.x))


def plot_scaling_law(law: ScalingLaw, path: str, sparsities=(0.0, 0.3, 0.4558, 0.6, 0.7, 0.8),
                     budget_range=(1e8, 1e11), title: str | None = None) -> str:
    """Plot predicted loss against activated parameters for several sparsities; save a PNG and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = np.logspace(math.log10(budget_range[0]), math.log10(budget_range[1]), 200)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in sparsities:
        ax.plot(budgets, law.loss_at_budget(budgets, s), label=f"S = {100 * s:.1f}%")
    ax.set_xscale("log")
    ax.set_xlabel("activated parameters N_a = (1 − S)·N")
    ax.set_ylabel("predicted loss")
    ax.set_title(title or f"Q-Sparse scaling law (S* = {100 * optimal_sparsity(law):.2f}%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
