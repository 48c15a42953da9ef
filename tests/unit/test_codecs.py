"""Codecs round-trip within their stated error; error feedback sends what top-k drops."""

from __future__ import annotations

import pytest
import torch

from fedlm.core.compression import CastCodec, ErrorFeedback, Int8Codec, TopKCodec, payload_bytes


@pytest.fixture
def vector() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(10_001, generator=generator) * torch.logspace(-3, 1, 10_001)  # many magnitudes


@pytest.mark.parametrize(("dtype", "relative"), [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_casts_halve_the_bytes_within_their_precision(vector, dtype, relative):
    codec = CastCodec(dtype)
    parts = codec.encode(vector)
    decoded = codec.decode(parts, vector.numel())
    assert payload_bytes(parts) == 2 * vector.numel()
    normal = vector.abs() > 1e-4  # float16's normal range starts at 6.1e-5
    assert ((decoded - vector).abs()[normal] <= relative * vector.abs()[normal]).all()


def test_int8_is_a_quarter_of_the_bytes_and_within_half_a_step_per_block(vector):
    codec = Int8Codec(block=256)
    parts = codec.encode(vector)
    decoded = codec.decode(parts, vector.numel())
    blocks = -(-vector.numel() // 256)
    assert payload_bytes(parts) == vector.numel() + 4 * blocks
    for index in range(blocks):
        part = slice(index * 256, (index + 1) * 256)
        step = vector[part].abs().max() / 127
        assert (decoded[part] - vector[part]).abs().max() <= step / 2 + 1e-7
    assert torch.equal(codec.decode(codec.encode(torch.zeros(300)), 300), torch.zeros(300))


def test_topk_keeps_exactly_the_largest_coordinates(vector):
    codec = TopKCodec(fraction=0.01)
    parts = codec.encode(vector)
    decoded = codec.decode(parts, vector.numel())
    kept = decoded != 0
    assert int(kept.sum()) == 100
    assert vector.abs()[kept].min() >= vector.abs()[~kept].max()
    assert torch.equal(decoded[kept], vector[kept])
    assert payload_bytes(parts) == 100 * (4 + 4)


def test_error_feedback_eventually_sends_every_coordinate():
    target = torch.linspace(1.0, 2.0, 100)  # the same update every round
    plain, feedback = TopKCodec(fraction=0.05), ErrorFeedback(TopKCodec(fraction=0.05))
    sent_plain, sent_feedback = torch.zeros(100), torch.zeros(100)
    rounds = 60
    for _ in range(rounds):
        sent_plain += plain.decode(plain.encode(target), 100)
        sent_feedback += feedback.codec.decode(feedback.encode(target), 100)
    # without feedback the same 5 coordinates win every round; with it the sum tracks rounds * target
    assert int((sent_plain != 0).sum()) == 5
    assert torch.allclose(sent_feedback + feedback.residual, rounds * target, atol=1e-4)
    assert (feedback.residual.abs() <= 2.0 * 20).all() and (sent_feedback > 0).all()


@pytest.mark.parametrize(
    ("codec", "parts", "problem"),
    [
        (Int8Codec(block=4), {"q": torch.zeros(8, dtype=torch.int8), "scale": torch.ones(1)}, "scales"),
        (TopKCodec(), {"indices": torch.tensor([0, 9]), "values": torch.ones(2)}, "outside"),
        (CastCodec(), {"values": torch.zeros(3, dtype=torch.float16)}, "shape"),
    ],
)
def test_malformed_payloads_are_refused(codec, parts, problem):
    with pytest.raises(ValueError, match=problem):
        codec.decode(parts, 8)
