"""Client layouts: lower LoRA ranks and stack's base weights, mapped to and from the global vector."""

from __future__ import annotations

import pytest
import torch

from fedlm.core.layout import ClientLayout, with_rank
from fedlm.core.params import ParamSpec

LAYER = "m.layer.0.query"
GLOBAL = ParamSpec(
    names=(f"{LAYER}.base_layer.weight", f"{LAYER}.lora_A.default.weight", f"{LAYER}.lora_B.default.weight", "m.head"),
    shapes=((5, 6), (8, 6), (5, 8), (3,)),
)


def blocks(vector: torch.Tensor, spec: ParamSpec) -> dict[str, torch.Tensor]:
    return {name: vector[where].view(shape) for name, (where, shape) in spec.locations().items()}


def test_with_rank_changes_only_the_lora_factors_and_drops_what_is_asked():
    low = with_rank(GLOBAL, 2, drop=(".base_layer.weight",))
    assert low.names == GLOBAL.names[1:]
    assert low.shapes == ((2, 6), (5, 2), (3,))
    assert with_rank(GLOBAL, 8) == GLOBAL


def test_restrict_takes_the_leading_rank_and_rescales_b_and_embed_keeps_the_scaled_product():
    """A rank-2 client with scaling s_k = 4 s (alpha / r with r 8 -> 2): s_k B_k A_k must equal
    s B A of its embedding, and restricting gives the leading 2 rows of A and columns of B."""
    download = with_rank(GLOBAL, 2)
    upload = with_rank(GLOBAL, 2, drop=(".base_layer.weight",))
    layout = ClientLayout(GLOBAL, download, upload, {LAYER: 4.0})
    assert not layout.same_ranks and not layout.is_identity
    generator = torch.Generator().manual_seed(0)
    global_vector = torch.randn(GLOBAL.numel, generator=generator)
    restricted = blocks(layout.restrict(global_vector), download)
    full = blocks(global_vector, GLOBAL)
    assert torch.equal(restricted[f"{LAYER}.lora_A.default.weight"], full[f"{LAYER}.lora_A.default.weight"][:2])
    assert torch.allclose(
        restricted[f"{LAYER}.lora_B.default.weight"], full[f"{LAYER}.lora_B.default.weight"][:, :2] / 4
    )
    assert torch.equal(restricted[f"{LAYER}.base_layer.weight"], full[f"{LAYER}.base_layer.weight"])
    assert layout.restrict(global_vector, upload=True).numel() == upload.numel

    client_values = torch.randn(upload.numel, generator=generator)
    own = blocks(client_values, upload)
    embedded = blocks(layout.embed(client_values, global_vector), GLOBAL)
    client_product = 4.0 * own[f"{LAYER}.lora_B.default.weight"] @ own[f"{LAYER}.lora_A.default.weight"]
    global_product = embedded[f"{LAYER}.lora_B.default.weight"] @ embedded[f"{LAYER}.lora_A.default.weight"]
    assert torch.allclose(global_product, client_product, atol=1e-6)
    assert torch.equal(embedded[f"{LAYER}.lora_A.default.weight"][2:], torch.zeros(6, 6))  # padding
    assert torch.equal(embedded[f"{LAYER}.base_layer.weight"], full[f"{LAYER}.base_layer.weight"])  # not sent
    assert torch.equal(embedded["m.head"], own["m.head"])


def test_the_same_layout_is_the_identity():
    layout = ClientLayout(GLOBAL, GLOBAL, GLOBAL, {LAYER: 1.0})
    assert layout.is_identity
    vector = torch.randn(GLOBAL.numel)
    assert torch.equal(layout.embed(layout.restrict(vector), torch.zeros_like(vector)), vector)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (with_rank(GLOBAL, 9), "at most the global rank"),
        (ParamSpec(GLOBAL.names[:3], GLOBAL.shapes[:3]), "lacks parameter 'm.head'"),
        (ParamSpec((*GLOBAL.names, "m.extra"), (*GLOBAL.shapes, (2,))), "'m.extra' is not in the global model"),
        (ParamSpec(GLOBAL.names, ((5, 6), (8, 6), (5, 8), (4,))), r"'m.head' has shape \[4\]"),
    ],
)
def test_a_client_that_does_not_fit_the_global_layout_is_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        ClientLayout(GLOBAL, spec, spec, {})
