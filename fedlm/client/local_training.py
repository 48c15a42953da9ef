"""Local training: the loop every client runs on its own data, with the hooks strategies declare.

A strategy that changes what clients do (FedProx's proximal term, SCAFFOLD's control variates)
puts a key in its round config (`Strategy.configure_fit`); `TRAINING_HOOKS` maps that key to the
client-side `TrainingHook` it stands for, so the loop has no `if` per strategy. DP-SGD (Opacus)
replaces batching and clipping when the client's options ask for it. One step:

    loss.backward() -> DP-SGD's per-example clipping and noise -> each hook's gradient change
    -> gradient clipping (without DP-SGD) -> optimizer step
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from fedlm.core.params import ParamSpec, unflatten
from fedlm.errors import ConfigError
from fedlm.privacy.dp_sgd import PrivateTraining, SampleLevelDP
from fedlm.protocol import FitIns
from fedlm.tasks.text import EncodedDataset, batches, forward_options, length_grouped


@dataclass
class TrainingOptions:
    """Local training settings; defaults suit fine-tuning a BERT-sized encoder."""

    batch_size: int = 16
    learning_rate: float = 5e-5
    max_length: int = 128
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    seed: int = 0
    device: str = "cpu"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    group_by_length: bool = False  # batches of examples of similar lengths (less padding)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast of the forward pass (fp16: CUDA only)
    # sample-level DP: train with DP-SGD (per-example clipping replaces max_grad_norm)
    dp_sgd: SampleLevelDP | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dp_sgd, dict):  # from a run config
            self.dp_sgd = SampleLevelDP(**self.dp_sgd)
        for field_name in ("batch_size", "max_length"):
            if not isinstance(getattr(self, field_name), int) or getattr(self, field_name) < 1:
                raise ConfigError(f"{field_name} must be a positive integer, got {getattr(self, field_name)!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"mixed_precision must be one of {list(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.mixed_precision == "fp16" and not self.device.startswith("cuda"):
            raise ConfigError(
                f"mixed_precision fp16 needs a CUDA device (loss scaling), and training.device is {self.device}: "
                "use bf16, or no"
            )
        if self.mixed_precision != "no" and self.dp_sgd is not None:
            raise ConfigError("DP-SGD (Opacus) computes per-example gradients in float32: set mixed_precision: no")


PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FUSED_DEVICES = ("cpu", "cuda")  # where torch.optim has fused AdamW and SGD kernels


class MixedPrecision:
    """The forward pass autocast to bf16 or fp16 on the training device (parameters, gradients
    and the optimizer stay float32); fp16's small range needs loss scaling (a GradScaler)."""

    def __init__(self, kind: str, device: str) -> None:
        self.dtype = PRECISIONS[kind]
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if kind == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradients at their true scale, before hooks and clipping see them."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:  # skips the step when the scaled gradients overflowed, and adapts the scale
            self.scaler.step(optimizer)
            self.scaler.update()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' activation checkpointing (non-reentrant: works with frozen inputs, as under LoRA)."""
    if not getattr(model, "supports_gradient_checkpointing", False) and not hasattr(model, "get_base_model"):
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing: set it to false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # idempotent


class TrainingHook(Protocol):
    """A strategy's client-side behaviour during one local training."""

    def adjust_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Change the gradients of the trainable parameters before the optimizer steps."""

    def finish(self, delta: torch.Tensor, steps: int, learning_rate: float) -> dict[str, torch.Tensor]:
        """After training (`delta`: the update): the extra vectors the reply carries."""


class ProximalTerm:
    """FedProx (Li et al. 2020, arXiv:1812.06127): the gradient of mu/2 ||w - w_global||^2."""

    def __init__(self, mu: float, received: torch.Tensor, spec: ParamSpec) -> None:
        self.mu = mu
        self.centers = unflatten(received, spec)

    @torch.no_grad()
    def adjust_gradients(self, params: list[torch.nn.Parameter]) -> None:
        for param, center in zip(params, self.centers):
            param.grad.add_(param - center, alpha=self.mu)

    def finish(self, delta: torch.Tensor, steps: int, learning_rate: float) -> dict[str, torch.Tensor]:
        return {}


class ControlVariates:
    """SCAFFOLD (Karimireddy et al. 2020, arXiv:1910.06378): gradients corrected by c - c_i; the
    client's control variate c_i lives on `holder` (its `control_variate`) between rounds."""

    def __init__(self, holder: Any, server_control: torch.Tensor, received: torch.Tensor, spec: ParamSpec) -> None:
        if holder.control_variate is None:
            holder.control_variate = torch.zeros_like(received)
        self.holder = holder
        self.server_control = server_control
        self.correction = unflatten(server_control - holder.control_variate, spec)

    @torch.no_grad()
    def adjust_gradients(self, params: list[torch.nn.Parameter]) -> None:
        for param, correction in zip(params, self.correction):  # g - c_i + c
            param.grad.add_(correction)

    def finish(self, delta: torch.Tensor, steps: int, learning_rate: float) -> dict[str, torch.Tensor]:
        # option II: c_i+ = c_i - c + (x - y_i) / (K lr)
        old = self.holder.control_variate
        new = old - self.server_control - delta / (steps * learning_rate)
        self.holder.control_variate = new
        return {"control_delta": new - old}


# round-config key -> the hook it asks for, built from (instructions, client, received vector, spec)
TRAINING_HOOKS: dict[str, Callable[[FitIns, Any, torch.Tensor, ParamSpec], TrainingHook | None]] = {
    "proximal_mu": lambda ins, client, received, spec: (
        ProximalTerm(float(ins.config["proximal_mu"]), received, spec) if float(ins.config["proximal_mu"]) > 0 else None
    ),
    "scaffold": lambda ins, client, received, spec: (
        ControlVariates(client, ins.tensors["server_control"], received, spec) if ins.config["scaffold"] else None
    ),
}


def training_hooks(ins: FitIns, client: Any, received: torch.Tensor, spec: ParamSpec) -> list[TrainingHook]:
    """The hooks the round config asks for, in `TRAINING_HOOKS` order."""
    hooks = (make(ins, client, received, spec) for key, make in TRAINING_HOOKS.items() if key in ins.config)
    return [hook for hook in hooks if hook is not None]


@dataclass
class TrainingResult:
    steps: int
    loss: float
    seen: int
    seconds: float
    sampling_rate: float | None  # DP-SGD's, for the client's accountant


def train_locally(
    model: torch.nn.Module,
    data: EncodedDataset,
    options: TrainingOptions,
    epochs: int,
    seed: int,
    pad_id: int,
    hooks: list[TrainingHook],
    step_callback: Callable[[int, int], None] | None = None,
) -> TrainingResult:
    """Train `model` (already holding the parameters to start from) for `epochs` on `data`:
    shuffled batches seeded by `seed` (dropout too), or DP-SGD's Poisson-sampled steps."""
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = make_optimizer(params, options)
    precision = MixedPrecision(options.mixed_precision, options.device)
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    private = None
    if options.dp_sgd is not None and data.segments is not None:
        raise ConfigError(
            "DP-SGD clips each row's gradient, and a packed row holds several examples: set task.packing: false"
        )
    if options.dp_sgd is not None:
        private = PrivateTraining(options.dp_sgd, model, optimizer, len(data), options.batch_size)
    steps_per_epoch = -(-len(data) // options.batch_size) if private is None else private.steps_per_epoch
    total_steps, step, seen, loss_sum = epochs * steps_per_epoch, 0, 0, torch.zeros((), device=options.device)
    start = time.perf_counter()
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator().manual_seed(seed)
            lengths = [len(ids) for ids in data.input_ids] if options.group_by_length else None
            for batch in _batches(data, epochs, generator, private, options.batch_size, pad_id, lengths):
                if batch is not None:
                    batch = {key: value.to(options.device) for key, value in batch.items()}
                    with precision.autocast():
                        loss = model(**batch, **forward_options(batch)).loss if private is None else private.loss(batch)
                    precision.backward(loss)
                    loss_sum += loss.detach() * len(batch["labels"])
                    seen += len(batch["labels"])
                if private is not None:  # per-example clipping and noise, before any other change
                    private.noisy_gradients(sampled_nothing=batch is None)
                precision.unscale(optimizer)
                for hook in hooks:
                    hook.adjust_gradients(params)
                if private is None and options.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
                precision.step(optimizer)
                (optimizer if private is None else private.optimizer).zero_grad(set_to_none=True)
                step += 1
                if step_callback is not None:
                    step_callback(step, total_steps)
    finally:
        if private is not None:
            private.close()
    seconds = time.perf_counter() - start
    sampling_rate = None if private is None else private.sampling_rate
    return TrainingResult(step, float(loss_sum) / max(seen, 1), seen, seconds, sampling_rate)


def _batches(
    data: EncodedDataset,
    epochs: int,
    generator: torch.Generator,
    private: PrivateTraining | None,
    batch_size: int,
    pad_id: int,
    lengths: list[int] | None = None,
) -> Iterator[dict[str, torch.Tensor] | None]:
    """The training batches: `epochs` shuffled passes (grouped by length when given the examples'
    `lengths`), or under DP-SGD Poisson-sampled steps (None for a step that sampled no example)."""
    if private is None:
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=generator).tolist()
            if lengths is not None:
                order = length_grouped(order, lengths, batch_size, generator)
            yield from batches(data, batch_size, pad_id, order)
        return
    for chosen in private.sampled_steps(epochs):
        yield next(batches(data, len(chosen), pad_id, chosen)) if chosen else None


def make_optimizer(params: list[torch.nn.Parameter], options: TrainingOptions) -> torch.optim.Optimizer:
    """SGD, or AdamW without weight decay on biases and norms (parameters of fewer than 2 dims).
    Both fused (one kernel for all parameters) where torch has the kernel: on CPU, a tiny model's
    step is otherwise mostly Python overhead per tensor (BENCHMARKS.md)."""
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params) or None
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.learning_rate, weight_decay=options.weight_decay, fused=fused)
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": options.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=options.learning_rate,
        fused=fused,
    )
