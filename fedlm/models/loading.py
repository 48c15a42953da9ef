"""Loading a pretrained model (for a task's head) and its tokenizer from a local folder, offline."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from fedlm.errors import ModelError
from fedlm.models.registry import resolve_model_path

logger = logging.getLogger("fedlm")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars inside the block."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(name_or_path: str, owner: str = "model"):
    """The tokenizer saved next to the model (never downloaded)."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not name_or_path:
        raise ModelError(f"{owner}: the model has no name_or_path to load a tokenizer from; pass tokenizer=...")
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(name_or_path)))
    except (OSError, ValueError) as error:
        raise ModelError(
            f"{owner}: cannot load a tokenizer from {name_or_path}: {error}; pass tokenizer=..."
        ) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # decoders (GPT-2, Llama) often have none; padded positions are masked out of attention and loss
        tokenizer.pad_token = tokenizer.eos_token
        if name_or_path not in _PADDED_WITH_EOS:
            _PADDED_WITH_EOS.add(name_or_path)
            logger.warning("%s: its tokenizer has no pad token; padding with its end-of-sequence token %r",
                        name_or_path, tokenizer.eos_token)  # fmt: skip
    return tokenizer


_PADDED_WITH_EOS: set[str] = set()  # the tokenizers load_tokenizer said so for


def load_pretrained(auto_class: Any, name_or_path: str, seed: int, **options: Any) -> torch.nn.Module:
    """`auto_class.from_pretrained` (such as transformers' AutoModelForSequenceClassification) on a
    bundled name or folder, offline, with `options` (num_labels, problem_type, ...); a new head is
    initialised from `seed`. Tasks load their models through it (`fedlm.tasks.Task.load_model`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(name_or_path)
    try:
        with quiet_transformers(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return auto_class.from_pretrained(str(path), **options)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {name_or_path} from {path}: {error}") from error


QUANTIZED_DEVICES = ("cpu", "cuda", "xpu")  # where bitsandbytes runs 4- and 8-bit layers
COMPUTE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantized_loading(bits: str, device: str, mixed_precision: str = "no") -> dict[str, Any]:
    """`from_pretrained` options that load the base quantized to `bits` (4bit: NF4 with double
    quantization, computing in the dtype of `mixed_precision`, as QLoRA does; 8bit: LLM.int8())
    by bitsandbytes, straight onto `device`. The quantization is deterministic, so every
    participant gets the same base."""
    import importlib.util

    from fedlm.errors import ConfigError

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization {bits} needs bitsandbytes, which is not installed: pip install 'fedlm[qlora]'"
        )
    if device.partition(":")[0] not in QUANTIZED_DEVICES:
        raise ConfigError(
            f"model.quantization {bits}: bitsandbytes runs on {', '.join(QUANTIZED_DEVICES)}, not training.device "
            f"{device}; set model.quantization: none or another device"
        )
    from transformers import BitsAndBytesConfig

    if bits == "4bit":
        settings = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=COMPUTE_DTYPES[mixed_precision],
        )  # fmt: skip
    else:
        settings = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": settings, "device_map": {"": device}}


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model a PEFT adapter wraps) has a bitsandbytes-quantized base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_quantized", False))


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model a PEFT adapter wraps) is a transformers causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith("ForCausalLM")
