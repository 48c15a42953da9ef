"""Client-level differential privacy for federated updates: clipping, Gaussian noise, and
adaptive clipping.

DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963): each client's delta is clipped to L2 norm C,
the clipped deltas are summed, Gaussian noise N(0, (z C)^2 I) is added to the sum, and the sum is
divided by the expected number of clients per round m. One client changes the sum by at most C,
so each round is a Gaussian mechanism with noise multiplier z on a subsampled population, which
`fedlm.privacy.accounting` turns into (epsilon, delta).

`DifferentialPrivacy` wraps any strategy: the inner strategy (FedAvg, FedAdam, ...) sees one
update per round, the noisy average. The noise is added by the server (a trusted aggregator), or
split across the clients (distributed DP: each adds N(0, (z C)^2 / m I) to its clipped delta, so
the sum carries the same noise and the server, e.g. behind secure aggregation, never sees a
noiseless update).

Adaptive clipping (Andrew et al. 2021, arXiv:1905.03871): C follows the `target_quantile` of the
clients' update norms, C <- C exp(-eta (b - gamma)) with b the noisy fraction of clients whose
update was not clipped; the count's noise (std `count_noise` clients) uses part of the privacy
budget, so the updates' noise multiplier becomes (z^-2 - (2 sigma_b)^-2)^-1/2 (their Theorem 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedlm.core.aggregate import weighted_sum
from fedlm.core.seeding import derive_seed
from fedlm.core.strategies import FedAvg, Strategy
from fedlm.core.update import ClientUpdate

NOISE_PLACEMENTS = ("server", "clients")


def clip_delta(delta: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """`delta` scaled by min(1, C / ||delta||_2), and its norm before clipping."""
    norm = float(delta.norm())
    if norm <= clip_norm:
        return delta, norm
    return delta * (clip_norm / norm), norm


@dataclass
class AdaptiveClipping:
    """Andrew et al. 2021: geometric update of the clip norm towards the `target_quantile` of the
    update norms, at `learning_rate` eta, with the unclipped count noised by N(0, count_noise^2)."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not self.learning_rate > 0 or not self.count_noise > 0:
            raise ValueError("adaptive clipping's learning_rate and count_noise must be > 0")

    def next_clip_norm(
        self, clip_norm: float, unclipped: int, expected_clients: float, generator: torch.Generator
    ) -> float:
        noisy_count = unclipped + self.count_noise * float(torch.randn((), generator=generator, dtype=torch.float64))
        return clip_norm * math.exp(-self.learning_rate * (noisy_count / expected_clients - self.target_quantile))

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        """The updates' share of a total noise multiplier z, the clipped count taking the rest."""
        remainder = noise_multiplier**-2 - (2 * self.count_noise) ** -2
        if remainder <= 0:
            raise ValueError(
                f"adaptive clipping's count_noise {self.count_noise} leaves no budget for the updates at noise "
                f"multiplier {noise_multiplier}: count_noise must exceed {noise_multiplier / 2:.3g}"
            )
        return remainder**-0.5


class DifferentialPrivacy(Strategy):
    """DP-FedAvg around `strategy` (default FedAvg): clip every client's delta to `clip_norm`,
    add Gaussian noise with std `noise_multiplier * clip_norm` to their sum (on the server, or in
    shares on the clients with `noise="clients"`), divide by `expected_clients`, and hand that
    average to the inner strategy. Clients are weighted equally, as the sensitivity analysis needs.
    Noise is drawn from `seed` and the round, so a resumed run continues the same sequence."""

    weights_clients_equally: ClassVar[bool] = True

    def __init__(
        self,
        strategy: Strategy | None = None,
        *,
        noise_multiplier: float,
        clip_norm: float,
        expected_clients: float,
        noise: str = "server",
        adaptive: AdaptiveClipping | None = None,
        seed: int = 0,
    ) -> None:
        if noise_multiplier < 0 or not clip_norm > 0 or not expected_clients > 0:
            raise ValueError("noise_multiplier must be >= 0, clip_norm and expected_clients > 0")
        if noise not in NOISE_PLACEMENTS:
            raise ValueError(f"noise must be one of {list(NOISE_PLACEMENTS)}, got {noise!r}")
        if adaptive is not None and noise == "clients":
            raise ValueError(
                "adaptive clipping counts the updates the server clipped; with noise 'clients' the clients clip "
                "and the server cannot tell (use noise 'server', or a fixed clip_norm)"
            )
        super().__init__()
        self.strategy = strategy or FedAvg()
        self.noise_multiplier = noise_multiplier
        self.update_noise_multiplier = (
            noise_multiplier
            if adaptive is None or noise_multiplier == 0
            else adaptive.update_noise_multiplier(noise_multiplier)
        )
        self.clip_norm = clip_norm
        self.expected_clients = expected_clients
        self.noise = noise
        self.adaptive = adaptive
        self.seed = seed
        self.rounds = 0
        self.last_round: dict[str, float] = {}

    @property
    def noise_std(self) -> float:
        """The std of the noise on the sum of clipped updates."""
        return self.update_noise_multiplier * self.clip_norm

    def configure_fit(self, global_params: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config, tensors = self.strategy.configure_fit(global_params)
        if self.noise == "clients":  # each client clips and adds its share of the noise
            share = self.noise_std / math.sqrt(self.expected_clients)
            config = {**config, "dp_clip_norm": self.clip_norm, "dp_noise_std": share}
        return config, tensors

    def aggregate(self, global_params: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        average = self.private_mean([update.delta for update in updates])
        examples = sum(update.num_examples for update in updates)
        return self.strategy.aggregate(global_params, [ClientUpdate(average, examples)])

    def private_mean(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """(sum of the clipped vectors + the server's noise) / expected clients; also what
        federated distillation privatizes the clients' probabilities with. With noise on the
        clients the vectors arrive clipped and noised: they are summed as they are (clipping a
        noised vector again would shrink the noise it carries)."""
        if self.noise == "clients":
            self.rounds += 1
            self.last_round = {"clip_norm": self.clip_norm}
            return weighted_sum(vectors, [1.0] * len(vectors)).div_(self.expected_clients)
        self.rounds += 1
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "dp noise", self.rounds))
        norms = [float(vector.norm()) for vector in vectors]
        unclipped = sum(norm <= self.clip_norm for norm in norms)
        scales = [min(1.0, self.clip_norm / norm) if norm > 0 else 1.0 for norm in norms]
        total = weighted_sum(vectors, scales)  # the sum of the clipped vectors
        if self.noise_std > 0:
            total.add_(torch.randn(total.shape, generator=generator, dtype=total.dtype), alpha=self.noise_std)
        self.last_round = {"clip_norm": self.clip_norm, "unclipped_fraction": unclipped / len(vectors)}
        if self.adaptive is not None:
            self.clip_norm = self.adaptive.next_clip_norm(self.clip_norm, unclipped, self.expected_clients, generator)
        return total.div_(self.expected_clients)

    def round_metrics(self) -> dict[str, float]:
        return {f"dp_{key}": value for key, value in self.last_round.items()}

    def round_noise_multiplier(self, finished: int) -> float:
        """The noise multiplier a round actually had: with noise on the clients, each of the
        expected m clients adds a share of variance 1/m, so when only `finished` < m updates
        reach the sum the noise is z sqrt(finished / m)."""
        if self.noise == "clients" and finished < self.expected_clients:
            return self.noise_multiplier * math.sqrt(finished / self.expected_clients)
        return self.noise_multiplier

    def aggregate_sum(
        self, global_params: torch.Tensor, total: torch.Tensor, total_weight: float, num_examples: int
    ) -> torch.Tensor:
        """The step when secure aggregation hands over only the sum of the clients' updates,
        which the clients clipped and noised themselves (`noise="clients"`): divided by the
        expected clients, not by `total_weight` (every client counts once)."""
        if self.noise != "clients":
            raise ValueError("with secure aggregation the server never sees an update: noise must be 'clients'")
        self.rounds += 1
        self.last_round = {"clip_norm": self.clip_norm}
        average = (total.double() / self.expected_clients).to(global_params.dtype)
        return self.strategy.aggregate(global_params, [ClientUpdate(average, num_examples)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        own = {
            "dp.rounds": torch.tensor(self.rounds),
            "dp.clip_norm": torch.tensor(self.clip_norm, dtype=torch.float64),
        }
        return {**own, **self.strategy.state_dict()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rounds = int(state["dp.rounds"])
        self.clip_norm = float(state["dp.clip_norm"])
        self.strategy.load_state_dict({key: value for key, value in state.items() if not key.startswith("dp.")})
