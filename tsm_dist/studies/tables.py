"""Result files of the studies and the demo: CSV of dataclass rows, and matplotlib set up for files."""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterable


def write_csv(rows: Iterable[Any], row_type: type, path: Path) -> None:
    """One line per dataclass row, columns in field order; NaN (not measured) is an empty cell."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(row_type)])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(row).items()})


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: plots are files; never open a window (login nodes have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
