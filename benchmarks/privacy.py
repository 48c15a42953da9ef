"""What privacy costs in time: secure aggregation for 10, 50, 100 clients with LoRA-sized updates,
DP-FedAvg's clipping and noise against plain FedAvg aggregation, and CKKS homomorphic aggregation
(one client's encryption and bytes, the server's sum of 10 clients, a key holder's decryption).

Secure aggregation runs every client's and the server's side in this one process
(`fedlm.privacy.secure_aggregation.secure_sum`), so the table gives the total, the mean per
client (what each client adds to its round: keys, shares, masks) and the server's unmasking,
next to summing the same plain vectors. Prints tables and writes benchmarks/results/privacy.json.
Not a test: nothing asserts time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedlm.client import FedClient
from fedlm.core.privacy import DifferentialPrivacy
from fedlm.core.strategies import FedAvg
from fedlm.core.update import ClientUpdate
from fedlm.privacy import secure_aggregation as secagg


def timed_secure_sum(count: int, length: int) -> dict[str, float]:
    """Secure aggregation of `count` random updates of `length` values, its stages timed."""
    settings = secagg.SecAggSettings.for_clients(count, clip_range=1.0, graph_seed=1)
    generator = torch.Generator().manual_seed(0)
    updates = {i: 0.01 * torch.randn(length, generator=generator) for i in range(count)}
    start = time.perf_counter()
    server = secagg.SecAggServer(settings)
    clients = {i: secagg.SecAggClient(i, settings, server.neighbours[i]) for i in range(count)}
    keys = {i: client.public_keys() for i, client in clients.items()}
    server.mask_public = {i: pair[1] for i, pair in keys.items()}
    outbox = {i: client.share_keys({v: keys[v] for v in client.neighbours}) for i, client in clients.items()}
    masked = {}
    for i, client in clients.items():
        masked[i] = client.masked_input(updates[i], {s: sent[i] for s, sent in outbox.items() if i in sent})
    clients_done = time.perf_counter()
    revealed = {i: client.reveal(set(client.neighbours), set()) for i, client in clients.items()}
    total = server.unmask(masked, revealed, set(clients))
    end = time.perf_counter()
    plain_start = time.perf_counter()
    plain = torch.stack(list(updates.values())).sum(dim=0)
    plain_seconds = time.perf_counter() - plain_start
    assert (total - plain).abs().max() < count * settings.step + 1e-6  # the benchmark checks its own answer
    return {
        "clients": count,
        "neighbours": settings.num_neighbours,
        "threshold": settings.threshold,
        "total_seconds": end - start,
        "client_seconds_mean": (clients_done - start) / count,
        "server_seconds": end - clients_done,
        "plain_sum_seconds": plain_seconds,
    }


def timed_dp(count: int, length: int, repeats: int = 5) -> dict[str, float]:
    """DP-FedAvg's aggregation (clip, noise, average) against FedAvg's, same updates."""
    generator = torch.Generator().manual_seed(0)
    updates = [ClientUpdate(0.01 * torch.randn(length, generator=generator), 10) for _ in range(count)]
    params = torch.zeros(length)

    def seconds(strategy) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            strategy.aggregate(params, updates)
            best = min(best, time.perf_counter() - start)
        return best

    def client_share_seconds() -> float:  # noise on the clients: one client's clip and noise share
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            FedClient._privatize(updates[0].delta, 1.0, 1.0 / count**0.5)
            best = min(best, time.perf_counter() - start)
        return best

    plain = seconds(FedAvg())
    private = seconds(DifferentialPrivacy(noise_multiplier=1.0, clip_norm=1.0, expected_clients=count))
    distributed = seconds(
        DifferentialPrivacy(noise_multiplier=1.0, clip_norm=1.0, expected_clients=count, noise="clients")
    )
    return {
        "clients": count,
        "fedavg_seconds": plain,
        "dp_seconds": private,
        "overhead": private / plain - 1,
        "dp_noise_on_clients_server_seconds": distributed,
        "client_share_seconds": client_share_seconds(),
    }


def timed_homomorphic(length: int, clients: int = 10) -> dict[str, float]:
    """CKKS (TenSEAL, 8192 slots / 2, 128-bit security): per client encrypt, server add, decrypt."""
    from fedlm.privacy.homomorphic import HomomorphicKeys, add_encrypted

    keys = HomomorphicKeys()
    update = 0.01 * torch.randn(length, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    encrypted = keys.encrypt(update)
    encrypt_seconds = time.perf_counter() - start
    start = time.perf_counter()
    total = add_encrypted(keys.public_context(), [encrypted] * clients, length)
    add_seconds = time.perf_counter() - start
    start = time.perf_counter()
    decrypted = keys.decrypt(total, length)
    decrypt_seconds = time.perf_counter() - start
    assert torch.allclose(decrypted, clients * update, atol=1e-4)
    return {
        "values": length,
        "ciphertexts_per_client": len(encrypted),
        "bytes_per_client": sum(len(chunk) for chunk in encrypted),
        "plain_bytes_per_client": 4 * length,
        "encrypt_seconds_per_client": encrypt_seconds,
        "server_add_seconds": add_seconds,
        "clients_added": clients,
        "decrypt_seconds": decrypt_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1_000_000, help="values per update (LoRA-sized)")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    args = parser.parse_args()
    torch.set_num_threads(2)
    secure = [timed_secure_sum(count, args.length) for count in args.clients]
    table = Table(title=f"secure aggregation of {args.length:,}-value updates (all parties in one process)")
    for column in ("clients", "neighbours k", "threshold t", "total s", "per client s", "server s", "plain sum s"):
        table.add_column(column, justify="right")
    for row in secure:
        table.add_row(
            str(row["clients"]), str(row["neighbours"]), str(row["threshold"]), f"{row['total_seconds']:.2f}",
            f"{row['client_seconds_mean']:.3f}", f"{row['server_seconds']:.2f}", f"{row['plain_sum_seconds']:.3f}",
        )  # fmt: skip
    console = Console(width=140)
    console.print(table)
    dp = timed_dp(10, args.length)
    console.print(
        f"DP-FedAvg aggregation of 10 x {args.length:,}: {dp['dp_seconds']:.3f} s against FedAvg's "
        f"{dp['fedavg_seconds']:.3f} s ({dp['overhead']:+.0%}); with the noise on the clients the server takes "
        f"{dp['dp_noise_on_clients_server_seconds']:.4f} s and each client {dp['client_share_seconds']:.4f} s to clip "
        "and add its share"
    )
    he = timed_homomorphic(args.length)
    console.print(
        f"CKKS: one client encrypts {he['values']:,} values in {he['encrypt_seconds_per_client']:.1f} s into "
        f"{he['ciphertexts_per_client']} ciphertexts, {he['bytes_per_client'] / 1e6:.1f} MB (plain float32: "
        f"{he['plain_bytes_per_client'] / 1e6:.1f} MB); the server adds {he['clients_added']} clients' in "
        f"{he['server_add_seconds']:.1f} s; decrypting the sum takes {he['decrypt_seconds']:.1f} s"
    )
    out = Path(__file__).parent / "results" / "privacy.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"secure_aggregation": secure, "dp": dp, "homomorphic": he}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
