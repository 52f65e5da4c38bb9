"""Quality budgets: how much worse than the uncompressed student a compressed one may be (a TOML file).

    [limits]
    psnr = { drop = 0.5 }       # higher is better: the compressed student may lose at most 0.5
    stlpips = { rise = 0.03 }   # lower is better: it may gain at most 0.03
    [beat_bicubic]
    metrics = ["stlpips"]       # and must still beat bicubic upsampling on these
    [parity]                    # export only: runtime output vs PyTorch output, PSNR floor in dB
    fp32 = 40.0
    fp16 = 35.0

`check_budget` compares the mean scores of a quality table ({"student_vs_hr", "original_vs_hr",
"bicubic_vs_hr", "higher_is_better"}, as compress.quality.compare.quality writes it) with a budget and lists every
item with its measured value, its limit and whether it passed; a metric that was not measured is "skipped"
(never passed). The default budget ships in compress/assets/budgets/default.toml; `compress prune` exits
with BUDGET_EXIT_CODE when an item fails, and export's gates read the same format.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

BUDGET_EXIT_CODE = 3
DEFAULT_BUDGET_NAME = "default.toml"


def default_budget_path(name: str = DEFAULT_BUDGET_NAME) -> Path:
    return Path(str(resources.files("compress") / "assets" / "budgets" / name))


def load_budget(path: Path | str | None = None, default_name: str = DEFAULT_BUDGET_NAME) -> dict:
    """The budget at `path` (None: the shipped `default_name`), checked: unknown keys and bad values name the file."""
    path = Path(path) if path is not None else default_budget_path(default_name)
    if not path.is_file():
        raise FileNotFoundError(f"--budget {path}: no such file (the default is {default_budget_path(default_name)})")
    try:
        budget = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"--budget {path}: not valid TOML ({error})") from None
    unknown = sorted(set(budget) - {"limits", "beat_bicubic", "parity"})
    if unknown:
        raise ValueError(f"--budget {path}: unknown sections {unknown}; allowed: [limits], [beat_bicubic], [parity]")
    parity = budget.get("parity", {})
    for precision, floor in parity.items():
        if precision not in ("fp32", "fp16", "int8") or not isinstance(floor, (int, float)) or floor <= 0:
            raise ValueError(f"--budget {path}: parity.{precision} must be fp32, fp16 or int8 = a PSNR floor in dB > 0, "
                             f"got {floor!r}")
    for metric, limit in budget.get("limits", {}).items():
        if not isinstance(limit, dict) or len(limit) != 1 or next(iter(limit)) not in ("drop", "rise"):
            raise ValueError(f"--budget {path}: limits.{metric} must be {{ drop = X }} or {{ rise = X }}, got {limit!r}")
        value = next(iter(limit.values()))
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"--budget {path}: limits.{metric} must be a number >= 0, got {value!r}")
    metrics = budget.get("beat_bicubic", {}).get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise ValueError(f"--budget {path}: beat_bicubic.metrics must be a list of metric names")
    return {"path": str(path), "limits": budget.get("limits", {}), "beat_bicubic": metrics, "parity": parity}


def check_budget(quality: dict, budget: dict) -> dict:
    """{"passed": bool, "items": [...], "failed": [names]} for `quality` (module docstring) against `budget`."""
    student, original = quality.get("student_vs_hr", {}), quality.get("original_vs_hr", {})
    bicubic, higher = quality.get("bicubic_vs_hr", {}), quality.get("higher_is_better", {})
    items = []
    for metric, limit in budget["limits"].items():
        kind, allowed = next(iter(limit.items()))
        name = f"{metric} {kind} <= {allowed:g}"
        if metric not in student or metric not in original:
            items.append({"item": name, "status": "skipped", "why": f"{metric} was not measured"})
            continue
        change = original[metric] - student[metric] if kind == "drop" else student[metric] - original[metric]
        items.append({"item": name, "status": "passed" if change <= allowed else "failed", "measured": change,
                      "student": student[metric], "original": original[metric]})
    for metric in budget["beat_bicubic"]:
        name = f"{metric} better than bicubic"
        if metric not in student or metric not in bicubic or metric not in higher:
            items.append({"item": name, "status": "skipped", "why": f"{metric} was not measured"})
            continue
        better = student[metric] > bicubic[metric] if higher[metric] else student[metric] < bicubic[metric]
        items.append({"item": name, "status": "passed" if better else "failed", "student": student[metric],
                      "bicubic": bicubic[metric]})
    failed = [i["item"] for i in items if i["status"] == "failed"]
    return {"budget": budget["path"], "passed": not failed, "failed": failed, "items": items}
