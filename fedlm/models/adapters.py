"""Parameter-efficient fine-tuning through Hugging Face PEFT (`pip install fedlm[peft]`).

`add_adapter` wraps a sequence classifier with a PEFT adapter (LoRA, Hu et al. 2021,
arXiv:2106.09685; IA3, Liu et al. 2022, arXiv:2205.05638; prompt tuning, Lester et al. 2021,
arXiv:2104.08691) so that only the adapter and the classification head are trainable. The
federated vector is exactly the trainable parameters (`fedlm.models.federated`), so the frozen
base is loaded once per process and never sent. The adapter is initialised from a seed, so every
client and the server start from the same adapter.
"""

from __future__ import annotations

import copy
import sys
import weakref
from pathlib import Path
from typing import Any

import torch

from fedlm.errors import ModelError
from fedlm.models.loading import is_causal_lm

AUTO = "auto"


def is_adapted(model: torch.nn.Module) -> bool:
    peft = sys.modules.get("peft")  # not imported: no model can be a PeftModel
    return peft is not None and isinstance(model, peft.PeftModel)


# PEFT injects adapter layers into the base model in place: a base wrapped once is remembered so
# that clients sharing one model object share one wrapper instead of stacking adapters.
_WRAPPED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, torch.nn.Module]] = weakref.WeakKeyDictionary()


def add_adapter(model: torch.nn.Module, peft_config: Any, seed: int) -> torch.nn.Module:
    """`model` wrapped with the adapter `peft_config` (a `peft.PeftConfig`; `target_modules="auto"`
    or None picks PEFT's defaults for the architecture), initialised from `seed`. Wrapping the same
    base again with the same config returns the same wrapper."""
    if model in _WRAPPED:
        wrapped_config, wrapper = _WRAPPED[model]
        if wrapped_config != peft_config:
            raise ModelError("this model already carries a different adapter; load a fresh model for another one")
        return wrapper
    try:
        from peft import TaskType, get_peft_model
    except ImportError:
        raise ModelError("adapters need PEFT: pip install 'fedlm[peft]'") from None
    requested, peft_config = peft_config, copy.deepcopy(peft_config)
    if peft_config.task_type is None:  # a language model's wrapper keeps generate; a classifier's trains its head
        if is_causal_lm(model):
            peft_config.task_type = TaskType.CAUSAL_LM
        elif getattr(model.config, "is_encoder_decoder", False):
            peft_config.task_type = TaskType.SEQ_2_SEQ_LM
        elif type(model).__name__.endswith("ForTokenClassification"):
            peft_config.task_type = TaskType.TOKEN_CLS
        else:
            peft_config.task_type = TaskType.SEQ_CLS
    if hasattr(peft_config, "target_modules"):
        peft_config.target_modules = _target_modules(model, peft_config)
    if getattr(peft_config, "feedforward_modules", None) == AUTO:
        peft_config.feedforward_modules = None  # PEFT's default for the architecture
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            wrapper = get_peft_model(model, peft_config)
        except ValueError as error:
            raise ModelError(f"cannot add a {peft_config.peft_type} adapter to {_model_type(model)}: {error}") from None
    _WRAPPED[model] = (requested, wrapper)
    return wrapper


def prepare_quantized(model: torch.nn.Module) -> None:
    """A quantized base made ready for adapter training, as PEFT prescribes: its weights frozen,
    its norms and other unquantized parameters in float32. On CPUs with AVX-512 BF16, bitsandbytes
    (0.50) repacks a 4-bit layer's weight for its inference kernel on the first forward pass
    without gradients, and the adapters over it stop learning after that (an evaluation before a
    round would freeze them): the layers keep their trainable layout."""
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _model_type(model: torch.nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def _target_modules(model: torch.nn.Module, peft_config: Any) -> list[str] | None:
    """The configured target modules, checked against the model; None for PEFT's defaults."""
    targets = peft_config.target_modules
    linear = sorted(
        {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    )
    if targets in (None, AUTO):
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        if str(peft_config.peft_type).endswith("LORA") and _model_type(model) not in DEFAULTS:
            raise ModelError(
                f"no default LoRA target modules for model type {_model_type(model)!r}; set target_modules "
                f"to some of its linear layers: {linear}"
            )
        return None
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    if missing:
        raise ModelError(
            f"adapter target modules {missing} are not in the {_model_type(model)} model; its linear layers are {linear}"
        )
    return targets


def freeze_lora_a(model: torch.nn.Module) -> None:
    """FFA-LoRA (Sun et al. 2024, arXiv:2403.12313): keep every LoRA A at its shared seeded
    initialisation and train (and federate) only B; then the average of the clients' B A products
    is exactly the product of the averaged B with the common A."""
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)


def lora_scalings(model: torch.nn.Module) -> dict[str, float]:
    """Each LoRA layer's scaling s (alpha / r, or alpha / sqrt(r) with rsLoRA): the layer adds
    s B A to its base weight. Keys are the layers' module names, as in `fedlm.core.lora`."""
    scalings = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and hasattr(module, "lora_A"):
            adapter = module.active_adapters[0]
            scalings[name] = float(scaling[adapter])
    return scalings


def check_foldable(model: torch.nn.Module) -> None:
    """A `ModelError` unless every LoRA layer's base weight is out x in, so that s B A can be added
    to it (stack aggregation)."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and getattr(module, "fan_in_fan_out", False):
            raise ModelError(
                f"LoRA layer {name} stores its weight transposed (fan_in_fan_out, e.g. GPT-2's Conv1D), which "
                "stack aggregation cannot fold into; target nn.Linear modules or use svd"
            )


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with the adapter folded into the base weights."""
    return copy.deepcopy(model).merge_and_unload()


def load_adapter(base: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """`base` with the PEFT adapter saved in `folder` (`FedServer.save(..., merge_lora=False)`);
    a `ModelError` naming both when the adapter was trained on another base or label count."""
    from peft import PeftModel

    if not (Path(folder) / "adapter_config.json").is_file():
        raise ModelError(f"{folder} holds no PEFT adapter (no adapter_config.json)")
    try:
        return PeftModel.from_pretrained(base, str(folder))
    except (RuntimeError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()
        raise ModelError(
            f"the adapter in {folder} does not fit the {_model_type(base)} base model "
            f"{getattr(base, 'name_or_path', '')!r} ({reason[0] if reason else type(error).__name__}"
            f"{'; ' + reason[1].strip() if len(reason) > 1 else ''}); load the base model, with the label count, "
            "that the adapter was trained on"
        ) from None
