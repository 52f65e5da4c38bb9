"""`sd3-medium-tsd` at full geometry on this machine: 2 real training steps, peak memory, and the memory model.

TSD-SR's own recipe (preset `sd3-medium-tsd`: student LoRA r64 on the transformer and the VAE encoder, fake-score
LoRA r64, teacher LoRA r64, all adapters on one frozen SD3-medium transformer; per-image prompt embeddings;
gradient checkpointing) runs on the `sd3-medium` geometry (2028 M + 84 M parameters) with random weights.
Random weights make the losses meaningless; parameter counts, time and memory are real. Each phase runs in its
own process, so each peak RSS is that phase's alone:

1. `prior`: writes a prior folder (fp16 base, zero null and random default embeddings, a random teacher LoRA
   r64 in checkpoint/teacher/, random per-image embeddings for the bundled training photos) to --workdir
   (kept and reused: about 4.3 GB).
2. `steps`: loads the recipe (`DistillRecipe.load/setup`) and times 2 training steps at --hr-size with float32
   arithmetic (train.mixed_precision=no); prints seconds per step and peak RSS.
3. `half`: the same set-up with train.mixed_precision=bf16 (frozen weights stored in bf16, adapters float32):
   peak RSS of load + set-up. Its steps are not run: this CPU has no bf16 arithmetic (the phase measures a
   bf16 and a float32 matmul and prints both rates).
4. `activations`: the memory model of a `--model-hr-size` (512) crop on a GPU: bytes autograd keeps for the
   backward pass (saved-tensor hooks, storages counted once) in one student forward (VAE encoder with its
   LoRA, transformer with and without gradient checkpointing, frozen decoder that the perceptual loss
   backpropagates through) and in one fake-score forward, per image, measured in float32.

    python -m benchmarks.distill_fullscale --workdir /tmp/sd3-prior --json runs/distill_fullscale.json
    python -m benchmarks.distill_fullscale --from-json docs/distill-fullscale.json   # the table of a saved run

Prints a JSON document with every number and the machine; `docs/distill-fullscale.md` records a run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

PHASES = ("prior", "steps", "half", "activations")
TEACHER_RANK = 64


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    from compress.quality.cost import peak_memory

    return peak_memory()["cpu_rss_peak_bytes"]


def write_prior(workdir: Path, seed: int, geometry: str = "sd3-medium") -> dict:
    """A prior folder of the sd3-medium geometry with random weights, in the TSD-SR release layout."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from compress.data.photos import list_photos
    from compress.models.layout import prior_paths
    from compress.models.lora import TRANSFORMER_LORA_TARGETS, add_lora, save_lora_file
    from compress.models.presets import SD3_SCHEDULER, build_random_components, get_preset
    from distill.reference.kit import save_embeddings

    done = workdir / "complete.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.perf_counter()
    layout = prior_paths(workdir)
    transformer, vae, prompt, pooled = build_random_components(get_preset(geometry), seed=seed)
    transformer.to(torch.float16).save_pretrained(layout.transformer)
    vae.to(torch.float16).save_pretrained(layout.vae)
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(layout.scheduler)
    save_embeddings(workdir, {"prompt_embeds": prompt, "pool_embeds": pooled,
                              "null_prompt_embeds": torch.zeros_like(prompt), "null_pool_embeds": torch.zeros_like(pooled)})
    generator = torch.Generator().manual_seed(seed + 1)
    add_lora(transformer, TEACHER_RANK, TRANSFORMER_LORA_TARGETS)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator, dtype=param.dtype) * 1e-3
    save_lora_file(transformer, layout.teacher_lora)
    from safetensors.torch import save_file

    embeds = workdir / "prompt_embeds"
    embeds.mkdir(exist_ok=True)
    for photo in list_photos("train"):
        save_file({"prompt_embeds": torch.randn(prompt.shape[1:], generator=generator),
                   "pool_embeds": torch.randn(pooled.shape[1:], generator=generator)},
                  str(embeds / f"{photo.name}.safetensors"))
    info = {"seconds": round(time.perf_counter() - start, 1), "tokens": prompt.shape[1],
            "bytes_on_disk": sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file())}
    done.write_text(json.dumps(info))
    return info


def _config(workdir: Path, hr_size: int, batch_size: int, mixed_precision: str):
    from distill.config import RecipeConfig

    return RecipeConfig.from_yaml("sd3-medium-tsd", {
        "model.prior": str(workdir), "model.teacher_lora": "release", "train.prompt_embeds": str(workdir / "prompt_embeds"),
        "train.hr_size": hr_size, "train.batch_size": batch_size, "train.mixed_precision": repr(mixed_precision) if mixed_precision == "no" else mixed_precision,
        "train.num_workers": 0, "loss.perceptual_net": "auto"})


def _setup(workdir: Path, out: Path, hr_size: int, batch_size: int, mixed_precision: str) -> tuple[object, dict]:
    from compress.quality.cost import count_params
    from distill.recipe import FAKE_ADAPTER, STUDENT_ADAPTER, TEACHER_ADAPTER, DistillRecipe

    start = time.perf_counter()
    recipe = DistillRecipe(_config(workdir, hr_size, batch_size, mixed_precision), out, progress=False).load()
    loaded = time.perf_counter() - start
    rss_loaded = _rss_now()
    recipe.setup()
    base = recipe.prior.transformer
    named = dict(base.named_parameters())

    def adapter(name):
        return sum(p.numel() for n, p in named.items() if f".{name}." in n)

    counts = {
        "base_transformer": sum(p.numel() for n, p in named.items() if "lora_" not in n),
        "vae": sum(p.numel() for n, p in recipe.prior.vae.named_parameters() if "lora_" not in n),
        "student_transformer_lora": adapter(STUDENT_ADAPTER),
        "student_vae_lora": sum(p.numel() for n, p in recipe.prior.vae.named_parameters() if "lora_" in n),
        "fake_score_lora": adapter(FAKE_ADAPTER),
        "teacher_lora": adapter(TEACHER_ADAPTER),
        "perceptual_net": count_params(recipe.perceptual) if recipe.perceptual is not None else 0,
        "student_trainable": sum(p.numel() for p in recipe.trainable),
        "fake_trainable": sum(p.numel() for p in recipe.fake_trainable),
    }
    dtypes = sorted({str(p.dtype) for p in base.parameters() if not p.requires_grad})
    return recipe, {"load_seconds": round(loaded, 1), "rss_after_load_bytes": rss_loaded,
                    "rss_after_setup_bytes": _rss_now(), "parameters": counts, "frozen_dtypes": dtypes,
                    "trainable_dtypes": sorted({str(p.dtype) for p in recipe.trainable}),
                    "perceptual": recipe.perceptual_name}


def run_steps(workdir: Path, out: Path, hr_size: int, batch_size: int, steps: int) -> dict:
    recipe, info = _setup(workdir, out, hr_size, batch_size, "no")
    seconds, losses = [], []
    for step in range(steps):
        start = time.perf_counter()
        logs = recipe.train_step(step)
        seconds.append(round(time.perf_counter() - start, 1))
        losses.append({k: v for k, v in logs.items() if k != "lr"})
        print(f"step {step + 1}/{steps}: {seconds[-1]} s", file=sys.stderr, flush=True)
    finite = all(torch.isfinite(torch.tensor(v)).item() for row in losses for v in row.values())
    return {**info, "hr_size": hr_size, "batch_size": batch_size, "threads": torch.get_num_threads(),
            "seconds_per_step": seconds, "losses": losses, "losses_finite": finite,
            "gradient_checkpointing": recipe.cfg.train.gradient_checkpointing, "peak_rss_bytes": _peak()}


def _matmul_rate(dtype: torch.dtype, size: int = 512) -> float:
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    start = time.perf_counter()
    a @ b
    return size**3 / (time.perf_counter() - start) / 1e9


def run_half(workdir: Path, out: Path, hr_size: int, batch_size: int) -> dict:
    _, info = _setup(workdir, out, hr_size, batch_size, "bf16")
    return {**info, "peak_rss_bytes": _peak(), "steps": "not run: see matmul rates",
            "matmul_gmacs_float32": round(_matmul_rate(torch.float32), 2),
            "matmul_gmacs_bfloat16": round(_matmul_rate(torch.bfloat16), 2)}


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the block, each storage counted once.

    The modules' own weights are not counted (saving one keeps no extra memory). Autograd keeps a meta
    placeholder instead of each tensor, so a pass whose saved tensors would not fit beside
    a float32 SD3 transformer on this machine is measured all the same (no backward may run on it). A storage is
    counted once while it lives; one allocated later at a freed one's address is a new storage and is counted.
    """

    def __init__(self, *modules: torch.nn.Module):
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weakref = StorageWeakRef
        self.storages: dict[int, object] = {}  # address -> weak reference of the storage counted there
        self.total = 0
        # a layer saves its weight to pass gradients to its input: that is the weight's memory, counted already
        self.weights = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.weights:
            return torch.empty_like(tensor, device="meta")
        seen = self.storages.get(storage.data_ptr())
        if seen is None or seen.expired():
            self.storages[storage.data_ptr()] = self._weakref(storage)
            self.total += storage.nbytes()
        return torch.empty_like(tensor, device="meta")

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def run_activations(workdir: Path, hr_size: int) -> dict:
    """Saved-for-backward bytes of one image at `hr_size`, per stage of a student step and of a fake-score step."""
    from compress.models.lora import (
        FAKE_SCORE_LORA_TARGETS,
        TRANSFORMER_LORA_TARGETS,
        adapters_active,
        add_lora,
        vae_encoder_lora_targets,
    )
    from distill.flow import Conditioning
    from distill.recipe import FAKE_ADAPTER, STUDENT_ADAPTER, load_prior

    torch.manual_seed(0)
    prior = load_prior(workdir)

    base, vae = prior.transformer, prior.vae
    add_lora(base, 64, TRANSFORMER_LORA_TARGETS, adapter_name=STUDENT_ADAPTER)
    add_lora(base, 64, FAKE_SCORE_LORA_TARGETS, adapter_name=FAKE_ADAPTER)
    add_lora(vae, 64, vae_encoder_lora_targets(vae))
    for name, p in (*base.named_parameters(), *vae.named_parameters()):
        p.requires_grad_("lora_" in name)
    image = torch.rand(1, 3, hr_size, hr_size) * 2 - 1
    result = {"hr_size": hr_size, "dtype": "float32"}
    with SavedBytes(vae) as saved:
        latent = vae.encode(image).latent_dist.mode()
    result["vae_encoder_lora"] = saved.total
    latent = latent.detach().requires_grad_(True)  # the decoder is frozen; the loss backpropagates through it
    with SavedBytes(vae) as saved:
        vae.decode(latent).sample
    result["vae_decoder_frozen"] = saved.total
    cond = Conditioning(prior.cond.prompt_embeds, prior.cond.pooled)
    timestep = torch.tensor([1000.0])

    def transformer_pass(adapters):
        # checkpointing keeps each block's inputs itself (not through saved-tensor hooks): counted by a pre-hook
        block_inputs = {}

        def count_inputs(module, args, kwargs):
            if base.gradient_checkpointing:
                for t in (*args, *kwargs.values()):
                    if isinstance(t, torch.Tensor):
                        block_inputs[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

        hooks = [b.register_forward_pre_hook(count_inputs, with_kwargs=True) for b in base.transformer_blocks]
        with adapters_active(base, adapters), SavedBytes(base) as saved:
            base(hidden_states=latent.detach(), timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                 pooled_projections=cond.pooled, return_dict=False)
        for hook in hooks:
            hook.remove()
        return saved.total + sum(v for k, v in block_inputs.items() if k not in saved.storages)

    result["transformer_student"] = transformer_pass((STUDENT_ADAPTER,))
    result["transformer_fake_score"] = transformer_pass((FAKE_ADAPTER,))
    base.enable_gradient_checkpointing()
    result["transformer_student_checkpointed"] = transformer_pass((STUDENT_ADAPTER,))
    result["transformer_fake_score_checkpointed"] = transformer_pass((FAKE_ADAPTER,))  # one transformer: both
    result["tokens"] = {"image": (hr_size // 8 // 2) ** 2, "prompt": int(cond.prompt_embeds.shape[1])}
    result["peak_rss_bytes"] = _peak()
    return result


def memory_model(steps: dict, activations: dict, batch: int = 2, shard_gpus: int = 8) -> dict:
    """Per-GPU memory of `sd3-medium-tsd` at the activation phase's crop, `batch` crops a GPU, fp16 mixed precision.

    Weights, adapters, gradients and optimiser states are the set-up's exact parameter counts times their bytes
    (frozen fp16; trainable adapters float32 with float32 gradients; AdamW two float32 states, 8-bit AdamW two
    bytes). Activations are the float32 bytes measured for one image, times `batch`, halved for fp16 autocast
    (norm statistics stay float32, so this is a slight underestimate). The student's step and the fake score's
    step do not hold activations at the same time (the student's backward runs first), so the larger counts;
    checkpointing applies to both, as they run on one transformer.
    """
    n = steps["parameters"]
    gib = 2**30
    frozen = (n["base_transformer"] + n["vae"] + n["teacher_lora"]) * 2 + n["perceptual_net"] * 4
    trainable = n["student_trainable"] + n["fake_trainable"]
    act = {k: activations[k] * batch / 2 for k in ("vae_encoder_lora", "vae_decoder_frozen", "transformer_student",
                                                   "transformer_student_checkpointed", "transformer_fake_score",
                                                   "transformer_fake_score_checkpointed")}
    student_full = act["vae_encoder_lora"] + act["transformer_student"] + act["vae_decoder_frozen"]
    student_ckpt = act["vae_encoder_lora"] + act["transformer_student_checkpointed"] + act["vae_decoder_frozen"]
    rows = {
        "frozen weights (fp16 base + VAE + teacher LoRA; fp32 perceptual net)": frozen,
        "trainable adapters (fp32: student transformer + VAE-encoder LoRA, fake-score LoRA)": trainable * 4,
        "their gradients (fp32)": trainable * 4,
        "AdamW states (2 x fp32)": trainable * 8,
        "8-bit AdamW states instead (optim.optimizer=adamw8bit)": trainable * 2,
        "activations, no checkpointing": max(student_full, act["transformer_fake_score"]),
        "activations, gradient checkpointing": max(student_ckpt, act["transformer_fake_score_checkpointed"]),
    }
    # train.shard_prior: the transformer's frozen weights (its base and the teacher adapter) split over the GPUs
    sharded = (n["base_transformer"] + n["teacher_lora"]) * 2
    rows[f"frozen weights instead, train.shard_prior over {shard_gpus} GPUs"] = frozen - sharded + sharded / shard_gpus
    static = frozen + trainable * 16
    return {
        "crop": activations["hr_size"], "batch_per_gpu": batch, "bytes": rows,
        "total_without_checkpointing_gib": round((static + rows["activations, no checkpointing"]) / gib, 2),
        "total_with_checkpointing_gib": round(
            (static + rows["activations, gradient checkpointing"]) / gib, 2),
        "total_with_checkpointing_sharded_gib": round(
            (static - sharded + sharded / shard_gpus + rows["activations, gradient checkpointing"]) / gib, 2),
        "shard_gpus": shard_gpus,
        "markdown": "\n".join(["| part | GiB |", "| --- | --- |"]
                              + [f"| {k} | {v / gib:.2f} |" for k, v in rows.items()]),
    }


def _child(phase: str, ns) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.distill_fullscale", "--phase", phase, "--workdir", str(ns.workdir),
           "--hr-size", str(ns.hr_size), "--batch-size", str(ns.batch_size), "--steps", str(ns.steps),
           "--model-hr-size", str(ns.model_hr_size), "--geometry", ns.geometry]
    start = time.perf_counter()
    print(f"phase {phase} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"phase {phase} failed (exit {done.returncode}); its messages are above")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["phase_seconds"] = round(time.perf_counter() - start, 1)
    print(f"phase {phase}: {result['phase_seconds']} s, peak RSS {result.get('peak_rss_bytes', 0) / 2**30:.2f} GiB",
          file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where the random prior is written (~4.3 GB)")
    parser.add_argument("--hr-size", type=int, default=64, help="HR crop of the timed steps")
    parser.add_argument("--batch-size", type=int, default=1, help="crops per step of the timed steps")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model-hr-size", type=int, default=512, help="crop of the activation memory model")
    parser.add_argument("--geometry", default="sd3-medium", help="geometry preset of the random prior (tests: tiny)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="recompute the memory model of a saved run (its steps and activations) and stop")
    ns = parser.parse_args(argv)
    if ns.from_json is not None:
        saved = json.loads(ns.from_json.read_text())
        model = memory_model(saved["steps"], saved["activations"])
        print(model["markdown"])
        print(f"total with checkpointing {model['total_with_checkpointing_gib']} GiB, "
              f"without {model['total_without_checkpointing_gib']} GiB, "
              f"sharded over {model['shard_gpus']} GPUs {model['total_with_checkpointing_sharded_gib']} GiB")
        return 0
    if ns.workdir is None:
        parser.error("--workdir is required (where the random prior is written, about 4.3 GB)")
    if ns.phase is not None:  # a child: one phase, its JSON on the last stdout line
        out = ns.workdir / f"run-{ns.phase}"
        if ns.phase == "prior":
            ns.workdir.mkdir(parents=True, exist_ok=True)
            result = write_prior(ns.workdir, seed=0, geometry=ns.geometry)
            result["peak_rss_bytes"] = _peak()
        elif ns.phase == "steps":
            result = run_steps(ns.workdir, out, ns.hr_size, ns.batch_size, ns.steps)
        elif ns.phase == "half":
            result = run_half(ns.workdir, out, ns.hr_size, ns.batch_size)
        else:
            result = run_activations(ns.workdir, ns.model_hr_size)
        print(json.dumps(result, default=str))
        return 0
    from compress.quality.cost import machine_info

    phases = [p for p in ns.phases.split(",") if p]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"--phases: unknown {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    if "prior" not in phases and not (ns.workdir / "complete.json").is_file():
        parser.error(f"--workdir {ns.workdir} holds no prior yet; include the prior phase")
    results = {"preset": "sd3-medium-tsd", "geometry": ns.geometry, "machine": machine_info(),
               "torch": torch.__version__}
    for phase in phases:
        results[phase] = _child(phase, ns)
    if "steps" in results and "activations" in results:
        results["memory_model"] = memory_model(results["steps"], results["activations"])
    print(json.dumps(results, indent=2, default=str))
    if ns.json:
        from compress.io import write_json

        write_json(ns.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
