"""Federated distillation of decoders: clients send their top-k next-token log-probabilities on a
public set of prompts and responses instead of weights, and the server trains the student decoder
on the merged distributions.

A decoder's output at one position is a distribution over its whole vocabulary (49,152 tokens for
SmolLM2), so clients send its k most likely tokens (ids and log-probabilities) at every target
position of the public set: positions x k x 2 values, a few per cent of the full distributions,
and most of their mass. The server weights each client's probabilities by its examples, sums
them per token over the union of the clients' top-k tokens, renormalises over that union, and
trains the student with the token-level KD loss (`fedlm.core.distillation.merge_top_k`,
`sparse_distillation_loss`; Hinton et al. 2015, arXiv:1503.02531, on the sparse support). Clients
may run decoders of different sizes: they must share the student's vocabulary (checked).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedlm.algorithms.distillation import FederatedDistillation
from fedlm.core.distillation import merge_top_k
from fedlm.core.seeding import derive_seed
from fedlm.core.strategies import Strategy
from fedlm.core.update import ClientUpdate
from fedlm.data.dataset import TextDataset
from fedlm.errors import ConfigError, WireError
from fedlm.tasks.distillation import TOP_K_TOKENS, distil_tokens, target_positions, vocabulary_fingerprint
from fedlm.tasks.text import EncodedDataset

if TYPE_CHECKING:
    from fedlm.server.global_model import GlobalModel


class DecoderDistillation(FederatedDistillation):
    """Federated distillation (see `FederatedDistillation`) for a causal LM task: `public`, the
    public conversations or texts as the task read them; `student`, the decoder the server trains,
    with its `tokenizer`; `top_k`, the tokens each client sends per position; `temperature`,
    `epochs`, `learning_rate` and `batch_size`, the student's training. Clients' probabilities are
    weighted by their examples."""

    def __init__(
        self,
        public: TextDataset,
        student: torch.nn.Module,
        tokenizer: Any,
        *,
        top_k: int = 16,
        temperature: float = 1.0,
        epochs: int = 1,
        learning_rate: float = 5e-5,
        batch_size: int = 8,
        weighting: str = "examples",
    ) -> None:
        if not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
        if weighting != "examples":
            raise ConfigError(
                f"distillation of decoders weights clients by their examples; weighting {weighting!r} weighs class "
                "distributions, which a decoder's top-k are not"
            )
        super().__init__(
            public.texts, student, tokenizer, temperature=temperature, epochs=epochs, learning_rate=learning_rate,
            batch_size=batch_size,
        )  # fmt: skip
        self.public_data = public
        self.top_k = top_k
        self.vocabulary = vocabulary_fingerprint(tokenizer)
        self._encoded: EncodedDataset | None = None
        self._positions: int | None = None

    def client_config(self) -> dict[str, Any]:
        return {
            "temperature": self.settings.temperature,
            "output": "top_k",
            "top_k": self.top_k,
            "digest_epochs": 0,
            "public_examples": len(self.public.texts),
            "public_fingerprint": self.public.fingerprint,
            "vocabulary": self.vocabulary,
        }

    def join(self, clients: list[Any], target_keys: dict[str, list[str]]) -> None:
        """In process: every client (whose tokenizer must have the student's vocabulary) predicts
        on the public set from now on (a decoder's clients declare no labels)."""
        for client in clients:
            if vocabulary_fingerprint(client.tokenizer) != self.vocabulary:
                raise ConfigError(
                    f"client {client.name}: its tokenizer's vocabulary ({len(client.tokenizer.get_vocab())} tokens) is "
                    f"not the student's ({len(self.tokenizer.get_vocab())} tokens); distillation of decoders compares "
                    "next-token distributions, so every decoder needs the student's tokenizer"
                )
            client.join_distillation(self.public_data.texts, self.public_data.labels)

    def encoded(self, model: GlobalModel) -> EncodedDataset:
        """The public set as the task encodes it with the student's tokenizer."""
        if self._encoded is None:
            self._encoded = model.encode(self.public_data.texts, self.public_data.labels, owner="public set")
            self._positions = target_positions(self._encoded)
        return self._encoded

    def upload_numel(self, model: GlobalModel, name: str | None = None) -> int:
        self.encoded(model)
        return self._positions * self.top_k

    def check_update(self, model: GlobalModel, update: ClientUpdate) -> None:
        """A reply's top-k must be log-probabilities (<= 0, summing to at most 1 per position) of
        token ids the vocabulary has: a WireError (the client is dropped) otherwise."""
        tokens = update.extras.get(TOP_K_TOKENS)
        if tokens is None or set(update.extras) != {TOP_K_TOKENS}:
            raise WireError(f"a top-k reply carries the delta and exactly one extra vector, {TOP_K_TOKENS!r}")
        vocabulary = model.template.config.vocab_size
        if not ((tokens >= 0) & (tokens < vocabulary) & (tokens == tokens.round())).all():
            raise WireError(f"{TOP_K_TOKENS} holds values that are not token ids in [0, {vocabulary})")
        values = update.delta.view(-1, self.top_k)
        if (values > 1e-4).any() or (values.double().logsumexp(dim=-1) > 1e-3).any():
            raise WireError("the top-k values are not log-probabilities (each <= 0, summing to at most 1)")

    def aggregate(
        self,
        model: GlobalModel,
        strategy: Strategy,
        updates: list[ClientUpdate],
        seed: int,
        round_number: int,
        summed: None = None,
    ) -> dict[str, Any]:
        """The clients' top-k merged (`merge_top_k`, weighted by examples), then the student trained
        on them; its parameters become the global parameters."""
        tokens = [update.extras[TOP_K_TOKENS].view(-1, self.top_k).long() for update in updates]
        values = [update.delta.view(-1, self.top_k) for update in updates]
        merged_tokens, probabilities = merge_top_k(tokens, values, [update.num_examples for update in updates])
        trained = model.model()
        loss = distil_tokens(
            trained, self.encoded(model), merged_tokens, probabilities.float(), self.settings.temperature,
            self.settings.epochs, self.settings.learning_rate, self.settings.batch_size, model.pad_id,
            derive_seed(seed, "student", round_number), model.options.device,
        )  # fmt: skip
        model.params = model.read(trained)
        return {
            "student_loss": loss,
            "soft_target_tokens": float((probabilities > 0).sum(dim=-1).double().mean()),  # the unions' mean size
            "soft_target_confidence": float(probabilities.max(dim=-1).values.mean()),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # no digest step: nothing of a round is needed by the next

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None
