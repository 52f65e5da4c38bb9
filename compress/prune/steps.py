"""One compression step applied to a student: the code the prune recipe and the planner's measurements share.

`apply_step(student, step, args, calibration)` returns a new student (the input is left untouched) and a
JSON record of what the step decided; `calibration` is a lazily built list of (LR, HR) training crops
(`calibration_pairs`), shared by the steps that score blocks or channels on photos.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from compress.models.student import OneStepSR
from compress.prune.cli import VAE_STEPS, PruneArgs, Step


def replace_vae(student: OneStepSR, vae: torch.nn.Module) -> OneStepSR:
    """A new OneStepSR with `vae` (same latent space: channels and scaling) and the same transformer."""
    from dataclasses import replace

    settings = replace(student.settings, vae_class=type(vae).__name__)
    return OneStepSR(student.transformer, vae, student.prompt_embeds, student.pooled_prompt_embeds, settings).eval()


def calibration_pairs(count: int, seed: int, hr_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(LR, HR) crops of the training photos (never the validation ones) that score blocks and channels."""
    from compress.data import SRPairDataset, list_photos

    data = SRPairDataset(list_photos("train"), hr_size=hr_size, degradation="realesrgan", seed=seed + 7919,
                         length=count)
    return [(data[i]["lr"][None], data[i]["hr"][None]) for i in range(count)]


@dataclass
class Calibration:
    """The calibration crops, built on first use (steps that need no photos never pay for them)."""

    count: int
    seed: int
    _pairs: list | None = field(default=None, repr=False)

    @property
    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._pairs is None:
            self._pairs = calibration_pairs(self.count, self.seed)
        return self._pairs


def taylor_loss_fn(student: OneStepSR, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """Calibration loss for Taylor importance: L1 between the one-step output latent and the HR latent.

    The HR target (not the uncompressed student's output, which the student still equals right after
    pre-caching and would give zero gradients) gives every channel a real gradient (Molchanov et al. 2019).
    """
    with torch.no_grad():
        inputs = [student.encode(student.preprocess(lr)) for lr, _ in pairs]
        targets = [student.encode(hr.mul(2).sub(1)) for _, hr in pairs]

    def loss(transformer):
        total = 0.0
        for latent, target in zip(inputs, targets):
            total = total + (latent - transformer(latent, return_dict=False)[0] - target).abs().mean()
        return total / len(inputs)

    return loss


def apply_step(student: OneStepSR, step: Step, args: PruneArgs, calibration: Calibration,
               verbose: bool = True) -> tuple[OneStepSR, dict]:
    """`step` applied to `student` (a new student; the input's modules are not modified) and its record."""
    from compress.prune.conditioning import precache, remove_text_stream, replace_transformer

    def say(message: str) -> None:
        if verbose:
            print(message, file=sys.stderr)

    started = time.perf_counter()
    record: dict = {"step": str(step)}
    params_before = sum(p.numel() for p in student.transformer.parameters())
    vae_before = sum(p.numel() for p in student.vae.parameters())
    if step.name in VAE_STEPS:
        from compress.prune.vae import apply_vae_step

        vae, details = apply_vae_step(student.vae, step)
        student = replace_vae(student, vae)
        record["vae"] = details
        say(f"{step}: {details}")
    elif step.name == "precache":
        student = precache(student)
        record["note"] = "lossless: timestep/pooled embedding, adaLN modulation of both streams, final norm " \
                         "modulation and context-embedder output folded into buffers"
    elif step.name == "textless":
        student = replace_transformer(student, remove_text_stream(student.transformer))
    elif step.name == "depth":
        from compress.prune.depth import choose_depth, describe_kept, keep_blocks

        options, bar = {}, None
        if args.method == "learnable":
            from tqdm import tqdm

            bar = tqdm(total=args.search_steps, desc="depth search", unit="step", file=sys.stderr,
                       mininterval=0.5 if sys.stderr.isatty() else 15.0, disable=not verbose)
            options = {"steps": args.search_steps, "batch_size": args.batch_size, "hr_size": args.hr_size,
                       "progress": bar.update}
        decision = choose_depth(args.method, student, [lr for lr, _ in calibration.pairs], step.ratio, args.seed,
                                **options)
        if bar is not None:
            bar.close()
        count = len(student.transformer.transformer_blocks)
        say(f"depth ({args.method}): {describe_kept(decision.kept, count)}")
        student = replace_transformer(student, keep_blocks(student.transformer, decision.kept))
        record["decision"] = decision.to_json()
    elif step.name in ("heads", "mlp"):
        from compress.prune.heads import prune_widths

        ratio_key = "head_ratio" if step.name == "heads" else "mlp_ratio"
        loss = taylor_loss_fn(student, calibration.pairs) if args.importance == "taylor" else None
        transformer, width = prune_widths(student.transformer, importance=args.importance, scope=args.width_scope,
                                          round_to=args.round_to, calibration_loss=loss, **{ratio_key: step.ratio})
        if min(width.heads_after) < 1:
            raise ValueError(f"--steps {step}: --width-scope global removed every head of a block; lower the "
                             "ratio or use --width-scope uniform")
        student = replace_transformer(student, transformer)
        record["decision"] = width.to_json()
        say(f"{step.name}: heads {width.heads_after}, MLP {width.mlp_after}")
    else:
        raise ValueError(f"unknown step {step}")
    record["transformer_params"] = {"before": params_before,
                                    "after": sum(p.numel() for p in student.transformer.parameters())}
    record["vae_params"] = {"before": vae_before, "after": sum(p.numel() for p in student.vae.parameters())}
    record["seconds"] = round(time.perf_counter() - started, 2)
    return student, record
