"""Privacy accounting: dp-accounting called directly, and the Gaussian mechanism's exact epsilon."""

from __future__ import annotations

import math

import dp_accounting
import pytest

from fedlm.privacy.accounting import PrivacyAccountant, compute_epsilon, noise_for_epsilon


@pytest.mark.parametrize(
    ("q", "z", "rounds", "delta"), [(0.1, 1.0, 100, 1e-5), (0.01, 0.8, 1000, 1e-6), (0.5, 2.0, 30, 1e-5)]
)
@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_epsilon_is_dp_accountings_for_poisson_sampled_gaussian_rounds(q, z, rounds, delta, kind):
    reference = dp_accounting.rdp.RdpAccountant() if kind == "rdp" else dp_accounting.pld.PLDAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert compute_epsilon(z, q, rounds, delta, kind) == pytest.approx(reference.get_epsilon(delta), rel=1e-6)


def gaussian_delta(epsilon: float, sigma: float) -> float:
    """Exact delta(epsilon) of the Gaussian mechanism with sensitivity 1 (Balle and Wang 2018, Theorem 8)."""
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    return phi(1 / (2 * sigma) - epsilon * sigma) - math.exp(epsilon) * phi(-1 / (2 * sigma) - epsilon * sigma)


def gaussian_epsilon(sigma: float, delta: float) -> float:
    low, high = 0.0, 100.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if gaussian_delta(middle, sigma) > delta else (low, middle)
    return high


def test_every_client_every_round_matches_the_exact_gaussian_mechanism():
    """With q = 1, T rounds at noise z are one Gaussian mechanism at z / sqrt(T): PLD accounting
    must give its exact epsilon (analytic, Balle and Wang 2018), RDP an upper bound."""
    z, rounds, delta = 4.0, 16, 1e-5
    exact = gaussian_epsilon(z / math.sqrt(rounds), delta)
    assert compute_epsilon(z, 1.0, rounds, delta, "pld") == pytest.approx(exact, rel=0.01)
    assert exact < compute_epsilon(z, 1.0, rounds, delta, "rdp") < 1.3 * exact


def test_noise_for_a_target_epsilon_reaches_it():
    z = noise_for_epsilon(8.0, 0.1, 100, 1e-5)
    assert compute_epsilon(z, 0.1, 100, 1e-5) == pytest.approx(8.0, rel=1e-3)
    assert compute_epsilon(z * 0.95, 0.1, 100, 1e-5) > 8.0


def test_the_accountant_composes_changing_rounds_and_its_state_resumes():
    accountant = PrivacyAccountant("rdp")
    for _ in range(20):
        accountant.step(1.0, 0.1)
    accountant.step(2.0, 0.2, rounds=5)
    assert accountant.state()["steps"] == [[1.0, 0.1, 20], [2.0, 0.2, 5]]
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 20)
    reference.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(2.0)), 5)
    assert accountant.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)
    resumed = PrivacyAccountant()
    resumed.load_state(accountant.state())
    assert resumed.epsilon(1e-5) == accountant.epsilon(1e-5)
    assert PrivacyAccountant().epsilon(1e-5) == 0.0


def test_the_values_opacus_pins_for_90_epochs_of_dp_sgd():
    """Opacus's accountant tests pin, for noise 1.5, sampling rate 0.04 and 90 epochs (2,250
    steps) at delta 1e-5, RDP epsilon 7.32911117143, and noise 1.425307617 for epsilon 8 (its
    search stops at a tolerance of 0.01 in epsilon, hence the looser match)."""
    assert compute_epsilon(1.5, 0.04, 2250, 1e-5, "rdp") == pytest.approx(7.32911117143, rel=1e-3)
    assert compute_epsilon(1.5, 0.04, 2250, 1e-5, "pld") < 7.32911117143  # PLD is tighter
    assert noise_for_epsilon(8.0, 0.04, 2250, 1e-5) == pytest.approx(1.425307617, rel=0.01)
