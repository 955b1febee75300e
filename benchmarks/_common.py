"""Helpers shared by the benchmarks: tables that are printed and saved."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[_format(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def save(name: str, title: str, body: str, command: str) -> Path:
    """Prints a result and saves it as benchmarks/results/<name>.md with how it was made."""
    RESULTS.mkdir(exist_ok=True)
    text = (f"# {title}\n\n{body}\n\nCommand: `{command}`  \n"
            f"Machine: {platform.machine()}, {platform.system()}, Python "
            f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    print(text)
    print(f"saved to {path}")
    return path


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
