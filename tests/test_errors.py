"""Every command answers bad input with one line naming the input and the fix, a non-zero exit, and no
partial artifact; an interrupted run (SIGINT, SIGTERM) exits 130/143 leaving nothing truncated.

The audit runs the real CLIs in fresh processes, as a user would. The bad-input cases fail before torch is
imported (compress/models/preflight.py, compress/io.py), so each takes well under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.models.layout import SAMPLE_IMAGE
from tests.conftest import REPO, run_cli

UNWRITABLE = Path("/sys/tinysr-out")  # sysfs refuses new entries, even to root (permission bits do not)


@pytest.fixture(scope="module")
def newer_student(tmp_path_factory) -> Path:
    """A saved tiny student whose student_config.json says a future format version."""
    from compress.models.resolve import load_model

    folder = tmp_path_factory.mktemp("newer") / "student"
    load_model("preset:tiny").model.save_pretrained(folder)
    config = json.loads((folder / "student_config.json").read_text())
    (folder / "student_config.json").write_text(json.dumps(dict(config, version=7)))
    return folder


def _commands(out: Path, model: str | None = None) -> dict[str, list[str]]:
    """Each command, writing to `out`, on `model` where it takes one (default: the tiny preset, no files)."""
    model = model or "preset:tiny"
    return {
        "upscale": ["compress", "upscale", str(SAMPLE_IMAGE), "--model", model, "-o", str(out)],
        "eval": ["compress", "eval", "--model", model, "-o", str(out)],
        "prune": ["compress", "prune", "--model", model, "--target-params", "0.5", "-o", str(out)],
        "distill": ["distill", "train", "--preset", "redistill-stage1", "--student", model, "--out", str(out)],
        "export onnx": ["export", "onnx", "--model", model, "-o", str(out)],
        "export coreml": ["export", "coreml", "--model", model, "-o", str(out)],
    }


def _one_line_error(args: list[str], *fragments: str) -> str:
    start = time.perf_counter()
    result = run_cli(*args)
    seconds = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (args, result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, (args, lines)  # one line: no usage block, no traceback
    for fragment in fragments:
        assert fragment in lines[0], (args, lines[0])
    assert seconds < 5.0, (args, f"{seconds:.1f} s: the check ran after the heavy imports")
    return lines[0]


@pytest.mark.parametrize("command", list(_commands(Path("x"))))
def test_output_path_that_is_a_file(command, tmp_path):
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    flag = "--out" if command == "distill" else "-o"
    _one_line_error(_commands(target)[command], f"{flag} {target} is a file, not a folder")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("command", list(_commands(Path("x"))))
def test_output_folder_that_cannot_be_written(command):
    _one_line_error(_commands(UNWRITABLE)[command], f"{UNWRITABLE}: cannot write in /sys", "give a folder you can write")


@pytest.mark.parametrize("command", list(_commands(Path("x"))))
def test_model_folder_from_a_newer_toolkit(command, newer_student, tmp_path):
    out = tmp_path / "out"
    _one_line_error(_commands(out, str(newer_student))[command],
                    "written by a newer version of this toolkit (student format 7", "upgrade tinysr-toolkit")
    assert not out.exists()


@pytest.mark.parametrize("command", list(_commands(Path("x"))))
def test_missing_model_folder(command, tmp_path):
    out = tmp_path / "out"
    flag = "--student" if command == "distill" else "--model"
    _one_line_error(_commands(out, str(tmp_path / "nowhere"))[command], f"{flag} {tmp_path / 'nowhere'}: no such folder")
    assert not out.exists()


def test_missing_and_repeated_inputs(tmp_path):
    out = tmp_path / "out"
    _one_line_error(["compress", "upscale", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(out)],
                    f"input not found: {tmp_path / 'a.png'}, {tmp_path / 'b.png'}")
    relative = os.path.relpath(SAMPLE_IMAGE, REPO)
    _one_line_error(["compress", "upscale", str(SAMPLE_IMAGE), relative, "-o", str(out)],
                    f"is given twice (also as {SAMPLE_IMAGE})", "give each once")
    _one_line_error(["compress", "eval", "--data", str(tmp_path / "photos"), "-o", str(out)],
                    f"--data not found: {tmp_path / 'photos'}")
    _one_line_error(["distill", "train", "--preset", "reference-tsd", "--prior", str(tmp_path / "prior"),
                     "--out", str(out)], f"--prior {tmp_path / 'prior'}: no such folder")
    assert not out.exists()


@pytest.mark.parametrize("args, fragment", [
    (["compress", "upscale", str(SAMPLE_IMAGE), "-o", "OUT", "--max-megapixels", "0"], "--max-megapixels must be positive"),
    (["compress", "upscale", str(SAMPLE_IMAGE), "-o", "OUT", "--latent-tile", "abc"], "argument --latent-tile: invalid int"),
    (["compress", "eval", "-o", "OUT", "--limit", "0"], "--limit must be >= 1"),
    (["compress", "eval", "-o", "OUT", "--hr-size", "100"], "--hr-size must be a multiple of 64"),
    (["compress", "prune", "-o", "OUT", "--target-params", "1.5"], "--target-params must be a fraction in (0, 1)"),
    (["distill", "train", "--preset", "reference-tsd", "--out", "OUT", "--steps", "0"], "--steps must be >= 1"),
    (["distill", "train", "--preset", "reference-tsd", "--out", "OUT", "--set", "optim.lr=-1"], "optim.lr"),
    (["export", "onnx", "-o", "OUT", "--opset", "99"], "--opset must be between 14 and 21"),
    (["export", "coreml", "-o", "OUT", "--palettize", "5"], "--palettize"),
])
def test_flag_values_out_of_range(args, fragment, tmp_path):
    out = tmp_path / "out"
    _one_line_error([str(out) if a == "OUT" else a for a in args], fragment)
    assert not out.exists()


def test_a_full_disk_is_one_line_and_leaves_no_partial_image(tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of writing a PNG: exit 2, one line, and neither the image nor its temporary file
    stays behind (the write goes through compress.io.atomic_path)."""
    import errno

    import compress.imaging
    from compress.__main__ import main

    def disk_full(fd):  # the PNG's bytes went to the temporary file; flushing them to disk fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compress.imaging.os, "fsync", disk_full)
    out = tmp_path / "out"
    assert main(["upscale", str(SAMPLE_IMAGE), "--model", "preset:tiny", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: out of disk space (No space left on device); free space or choose another output "
                       "folder: nothing partially written was kept"), err
    assert sorted(p.name for p in out.iterdir()) == [], list(out.iterdir())


def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "the run never reached the point to interrupt"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_interrupted_upscale_keeps_only_complete_images(sig, code, word, tmp_path, capsys):
    """The signal comes from a thread of this process once two images are written (the same handler path as
    a signal from outside, without a second interpreter's start-up)."""
    import threading

    from PIL import Image

    from compress.__main__ import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(40):
        shutil.copy(SAMPLE_IMAGE, photos / f"p{index:02d}.png")
    out = tmp_path / "out"

    def signal_when_two_are_written():
        deadline = time.time() + 120
        while len(list(out.glob("*.png"))) < 2 and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), sig)

    threading.Thread(target=signal_when_two_are_written, daemon=True).start()
    # a job a shell starts in the background inherits SIGINT ignored (as CI may run it); a terminal's Ctrl-C
    # reaches Python's default handler, which is what this test is about
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["upscale", str(photos), "--model", "preset:tiny", "-o", str(out)]) == code
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err.strip().splitlines()[-1] == word
    written = sorted(out.iterdir())
    assert 2 <= len(written) < 40 and all(p.suffix == ".png" for p in written), written  # no .tmp, no run summary
    for path in written:
        with Image.open(path) as image:
            image.load()  # a truncated PNG raises here
            assert image.size == (512, 512)


def test_terminated_distill_keeps_its_checkpoints(tiny_prior, tmp_path, capsys):
    """SIGTERM (a scheduler's stop) in the middle of a run: exit 143, complete checkpoints only, no final model.
    The signal comes from a thread of this process (see above); resuming after a kill is
    tests/test_fault_injection.py's."""
    import threading

    from distill.__main__ import main

    out = tmp_path / "run"
    states = out / "checkpoints"

    def terminate_after_the_first_checkpoint():
        deadline = time.time() + 300
        while not list(states.glob("step-*/trainer_state.json")) and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    # a SIGTERM arriving after main() has returned must not stop pytest: run_command restores this handler
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        threading.Thread(target=terminate_after_the_first_checkpoint, daemon=True).start()
        code = main(["train", "--preset", "reference-tsd", "--prior", str(tiny_prior), "--steps", "40",
                     "--set", "train.batch_size=1", "--set", "train.hr_size=64", "--set", "train.checkpoint_every=1",
                     "--set", "loss.perceptual_net=stlpips", "--out", str(out)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143
    assert f"terminated: resume with --resume from the last checkpoint in {out}" in capsys.readouterr().err
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    saved = list(states.glob("step-*/trainer_state.json"))
    assert saved and all(json.loads(p.read_text())["step"] >= 1 for p in saved)
    assert not list(states.glob(".*.tmp"))
