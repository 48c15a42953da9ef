"""Running a federation's rounds, whatever the transport: the run folder, metrics and checkpoints.

A run folder is fedlm's own: it carries a marker, fedlm-run.json (fedlm version, creation time,
config hash), and `check_run_folder` decides, before any model is loaded, whether a run may write
into a folder: a new or empty one (or one holding only `fedlm partition`'s report) always; a fedlm
run folder with `resume` (continue its checkpoint) or `overwrite` (delete fedlm's outputs in it and
start afresh); never a folder fedlm did not make, nor one where the final model would replace the
run's input model. Every output is written to a temporary file or folder and renamed into place,
so a crash never leaves a truncated metrics.jsonl or model, and JSON never holds bare NaN.

A run in which no round aggregated (every round skipped, or stopped before the first) still
writes its metrics and summary.json ("aggregated_rounds": 0 and a "warning"), saves no model, and
ends with a `ClientError`: `fedlm run` exits 2, as for every fedlm error.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fedlm
from fedlm.checkpoint import data_fingerprints, load_checkpoint, save_checkpoint
from fedlm.config import RunConfig
from fedlm.data.report import write_partition_report
from fedlm.errors import ClientError, ConfigError
from fedlm.files import finite_json, json_text, replace_folder, write_atomic
from fedlm.server import FedServer
from fedlm.tasks import Task
from fedlm.tasks.text import EncodedDataset

RUN_MARKER = "fedlm-run.json"
PARTITION_REPORT = ("partition.json", "partition.png")  # also written by `fedlm partition`
PARTITION_TEMPORARY = "partition.tmp"  # the report is written there, then its files renamed into place
# what a run writes into its folder: all that --overwrite deletes (with their .tmp and .old copies)
RUN_OUTPUTS = (
    RUN_MARKER, "config.yaml", *PARTITION_REPORT, "metrics.jsonl", "samples", "checkpoint", "model", "summary.json",
)  # fmt: skip
SAMPLE_CHARACTERS = 100  # how much of the first sample a round record and its log line show


@dataclass
class Federation:
    """A server ready to run a config's rounds, with its federated validation set, the number of
    clients sampled per round (None: all), the partition summary (None when unknown), the
    validation prompts the global model answers after every round (`Task.sample_prompts`), and
    each client's group (its main value of `data.group_column`) that its test results count for."""

    config: RunConfig
    server: FedServer
    validation: EncodedDataset | None
    clients_per_round: int | None
    partition: dict[str, Any] | None = None
    sample_prompts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    client_groups: dict[str, str] = dataclasses.field(default_factory=dict)


def check_run_folder(
    config: RunConfig, resume: bool = False, overwrite: bool = False, allow_data_change: bool = False
) -> None:
    """Refuse (ConfigError) a run that would write where it must not; reads the folder, changes nothing.

    The final model (output_dir/model) must not be, or hold, an input model of the run. The output
    folder must be new, empty, hold only a partition report, or be a fedlm run folder (with its
    marker); a fedlm run folder that holds a run needs `resume` or `overwrite`. Called by the CLI
    before the model is loaded, and again by `run_federation` before it writes."""
    output = Path(config.output_dir)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the output folder, --overwrite deletes it: give one of them")
    if allow_data_change and not resume:
        raise ConfigError("--allow-data-change applies to --resume only (a fresh run has no earlier data to compare)")
    final = (output / "model").resolve()
    for field, name in input_models(config):
        source = Path(name).resolve()
        if Path(name).exists() and (source == final or final in source.parents or source == output.resolve()):
            raise ConfigError(
                f"{field} {name} is where this run would write its outputs (output_dir {output}, final model "
                f"{output / 'model'}): the run would replace its own input model; choose another output_dir"
            )
    if not output.exists():
        return
    if not output.is_dir():
        raise ConfigError(f"output_dir {output} is a file, not a folder; choose a new or empty folder as output_dir")
    entries = {path.name for path in output.iterdir()}
    if RUN_MARKER not in entries:
        if entries <= set(PARTITION_REPORT):  # empty, or what `fedlm partition` wrote there
            return
        raise ConfigError(
            f"output_dir {output} is not empty and is not a fedlm run folder (it has no {RUN_MARKER}); fedlm does not "
            f"write among files it did not make (it holds {', '.join(sorted(entries)[:5])}"
            f"{', ...' if len(entries) > 5 else ''}): choose a new or empty folder as output_dir (--output-dir)"
        )
    if resume or overwrite:
        return
    if any((output / name / "state.json").exists() for name in ("checkpoint", "checkpoint.old")):
        raise ConfigError(
            f"output_dir {output} holds a fedlm run with a checkpoint: pass --resume to continue it, --overwrite to "
            "start afresh (deletes its checkpoint, metrics and model), or choose another output_dir"
        )
    raise ConfigError(
        f"output_dir {output} holds an earlier fedlm run's outputs: pass --overwrite to start afresh (deletes them), "
        "or choose another output_dir"
    )


def input_models(config: RunConfig) -> list[tuple[str, str]]:
    """(config field, model name or folder) of every model the run starts from."""
    models = [("model.name", config.model.name)]
    algorithm = config.algorithm
    if getattr(algorithm, "student", None):
        models.append(("algorithm.student", algorithm.student))
    models += [("algorithm.client_models", name) for name in getattr(algorithm, "client_models", None) or []]
    return models


def start_run_folder(config: RunConfig, resume: bool, overwrite: bool) -> None:
    """Make the output folder fedlm's: with `overwrite`, delete fedlm's outputs in it (and nothing
    else); write the marker (a resumed run keeps its creation time)."""
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if overwrite:
        paths = [output / PARTITION_TEMPORARY]
        paths += [output / f"{name}{suffix}" for name in RUN_OUTPUTS for suffix in ("", ".tmp", ".old")]
        for path in paths:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    created = None
    if resume:
        try:
            created = json.loads((output / RUN_MARKER).read_text()).get("created")
        except (OSError, ValueError, AttributeError):
            created = None
    marker = {
        "fedlm_version": fedlm.__version__,
        "created": created or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config_sha256": hashlib.sha256(json_text(config.model_dump(mode="json")).encode()).hexdigest(),
    }
    write_atomic(output / RUN_MARKER, json_text(marker, indent=2) + "\n")


def run_federation(
    federation: Federation,
    on_round_end: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    allow_data_change: bool = False,
) -> list[dict[str, Any]]:
    """Run the configured rounds, checkpointing after round 0 and every `checkpoint_every` rounds.

    Writes fedlm-run.json, config.yaml, the partition report, metrics.jsonl (round 0 = before
    training), checkpoint/, model/ and summary.json (`run_summary`) into the output folder, each
    atomically, once `check_run_folder` allows it. With `resume`, continues from the folder's
    checkpoint (an error if there is none, it is corrupt, the config differs, or, unless
    `allow_data_change`, a client's data changed); with `overwrite`, first deletes an earlier run's
    outputs there. Records hold null (and a "non_finite" list) where a metric was NaN or infinite.
    Returns the records of rounds 1 and up; raises ClientError, after writing the summary, when no
    round aggregated.
    """
    config, server = federation.config, federation.server
    check_run_folder(config, resume, overwrite, allow_data_change)
    output = Path(config.output_dir)
    checkpoint = output / "checkpoint"
    config_data = config.model_dump(mode="json")
    fingerprints = data_fingerprints(server)
    records = load_checkpoint(server, checkpoint, config_data, fingerprints, allow_data_change) if resume else []
    start_run_folder(config, resume, overwrite)
    write_atomic(output / "config.yaml", config.to_yaml())
    if federation.partition is not None:
        write_partition(federation.partition, output)
    settings = config.federation
    write_metrics(output, records)

    def record_round(record: dict[str, Any]) -> None:
        if federation.client_groups and record.get("client_test"):
            column = config.data.group_column
            record[f"client_test_by_{column}"] = grouped_client_test(record["client_test"], federation.client_groups)
        if federation.sample_prompts:
            record.update(write_samples(server, federation.sample_prompts, output, record["round"]))
        record = finite_json(record)  # as written: NaN and infinity as None, listed under "non_finite"
        records.append(record)
        write_metrics(output, records)
        due = settings.checkpoint_every and record["round"] % settings.checkpoint_every == 0
        if record["round"] == 0 or due or record["round"] == settings.rounds:
            save_checkpoint(server, checkpoint, records, config_data, fingerprints)
        if on_round_end is not None:
            on_round_end(record)

    if not records:
        before = server.transport.bytes.snapshot()
        metrics = server.evaluate_global_model(federation.validation, settings.clients_per_evaluation)
        record_round({"round": 0, **metrics, **server.transport.bytes.since(before)})
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
        save_checkpoint(server, checkpoint, records, config_data, fingerprints)
    summary = run_summary(records, server.global_model.task.metrics)
    summary["privacy"] = privacy_report(server, config, records)
    if server.stop_reason is not None:
        summary["stopped"] = server.stop_reason
    if settings.max_total_bytes is not None:
        summary["communication_budget"] = {"max_total_bytes": settings.max_total_bytes,
                                           "training_rounds_bytes": server.bytes_spent()}  # fmt: skip
    if summary["aggregated_rounds"] == 0:
        why = server.stop_reason or (
            f"every round was skipped: fewer than federation.min_clients ({settings.min_clients}) clients sent a "
            "valid update (each round's 'dropped' in metrics.jsonl names the clients and why)"
        )
        summary["warning"] = f"no round aggregated, so no model was saved: {why}"
    else:
        save_model(server, output / "model")
    write_atomic(output / "summary.json", json_text(summary, indent=2))
    if summary["aggregated_rounds"] == 0:
        raise ClientError(f"{output}: {summary['warning']}")
    return [record for record in records if record["round"] > 0]


def grouped_client_test(client_test: list[dict[str, Any]], groups: dict[str, str]) -> dict[str, dict[str, float]]:
    """The clients' test results by group (a language, a source: `Federation.client_groups`): per group its
    clients, their test examples, and each metric's mean over the clients that report it, weighted
    by test examples."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for item in client_test:
        if item["client"] in groups and item.get("num_examples"):
            grouped.setdefault(groups[item["client"]], []).append(item)
    result = {}
    for group, items in sorted(grouped.items()):
        examples = sum(item["num_examples"] for item in items)
        result[group] = {"clients": len(items), "num_examples": examples}
        for key in sorted({key for item in items for key, value in item.items() if isinstance(value, float)}):
            reporting = [item for item in items if isinstance(item.get(key), float)]
            weight = sum(item["num_examples"] for item in reporting)
            result[group][key] = sum(item[key] * item["num_examples"] for item in reporting) / weight
    return result


def write_metrics(output: Path, records: list[dict[str, Any]]) -> None:
    """metrics.jsonl, one record a line, rewritten whole through a temporary file: a crash leaves
    the previous version (the checkpoint holds the records too, and a resume rewrites it)."""
    write_atomic(output / "metrics.jsonl", "".join(json_text(record) + "\n" for record in records))


def write_samples(server: FedServer, prompts: list[dict[str, Any]], output: Path, round_number: int) -> dict:
    """The global model's responses to `prompts`, one JSON object a line (the prompt, its reference,
    the response and the task's scores of it) in samples/round_N.jsonl; the record's "sample" (the
    first response, shortened), "sample_seconds", and each score's mean as "sample_<score>"."""
    start = time.perf_counter()
    responses = server.global_model.generate(prompts)
    scores = server.global_model.task.score_samples(prompts, responses)
    lines = [
        json_text({**prompt, "response": response, **score}) + "\n"
        for prompt, response, score in zip(prompts, responses, scores)
    ]
    (output / "samples").mkdir(exist_ok=True)
    write_atomic(output / "samples" / f"round_{round_number}.jsonl", "".join(lines))
    means = {f"sample_{name}": sum(score[name] for score in scores) / len(scores) for name in scores[0]}
    return {"sample": shortened(responses[0]), **means, "sample_seconds": time.perf_counter() - start}


def shortened(text: str, limit: int = SAMPLE_CHARACTERS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_partition(summary: dict[str, Any], output: Path) -> None:
    """The partition report, written into a temporary folder and its files renamed into `output`."""
    temporary = output / PARTITION_TEMPORARY
    shutil.rmtree(temporary, ignore_errors=True)
    write_partition_report(summary, temporary)
    for name in PARTITION_REPORT:
        if (temporary / name).exists():  # no heatmap without class labels or a partition column
            (temporary / name).replace(output / name)
    shutil.rmtree(temporary, ignore_errors=True)


def save_model(server: FedServer, folder: Path) -> None:
    """The final model, saved into a temporary folder renamed over `folder` when complete."""
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    server.save(temporary)
    replace_folder(temporary, folder)


def run_summary(records: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, Any]:
    """The run in numbers: rounds, how many aggregated (not skipped), the last round's metrics
    (validation, and the clients' distribution of the task's `metrics`),
    and the bytes sent down and up in total and per client, summed over all records (round 0's
    evaluation included)."""
    clients: dict[str, dict[str, int]] = {}
    for record in records:
        for name, moved in record.get("client_bytes", {}).items():
            total = clients.setdefault(name, {"down": 0, "up": 0})
            total["down"] += moved["down"]
            total["up"] += moved["up"]
    last = records[-1] if records else {}
    reported = ("val_", *(f"client_{metric}_" for metric in metrics))
    final = {key: value for key, value in last.items() if key.startswith(reported)}
    non_finite = [key for key in last.get("non_finite", []) if key in final]
    if non_finite:
        final["non_finite"] = non_finite
    return {
        "rounds": last.get("round", 0),
        "aggregated_rounds": sum(1 for record in records if record["round"] > 0 and not record.get("skipped")),
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
                if server.algorithm.replaces_weights
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


METRIC_ABBREVIATIONS = {"accuracy": "acc", "macro_f1": "f1"}  # how round lines name metrics


def round_line(record: dict[str, Any], rounds: int, task: Task) -> str:
    """One round's record as a line of the log: the task's validation metrics, and the clients'
    distribution of its headline metric (a non-finite metric, null in the record, reads "non-finite")."""
    metrics, headline = task.metrics, task.headline

    def number(key: str, spec: str) -> str:
        value = record[key]
        return "non-finite" if value is None else format(value, spec)

    parts = [f"round {record['round']}/{rounds}"]
    if "train_loss" in record:
        parts.append(f"train loss {number('train_loss', '.4f')}")
    if "learning_rate" in record:
        parts.append(f"lr {record['learning_rate']:.2e}")
    if record.get("train_skipped_examples"):
        parts.append(f"{record['train_skipped_examples']} examples too long, skipped")
    shown = [metric for metric in metrics if f"val_{metric}" in record]
    if shown:
        parts.append("  ".join(f"val {abbreviated(metric)} {number(f'val_{metric}', '.3f')}" for metric in shown))
    if f"client_{headline}_mean" in record:
        parts.append(
            f"client {abbreviated(headline)} mean {number(f'client_{headline}_mean', '.3f')} "
            f"worst {number(f'client_{headline}_worst', '.3f')} p10 {number(f'client_{headline}_p10', '.3f')}"
        )
    if "seconds" in record:
        parts.append(f"{number('seconds', '.1f')} s")
    if "bytes_up" in record:
        parts.append(f"up {megabytes(record['bytes_up'])}  down {megabytes(record['bytes_down'])}")
    if "epsilon" in record:
        parts.append(f"epsilon {number('epsilon', '.3f')} (delta {record['delta']:g})")
    if "dp_sgd_epsilon_max" in record:
        parts.append(f"DP-SGD epsilon max {number('dp_sgd_epsilon_max', '.3f')} (delta {record['dp_sgd_delta']:g})")
    if record.get("dropped"):
        parts.append(f"dropped {', '.join(item['client'] for item in record['dropped'])} (reasons in the log)")
    if record.get("skipped"):
        parts.append("skipped: too few valid updates")
    line = "  ".join(parts)
    if "sample" not in record:
        return line
    scores = [
        f"{key.removeprefix('sample_')} {value:.3f}"
        for key, value in record.items()
        if key.startswith("sample_") and key != "sample_seconds"
    ]
    means = f" (mean {', '.join(scores)})" if scores else ""
    return f"{line}\n  sample{means}: {record['sample']!r}"


def abbreviated(metric: str) -> str:
    return METRIC_ABBREVIATIONS.get(metric, metric)
