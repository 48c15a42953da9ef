"""Write the walkthrough's data: three organisations' BBC News articles (one CSV each, label-skewed)
and a validation set for the server, carved from the bundled dataset.

    python examples/deployment/prepare_data.py --out data/deployment
"""

import argparse
import csv
from pathlib import Path

import torch

from fedlm.data import load_bundled_dataset

CLIENTS = ("clinic-a", "clinic-b", "clinic-c")


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("data/deployment"))
    parser.add_argument("--per-client", type=int, default=160)
    parser.add_argument("--validation", type=int, default=200)
    args = parser.parse_args()
    data = load_bundled_dataset("bbc-news")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [{"text": data.texts[i], "label": data.labels[i]} for i in order]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "validation.csv", rows[: args.validation])
    rest = sorted(rows[args.validation :], key=lambda row: row["label"])  # sorted by label: each client is skewed
    step = len(rest) // len(CLIENTS)
    for index, name in enumerate(CLIENTS):
        chunk = rest[index * step : (index + 1) * step]
        picks = torch.randperm(len(chunk), generator=torch.Generator().manual_seed(index)).tolist()
        write_csv(args.out / f"{name}.csv", [chunk[i] for i in picks[: args.per_client]])
        print(f"wrote {args.out / name}.csv")
    print(f"wrote {args.out / 'validation.csv'}")


if __name__ == "__main__":
    main()
