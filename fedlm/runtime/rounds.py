"""Running a federation's rounds, whatever the transport: the run folder, metrics and checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlm.checkpoint import load_checkpoint, save_checkpoint
from fedlm.config import RunConfig
from fedlm.data.report import write_partition_report
from fedlm.server import FedServer
from fedlm.tasks.classification import EncodedDataset


@dataclass
class Federation:
    """A server ready to run a config's rounds, with its federated validation set, the number of
    clients sampled per round (None: all) and the partition summary (None when unknown)."""

    config: RunConfig
    server: FedServer
    validation: EncodedDataset | None
    clients_per_round: int | None
    partition: dict[str, Any] | None = None


def run_federation(
    federation: Federation, on_round_end: Callable[[dict[str, Any]], None] | None = None, resume: bool = False
) -> list[dict[str, Any]]:
    """Run the configured rounds, checkpointing after round 0 and every `checkpoint_every` rounds.

    Writes config.yaml, the partition report, metrics.jsonl (round 0 = before training),
    checkpoint/, model/ and summary.json (`run_summary`) into the output folder. With `resume`, continues from the folder's
    checkpoint (an error if there is none, it is corrupt, or the config differs). Returns the
    records of rounds 1 and up.
    """
    config, server = federation.config, federation.server
    output = Path(config.output_dir)
    checkpoint = output / "checkpoint"
    config_data = config.model_dump(mode="json")
    records = load_checkpoint(server, checkpoint, config_data) if resume else []
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(config.to_yaml())
    if federation.partition is not None:
        write_partition_report(federation.partition, output)
    settings = config.federation
    with (output / "metrics.jsonl").open("w") as metrics_file:
        metrics_file.writelines(json.dumps(record) + "\n" for record in records)

        def record_round(record: dict[str, Any]) -> None:
            records.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            due = settings.checkpoint_every and record["round"] % settings.checkpoint_every == 0
            if record["round"] == 0 or due or record["round"] == settings.rounds:
                save_checkpoint(server, checkpoint, records, config_data)
            if on_round_end is not None:
                on_round_end(record)

        if not records:
            before = server.byte_counts()
            metrics = server.evaluate_global_model(federation.validation, settings.clients_per_evaluation)
            record_round({"round": 0, **metrics, **server.bytes_since(before)})
        if settings.rounds > server.round:
            server.fit(
                rounds=settings.rounds - server.round,
                local_epochs=config.training.local_epochs,
                clients_per_round=federation.clients_per_round,
                validation=federation.validation,
                clients_per_evaluation=settings.clients_per_evaluation,
                on_round_end=record_round,
            )
        if server.stop_reason is not None:  # e.g. the privacy budget: keep where it stopped
            save_checkpoint(server, checkpoint, records, config_data)
    server.save(output / "model")
    summary = run_summary(records)
    summary["privacy"] = privacy_report(server, config, records)
    if server.stop_reason is not None:
        summary["stopped"] = server.stop_reason
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return [record for record in records if record["round"] > 0]


def run_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run in numbers: rounds, the last round's metrics, and the bytes sent down and up in
    total and per client, summed over all records (round 0's evaluation included)."""
    clients: dict[str, dict[str, int]] = {}
    for record in records:
        for name, moved in record.get("client_bytes", {}).items():
            total = clients.setdefault(name, {"down": 0, "up": 0})
            total["down"] += moved["down"]
            total["up"] += moved["up"]
    last = records[-1] if records else {}
    final = {key: value for key, value in last.items() if key.startswith(("val_", "client_accuracy", "client_macro"))}
    return {
        "rounds": last.get("round", 0),
        "final": final,
        "bytes_down": sum(record.get("bytes_down", 0) for record in records),
        "bytes_up": sum(record.get("bytes_up", 0) for record in records),
        "clients": dict(sorted(clients.items())),
    }


def privacy_report(server: FedServer, config: RunConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the run protected beyond keeping text on the clients, and what the server could see."""
    secure, encrypted = config.secure_aggregation is not None, config.homomorphic is not None
    report: dict[str, Any] = {
        "secure_aggregation": secure,
        "homomorphic_encryption": encrypted,
        "differential_privacy": server.privacy is not None,
        "sample_level_dp": config.training.dp_sgd is not None,
    }
    if secure:
        report["server_sees"] = "only the sum of the updates of the clients that finished each round (SecAgg+)"
    elif encrypted:
        report["server_sees"] = (
            "the clients' updates encrypted (CKKS) and their sum, decrypted by a client; never a plaintext update"
        )
    else:
        report["server_sees"] = "every client's update"
    if config.training.dp_sgd is not None:
        report["dp_sgd"] = dp_sgd_report(config, records)
    if server.privacy is None:
        return report
    settings, accounting = config.dp, server.privacy
    report.update(
        {
            "level": (
                "client: each client's probabilities on the public set in a round are clipped and noised"
                if server.distillation is not None
                else "client: each client's whole update in a round is clipped and noised (DP-FedAvg)"
            ),
            "epsilon": accounting.accountant.epsilon(accounting.delta),
            "delta": accounting.delta,
            "accountant": accounting.accountant.kind,
            "noise_multiplier": accounting.noise_multiplier,
            "sampling_rate": accounting.sampling_rate,
            "rounds_accounted": sum(int(step[2]) for step in accounting.accountant.steps),
            "clip_norm": {"initial": settings.clip_norm, "final": server.strategy.clip_norm},
            "adaptive_clipping": settings.adaptive is not None,
            "noise_added_by": "the server" if settings.noise == "server" else "the clients, each its share",
        }
    )
    if settings.noise == "server":
        report["server_sees"] += " before clipping and noise: the server is trusted; the released model is private"
    elif not secure and not encrypted:
        report["server_sees"] += ", clipped and with its share of the noise; the sum carries the full noise"
    return report


def dp_sgd_report(config: RunConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Sample-level DP: each client's examples are protected by its own epsilon, the largest of
    which (over every round) holds for every client."""
    settings = config.training.dp_sgd
    latest: dict[str, float] = {}  # each client's epsilon after the last round it trained in
    for record in records:
        latest.update(record.get("client_dp_sgd_epsilon", {}))
    return {
        "level": "sample: each client trains with DP-SGD (per-example clipping and noise, Poisson-sampled steps)",
        "epsilon_max": max(latest.values(), default=0.0),
        "client_epsilon": dict(sorted(latest.items())),
        "delta": settings.delta,
        "accountant": settings.accountant,
        "noise_multiplier": settings.noise_multiplier,
        "clip_norm": settings.clip_norm,
        "protects": "each training example of a client, against the server, other clients and the released model",
    }


def privacy_line(report: dict[str, Any]) -> str:
    """The privacy report in one line: what the server saw and the epsilons spent."""
    parts = [f"privacy: the server saw {report['server_sees']}"]
    if report["differential_privacy"]:
        parts.append(f"client-level DP epsilon {report['epsilon']:.2f} (delta {report['delta']:g})")
    if report["sample_level_dp"]:
        dp_sgd = report["dp_sgd"]
        parts.append(f"DP-SGD epsilon up to {dp_sgd['epsilon_max']:.2f} per client (delta {dp_sgd['delta']:g})")
    return "; ".join(parts)


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def round_line(record: dict[str, Any], rounds: int) -> str:
    parts = [f"round {record['round']}/{rounds}"]
    if "train_loss" in record:
        parts.append(f"train loss {record['train_loss']:.4f}")
    if "val_accuracy" in record:
        parts.append(f"val acc {record['val_accuracy']:.3f}  val f1 {record['val_macro_f1']:.3f}")
    if "client_accuracy_mean" in record:
        parts.append(
            f"client acc mean {record['client_accuracy_mean']:.3f} worst {record['client_accuracy_worst']:.3f} "
            f"p10 {record['client_accuracy_p10']:.3f}"
        )
    if "seconds" in record:
        parts.append(f"{record['seconds']:.1f} s")
    if "bytes_up" in record:
        parts.append(f"up {megabytes(record['bytes_up'])}  down {megabytes(record['bytes_down'])}")
    if "epsilon" in record:
        parts.append(f"epsilon {record['epsilon']:.3f} (delta {record['delta']:g})")
    if "dp_sgd_epsilon_max" in record:
        parts.append(f"DP-SGD epsilon max {record['dp_sgd_epsilon_max']:.3f} (delta {record['dp_sgd_delta']:g})")
    if record.get("dropped"):
        parts.append(f"dropped {', '.join(item['client'] for item in record['dropped'])} (reasons in the log)")
    if record.get("skipped"):
        parts.append("skipped: too few valid updates")
    return "  ".join(parts)
