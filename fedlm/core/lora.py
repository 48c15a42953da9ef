"""LoRA structure in a flat parameter vector, and what averaging the factors costs.

A LoRA layer adds B A (B: out x r, A: r x in) to a frozen weight. Averaging clients' A and B
separately (FedIT, Zhang et al. 2024, arXiv:2310.05920) gives (sum_k w_k B_k)(sum_k w_k A_k),
which is not the average update sum_k w_k B_k A_k; `lora_aggregation_error` measures the gap
per layer, relative to the exact average, so users see what inexact averaging costs.
`svd_refactor` instead re-factors the exact average to the adapters' rank (FlexLoRA-style, Bai
et al. 2024, arXiv:2402.11505): the best rank-r approximation in Frobenius norm. `fold_products`
is FLoRA's exact aggregation (Wang et al. 2024, arXiv:2409.05976): stacking the clients' factors,
[w_1 B_1 ... w_K B_K] [A_1; ...; A_K] = sum_k w_k B_k A_k, is added to the frozen base weight
and the adapter starts again from its initialisation, so ranks never grow.

Clients' factors here are in the global layout (`fedlm.core.layout`): B already rescaled to the
global scaling, lower ranks zero-padded; the products are in units of the global B A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedlm.core.params import ParamSpec
from fedlm.core.update import ClientUpdate


@dataclass(frozen=True)
class LoraPair:
    """Where one layer's A and B sit in the flat vector."""

    layer: str
    a: slice
    a_shape: tuple[int, int]
    b: slice
    b_shape: tuple[int, int]
    base: slice | None = None  # the frozen weight B A adds to, when the vector holds it
    base_shape: tuple[int, int] | None = None


def lora_pairs(spec: ParamSpec) -> list[LoraPair]:
    """The LoRA layers whose A and B are both in the vector (PEFT names: `<layer>.lora_A.<adapter>.weight`)."""
    offsets = spec.locations()
    pairs = []
    for name, (a_slice, a_shape) in offsets.items():
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        if b_name in offsets:
            layer = name.split(".lora_A.")[0]
            b_slice, b_shape = offsets[b_name]
            base_slice, base_shape = offsets.get(f"{layer}.base_layer.weight", (None, None))
            pairs.append(LoraPair(layer, a_slice, a_shape, b_slice, b_shape, base_slice, base_shape))
    return pairs


def weighted_products(global_params: torch.Tensor, updates: list[ClientUpdate], pair: LoraPair) -> torch.Tensor:
    """sum_k w_k B_k A_k in float64, each client's factors = global + its delta, w_k by examples."""
    total = sum(update.num_examples for update in updates)
    exact = torch.zeros(pair.b_shape[0], pair.a_shape[1], dtype=torch.float64)
    for update in updates:
        a = (global_params[pair.a] + update.delta[pair.a]).view(pair.a_shape).double()
        b = (global_params[pair.b] + update.delta[pair.b]).view(pair.b_shape).double()
        exact.addmm_(b, a, alpha=update.num_examples / total)
    return exact


def lora_aggregation_error(
    global_params: torch.Tensor,
    new_params: torch.Tensor,
    updates: list[ClientUpdate],
    pairs: list[LoraPair],
    scalings: dict[str, float] | None = None,
) -> dict[str, float]:
    """||sum_k w_k B_k A_k - B_new A_new||_F / ||sum_k w_k B_k A_k||_F for each layer and overall
    (`overall`: the same ratio over all layers' entries), with w_k the example-count weights and
    each client's factors = global + its delta. With `scalings` (layer -> s), what the new global
    model folded into a base weight counts too: B_new A_new + (W_new - W) / s."""
    errors: dict[str, float] = {}
    difference_sq, exact_sq = 0.0, 0.0
    for pair in pairs:
        exact = weighted_products(global_params, updates, pair)
        merged = new_params[pair.b].view(pair.b_shape).double() @ new_params[pair.a].view(pair.a_shape).double()
        if scalings is not None and pair.base is not None:
            folded = (new_params[pair.base].double() - global_params[pair.base].double()) / scalings[pair.layer]
            merged += folded.view(pair.base_shape)
        layer_difference, layer_exact = float((exact - merged).square().sum()), float(exact.square().sum())
        errors[pair.layer] = math.sqrt(layer_difference / layer_exact) if layer_exact > 0 else 0.0
        difference_sq, exact_sq = difference_sq + layer_difference, exact_sq + layer_exact
    errors["overall"] = math.sqrt(difference_sq / exact_sq) if exact_sq > 0 else 0.0
    return errors


def svd_refactor(
    global_params: torch.Tensor, new_params: torch.Tensor, updates: list[ClientUpdate], pairs: list[LoraPair]
) -> torch.Tensor:
    """`new_params` with each layer's A and B replaced by the rank-r truncated SVD of the exact
    weighted product, U_r S_r V_r^T, split evenly: B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T."""
    result = new_params.clone()
    for pair in pairs:
        left, values, right = torch.linalg.svd(weighted_products(global_params, updates, pair), full_matrices=False)
        rank = pair.a_shape[0]
        root = values[:rank].sqrt()
        result[pair.b] = (left[:, :rank] * root).to(result.dtype).reshape(-1)
        result[pair.a] = (root.unsqueeze(1) * right[:rank]).to(result.dtype).reshape(-1)
    return result


def fold_products(
    global_params: torch.Tensor,
    new_params: torch.Tensor,
    updates: list[ClientUpdate],
    pairs: list[LoraPair],
    scalings: dict[str, float],
    initial_params: torch.Tensor,
) -> torch.Tensor:
    """`new_params` with s * sum_k w_k B_k A_k added to each layer's base weight (s: the layer's
    LoRA scaling) and the factors set back to `initial_params`' (B = 0 there, so the adapter adds
    nothing until clients train it again)."""
    result = new_params.clone()
    for pair in pairs:
        if pair.base_shape != (pair.b_shape[0], pair.a_shape[1]):
            raise ValueError(f"LoRA layer {pair.layer}: no base weight of shape out x in in the vector")
        exact = weighted_products(global_params, updates, pair) * scalings[pair.layer]
        base = global_params[pair.base].view(pair.base_shape).double()
        result[pair.base] = (base + exact).to(result.dtype).reshape(-1)
        result[pair.a] = initial_params[pair.a]
        result[pair.b] = initial_params[pair.b]
    return result
