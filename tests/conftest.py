"""Shared fixtures: tiny SD3-geometry students with non-trivial LoRAs, written as TSD-SR releases."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Tests must never reach a hub; fail fast if anything tries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def make_tiny_lora_student(seed: int = 0, rank: int = 4):
    """Tiny SD3-geometry transformer + VAE with random base weights and random (non-zero) LoRAs."""
    from compress.models.lora import TRANSFORMER_LORA_TARGETS, add_lora, vae_encoder_lora_targets
    from compress.models.presets import build_random_components, get_preset
    from compress.models.student import OneStepSR

    transformer, vae, prompt, pooled = build_random_components(get_preset("tiny"), seed=seed)
    add_lora(transformer, rank, TRANSFORMER_LORA_TARGETS)
    add_lora(vae, rank, vae_encoder_lora_targets(vae))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in list(transformer.named_parameters()) + list(vae.named_parameters()):
            if "lora_B" in name:  # zero-initialised by peft; make the adapters matter
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return OneStepSR(transformer, vae, prompt, pooled).eval()


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    """(release root, in-memory unmerged student) for the tiny preset in the official TSD-SR layout."""
    from compress.models.release import write_tsdsr_release

    model = make_tiny_lora_student()
    root = tmp_path_factory.mktemp("release")
    write_tsdsr_release(root, model.transformer, model.vae, model.prompt_embeds, model.pooled_prompt_embeds)
    return root, model


@pytest.fixture(autouse=True, scope="module")
def _return_memory_after_each_module():
    """Give the memory a test module's fixtures held back to the OS, so later tests (and --rss-report) start lean."""
    yield
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def run_cli(module: str, *args: str, cwd: Path | None = None, timeout: int = 600):
    """Run `python -m MODULE ARGS` in a fresh process, as a user would."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------------------------------------------------
# Opt-in memory report: `python -m pytest -q --rss-report` samples, every 0.1 s, the memory of the test process
# and of every process it started (CLI runs in subprocesses included) and prints, per test, the peak of their
# summed PSS (proportional set size: shared library pages such as libtorch's are split between the processes
# that map them, so the sum is the memory the test really occupies) and the largest single-process RSS, so
# "no test above 4 GB" is a measurement (Linux /proc only).
# ---------------------------------------------------------------------------------------------------------
def pytest_addoption(parser):
    parser.addoption("--rss-report", action="store_true", help="report each test's peak memory (process tree)")


def _proc_kb(path: str, key: str) -> int:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


class _MemorySampler:
    def __init__(self):
        import threading

        self.peaks: dict[str, tuple[int, int]] = {}  # test -> (tree PSS kB, largest process RSS kB)
        self.current: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.1):
            test = self.current
            if test is None:
                continue
            pids = _tree(os.getpid())
            pss = sum(_proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)
            rss = max(_proc_kb(f"/proc/{pid}/status", "VmRSS:") for pid in pids)
            old = self.peaks.get(test, (0, 0))
            self.peaks[test] = (max(old[0], pss), max(old[1], rss))


def pytest_configure(config):
    if config.getoption("--rss-report", default=False) and os.path.isdir("/proc"):
        config._memory_sampler = _MemorySampler()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    sampler = getattr(item.config, "_memory_sampler", None)
    if sampler is not None:
        sampler.current = item.nodeid
    yield
    if sampler is not None:
        sampler.current = None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    sampler = getattr(config, "_memory_sampler", None)
    if sampler is None:
        return
    sampler.stop.set()
    ranked = sorted(sampler.peaks.items(), key=lambda kv: -kv[1][0])
    terminalreporter.write_sep("=", "peak memory per test (test process + subprocesses), highest 15")
    terminalreporter.write_line("tree PSS   largest process RSS   test")
    for nodeid, (pss, rss) in ranked[:15]:
        terminalreporter.write_line(f"{pss / 2**20:6.2f} GB  {rss / 2**20:6.2f} GB            {nodeid}")


@pytest.fixture(scope="session")
def tiny_prior(tmp_path_factory) -> Path:
    """A prior folder in the layout scripts/train_reference.py writes (TSD-SR release layout), random tiny weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from compress.models.presets import build_random_components, get_preset
    from compress.models.release import prior_paths
    from distill.reference.kit import save_embeddings

    root = tmp_path_factory.mktemp("prior")
    layout = prior_paths(root)
    transformer, vae, prompt, pooled = build_random_components(get_preset("tiny"), seed=5)
    transformer.save_pretrained(layout.transformer)
    vae.save_pretrained(layout.vae)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(layout.scheduler)
    save_embeddings(root, {"prompt_embeds": prompt, "pool_embeds": pooled,
                           "null_prompt_embeds": torch.zeros_like(prompt), "null_pool_embeds": torch.zeros_like(pooled)})
    return root


TSD_STEPS, TSD_CHECKPOINT_EVERY = 4, 2


def tsd_cli_args(prior: Path, out: Path) -> list[str]:
    """`python -m distill train` of the reference TSD recipe on the tiny prior: 4 steps, a checkpoint every 2."""
    settings = {"train.batch_size": 1, "train.hr_size": 64, "train.checkpoint_every": TSD_CHECKPOINT_EVERY,
                "loss.perceptual_net": "stlpips"}
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    return ["distill", "train", "--preset", "reference-tsd", "--prior", str(prior), "--steps", str(TSD_STEPS),
            *sets, "--out", str(out)]


@pytest.fixture(scope="session")
def tsd_straight_run(tiny_prior, tmp_path_factory) -> Path:
    """One uninterrupted `tsd_cli_args` run, through the CLI in a fresh process (its run folder)."""
    out = tmp_path_factory.mktemp("tsd_straight") / "run"
    result = run_cli(*tsd_cli_args(tiny_prior, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out
