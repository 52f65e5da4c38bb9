"""Writing results: atomic metrics JSON and aligned Markdown tables for CLIs and report.md.

Atomic writes matter because benchmarks are long and get interrupted: a reader must see either the previous
complete file or the new complete file, never half of one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_table", "to_jsonable", "write_metrics_json"]


def to_jsonable(value: Any) -> Any:
    """Convert tensors, numpy values, paths and dataclasses to plain JSON types.

    Non-finite floats become the strings "inf", "-inf" and "nan" (strict JSON has no such numbers; PSNR of
    identical images is legitimately infinite and must survive the round trip unambiguously).
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(item) for item in value]
    # torch tensors and numpy arrays/scalars, without importing either here.
    if hasattr(value, "tolist") and callable(value.tolist):
        return to_jsonable(value.tolist())
    if hasattr(value, "item") and callable(value.item):
        return to_jsonable(value.item())
    raise TypeError(f"cannot convert {type(value).__name__} to JSON")


def write_metrics_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically (compress.io.atomic_path), inf/NaN as strings."""
    from compress.io import atomic_path

    target = Path(path)
    text = json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n"
    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return target


def _format_cell(value: Any, float_digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            value = value.item()  # zero-dimensional tensor / numpy scalar
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{float_digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str | tuple[str, str]],
    float_digits: int | Mapping[str, int] = 4,
) -> str:
    """A Markdown pipe table whose columns are also padded, so it reads well both raw (CLI) and rendered.

    ``columns`` are row keys, or ``(key, header)`` pairs. Missing values print as "-", numeric columns are
    right-aligned, floats use ``float_digits`` decimals (one number for all, or per key).
    """
    keys = [column if isinstance(column, str) else column[0] for column in columns]
    headers = [column if isinstance(column, str) else column[1] for column in columns]
    if isinstance(float_digits, Mapping):
        digits = {key: int(float_digits.get(key, 4)) for key in keys}
    else:
        digits = dict.fromkeys(keys, int(float_digits))

    cells = [[_format_cell(row.get(key), digits[key]) for key in keys] for row in rows]
    numeric = [
        any(_is_numeric(row.get(key)) for row in rows)
        and all(row.get(key) is None or _is_numeric(row.get(key)) for row in rows)
        for key in keys
    ]
    widths = [max([len(str(header)), 3] + [len(line[index]) for line in cells]) for index, header in enumerate(headers)]

    def render(values: Sequence[str]) -> str:
        padded = [
            value.rjust(width) if right else value.ljust(width) for value, width, right in zip(values, widths, numeric)
        ]
        return "| " + " | ".join(padded) + " |"

    separator = (
        "| " + " | ".join(("-" * (w - 1) + ":") if right else "-" * w for w, right in zip(widths, numeric)) + " |"
    )
    lines = [render([str(header) for header in headers]), separator]
    lines.extend(render(line) for line in cells)
    return "\n".join(lines)
