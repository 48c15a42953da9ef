"""Rounds under secure aggregation: the same model as plain FedAvg, dropouts, and what the server saw."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import fail_in_round
from fedlm.config import parse_config
from fedlm.errors import ConfigError
from fedlm.privacy.accounting import PrivacyAccountant, compute_epsilon
from fedlm.protocol import StageRes
from fedlm.runtime import build_simulation


def simulation(config_data_factory, secure: bool, **sections):
    data = config_data_factory(num_clients=4, rounds=2, **sections)
    if secure:
        data["secure_aggregation"] = {"clip_range": 1.0}
    return build_simulation(parse_config(data))


def test_secure_rounds_give_plain_fedavgs_model_and_the_server_sees_only_masked_vectors(config_data_factory):
    plain = simulation(config_data_factory, secure=False).server
    start = plain.global_params.clone()
    plain.fit(rounds=2)
    secure = simulation(config_data_factory, secure=True).server
    seen = []
    fit = secure.transport.fit
    secure.transport.fit = lambda messages, deadline: seen.append(fit(messages, deadline)) or seen[-1]
    history = secure.fit(rounds=2)
    assert all(record["secure_aggregation"]["finished"] == 4 for record in history)
    replies = [reply for round_replies in seen for reply in round_replies.values()]
    assert len(replies) == 8 and all(reply.delta.dtype == torch.int64 for reply in replies)  # ring elements only
    # quantization to 2^30 levels over [-1, 1] and float32 sums: far below the updates' size
    assert (secure.global_params - plain.global_params).abs().max() < 1e-5
    assert (plain.global_params - start).abs().max() > 1e-3  # while the model itself moved


def test_a_client_lost_after_sharing_its_keys_is_dropped_and_the_rest_are_summed(config_data_factory):
    plain = simulation(config_data_factory, secure=False).server
    secure = simulation(config_data_factory, secure=True).server
    for server in (plain, secure):
        fail_in_round(server, {"client-2"}, 1)
    plain.fit(rounds=1)
    record = secure.fit(rounds=1)[0]
    assert record["clients"] == 3 and record["dropped"][0]["client"] == "client-2"
    assert "lost power" in record["dropped"][0]["reason"]
    assert (secure.global_params - plain.global_params).abs().max() < 1e-5


def test_too_many_lost_clients_skip_the_round_and_keep_the_model(config_data_factory):
    secure = simulation(config_data_factory, secure=True).server
    fail_in_round(secure, {"client-0", "client-1", "client-2"}, 1)
    before = secure.global_params.clone()
    record = secure.fit(rounds=1)[0]
    assert "cannot unmask" in record["secure_aggregation"]["error"]
    assert torch.equal(secure.global_params, before)


def test_secure_aggregation_composes_with_client_side_dp(config_data_factory):
    dp = {"noise_multiplier": 1.0, "clip_norm": 0.5, "noise": "clients"}
    history = simulation(config_data_factory, secure=True, dp=dp).server.fit(rounds=2)
    assert history[-1]["epsilon"] > history[0]["epsilon"] > 0
    assert all(record["secure_aggregation"]["finished"] == 4 for record in history)


def test_a_dropout_under_client_side_noise_is_accounted_at_the_noise_that_reached_the_sum(config_data_factory):
    dp = {"noise_multiplier": 1.0, "clip_norm": 0.5, "noise": "clients"}
    secure = simulation(config_data_factory, secure=True, dp=dp).server
    fail_in_round(secure, {"client-2"}, 2)
    history = secure.fit(rounds=2)
    assert history[1]["clients"] == 3 and history[1]["dp_round_noise_multiplier"] == pytest.approx(math.sqrt(3 / 4))
    accountant = PrivacyAccountant()
    accountant.step(1.0, 1.0)  # every client takes part: q = 1
    accountant.step(math.sqrt(3 / 4), 1.0)  # three of four noise shares reached the sum
    assert history[1]["epsilon"] == pytest.approx(accountant.epsilon(1e-5), rel=1e-9)
    assert history[1]["epsilon"] > compute_epsilon(1.0, 1.0, 2, 1e-5)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"strategy": {"kind": "scaffold"}}, r"\['strategy scaffold'\] need each one"),
        ({"dp": {"noise_multiplier": 1.0}}, "dp.noise: clients"),
        ({"communication": {"upload": {"kind": "int8"}}}, r"\['communication.upload'\] need each one"),
    ],
)
def test_settings_that_need_individual_updates_are_refused(config_data_factory, sections, message):
    data = config_data_factory(num_clients=4, rounds=1, **sections)
    data["secure_aggregation"] = {}
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def forge_stage(server, name: str, stage: str, forge) -> None:
    """Make client `name` answer `stage` with `forge(its honest reply)`."""
    client = next(client for client in server.clients if client.name == name)
    honest = client.stage

    def stage_(ins, honest=honest):
        reply = honest(ins)
        return forge(reply) if ins.stage == stage else reply

    client.stage = stage_


def _keys(**tensors):
    return lambda reply: StageRes(
        {}, {key: value for key, value in {**reply.tensors, **tensors}.items() if value is not None}
    )


@pytest.mark.parametrize(
    ("stage", "forge", "problem"),
    [
        ("secagg_keys", _keys(mask=None), "expected public keys 'channel' and 'mask' only"),
        ("secagg_keys", _keys(mask=torch.zeros(5, dtype=torch.uint8)), "must hold 32 bytes, got 5"),
        ("secagg_keys", _keys(mask=torch.zeros(32, dtype=torch.uint8)), "not a usable X25519 public key"),
        ("secagg_keys", _keys(channel=torch.zeros(32)), "byte string"),
        ("secagg_shares", lambda reply: StageRes({}, {**reply.tensors, "to.99": torch.zeros(160, dtype=torch.uint8)}),
         "expected sealed shares"),
        ("secagg_shares", lambda reply: StageRes({}, {k: v[:5] for k, v in reply.tensors.items()}), "must hold 160 bytes"),
    ],
)  # fmt: skip
def test_a_malformed_key_exchange_message_drops_its_sender_only(config_data_factory, stage, forge, problem):
    plain = simulation(config_data_factory, secure=False).server
    secure = simulation(config_data_factory, secure=True).server
    fail_in_round(plain, {"client-2"}, 1)
    forge_stage(secure, "client-2", stage, forge)
    plain.fit(rounds=1)
    record = secure.fit(rounds=1)[0]
    assert [item["client"] for item in record["dropped"]] == ["client-2"] and problem in record["dropped"][0]["reason"]
    assert record["clients"] == 3 and not record.get("skipped")
    assert (secure.global_params - plain.global_params).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("forge", "problem"),
    [
        (lambda reply: StageRes({}), "expected 'self_seed' and 'mask_key' shares only"),
        (lambda reply: StageRes({**reply.meta, "self_seed": dict.fromkeys(reply.meta["self_seed"], "zz")}),
         "must be a decimal string"),
        (lambda reply: StageRes({**reply.meta, "self_seed": {"77": "1"}}), "not asked for"),
    ],
)  # fmt: skip
def test_a_malformed_reveal_is_refused_and_the_sum_is_still_recovered_from_the_others(
    config_data_factory, forge, problem
):
    plain = simulation(config_data_factory, secure=False).server
    secure = simulation(config_data_factory, secure=True).server
    forge_stage(secure, "client-1", "secagg_reveal", forge)
    plain.fit(rounds=1)
    record = secure.fit(rounds=1)[0]
    assert record["clients"] == 4 and not record["dropped"]  # its masked update was summed
    assert problem in record["secure_aggregation"]["refused_reveals"]["client-1"]
    assert (secure.global_params - plain.global_params).abs().max() < 1e-5
