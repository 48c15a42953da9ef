"""Sample-level differential privacy on a client: DP-SGD (Abadi et al. 2016, arXiv:1607.00133)
through Opacus (`pip install 'fedlm[dp]'`), for a client that trusts nobody, the server included.

Every step samples the client's examples independently with probability q = batch_size /
examples (Poisson sampling, which the accountant assumes; a step may see no example and still
adds noise), clips each example's gradient to L2 norm C, adds Gaussian noise N(0, (z C)^2 I) to
their sum and divides by the expected batch size q * examples. A step is then the event
PoissonSampled(q, Gaussian(z)); the client's epsilon after all the steps it has taken, in every
round, comes from the same dp-accounting accountant as client-level DP and protects each of its
examples against anyone who sees its updates or any model trained from them.

Noise and sampling draw from the operating system's randomness: nobody can replay them, so a run
with DP-SGD is not bit-reproducible.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedlm.errors import ConfigError
from fedlm.privacy.accounting import ACCOUNTANTS, PrivacyAccountant


@dataclass
class SampleLevelDP:
    """DP-SGD settings: noise multiplier z, per-example clip norm C, the delta epsilon is reported
    at, and the accountant (rdp or pld)."""

    noise_multiplier: float
    clip_norm: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ConfigError(f"dp_sgd.noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        if not self.clip_norm > 0:
            raise ConfigError(f"dp_sgd.clip_norm must be > 0, got {self.clip_norm!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp_sgd.delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"dp_sgd.accountant must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}")
        _opacus()  # a missing extra is reported when the client is made, not when it first trains


def _opacus():
    try:
        import opacus
        import opacus.optimizers
    except ImportError:
        raise ConfigError("DP-SGD (training.dp_sgd) needs Opacus: pip install 'fedlm[dp]'") from None
    return opacus


class PrivateTraining:
    """One local training run under DP-SGD: Opacus's per-example gradients on `model` and its
    DP optimizer around `optimizer`. Draw each step's examples from `sampled_steps`, compute the
    loss with `loss`, turn per-example gradients into `.grad` with `noisy_gradients`, step the
    plain `optimizer`, zero with `self.optimizer`, and `close()` when done: it removes Opacus's
    hooks, since the model may be shared with other clients."""

    def __init__(
        self,
        settings: SampleLevelDP,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        num_examples: int,
        batch_size: int,
    ) -> None:
        adapter = getattr(model, "peft_config", {}).get("default")
        if adapter is not None and adapter.peft_type != "LORA":
            raise ConfigError(
                f"DP-SGD (dp_sgd) supports full fine-tuning and LoRA adapters, not {adapter.peft_type.value}: Opacus "
                "cannot compute per-example gradients for its parameters"
            )
        opacus = _opacus()
        self.settings = settings
        self.num_examples = num_examples
        self.sampling_rate = min(1.0, batch_size / num_examples)
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.module = opacus.GradSampleModule(model, loss_reduction="mean", strict=False)
        self.optimizer = opacus.optimizers.DPOptimizer(
            optimizer,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.clip_norm,
            expected_batch_size=self.sampling_rate * num_examples,
            generator=self.generator,
        )
        self.params = [param for param in model.parameters() if param.requires_grad]
        self.steps_per_epoch = max(1, round(1 / self.sampling_rate))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's
        self.takes_position_ids = "position_ids" in inspect.signature(base.forward).parameters

    def sampled_steps(self, epochs: int) -> Iterator[list[int]]:
        """The examples of each step: `epochs` times 1/q steps, each example in a step with
        probability q (possibly none)."""
        for _ in range(epochs * self.steps_per_epoch):
            chosen = torch.rand(self.num_examples, generator=self.generator) < self.sampling_rate
            yield chosen.nonzero().flatten().tolist()

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's mean loss through the per-example gradient hooks. Position ids are given
        per example where the model takes them: a model that broadcasts one row of them would get
        one gradient for the whole batch in its position embeddings, not one per example."""
        if self.takes_position_ids:
            batch_size, length = batch["input_ids"].shape
            positions = torch.arange(length, device=batch["input_ids"].device).expand(batch_size, length)
            batch = {**batch, "position_ids": positions}
        return self.module(**batch).loss

    def noisy_gradients(self, sampled_nothing: bool = False) -> None:
        """Set each parameter's `.grad` to the clipped, noised average of the step's per-example
        gradients (the noise alone when the step sampled no example)."""
        if sampled_nothing:
            for param in self.params:
                param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
        self.optimizer.pre_step()

    def close(self) -> None:
        self.module.cleanup()
        for param in self.params:
            for name in ("grad_sample", "summed_grad"):
                if hasattr(param, name):
                    delattr(param, name)


def steps_tensor(accountant: PrivacyAccountant | None) -> torch.Tensor | None:
    """An accountant's (noise multiplier, sampling rate, steps) runs as a float64 [k, 3] tensor: a
    client's privacy spending, checkpointed and kept on Flower nodes with its other state."""
    if accountant is None:
        return None
    return torch.tensor(accountant.steps, dtype=torch.float64).reshape(-1, 3)


def accountant_from(steps: torch.Tensor | None, kind: str) -> PrivacyAccountant:
    accountant = PrivacyAccountant(kind)
    if steps is not None:
        accountant.load_state({"kind": kind, "steps": steps.tolist()})
    return accountant
