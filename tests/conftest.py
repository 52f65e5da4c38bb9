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


def run_cli(module: str, *args: str, cwd: Path | None = None, timeout: int = 600):
    """Run `python -m MODULE ARGS` in a fresh process, as a user would."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------------------------------------------------
# Opt-in memory report: `python -m pytest -q --rss-report` samples, every 0.1 s, the resident memory of the
# test process and of every process it started (CLI runs in subprocesses included) and prints, per test, the
# peak of their sum, so "no test above 4 GB" is a measurement (Linux /proc only).
# ---------------------------------------------------------------------------------------------------------
def pytest_addoption(parser):
    parser.addoption("--rss-report", action="store_true", help="report each test's peak RSS (process tree)")


def _tree_rss_bytes(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class _RssSampler:
    def __init__(self):
        import threading

        self.peaks: dict[str, int] = {}
        self.current: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.1):
            test = self.current
            if test is not None:
                value = _tree_rss_bytes(os.getpid())
                if value > self.peaks.get(test, 0):
                    self.peaks[test] = value


def pytest_configure(config):
    if config.getoption("--rss-report", default=False) and os.path.isdir("/proc"):
        config._rss_sampler = _RssSampler()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    sampler = getattr(item.config, "_rss_sampler", None)
    if sampler is not None:
        sampler.current = item.nodeid
    yield
    if sampler is not None:
        sampler.current = None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    sampler = getattr(config, "_rss_sampler", None)
    if sampler is None:
        return
    sampler.stop.set()
    ranked = sorted(sampler.peaks.items(), key=lambda kv: -kv[1])
    terminalreporter.write_sep("=", "peak RSS per test (test process + its subprocesses), highest 15")
    for nodeid, value in ranked[:15]:
        terminalreporter.write_line(f"{value / 2**30:6.2f} GB  {nodeid}")
