"""The bundled pretrained decoder (SmolLM2-135M-Instruct, converted from its GGUF file) and the
bundled dialogue corpora: the conversion and generation through the task (federated rounds on it
are in benchmarks/causal_lm.py; the tests' federations run on a tiny Llama)."""

import json

import pytest

from fedlm.data import load_bundled_dataset
from fedlm.models import load_tokenizer, resolve_model_path
from fedlm.models.registry import convert_gguf
from fedlm.tasks import CausalLMTask, task_of_model

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The name smollm2-135m resolved into a fresh cache (so the conversion runs here)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDLM_CACHE", str(cache))
        yield cache


def test_smollm2_is_converted_once_into_the_cache_and_answers_through_the_task(smollm2):
    folder = resolve_model_path("smollm2-135m")
    assert folder.parent == smollm2 / "models" and (folder / "model.safetensors").is_file()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("smollm2-135m") == folder  # the second time: the converted folder as it is
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    task = CausalLMTask(max_new_tokens=12)
    model = task.load_model("smollm2-135m", None, seed=0)
    assert isinstance(task_of_model(model), CausalLMTask)
    assert sum(parameter.numel() for parameter in model.parameters()) == 134_515_008
    tokenizer = load_tokenizer("smollm2-135m")
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    prompt = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    (answer,) = task.generate(model, tokenizer, [prompt], max_length=64, device="cpu")
    assert "Paris" in answer, answer


def test_a_gguf_file_transformers_cannot_read_is_an_error_naming_it(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(7))
    with pytest.raises(Exception, match=r"broken.gguf: transformers cannot read this GGUF file"):
        convert_gguf(tmp_path / "broken.gguf", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_the_dialogue_corpora_load_as_conversations():
    chitchat = CausalLMTask().read(load_bundled_dataset("chitchat"), owner="data.dataset")
    assert len(chitchat) == 4017 and len(set(chitchat.columns["topic"])) == 35
    assert all(turns[0]["role"] == "user" and any(t["role"] == "assistant" for t in turns) for turns in chitchat.labels)
    # one turn per speaker change: the roles alternate
    assert all(a["role"] != b["role"] for turns in chitchat.labels for a, b in zip(turns, turns[1:]))
    chatterbot = CausalLMTask().read(load_bundled_dataset("chatterbot"), owner="data.dataset")
    assert len(chatterbot) == 7642 and len(set(chatterbot.columns["language"])) == 28
    assert chatterbot.columns["language"].count("english") == 2026
