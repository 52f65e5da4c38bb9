"""What every reference-kit stage shares: skip/extend/restart of a stage folder, the settings check of a
resumed run, the stage's Accelerate run state (:class:`StageRun`) and its metrics file.

A stage folder ``<out>/<stage>`` is a run folder of ``distill.training``: ``log.csv``,
``checkpoints/step-NNNNNNN/`` (Accelerate state + ``trainer_state.json``) and, once finished, ``metrics.json``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.training import (
    LOG_NAME,
    CheckpointManager,
    CsvLog,
    GeneratorStates,
    latest_trainer_state,
    list_checkpoints,
    make_accelerator,
    sync_lr,
)

METRICS_NAME = "metrics.json"
# A stage keeps its newest checkpoint only: each one is written atomically, so a crash never leaves none.
KEEP_CHECKPOINTS = 1


class StageRun:
    """The training state of one stage on an ``Accelerator``: checkpoints, RNG, LR schedule and log.

    The stage builds its model, optimiser and LambdaLR as usual and hands them to :meth:`prepare`; named
    ``torch.Generator`` objects go to :meth:`register_generators`. :meth:`resume` then loads the newest
    checkpoint (if any), re-plans the LR for the current total steps and truncates the log to the checkpoint,
    so the loop continues exactly where the uninterrupted run would be. Stages run on one process and place
    tensors on ``device`` themselves (``cpu``, ``cuda`` or ``cuda:N``).
    """

    def __init__(self, stage_dir: Path, device: str | torch.device, log_columns: Sequence[str]) -> None:
        device = torch.device(device)
        self.accelerator = make_accelerator(cpu=device.type == "cpu", device_placement=False)
        if self.accelerator.num_processes != 1:
            raise RuntimeError(
                f"the reference-kit stages run on one process, got {self.accelerator.num_processes}; run "
                "scripts/train_reference.py with python, not accelerate launch"
            )
        self.stage_dir = Path(stage_dir)
        self.checkpoints = CheckpointManager(self.accelerator, self.stage_dir, keep=KEEP_CHECKPOINTS)
        self.log = CsvLog(self.stage_dir / LOG_NAME, log_columns)
        self.history: list[dict[str, Any]] = []
        self._scheduler = None

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple:
        prepared = self.accelerator.prepare(model, optimizer, scheduler)
        self._scheduler = prepared[2]
        return prepared

    def register_generators(self, **generators: torch.Generator) -> None:
        self.accelerator.register_for_checkpointing(GeneratorStates(**generators))

    def resume(self) -> tuple[int, dict[str, Any]]:
        """``(start step, trainer state)``: ``(0, {})`` for a fresh stage (a stale log is emptied)."""
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        if not list_checkpoints(self.stage_dir):
            self.history = self.log.truncate(0)
            return 0, {}
        state = self.checkpoints.restore()
        sync_lr(self._scheduler)  # a new total after --extend: the schedule's value at this step
        self.history = self.log.truncate(int(state["step"]))
        return int(state["step"]), state

    def log_row(self, row: Mapping[str, Any]) -> None:
        self.history.append(dict(row))
        self.log.append([row])

    def save(self, step: int, **state: Any) -> None:
        self.checkpoints.save(step, **state)


def positive(config: Any, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def mean_tail(history: Sequence[Mapping[str, Any]], key: str, count: int = 50) -> float | None:
    values = [row[key] for row in history[-count:] if row.get(key) is not None]
    return float(np.mean(values)) if values else None


def progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=2.0)


def write_stage_metrics(path: Path | str, payload: Mapping[str, Any]) -> None:
    """metrics.json of a stage, with machine info added."""
    from compress.io import write_json
    from compress.quality.cost import machine_info

    write_json(path, {**payload, "machine": machine_info()})


def check_settings(
    path: Path, saved: Mapping[str, Any], current: Mapping[str, Any], flag_of: Mapping[str, str],
    ignore: Sequence[str] = (),
) -> None:
    """A resumed run must use the settings of the run it continues (else the loss curve is not the same)."""

    def norm(value: Any) -> Any:  # tuples come back from JSON as lists
        return json.loads(json.dumps(value))

    for key, value in current.items():
        if key in ignore:
            continue
        if key in saved and norm(saved[key]) != norm(value):
            flag = flag_of.get(key, key)
            raise ValueError(
                f"{path} was written with {key}={saved[key]!r} but this run asks {key}={value!r}; "
                f"rerun with {flag} {saved[key]} to continue it, or delete {path.parent} (or pass --restart) to start over"
            )


def clear_stage(stage_dir: Path, output_dir: Path) -> None:
    for path in (stage_dir, output_dir):
        if path.exists():
            shutil.rmtree(path)


def prepare_stage(
    stage: str, out: Path, output_dir: Path, settings: Mapping[str, Any], flags: Mapping[str, str],
    restart: bool, extend: bool,
) -> dict | None:
    """Common start of a stage: ``restart`` wipes it; a finished stage returns its metrics (skip) unless
    ``extend`` asks to continue it to more steps; settings of an existing run are checked."""
    stage_dir = out / stage
    if restart:
        clear_stage(stage_dir, output_dir)
    metrics_path = stage_dir / METRICS_NAME
    ignore = ("steps",) if extend else ()
    state = latest_trainer_state(stage_dir)
    if metrics_path.is_file() and (output_dir / "config.json").is_file():
        done = json.loads(metrics_path.read_text())
        saved = done.get("settings", {})
        check_settings(metrics_path, saved, settings, flags, ignore)
        if extend and int(saved.get("steps", 0)) < int(settings["steps"]) and state is not None:
            print(f"[{stage}] extending the finished run from {saved['steps']} to {settings['steps']} steps", flush=True)
            metrics_path.unlink()
            return None
        print(f"[{stage}] already trained ({metrics_path}); skipping (--restart trains it again, --extend with more "
              f"{flags['steps']} continues it)", flush=True)
        return done
    if state is not None:
        checkpoint = list_checkpoints(stage_dir)[-1]
        check_settings(checkpoint.parent, state.get("settings", {}), settings, flags, ignore)
        if int(state["step"]) > int(settings["steps"]):
            raise ValueError(f"{checkpoint} is at step {state['step']}, beyond {flags['steps']} {settings['steps']}")
    return None
