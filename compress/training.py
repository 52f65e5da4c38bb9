"""Training helpers shared by every training loop: prune's recovery (``compress/prune/recover.py``), the
distillation recipe (``distill/recipe.py``) and the reference-kit stages (``distill/reference/``); ``distill``
re-exports them as ``distill.training``.

One home for what a resumable run needs, so every loop checkpoints, logs and schedules the same way:

* :func:`make_accelerator`: the ``accelerate.Accelerator`` a loop runs on (one LR-schedule step per training
  step, whatever the number of processes);
* :func:`warmup_cosine` and :func:`sync_lr`: the LR multiplier (linear warm-up, then cosine to a floor or
  constant) and the re-planning of a resumed schedule whose total steps changed (``--extend``);
* :class:`CheckpointManager`: Accelerate state (``accelerator.save_state`` / ``load_state``: models,
  optimisers, schedulers, python/numpy/torch/CUDA RNG and every object registered with
  ``register_for_checkpointing``) in ``<run>/checkpoints/step-NNNNNNN/`` with a small ``trainer_state.json``
  (step, seconds, anything JSON the loop adds), each written atomically (``compress.io.atomic_dir``), the
  last ``keep`` kept; given the ``trained`` parameters, model files leave the frozen ones out;
* :class:`GeneratorStates`: named ``torch.Generator`` objects as one checkpointable object;
* :class:`CsvLog`: the per-step CSV log, appended every logged step and truncated to the checkpoint's step on
  resume, so a resumed run's log is the uninterrupted run's log.

Run folder (the recipe's ``--out``, a reference stage's ``<out>/<stage>``)::

    log.csv                                  one row per logged step
    checkpoints/step-0000100/                accelerate state + trainer_state.json
    metrics.json                             written by the loop when it finishes
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from compress.schedules import SCHEDULES, warmup_cosine  # noqa: F401  (re-exported: one home for loops)

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
LOG_NAME = "log.csv"


# ----------------------------------------------------------------------------------------------- accelerator
def make_accelerator(cpu: bool | None = None, mixed_precision: str = "no", device_placement: bool = True,
                     log_with: list[str] | None = None, project_dir: Path | str | None = None):
    """An ``Accelerator`` for a training loop (``cpu=None``: CPU when CUDA is not available).

    ``device_placement=False`` leaves placing models and tensors to the loop (the reference stages take a
    ``--device`` such as ``cuda:1``, which Accelerate's own choice of device would not honour).

    ``step_scheduler_with_optimizer=False``: the prepared LR scheduler steps once per ``scheduler.step()``.
    Accelerate's default steps it once per process (it assumes the schedule counts samples of one process);
    our loops count steps, which every process runs, so the default would end a two-process cosine at half
    the run and train the second half at LR 0. TSD-SR's ``train/train.py`` reaches the same per-step schedule
    by multiplying warm-up and total steps by the number of processes.
    """
    from accelerate import Accelerator

    if cpu is None:
        cpu = not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, device_placement=device_placement,
                       step_scheduler_with_optimizer=False, log_with=log_with or None,
                       project_dir=str(project_dir) if project_dir is not None else None)


# ----------------------------------------------------------------------------------------------- LR schedule
def sync_lr(scheduler: Any) -> None:
    """Set each optimiser group's lr to what the (possibly re-planned) LambdaLR gives at its current step.

    After ``load_state`` the optimiser holds the lr the saved run had; when the schedule was rebuilt for a new
    total (``--extend``: a warm restart), this moves the lr onto the new curve. For an unchanged schedule the
    value is the same number LambdaLR computes, so a plain resume is unaffected. Accepts a prepared
    (``AcceleratedScheduler``) or a plain LambdaLR.
    """
    scheduler = getattr(scheduler, "scheduler", scheduler)
    optimizer = getattr(scheduler.optimizer, "optimizer", scheduler.optimizer)
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)


# ----------------------------------------------------------------------------------------------- RNG state
class GeneratorStates:
    """Named ``torch.Generator`` objects as one stateful object for ``accelerator.register_for_checkpointing``.

    Accelerate saves the global python/numpy/torch/CUDA RNG states itself; loops that draw from their own
    generators (noise, dropout of the condition) register them through this wrapper so a resumed run continues
    each stream where it stopped. Loading a state with other names is an error.
    """

    def __init__(self, **generators: torch.Generator) -> None:
        self.generators = dict(generators)

    def __getitem__(self, name: str) -> torch.Generator:
        return self.generators[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: generator.get_state() for name, generator in self.generators.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.generators):
            raise KeyError(f"checkpoint holds generator states {sorted(state)}, this run has {sorted(self.generators)}")
        for name, generator in self.generators.items():
            generator.set_state(state[name].cpu())


# ----------------------------------------------------------------------------------------------- checkpoints
class CheckpointManager:
    """Accelerate-state checkpoints of one run folder: ``<run>/checkpoints/step-NNNNNNN/``.

    :meth:`save` is called by every process (each writes its own RNG state; the main process writes models,
    optimisers, schedulers and registered objects); the folder appears complete or not at all. :meth:`restore`
    loads the newest one into the prepared/registered objects and returns its ``trainer_state.json``.
    """

    def __init__(self, accelerator: Any, run_dir: Path | str, keep: int = 2,
                 trained: Iterable[torch.nn.Parameter] | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints to keep), got {keep}")
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / CHECKPOINT_DIR
        self.keep = int(keep)
        if trained is not None:
            self._save_only_trained(trained)
        if accelerator.is_main_process and self.folder.is_dir():
            # a checkpoint being written when the run was killed: never complete, never listed; cleared here
            for stale in self.folder.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)

    def _save_only_trained(self, trained: Iterable[torch.nn.Parameter]) -> None:
        """Model files hold the `trained` parameters and the buffers; the frozen parameters are left out (a
        distillation prior's 2 B frozen transformer would otherwise be written once per prepared model, per
        checkpoint) and are the ones the run loads from its prior before it resumes. Loading checks that the file
        lacks nothing but frozen parameters and holds nothing unknown."""
        trained_ids = {id(p) for p in trained}

        def frozen_names(model: torch.nn.Module) -> set[str]:
            return {name for name, param in model.named_parameters(remove_duplicate=False) if id(param) not in trained_ids}

        def drop_frozen(models: list, weights: list, output_dir: str) -> None:
            for index, model in enumerate(models):
                frozen = frozen_names(model)
                weights[index] = {key: value for key, value in weights[index].items() if key not in frozen}

        def load_checked(models: list, input_dir: str) -> None:
            from safetensors.torch import load_file

            for index, model in enumerate(list(models)):
                name = "model.safetensors" if index == 0 else f"model_{index}.safetensors"
                path = Path(input_dir) / name
                if not path.is_file():
                    raise FileNotFoundError(f"checkpoint {input_dir} lacks {name}; it is incomplete, resume from "
                                            "an earlier one or start without --resume")
                device = next(model.parameters()).device
                missing, unexpected = model.load_state_dict(load_file(str(path), device=str(device)), strict=False)
                absent = sorted(set(missing) - frozen_names(model))
                if absent or unexpected:
                    raise KeyError(f"checkpoint {path} does not match this run's model (missing trained "
                                   f"{absent[:3]}, unknown {list(unexpected)[:3]}); resume with the run's own config")
            models.clear()  # loaded here: accelerate loads no model itself

        self.accelerator.register_save_state_pre_hook(drop_frozen)
        self.accelerator.register_load_state_pre_hook(load_checked)

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.run_dir)

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save(self, step: int, **state: Any) -> Path:
        """Write the checkpoint of ``step`` (completed steps) with ``{"step": step, **state}`` as trainer state."""
        from compress.io import atomic_dir, write_json

        acc = self.accelerator
        target = self.folder / f"step-{int(step):07d}"
        acc.wait_for_everyone()
        with contextlib.ExitStack() as stack:
            tmp = str(stack.enter_context(atomic_dir(target, overwrite=True))) if acc.is_main_process else None
            if acc.num_processes > 1:  # every process writes its RNG state into the main process's folder
                from accelerate.utils import broadcast_object_list

                tmp = broadcast_object_list([tmp])[0]
            acc.save_state(tmp)
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_json(Path(tmp) / TRAINER_STATE, {"step": int(step), **state})
        if acc.is_main_process:
            for old in self.list()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target

    def restore(self, path: Path | None = None) -> dict[str, Any]:
        """Load ``path`` (default: the newest checkpoint) into the accelerator's objects; returns its trainer state."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise FileNotFoundError(
                f"no checkpoint under {self.folder} (looked for step-*/{TRAINER_STATE}); start without resuming"
            )
        self.accelerator.load_state(str(path))
        return read_trainer_state(path)


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Complete checkpoints (those with a trainer_state.json) of a run folder, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if (p / TRAINER_STATE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def read_trainer_state(path: Path | str) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint folder (no model is touched)."""
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def latest_trainer_state(run_dir: Path | str) -> dict[str, Any] | None:
    """Trainer state of the newest checkpoint of a run folder, or None when it has none."""
    found = list_checkpoints(run_dir)
    return read_trainer_state(found[-1]) if found else None


# ----------------------------------------------------------------------------------------------- CSV log
class CsvLog:
    """The per-step CSV log of a run: fixed ``columns``, a row appended per logged step.

    Values are written with ``str`` (Python floats round-trip exactly) and :meth:`read` parses them back to
    int/float (empty cells: None), so a history read from the log equals the one that was written.
    """

    def __init__(self, path: Path | str, columns: Sequence[str]) -> None:
        if "step" not in columns:
            raise ValueError(f"a training log needs a 'step' column, got {list(columns)}")
        self.path = Path(path)
        self.columns = list(columns)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        for row in rows:
            unknown = sorted(set(row) - set(self.columns))
            if unknown:
                raise KeyError(f"{self.path}: log row has columns {unknown} that the log does not have ({self.columns})")
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w" if new else "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def read(self) -> list[dict[str, Any]]:
        """Every complete row (a row cut short by a crash is dropped), values parsed."""
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if None not in row.values() and None not in row]
        return [{key: _parse(value) for key, value in row.items()} for row in rows]

    def truncate(self, step: int) -> list[dict[str, Any]]:
        """Keep the rows up to ``step`` (those a checkpoint of ``step`` covers), rewritten atomically; returns them."""
        from compress.io import atomic_path

        rows = [row for row in self.read() if isinstance(row.get("step"), int) and row["step"] <= step]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows({key: ("" if value is None else value) for key, value in row.items() if key in self.columns}
                             for row in rows)
        return rows


def _parse(value: str) -> int | float | str | None:
    if value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
