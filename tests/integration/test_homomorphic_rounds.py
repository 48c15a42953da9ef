"""Rounds under homomorphic aggregation: plain FedAvg's model, ciphertexts only on the server,
dropped and malformed clients, and what it refuses."""

from __future__ import annotations

import json

import pytest
import tenseal
import torch

from conftest import fail_in_round
from fedlm.config import parse_config
from fedlm.errors import ConfigError
from fedlm.protocol import FitRes
from fedlm.runtime import build_simulation, run_federation


def simulation(config_data_factory, encrypted: bool, **sections):
    data = config_data_factory(num_clients=3, rounds=2, **sections)
    if encrypted:
        data["homomorphic"] = {}
    return build_simulation(parse_config(data))


def test_encrypted_rounds_give_plain_fedavgs_model_and_the_server_holds_only_ciphertexts(config_data_factory):
    plain = simulation(config_data_factory, encrypted=False).server
    start = plain.global_params.clone()
    plain.fit(rounds=2)
    encrypted = simulation(config_data_factory, encrypted=True).server
    seen = []
    fit = encrypted.transport.fit
    encrypted.transport.fit = lambda messages, deadline: seen.append(fit(messages, deadline)) or seen[-1]
    history = encrypted.fit(rounds=2)
    assert all(record["homomorphic"]["finished"] == 3 for record in history)
    replies = [reply for round_replies in seen for reply in round_replies.values()]
    assert len(replies) == 6
    for reply in replies:  # no plaintext update: ciphertexts the server's public context cannot decrypt
        assert reply.delta.numel() == 0 and reply.extras and all(key.startswith("ciphertext.") for key in reply.extras)
        assert all(value.dtype == torch.uint8 for value in reply.extras.values())
    assert not tenseal.context_from(encrypted.channel.public_context).is_private()  # the server holds no secret key
    # CKKS at scale 2^40: errors around 1e-7 on values of order 1e-2
    assert (encrypted.global_params - plain.global_params).abs().max() < 1e-5
    assert (plain.global_params - start).abs().max() > 1e-3  # while the model itself moved


def test_a_failed_client_and_a_malformed_ciphertext_are_dropped_and_the_rest_are_summed(config_data_factory):
    plain = simulation(config_data_factory, encrypted=False).server
    encrypted = simulation(config_data_factory, encrypted=True).server
    fail_in_round(plain, {"client-1", "client-2"}, 1)
    fail_in_round(encrypted, {"client-2"}, 1)
    chunks = -(-(encrypted.global_model.spec.numel + 1) // 4096)  # as many as the server expects, none a ciphertext
    forged = {f"ciphertext.{index}": torch.tensor([8, 1, 2], dtype=torch.uint8) for index in range(chunks)}
    encrypted.clients[1].fit = lambda ins: FitRes(torch.zeros(0), 5, {}, forged)
    plain.fit(rounds=1)
    record = encrypted.fit(rounds=1)[0]
    reasons = {item["client"]: item["reason"] for item in record["dropped"]}
    assert "lost power" in reasons["client-2"] and "not CKKS ciphertexts" in reasons["client-1"]
    assert record["clients"] == 1 and record["homomorphic"]["decrypted_by"] == "client-0"
    assert (encrypted.global_params - plain.global_params).abs().max() < 1e-5


def test_homomorphic_aggregation_composes_with_client_side_dp_and_the_summary_says_so(config_data_factory, tmp_path):
    dp = {"noise_multiplier": 1.0, "clip_norm": 0.5, "noise": "clients"}
    history = run_federation(simulation(config_data_factory, encrypted=True, dp=dp))
    assert history[-1]["epsilon"] > history[0]["epsilon"] > 0
    assert all(record["homomorphic"]["finished"] == 3 for record in history)
    report = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    assert report["homomorphic_encryption"] and not report["secure_aggregation"] and report["differential_privacy"]
    assert "never a plaintext update" in report["server_sees"]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"secure_aggregation": {}}, "choose one of secure_aggregation and homomorphic"),
        (
            {"strategy": {"kind": "fedavg", "robust": {"kind": "median"}}},
            r"homomorphic gives the server only the sum.*strategy.robust",
        ),
        ({"dp": {"noise_multiplier": 1.0}}, "with homomorphic the server cannot add DP noise"),
        ({"homomorphic": {"poly_modulus_degree": 4096}}, "homomorphic.poly_modulus_degree"),
    ],
)
def test_settings_that_need_individual_updates_are_refused(config_data_factory, sections, message):
    data = config_data_factory(num_clients=3, rounds=1, **{"homomorphic": {}, **sections})
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_a_client_with_the_wrong_number_of_ciphertexts_is_dropped_alone(config_data_factory):
    plain = simulation(config_data_factory, encrypted=False).server
    encrypted = simulation(config_data_factory, encrypted=True).server
    fail_in_round(plain, {"client-0"}, 1)
    honest = encrypted.clients[0].fit

    def doubled(ins):  # the first replier: it no longer decides how many ciphertexts there should be
        reply = honest(ins)
        reply.extras[f"ciphertext.{len(reply.extras)}"] = reply.extras["ciphertext.0"].clone()
        return reply

    encrypted.clients[0].fit = doubled
    plain.fit(rounds=1)
    record = encrypted.fit(rounds=1)[0]
    assert [item["client"] for item in record["dropped"]] == ["client-0"]
    assert "ciphertexts, expected" in record["dropped"][0]["reason"] and record["clients"] == 2
    assert (encrypted.global_params - plain.global_params).abs().max() < 1e-5


def test_a_ciphertext_under_another_key_fails_the_sums_integrity_check_and_the_round_is_refused(config_data_factory):
    from fedlm.privacy.homomorphic import HomomorphicKeys

    encrypted = simulation(config_data_factory, encrypted=True).server
    encrypted.clients[1].homomorphic_keys = HomomorphicKeys()  # a node given the wrong he-secret.ctx
    before = encrypted.global_params.clone()
    record = encrypted.fit(rounds=1)[0]
    assert "integrity check" in record["homomorphic"]["error"] and record.get("skipped")
    assert torch.equal(encrypted.global_params, before)
