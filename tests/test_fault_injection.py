"""SIGKILL at random points of a distillation run (compress/training.py's checkpoints, distill/recipe.py's run):
the next `--resume` continues from the newest complete checkpoint, loses at most one checkpoint interval, and
ends with the loss curve of an uninterrupted run; before that, no run folder looks complete.

The default suite kills one run; `pytest -m slow tests/test_fault_injection.py` kills ten, at kill points
drawn from a fixed seed (a step count, then a delay inside the next step, which lands some kills in the
middle of a checkpoint write).
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.training import list_checkpoints, read_trainer_state
from distill.__main__ import main as distill_main
from tests.conftest import REPO, TSD_CHECKPOINT_EVERY, TSD_STEPS, tsd_cli_args

STEPS, EVERY = TSD_STEPS, TSD_CHECKPOINT_EVERY


def _rows(run: Path) -> list[dict]:
    if not (run / "log.csv").is_file():
        return []
    with (run / "log.csv").open() as handle:
        return list(csv.DictReader(handle))


def _kill_then_resume(prior: Path, out: Path, after_steps: int, delay: float, straight_rows: list[dict]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", *tsd_cli_args(prior, out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(_rows(out)) < after_steps:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill point"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, "the run finished before it was killed: move the kill point"
    done = len(_rows(out))
    # Nothing looks complete: no final model, no metrics, and only complete checkpoints are listed.
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    saved = [int(read_trainer_state(path)["step"]) for path in list_checkpoints(out)]
    newest = max(saved, default=0)
    assert done - newest <= EVERY, (done, saved)  # at most one checkpoint interval lost

    # the CLI in this process (the killed run was a process of its own, as a kill needs)
    assert distill_main([*tsd_cli_args(prior, out)[1:], *(["--resume"] if saved else [])]) == 0
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    for got, want in zip(rows, straight_rows):
        for key in ("total", "tsd", "fake_score", "perceptual"):
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-7), (got["step"], key)
    assert (out / "model").is_dir() and (out / "metrics.json").is_file()
    assert not list((out / "checkpoints").glob(".*.tmp")), "a killed checkpoint's temporary folder was left"
    return {"killed_after": done, "newest_checkpoint": newest}


@pytest.fixture(scope="module")
def straight(tsd_straight_run) -> list[dict]:
    return _rows(tsd_straight_run)


def test_a_killed_run_resumes_to_the_uninterrupted_curve(tiny_prior, straight, tmp_path):
    # killed as soon as step 3 is logged: step 2's checkpoint is complete and step 4's is not written; the slow
    # test below also kills before any checkpoint and in the middle of writing one
    outcome = _kill_then_resume(tiny_prior, tmp_path / "run", after_steps=3, delay=0.0, straight_rows=straight)
    assert outcome == {"killed_after": 3, "newest_checkpoint": 2}


@pytest.mark.slow
def test_ten_kills_at_random_points_all_resume(tiny_prior, straight, tmp_path):
    rng = random.Random(2026)
    # at least two steps remain after the point, so every kill lands before the run's end
    points = [(rng.randint(1, STEPS - 2), rng.uniform(0.0, 0.5)) for _ in range(10)]
    assert len(set(points)) == 10
    outcomes = [_kill_then_resume(tiny_prior, tmp_path / f"run{index}", after, delay, straight)
                for index, (after, delay) in enumerate(points)]
    print("kill points (steps logged at the kill, newest checkpoint):", outcomes)
