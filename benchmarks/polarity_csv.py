"""Write the Pang & Lee polarity train/dev split (see `assets.polarity_splits`) as CSV files for the CLI.

Usage::

    PYTHONPATH=src:. python benchmarks/polarity_csv.py OUT_DIR   # writes OUT_DIR/train.csv and OUT_DIR/dev.csv
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from benchmarks.assets import polarity_splits


def write_splits(out_dir: Path) -> dict[str, Path]:
    """Write `train.csv` and `dev.csv` (columns `text`, `label`; 1 positive, 0 negative) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in polarity_splits().items():
        paths[split] = out_dir / f"{split}.csv"
        with open(paths[split], "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return paths


if __name__ == "__main__":
    for split, path in write_splits(Path(sys.argv[1] if len(sys.argv) > 1 else "polarity_csv")).items():
        print(split, path)
