"""The scaling law: evaluation, S*, budgets, fitting and the paper's rounding trap."""

import numpy as np
import pytest

from qsparse_hf import scaling


def test_printed_constants_give_50_2_percent_not_45_58():
    assert scaling.optimal_sparsity(scaling.PAPER_CONSTANTS) == pytest.approx(0.5024, abs=5e-4)
    assert scaling.optimal_sparsity(scaling.CALIBRATED_FULL_PRECISION) == pytest.approx(0.4558, abs=1e-4)
    assert scaling.optimal_sparsity(scaling.CALIBRATED_1_58_BIT) == pytest.approx(0.6125, abs=1e-4)


def test_law_shape_matches_the_paper():
    law = scaling.CALIBRATED_FULL_PRECISION
    # Power law in N at fixed S, growing with S at fixed N, and the gap to dense shrinks as N grows.
    assert law.loss(1e9, 0.5) > law.loss(1e10, 0.5)
    assert law.loss(1e9, 0.7) > law.loss(1e9, 0.4) > law.loss(1e9, 0.0)
    gap_small = law.loss(3e8, 0.4) - law.loss(3e8, 0.0)
    gap_large = law.loss(7e9, 0.4) - law.loss(7e9, 0.0)
    assert 0 < gap_large < gap_small


def test_best_config_beats_dense_at_the_same_budget():
    best = scaling.best_config_for_budget(scaling.CALIBRATED_FULL_PRECISION, 4e9)
    assert best["params"] == pytest.approx(4e9 / (1 - 0.4558), rel=1e-3)
    assert best["params"] / best["activated_params"] == pytest.approx(1.84, abs=0.01)
    assert best["loss"] < best["dense_loss_same_budget"]
    with pytest.raises(ValueError):
        scaling.best_config_for_budget(scaling.CALIBRATED_FULL_PRECISION, 0)


@pytest.mark.parametrize("law, optimum", [(scaling.CALIBRATED_FULL_PRECISION, 0.4558),
                                          (scaling.CALIBRATED_1_58_BIT, 0.6125)])
def test_fit_recovers_a_known_optimum_from_noisy_points(law, optimum):
    rng = np.random.default_rng(0)
    N, S = np.meshgrid([3e8, 7e8, 1.3e9, 3e9, 7e9], [0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8])
    N, S = N.ravel(), S.ravel()
    observed = law.loss(N, S) * np.exp(rng.normal(0, 2e-4, N.size))
    fit = scaling.fit_scaling_law(N, S, observed)
    assert abs(scaling.optimal_sparsity(fit) - optimum) < 0.005


def test_fit_and_law_reject_bad_input():
    with pytest.raises(ValueError, match="at least 5"):
        scaling.fit_scaling_law([1e9] * 3, [0, 0.5, 0.7], [2.0, 2.1, 2.2])
    with pytest.raises(ValueError, match="sparsity"):
        scaling.PAPER_CONSTANTS.loss(1e9, 1.0)
    with pytest.raises(ValueError, match="precision"):
        scaling.law_for("fp8")


def test_plot_writes_a_png(tmp_path):
    path = scaling.plot_scaling_law(scaling.CALIBRATED_FULL_PRECISION, str(tmp_path / "law.png"))
    assert (tmp_path / "law.png").stat().st_size > 5000 and path.endswith("law.png")
