"""DP-SGD on a client (Opacus): per-example clipping against a hand-written reference, the noise's
scale, Poisson sampling, and the client's epsilon against dp-accounting and Opacus's accountant."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from fedlm.errors import ConfigError
from fedlm.privacy.accounting import compute_epsilon
from fedlm.privacy.dp_sgd import PrivateTraining, SampleLevelDP
from fedlm.tasks.text import EncodedDataset, batches


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def tiny_batch(size: int = 5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    data = EncodedDataset(
        [torch.randint(5, 60, (int(length),), generator=generator).tolist() for length in range(4, 4 + size)],
        [index % 3 for index in range(size)],
    )
    return next(batches(data, size, 0))


def clipped_average_by_hand(model, params, batch, clip_norm: float, expected_batch: float) -> list[torch.Tensor]:
    """Each example through the plain model on its own, its gradient clipped to clip_norm, summed,
    divided by the expected batch size: the DP-SGD gradient before noise."""
    total = [torch.zeros_like(param) for param in params]
    for row in range(len(batch["labels"])):
        length = int(batch["attention_mask"][row].sum())
        single = {
            "input_ids": batch["input_ids"][row : row + 1, :length],
            "attention_mask": batch["attention_mask"][row : row + 1, :length],
            "labels": batch["labels"][row : row + 1],
        }
        grads = torch.autograd.grad(model(**single).loss, params)
        norm = torch.sqrt(sum(grad.pow(2).sum() for grad in grads))
        scale = min(1.0, clip_norm / float(norm))
        for accumulated, grad in zip(total, grads):
            accumulated.add_(grad, alpha=scale)
    return [accumulated / expected_batch for accumulated in total]


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_the_private_gradient_is_the_average_of_per_example_clipped_gradients(load_tiny, adapter):
    model = load_tiny()
    if adapter == "lora":
        import peft

        from fedlm.models.adapters import add_adapter

        model = add_adapter(model, peft.LoraConfig(r=4), seed=0)
    model = without_dropout(model)
    params = [param for param in model.parameters() if param.requires_grad]
    batch = tiny_batch()
    clip_norm = 0.05  # small enough that every example's gradient is clipped
    expected = clipped_average_by_hand(model, params, batch, clip_norm, expected_batch=4 / 10 * 10)
    settings = SampleLevelDP(noise_multiplier=1e-9, clip_norm=clip_norm)
    private = PrivateTraining(settings, model, torch.optim.SGD(params, lr=0.1), num_examples=10, batch_size=4)
    try:
        private.loss(batch).backward()
        private.noisy_gradients()
        for param, reference in zip(params, expected):
            torch.testing.assert_close(param.grad, reference, rtol=1e-4, atol=1e-7)
    finally:
        private.close()
    assert not any(hasattr(param, "grad_sample") for param in params)
    assert not hasattr(model, "autograd_grad_sample_hooks")  # the model is plain again for other clients


def test_a_step_that_sampled_nothing_adds_noise_of_std_z_c_over_the_expected_batch(load_tiny):
    model = without_dropout(load_tiny())
    params = [param for param in model.parameters() if param.requires_grad]
    settings = SampleLevelDP(noise_multiplier=1.3, clip_norm=0.7)
    private = PrivateTraining(settings, model, torch.optim.SGD(params, lr=0.1), num_examples=40, batch_size=8)
    try:
        private.noisy_gradients(sampled_nothing=True)
        noise = torch.cat([param.grad.reshape(-1) for param in params])
    finally:
        private.close()
    assert noise.numel() > 20_000
    assert float(noise.std()) == pytest.approx(1.3 * 0.7 / 8, rel=0.03)
    assert abs(float(noise.mean())) < 4 * float(noise.std()) / math.sqrt(noise.numel())


def test_poisson_sampling_takes_each_example_with_probability_q(load_tiny):
    model = load_tiny()
    params = [param for param in model.parameters() if param.requires_grad]
    settings = SampleLevelDP(noise_multiplier=1.0)
    private = PrivateTraining(settings, model, torch.optim.SGD(params, lr=0.1), num_examples=50, batch_size=5)
    try:
        steps = list(private.sampled_steps(epochs=200))
    finally:
        private.close()
    assert private.sampling_rate == 0.1 and len(steps) == 200 * 10
    sizes = torch.tensor([len(step) for step in steps], dtype=torch.float64)
    # Binomial(50, 0.1): mean 5, variance 4.5
    assert float(sizes.mean()) == pytest.approx(5.0, abs=4 * math.sqrt(4.5 / len(steps)))
    assert float(sizes.var()) == pytest.approx(4.5, rel=0.1)
    assert any(not step for step in steps)  # empty steps happen, and are steps (noise only)
    counts = torch.bincount(torch.tensor([index for step in steps for index in step]), minlength=50)
    assert int(counts.min()) > 0.7 * 200 and int(counts.max()) < 1.3 * 200


@pytest.mark.parametrize(("noise", "rate", "steps"), [(1.0, 0.1, 50), (1.5, 0.04, 2250), (0.8, 0.5, 12)])
def test_a_clients_epsilon_matches_opacus_own_rdp_accountant(noise, rate, steps):
    from opacus.accountants import RDPAccountant

    opacus_accountant = RDPAccountant()
    opacus_accountant.history = [(noise, rate, steps)]
    # different grids of Renyi orders: the two agree closely, not exactly
    assert compute_epsilon(noise, rate, steps, 1e-5) == pytest.approx(opacus_accountant.get_epsilon(1e-5), rel=0.03)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("noise_multiplier", 0.0, "dp_sgd.noise_multiplier must be > 0"),
        ("clip_norm", -1.0, "dp_sgd.clip_norm must be > 0"),
        ("delta", 1.0, r"dp_sgd.delta must be in \(0, 1\)"),
        ("accountant", "gdp", r"dp_sgd.accountant must be one of \['rdp', 'pld'\]"),
    ],
)
def test_bad_dp_sgd_settings_name_the_field(field, value, message):
    settings = {"noise_multiplier": 1.0, field: value}
    with pytest.raises(ConfigError, match=message):
        SampleLevelDP(**settings)


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning"])
def test_adapters_without_per_example_gradients_are_refused_by_name(load_tiny, method):
    import peft

    from fedlm.models.adapters import add_adapter

    config = peft.IA3Config() if method == "ia3" else peft.PromptTuningConfig(num_virtual_tokens=4)
    model = add_adapter(load_tiny(), config, seed=0)
    params = [param for param in model.parameters() if param.requires_grad]
    with pytest.raises(ConfigError, match=f"supports full fine-tuning and LoRA adapters, not {method.upper()}"):
        PrivateTraining(SampleLevelDP(noise_multiplier=1.0), model, torch.optim.SGD(params, lr=0.1), 10, 4)


def test_missing_extras_are_named_before_any_training(monkeypatch):
    from fedlm.privacy.homomorphic import HomomorphicKeys

    monkeypatch.setitem(sys.modules, "opacus", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs Opacus: pip install 'fedlm\[dp\]'"):
        SampleLevelDP(noise_multiplier=1.0)
    monkeypatch.setitem(sys.modules, "tenseal", None)
    with pytest.raises(ConfigError, match=r"needs TenSEAL: pip install 'fedlm\[he\]'"):
        HomomorphicKeys()
