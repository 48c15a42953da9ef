"""Privacy accounting for client-level DP with Google's dp-accounting (`pip install fedlm[dp]`).

A DP-FedAvg round that samples clients at rate q = clients_per_round / num_clients and adds
Gaussian noise with multiplier z to the sum of clipped updates is the event
PoissonSampledDpEvent(q, GaussianDpEvent(z)); T rounds compose. fedlm samples a fixed number of
clients per round; like TensorFlow Federated's DP-FedAvg, it is accounted as Poisson sampling at
the same rate (exact when every client takes part, q = 1). Epsilon at a given delta comes from
Renyi DP (Mironov 2017, arXiv:1702.07476; Mironov, Talwar and Zhang 2019, arXiv:1908.10530) or
from privacy loss distributions (PLD; Koskela et al. 2020, Doroshenko et al. 2022,
arXiv:2207.04380), which is tighter.

`PrivacyAccountant` remembers the rounds it has seen as (z, q, count) runs, so its state is a
short JSON list and a resumed run reports exactly the epsilon the uninterrupted run would.
"""

from __future__ import annotations

import logging
from typing import Any

from fedlm.errors import ConfigError

ACCOUNTANTS = ("rdp", "pld")


def _library():
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError("differential privacy needs dp-accounting: pip install 'fedlm[dp]'") from None
    # RDP orders close to 1 sometimes fail to converge; dp-accounting then leaves them out of the
    # minimum over orders (correct, just looser) and logs a warning per order and call
    logging.getLogger("absl").setLevel(logging.ERROR)
    return dp_accounting


def _round_event(noise_multiplier: float, sampling_rate: float, rounds: int):
    dp = _library()
    event = dp.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp.PoissonSampledDpEvent(sampling_rate, event)
    return dp.SelfComposedDpEvent(event, rounds)


def _fresh(kind: str):
    dp = _library()
    if kind == "rdp":
        return dp.rdp.RdpAccountant()
    if kind == "pld":
        return dp.pld.PLDAccountant()
    raise ConfigError(f"accountant must be one of {list(ACCOUNTANTS)}, got {kind!r}")


def compute_epsilon(
    noise_multiplier: float, sampling_rate: float, rounds: int, delta: float, kind: str = "rdp"
) -> float:
    """Epsilon after `rounds` rounds at noise multiplier z and client sampling rate q."""
    accountant = PrivacyAccountant(kind)
    accountant.step(noise_multiplier, sampling_rate, rounds)
    return accountant.epsilon(delta)


def noise_for_epsilon(
    target_epsilon: float, sampling_rate: float, rounds: int, delta: float, kind: str = "rdp"
) -> float:
    """The smallest noise multiplier whose `rounds` rounds stay within `target_epsilon` at `delta`."""
    dp = _library()
    if not target_epsilon > 0:
        raise ConfigError(f"target_epsilon must be > 0, got {target_epsilon}")
    try:
        return float(
            dp.calibrate_dp_mechanism(
                lambda: _fresh(kind),
                lambda z: _round_event(z, sampling_rate, rounds),
                target_epsilon,
                delta,
                dp.LowerEndpointAndGuess(1e-3, 1.0),
                tol=1e-4,
            )
        )
    except (ValueError, RuntimeError) as error:
        raise ConfigError(
            f"dp: no noise multiplier reaches epsilon {target_epsilon} at delta {delta} over {rounds} rounds at "
            f"sampling rate {sampling_rate:.3g} ({error}); raise target_epsilon or delta, or run fewer rounds"
        ) from None


class PrivacyAccountant:
    """The rounds a run has spent, and the epsilon they cost (RDP or PLD accounting)."""

    def __init__(self, kind: str = "rdp") -> None:
        _fresh(kind)  # checks the library and the kind
        self.kind = kind
        self.steps: list[list[float]] = []  # [noise multiplier, sampling rate, rounds]

    def step(self, noise_multiplier: float, sampling_rate: float, rounds: int = 1) -> None:
        if noise_multiplier <= 0:
            raise ValueError("a round without noise (noise multiplier 0) has no finite epsilon")
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"the sampling rate must be in (0, 1], got {sampling_rate}")
        if self.steps and self.steps[-1][:2] == [noise_multiplier, sampling_rate]:
            self.steps[-1][2] += rounds
        else:
            self.steps.append([noise_multiplier, sampling_rate, rounds])

    def epsilon(self, delta: float) -> float:
        """Epsilon of all rounds so far at `delta` (0 before the first round)."""
        if not self.steps:
            return 0.0
        accountant = _fresh(self.kind)
        for noise_multiplier, sampling_rate, rounds in self.steps:
            accountant.compose(_round_event(noise_multiplier, sampling_rate, int(rounds)))
        return float(accountant.get_epsilon(delta))

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": [list(step) for step in self.steps]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.kind = state["kind"]
        self.steps = [[float(z), float(q), int(rounds)] for z, q, rounds in state["steps"]]


class RoundAccounting:
    """A run's privacy spending: every aggregated round costs one Gaussian round at noise
    multiplier z and sampling rate q; `max_epsilon` (if set) is the budget a run must stay in."""

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        kind: str = "rdp",
        max_epsilon: float | None = None,
    ) -> None:
        self.accountant = PrivacyAccountant(kind)
        self.noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        self.max_epsilon = max_epsilon

    def spend_round(self, noise_multiplier: float | None = None) -> dict[str, float]:
        """Account one more round, at the configured noise multiplier or the lower one the round
        actually had (client-side noise with dropouts); the epsilon and delta after it."""
        round_noise = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        self.accountant.step(round_noise, self.sampling_rate)
        spent = {"epsilon": self.accountant.epsilon(self.delta), "delta": self.delta}
        if round_noise != self.noise_multiplier:
            spent["dp_round_noise_multiplier"] = round_noise
        return spent

    def next_round_exceeds_budget(self) -> float | None:
        """The epsilon one more round would reach, when that is over `max_epsilon`; else None."""
        if self.max_epsilon is None:
            return None
        projected = PrivacyAccountant(self.accountant.kind)
        projected.load_state(self.accountant.state())
        projected.step(self.noise_multiplier, self.sampling_rate)
        epsilon = projected.epsilon(self.delta)
        return epsilon if epsilon > self.max_epsilon else None

    def stop_reason(self, next_round: int) -> str | None:
        """Why the run must stop before `next_round` (it would exceed `max_epsilon`), or None."""
        projected = self.next_round_exceeds_budget()
        if projected is None:
            return None
        return (
            f"stopped before round {next_round}: it would bring epsilon to {projected:.3f}, over "
            f"max_epsilon {self.max_epsilon} (delta {self.delta})"
        )
