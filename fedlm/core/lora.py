"""LoRA structure in a flat parameter vector, and what averaging the factors costs.

A LoRA layer adds B A (B: out x r, A: r x in) to a frozen weight. Averaging clients' A and B
separately (FedIT, Zhang et al. 2024, arXiv:2310.05920) gives (sum_k w_k B_k)(sum_k w_k A_k),
which is not the average update sum_k w_k B_k A_k; `lora_aggregation_error` measures the gap
per layer, relative to the exact average, so users see what inexact averaging costs.
`svd_refactor` instead re-factors the exact average to the adapters' rank (FlexLoRA-style, Bai
et al. 2024, arXiv:2402.11505): the best rank-r approximation in Frobenius norm.
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


def lora_pairs(spec: ParamSpec) -> list[LoraPair]:
    """The LoRA layers whose A and B are both in the vector (PEFT names: `<layer>.lora_A.<adapter>.weight`)."""
    offsets, position = {}, 0
    for name, shape in zip(spec.names, spec.shapes):
        size = math.prod(shape)
        offsets[name] = (slice(position, position + size), tuple(shape))
        position += size
    pairs = []
    for name, (a_slice, a_shape) in offsets.items():
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        if b_name in offsets:
            b_slice, b_shape = offsets[b_name]
            pairs.append(LoraPair(name.split(".lora_A.")[0], a_slice, a_shape, b_slice, b_shape))
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
    global_params: torch.Tensor, new_params: torch.Tensor, updates: list[ClientUpdate], pairs: list[LoraPair]
) -> dict[str, float]:
    """||sum_k w_k B_k A_k - B_new A_new||_F / ||sum_k w_k B_k A_k||_F for each layer and overall
    (`overall`: the same ratio over all layers' entries), with w_k the example-count weights and
    each client's factors = global + its delta."""
    errors: dict[str, float] = {}
    difference_sq, exact_sq = 0.0, 0.0
    for pair in pairs:
        exact = weighted_products(global_params, updates, pair)
        merged = new_params[pair.b].view(pair.b_shape).double() @ new_params[pair.a].view(pair.a_shape).double()
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
