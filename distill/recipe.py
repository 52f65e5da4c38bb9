"""The distillation recipe: load -> setup -> run -> save, on Accelerate.

One loop serves TSD-SR's student training (reconstruction + TSD with a fake-score LoRA model), TinySR's
re-distillation after pruning (stage 1: latent L1 to the teacher student; stage 2: + perceptual +
adversarial) and TAD-SR's alternative (HF score distillation + time-aware discriminator): the preset's
loss weights decide which networks are built and which terms run.

Determinism and resume: every random draw of step s (data items, timestep indices, noise) comes from
generators seeded by (seed, s, process), and checkpoints hold model/optimiser/scheduler states, the RNG and
the EMA (Accelerate state, `distill.training.CheckpointManager`) and the step, so a resumed run reproduces the
uninterrupted loss curve; the log is truncated to the checkpoint's step (`distill.training.CsvLog`).
Multi-GPU / multi-node: run the same command under `accelerate launch`; gradients are synchronised
because every trainable network is called through its prepared (DDP) wrapper.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from compress.data.pairs import SRPairDataset
from compress.data.photos import list_photos
from compress.io import atomic_dir, atomic_path, write_json
from compress.models.errors import ModelLoadError, TrainingDiverged
from compress.models.hooks import block_outputs
from compress.models.lora import (
    FAKE_SCORE_LORA_TARGETS,
    TRANSFORMER_LORA_TARGETS,
    adapter_parameters,
    adapters_active,
    add_lora,
    enable_adapter_aware_checkpointing,
    lora_disabled,
    set_active_adapters,
    vae_encoder_lora_targets,
)
from compress.models.student import OneStepSR
from distill.config import ConfigError, RecipeConfig
from distill.flow import Conditioning, FlowSchedule, ScoreModel
from distill.losses import (
    fake_score_loss,
    feature_kd_loss,
    hinge_d_loss,
    hinge_g_loss,
    latent_l1,
    latent_mse,
    tsd_gradient,
    tsd_loss,
)
from distill.training import (
    CHECKPOINT_DIR,
    LOG_NAME,
    CheckpointManager,
    CsvLog,
    list_checkpoints,
    make_accelerator,
    warmup_cosine,
)

MODEL_DIR = "model"
# The LoRA adapters on the prior's one transformer (TSD-SR's names: "default" student / teacher, "reg" fake score;
# ours say which is which, and the release files are written without adapter names).
STUDENT_ADAPTER, FAKE_ADAPTER, TEACHER_ADAPTER = "student", "fake_score", "teacher"
LOG_COLUMNS = ("step", "seconds", "total", "lr", "perceptual", "latent_mse", "pixel_l1", "tsd", "kd_latent_l1",
               "kd_latent_mse", "kd_feature", "hf_score", "adversarial", "fake_score", "discriminator", "nonfinite")


# ----------------------------------------------------------------------------------------------- models
@dataclass
class Prior:
    """The text-to-image flow prior (teacher score model) with its VAE and prompt embeddings."""

    transformer: nn.Module
    vae: nn.Module
    cond: Conditioning
    uncond: Conditioning
    path: Path


def load_prior(path: Path | str, dtype: torch.dtype = torch.float32) -> Prior:
    """Load a prior folder: the TSD-SR release layout with the base inside (``compress.models.release.prior_paths``).

    The SD3 base in ``base/`` or ``stable-diffusion-3-medium-diffusers/`` (the release loader's rule), and ``dataset/default/{prompt,pool}_embeds.pt`` + ``dataset/null/...`` (the null
    embeddings are CFG's unconditional branch). ``"builtin"`` is the shipped reference release; a reference
    kit from ``scripts/train_reference.py`` (``OUT/kit``, or ``OUT`` itself) has this layout too. The networks are
    loaded frozen in `dtype` (a half type under mixed precision: the SD3 base is most of a run's memory).
    """
    from compress.models.checks import load_diffusers_model
    from compress.models.release import load_embedding, prior_paths

    if str(path) == "builtin":
        from compress.models.resolve import REFERENCE_DIR

        path = REFERENCE_DIR
    layout = prior_paths(path)
    if not layout.base.is_dir():
        raise ModelLoadError(
            f"prior folder {layout.root} has no SD3 base (looked for "
            f"{' and '.join(str(p) for p in layout.looked_for_base)}, each a diffusers folder with transformer/ and "
            f"vae/); create one with `python scripts/train_reference.py --out {layout.root} --stage prior` or point "
            "model.prior at a TSD-SR release root with stabilityai/stable-diffusion-3-medium-diffusers copied in"
        )
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    missing = [str(file) for file in layout.embeddings.values() if not file.is_file()]
    if missing:
        raise ModelLoadError(
            f"prior {layout.root}: missing embedding file(s) {', '.join(missing)}; a prior folder needs "
            "dataset/default/ and dataset/null/ (TSD-SR release layout; scripts/train_reference.py --stage prior writes them)"
        )
    transformer = load_diffusers_model(SD3Transformer2DModel, layout.transformer, dtype)
    vae = load_diffusers_model(AutoencoderKL, layout.vae, dtype)
    width, pooled_width = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim
    tensors = {
        name: load_embedding(file, f"prior {name}", pooled_width if "pool" in name else width, "pool" not in name)
        for name, file in layout.embeddings.items()
    }
    return Prior(
        transformer.eval().requires_grad_(False),
        vae.eval().requires_grad_(False),
        Conditioning(tensors["prompt_embeds"], tensors["pool_embeds"]),
        Conditioning(tensors["null_prompt_embeds"], tensors["null_pool_embeds"]),
        layout.root,
    )


class StudentForTraining(nn.Module):
    """The one-step student's training forward: LR, HR -> student latent, decoded image, HR latent.

    Everything goes through the student's own stages (preprocess, encode, velocity, decode). The HR latent
    is the base VAE's (TSD-SR encodes HR with the VAE without its encoder LoRA): the same encoder with the
    LoRA switched off, so no second copy of the VAE is kept.
    """

    def __init__(self, student: OneStepSR, collect_features: bool = False, adapters: tuple[str, ...] | None = None):
        super().__init__()
        self.student = student
        self.collect_features = collect_features
        self.adapters = adapters  # the student's adapters on a transformer it shares (None: its own network)

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor | list]:
        student = self.student
        latent_lr = student.encode(student.preprocess(lr))
        with adapters_active(student.transformer, self.adapters), \
                block_outputs(student.transformer, enabled=self.collect_features) as features:
            latent = student.restore_latent(latent_lr)
        decoded = student.decode(latent)
        with torch.no_grad(), lora_disabled(student.vae):
            hr_latent = student.encode(hr * 2 - 1)
        return {"latent": latent, "image": decoded, "hr_latent": hr_latent, "features": features}


# ----------------------------------------------------------------------------------------------- data
class Batch(NamedTuple):
    lr: torch.Tensor
    hr: torch.Tensor
    names: list[str]  # the training image of each item
    prompt: tuple[torch.Tensor, torch.Tensor] | None  # its HQ prompt embeddings (B, L, D), (B, P), if given


def _as_is(batch: Batch) -> Batch:  # DataLoader's collate: a batch is already built
    return batch


class PairBatches:
    """Batch of step s for process r: items (s * world + r) * batch ... of deterministic pair datasets.

    Item i draws its image, crop and degradation from a generator seeded by (seed, i) (`compress.data.pairs`), so
    every rank reads its own items, and the same ones after a resume, whichever worker builds them.
    `start(first, last)` builds the batches of those steps ahead in `train.num_workers` DataLoader workers.
    """

    def __init__(self, cfg: RecipeConfig, world: int, rank: int, prompt_shape=None):
        train = cfg.train
        length = 2**31 - 1
        if train.data is None and train.pairs is None:
            photos = list_photos("train")
            self.realistic = SRPairDataset(photos, train.hr_size, "realesrgan", seed=train.seed, length=length)
            self.bicubic = SRPairDataset(photos, train.hr_size, "bicubic", seed=train.seed, length=length)
            self.summary = f"data: the {len(photos)} bundled training photos"
            names = [photo.name for photo in photos]
        elif train.pairs is not None:  # pre-degraded pairs: the same pairs whatever train.degradation says
            from compress.data.folder import PairedFolderDataset, scan_pair_folders

            scan = scan_pair_folders(train.pairs[0], train.pairs[1], train.hr_size)
            self.realistic = self.bicubic = PairedFolderDataset(scan, train.hr_size, seed=train.seed, length=length)
            self.summary = scan.summary(train.hr_size)
            names = [hr.stem for _, hr in scan.pairs]
        else:  # a user's folder: checked once, decoded lazily
            from compress.data.folder import FolderPairDataset, scan_hr_folder

            scan = scan_hr_folder(train.data, train.hr_size)
            self.realistic = FolderPairDataset(scan, train.hr_size, "realesrgan", seed=train.seed, length=length)
            self.bicubic = FolderPairDataset(scan, train.hr_size, "bicubic", seed=train.seed, length=length)
            self.summary = scan.summary(train.hr_size)
            names = [path.stem for path in scan.images]
        self.prompts = None
        if train.prompt_embeds is not None:
            from compress.data.prompts import PromptEmbeddings

            self.prompts = PromptEmbeddings(train.prompt_embeds, names, prompt_shape)
            self.summary += f"; per-image prompt embeddings from {train.prompt_embeds}"
        self.train, self.world, self.rank = train, world, rank
        self._loader, self._next = None, None
        # item numbering: from step first_step on, all processes together take world * batch items a step; a
        # resume under another number of processes rebases it, so no item is drawn twice or skipped
        self.first_step, self.first_item = 0, 0

    def items_before(self, step: int) -> int:
        """Items all processes have drawn before `step` (stored in checkpoints)."""
        return self.first_item + (step - self.first_step) * self.world * self.train.batch_size

    def rebase(self, step: int, items: int) -> None:
        self.first_step, self.first_item = step, items

    def _source(self, item: int) -> SRPairDataset:
        if self.train.degradation == "realesrgan":
            return self.realistic
        if self.train.degradation == "bicubic":
            return self.bicubic
        # mixed: a fixed hash of the item decides, so resume and other processes agree
        return self.bicubic if (item * 2654435761 % 2**32) / 2**32 < self.train.bicubic_fraction else self.realistic

    def __len__(self) -> int:  # steps, for DataLoader
        return 2**31 - 1

    def __getitem__(self, step: int) -> Batch:
        first = self.items_before(step) + self.rank * self.train.batch_size
        items = [self._source(i)[i] for i in range(first, first + self.train.batch_size)]
        names = [x["name"] for x in items]
        prompt = self.prompts.batch(names) if self.prompts is not None else None
        return Batch(torch.stack([x["lr"] for x in items]), torch.stack([x["hr"] for x in items]), names, prompt)

    def start(self, first: int, last: int) -> None:
        """Build the batches of steps first..last-1 ahead, in `train.num_workers` worker processes (0: none)."""
        if self.train.num_workers < 1 or first >= last:
            return
        from torch.utils.data import DataLoader

        self._loader = iter(DataLoader(self, batch_size=None, sampler=range(first, last), collate_fn=_as_is,
                                       num_workers=self.train.num_workers, prefetch_factor=2))
        self._next = first

    def __call__(self, step: int) -> Batch:
        if self._loader is not None and step == self._next:
            self._next += 1
            return next(self._loader)
        return self[step]


def make_adamw(params: list[nn.Parameter], lr: float, optim) -> torch.optim.Optimizer:
    """AdamW with the recipe's settings; ``optim.optimizer: adamw8bit`` is bitsandbytes' 8-bit AdamW (its states
    take 2 bytes a parameter instead of 8), for full-size runs where optimiser memory counts."""
    settings = dict(lr=lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, **settings)
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("optim.optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes), which is not "
                          "installed here; use optim.optimizer=adamw") from None
    return bitsandbytes.optim.AdamW8bit(params, **settings)


def check_engine(distributed_type) -> None:
    """DDP (one process or many) is the engine this recipe runs on. FSDP and DeepSpeed prepare one model per
    optimiser and shard and checkpoint each model whole, while the student, the fake score and the teacher share
    one frozen transformer through their adapters: refused in one line instead of failing inside accelerate."""
    name = str(getattr(distributed_type, "value", distributed_type))
    if name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(f"accelerate's {name} engine is not supported by the distillation recipe (its student, "
                          "fake score and teacher are adapters on one shared frozen transformer); launch with "
                          "distill/accelerate/ddp.yaml, and add --set train.shard_prior=true to shard that "
                          "transformer across the GPUs (FSDP2); per-GPU memory: docs/distill-fullscale.md")


@contextmanager
def only_trainable(module: nn.Module, trainable: list[nn.Parameter]) -> Iterator[None]:
    """Inside the block only `trainable` require grad in `module`: DDP (``accelerator.prepare``) registers the
    parameters that require grad when it wraps, and the student and the fake score share one transformer whose
    adapters belong to different optimisers. The flags are put back afterwards."""
    keep = {id(p) for p in trainable}
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for param, _ in flags:
        param.requires_grad_(id(param) in keep)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def step_generator(seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 4099 + rank) * 31 + stream)


# ----------------------------------------------------------------------------------------------- recipe
@dataclass
class RunState:
    step: int = 0
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    nonfinite_steps: int = 0  # skipped for a non-finite loss or gradient, over the whole run
    streak: list[int] = field(default_factory=list)  # the current run of such steps


class DistillRecipe:
    """load() the networks, setup() optimisers and Accelerate, run() the loop, save() the student."""

    def __init__(self, cfg: RecipeConfig, out: Path | str, resume: bool = False, max_steps: int | None = None,
                 progress: bool = True):
        self.cfg = cfg
        self.out = Path(out)
        self.resume = resume
        self.stop_at = min(cfg.train.steps, max_steps) if max_steps else cfg.train.steps
        self.progress = progress
        self.state = RunState()

    # -- load -----------------------------------------------------------------------------------------
    def load(self) -> "DistillRecipe":
        from accelerate.utils import set_seed

        from compress.models.resolve import load_model

        cfg = self.cfg
        set_seed(cfg.train.seed)  # LoRA initialisation (gaussian A) must be the same in every run and process
        # Under mixed precision the frozen prior (base, VAE, teacher LoRA) is stored in the half type and the
        # trainable adapters in float32, as TSD-SR does; autocast runs the arithmetic in half either way.
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision, torch.float32)
        self.prior = load_prior(cfg.model.prior, half) if cfg.model.prior else None
        # Every adapter (student, fake score, teacher) lives on the prior's one frozen transformer and is switched
        # on per call, as TSD-SR's train/train.py does for teacher and fake score; nothing is copied.
        base = self.prior.transformer if self.prior is not None else None
        self.teacher_adapters: tuple[str, ...] = ()
        if cfg.model.teacher_lora:
            from compress.models.lora import load_lora_file

            load_lora_file(base, cfg.model.teacher_lora_file(), TRANSFORMER_LORA_TARGETS, "teacher LoRA", adapter_name=TEACHER_ADAPTER)
            for p in adapter_parameters(base, TEACHER_ADAPTER):
                p.requires_grad_(False)
            self.teacher_adapters = (TEACHER_ADAPTER,)
            set_active_adapters(base, self.teacher_adapters)

        self.discriminator = None
        if cfg.loss.adversarial > 0:  # TAD-SR's D copies the teacher's first blocks: before other adapters join
            from distill.tadsr import TimeAwareDiscriminator

            self.discriminator = TimeAwareDiscriminator(base, num_blocks=cfg.model.discriminator_blocks)
            self.d_trainable = self.discriminator.trainable_parameters()

        self.student_adapters: tuple[str, ...] | None = None  # None: the student is its own network
        if cfg.model.student_init == "lora":
            vae = self.prior.vae
            add_lora(base, cfg.model.student_rank, TRANSFORMER_LORA_TARGETS, adapter_name=STUDENT_ADAPTER)
            add_lora(vae, cfg.model.vae_rank, vae_encoder_lora_targets(vae))
            student = OneStepSR(base, vae, self.prior.cond.prompt_embeds, self.prior.cond.pooled)
            student.requires_grad_(False)
            for p in (*adapter_parameters(base, STUDENT_ADAPTER), *adapter_parameters(vae, "default")):
                p.requires_grad_(True)
            self.student_adapters = (STUDENT_ADAPTER,)
        else:
            student = load_model(None if cfg.model.student_init == "builtin" else cfg.model.student_init).model
            student = student.float().train()
            student.requires_grad_(False)
            if cfg.model.trainable == "full":
                student.transformer.requires_grad_(True)
            else:
                add_lora(student.transformer, cfg.model.student_rank, TRANSFORMER_LORA_TARGETS)
                for name, p in student.transformer.named_parameters():
                    p.requires_grad_("lora_" in name)
        student.vae.decoder.requires_grad_(False)  # the decoder stays frozen (TSD-SR); gradients pass through
        if cfg.train.gradient_checkpointing and hasattr(student.transformer, "enable_gradient_checkpointing"):
            enable_adapter_aware_checkpointing(student.transformer)
        self.student = student
        self.trainee = StudentForTraining(student, collect_features=cfg.loss.kd_feature > 0,
                                          adapters=self.student_adapters)

        self.kd_teacher = None
        if cfg.loss.needs_kd_teacher:
            spec = None if cfg.model.kd_teacher == "builtin" else cfg.model.kd_teacher
            self.kd_teacher = load_model(spec).model.float().eval().requires_grad_(False)

        self.fake = None
        if cfg.loss.tsd > 0:
            add_lora(base, cfg.model.fake_rank, FAKE_SCORE_LORA_TARGETS, adapter_name=FAKE_ADAPTER)
            self.fake = ScoreModel(base, adapters=(FAKE_ADAPTER,))
        self.teacher_score = ScoreModel(base, adapters=self.teacher_adapters) if base is not None else None
        if base is not None:
            # between calls the student's adapter is the live one (none when it is its own network)
            set_active_adapters(base, self.student_adapters or ())
            # peft gives an adapter its base layer's dtype; the trained ones are kept in float32
            for module in (base, self.prior.vae):
                for param in module.parameters():
                    if param.requires_grad:
                        param.data = param.data.float()

        self.perceptual, self.perceptual_name = None, None
        if cfg.loss.perceptual > 0:
            from distill.perceptual import build_perceptual_loss

            self.perceptual, self.perceptual_name = build_perceptual_loss(cfg.loss.perceptual_net)
        self.schedule = FlowSchedule()
        return self

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self) -> "DistillRecipe":
        cfg = self.cfg
        for tracker, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
            if tracker in cfg.train.log_with:
                try:
                    __import__(module)
                except ImportError:
                    raise ConfigError(f"train.log_with: {tracker} is not installed here (pip install {module}); "
                                      "log.csv is always written") from None
        self.accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision, log_with=cfg.train.log_with,
                                            project_dir=self.out / "trackers")
        acc = self.accelerator
        check_engine(acc.distributed_type)
        shape = None
        if self.prior is not None:
            from compress.data.prompts import PromptShape

            null = self.prior.uncond
            shape = PromptShape(null.prompt_embeds.shape[1], null.prompt_embeds.shape[2], null.pooled.shape[1])
        self.data = PairBatches(cfg, acc.num_processes, acc.process_index, shape)
        if acc.is_main_process and self.progress:
            print(self.data.summary, file=sys.stderr)

        def adamw(params, lr):
            return make_adamw(params, lr, cfg.optim)

        # the fake score's adapter sits on the student's transformer too: it has its own optimiser
        fake_trainable = adapter_parameters(self.fake.transformer, FAKE_ADAPTER) if self.fake is not None else []
        fake_ids = {id(p) for p in fake_trainable}
        trainable = [p for p in self.trainee.parameters() if p.requires_grad and id(p) not in fake_ids]
        if not trainable:
            raise ValueError("the student has no trainable parameters; check model.trainable")
        self.optimizer = adamw(trainable, cfg.optim.lr)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.train.steps, cfg.optim.warmup_steps, decay=cfg.optim.schedule)
        )
        with only_trainable(self.trainee, trainable):
            self.trainee, self.optimizer, self.lr_scheduler = acc.prepare(self.trainee, self.optimizer, self.lr_scheduler)
        self.fake_trainable = fake_trainable
        self.fake_optimizer = self.d_optimizer = None
        if self.fake is not None:
            self.fake_optimizer = adamw(fake_trainable, cfg.optim.lr_fake)
            with only_trainable(self.fake, fake_trainable):
                self.fake, self.fake_optimizer = acc.prepare(self.fake, self.fake_optimizer)
        if self.discriminator is not None:
            self.d_optimizer = adamw(self.d_trainable, cfg.optim.lr_discriminator)
            self.discriminator, self.d_optimizer = acc.prepare(self.discriminator, self.d_optimizer)
        for module in (self.teacher_score, self.kd_teacher, self.perceptual):
            if module is not None:
                module.to(acc.device)
        self.sharding = None
        if cfg.train.shard_prior:
            self._shard_prior()
        self.ema = None
        if cfg.train.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(trainable, decay=cfg.train.ema_decay)
            acc.register_for_checkpointing(self.ema)
        self.trainable = trainable
        # the frozen prior (most of a full-size run's weights) is reloaded at resume, not checkpointed
        optimized = [p for opt in (self.optimizer, self.fake_optimizer, self.d_optimizer) if opt is not None
                     for group in opt.param_groups for p in group["params"]]
        self.checkpoints = CheckpointManager(acc, self.out, keep=cfg.train.keep_checkpoints, trained=optimized)
        self.log = CsvLog(self.out / LOG_NAME, LOG_COLUMNS)
        if self.resume:
            self._restore()
        elif acc.is_main_process:
            self._start_folder()
        if cfg.train.log_with:
            flat = {f"{section}.{key}": value for section, values in cfg.to_dict().items() if isinstance(values, dict)
                    for key, value in values.items() if isinstance(value, (int, float, str, bool))}
            acc.init_trackers(cfg.name, config=flat)
        return self

    def _shard_prior(self) -> None:
        """FSDP for the frozen weights, after DDP has wrapped the trained ones: torch's ``fully_shard`` splits each
        block of the prior transformer (and the rest of it) across the processes and gathers a block's weights
        only while it runs; the adapters are left out of the shards (``ignored_params``), so the DDP wrappers made
        before keep averaging their gradients and the optimisers, clipping and checkpoints see plain tensors.
        accelerate's own FSDP plugin cannot express this: it shards and checkpoints one whole model per
        optimiser, and here three networks share the transformer."""
        acc = self.accelerator
        if self.prior is None:
            raise ConfigError("train.shard_prior shards the prior transformer, and this recipe has none "
                              "(model.prior is unused without the TSD loss or the HF-score term)")
        if acc.num_processes < 2:
            raise ConfigError("train.shard_prior splits the prior across processes; launch with accelerate and "
                              "several processes (distill/accelerate/ddp.yaml), or leave it off")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
        base = self.prior.transformer
        adapters = {p for p in base.parameters() if p.requires_grad}
        whole = sum(p.numel() * p.element_size() for p in base.parameters() if p not in adapters)
        for block in base.transformer_blocks:
            fully_shard(block, mesh=mesh, ignored_params=adapters)
        fully_shard(base, mesh=mesh, ignored_params=adapters)
        local = sum(p.to_local().numel() * p.element_size() for p in base.parameters() if p not in adapters)
        self.sharding = {"processes": acc.num_processes, "frozen_transformer_bytes": whole,
                         "frozen_transformer_bytes_per_process": local}

    def _unsharded_student_transformer(self) -> nn.Module:
        """The student's transformer in one piece, for the release: its base is the frozen prior's (what the shards
        hold), read again from the prior folder, and its adapter, whole on every process, is copied onto it."""
        base = self.prior.transformer
        frozen_dtype = next(p.dtype for p in base.parameters() if not p.requires_grad)
        whole = load_prior(self.cfg.model.prior, frozen_dtype).transformer
        add_lora(whole, self.cfg.model.student_rank, TRANSFORMER_LORA_TARGETS, adapter_name=STUDENT_ADAPTER)
        marker = f".{STUDENT_ADAPTER}."
        trained = {name: p for name, p in base.named_parameters() if marker in name}
        copied = {name: p for name, p in whole.named_parameters() if marker in name}
        if copied.keys() != trained.keys():
            raise RuntimeError(f"the re-read prior's {STUDENT_ADAPTER} adapter does not match the trained one")
        for name, param in copied.items():
            param.data = trained[name].detach().clone()
        return whole

    def _start_folder(self) -> None:
        if list_checkpoints(self.out) or (self.out / MODEL_DIR).exists():
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        if self.log.path.is_file():  # rows of a run that stopped before its first checkpoint
            self.log.truncate(0)
        with atomic_path(self.out / "config.yaml") as tmp:
            import yaml

            tmp.write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    # -- checkpoints ----------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        self.checkpoints.save(self.state.step, seconds=self.state.seconds, nonfinite_steps=self.state.nonfinite_steps,
                              items_done=self.data.items_before(self.state.step),
                              processes=self.accelerator.num_processes)

    def _restore(self) -> None:
        if not list_checkpoints(self.out):
            raise FileNotFoundError(
                f"--resume: no checkpoint under {self.out / CHECKPOINT_DIR} (looked for step-*/trainer_state.json); "
                "start without --resume"
            )
        saved = self.checkpoints.restore()
        self.state.step, self.state.seconds = int(saved["step"]), float(saved["seconds"])
        self.state.nonfinite_steps = int(saved.get("nonfinite_steps", 0))
        if "items_done" in saved:  # checkpoints before this field: the same number of processes is assumed
            self.data.rebase(self.state.step, int(saved["items_done"]))
        before, now = saved.get("processes"), self.accelerator.num_processes
        if before and before != now and self.accelerator.is_main_process and self.progress:
            print(f"resuming step {self.state.step} with {now} process(es), the checkpoint's run had {before}: "
                  f"{now * self.cfg.train.batch_size} crops a step from here on, was {before * self.cfg.train.batch_size}",
                  file=sys.stderr)
        if self.accelerator.is_main_process:  # drop rows written after the checkpoint
            self.state.history = self.log.truncate(self.state.step)

    # -- run ------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        loss_cfg = cfg.loss
        rank = acc.process_index
        batch = self.data(step)
        lr, hr = batch.lr.to(acc.device), batch.hr.to(acc.device)
        # teacher and fake score see each image's HQ prompt where the user gave one (TSD-SR); else the fixed prompt
        cond = Conditioning(*batch.prompt) if batch.prompt is not None else (self.prior.cond if self.prior else None)
        g_index = step_generator(cfg.train.seed, step, rank, 1)
        g_noise = step_generator(cfg.train.seed, step, rank, 2)

        self.trainee.train()
        with acc.accumulate(self.trainee), acc.autocast():
            out = self.trainee(lr, hr)
            latent, hr_latent = out["latent"], out["hr_latent"]
            terms: dict[str, torch.Tensor] = {}
            if loss_cfg.perceptual > 0:
                height, width = hr.shape[-2:]
                terms["perceptual"] = self.perceptual((out["image"][..., :height, :width] + 1) / 2, hr).mean()
            if loss_cfg.latent_mse > 0:
                terms["latent_mse"] = latent_mse(latent, hr_latent)
            if loss_cfg.pixel_l1 > 0:
                terms["pixel_l1"] = F.l1_loss((out["image"][..., : hr.shape[-2], : hr.shape[-1]] + 1) / 2, hr)
            noise = torch.randn(latent.shape, generator=g_noise).to(latent)
            if loss_cfg.tsd > 0:
                index = int(self.schedule.sample_indices(1, g_index, loss_cfg.tsd_settings.index_low,
                                                         loss_cfg.tsd_settings.index_high)[0])
                grad = tsd_gradient(latent.detach(), hr_latent, noise, index, self.schedule, self.teacher_score,
                                    self.fake, cond, self.prior.uncond, loss_cfg.tsd_settings, g_index)
                terms["tsd"] = tsd_loss(latent, grad)
            teacher_latent = None
            if self.kd_teacher is not None:
                teacher = self.kd_teacher
                with torch.no_grad(), block_outputs(teacher.transformer, loss_cfg.kd_feature > 0) as teacher_features:
                    teacher_latent = teacher.restore_latent(teacher.encode(teacher.preprocess(lr)))
                if loss_cfg.kd_latent_l1 > 0:
                    terms["kd_latent_l1"] = latent_l1(latent, teacher_latent)
                if loss_cfg.kd_latent_mse > 0:
                    terms["kd_latent_mse"] = latent_mse(latent, teacher_latent)
                if loss_cfg.kd_feature > 0:
                    terms["kd_feature"] = feature_kd_loss(out["features"], teacher_features)
            if loss_cfg.hf_score > 0:
                from distill.tadsr import (
                    hf_score_distillation_gradient,
                    hf_score_distillation_loss,
                    sample_small_indices,
                )

                small = sample_small_indices(self.schedule, latent.shape[0], g_index)
                grad = hf_score_distillation_gradient(latent.detach(), teacher_latent, noise, small, self.schedule,
                                                      self.teacher_score, cond)
                terms["hf_score"] = hf_score_distillation_loss(latent, grad)
            if loss_cfg.adversarial > 0:
                from distill.tadsr import discriminator_inputs

                d_indices = self.schedule.sample_indices(latent.shape[0], g_index, 0, 1000)
                fake_in, timesteps = discriminator_inputs(latent, noise, d_indices, self.schedule)
                for p in self.d_trainable:  # the generator step must not move the discriminator
                    p.requires_grad_(False)
                # TAD-SR Eq. 11-12: hinge losses, one per time-conditioned head
                terms["adversarial"] = hinge_g_loss(self.discriminator(fake_in, timesteps, self.prior.cond, return_all=True))
            total = sum(getattr(loss_cfg, name) * value for name, value in terms.items())
            acc.backward(total)
            finite = bool(torch.isfinite(total.detach()))
            if acc.sync_gradients:
                norm = acc.clip_grad_norm_(self.trainable, cfg.optim.grad_clip)  # None where an engine clips itself
                finite &= norm is None or bool(torch.isfinite(norm))
            finite = self._on_every_rank(finite)
            if finite:
                self.optimizer.step()
            self.lr_scheduler.step()  # the schedule keeps its pace over skipped steps, as AMP's loss scaling does
            self.optimizer.zero_grad(set_to_none=True)

        logs = {name: float(value.detach()) for name, value in terms.items()}
        logs["total"] = float(total.detach())
        logs["nonfinite"] = 0.0 if finite else 1.0
        if not finite:  # nothing else learns from a step whose student output or loss is not finite
            logs["lr"] = self.lr_scheduler.get_last_lr()[0]
            return logs
        if self.fake is not None:  # TSD-SR: the fake-score model is updated after every student step
            indices = self.schedule.sample_indices(latent.shape[0], g_index, loss_cfg.tsd_settings.index_low,
                                                   loss_cfg.tsd_settings.index_high)
            fake_noise = torch.randn(latent.shape, generator=g_noise).to(latent)
            loss_fake = fake_score_loss(self.fake, latent.detach(), fake_noise, indices, self.schedule,
                                        cond, weighting=loss_cfg.fake_weighting, generator=g_index)
            acc.backward(loss_fake)
            acc.clip_grad_norm_(self.fake_trainable, cfg.optim.grad_clip)
            self.fake_optimizer.step()
            self.fake_optimizer.zero_grad(set_to_none=True)
            logs["fake_score"] = float(loss_fake.detach())
        if self.discriminator is not None:
            from distill.tadsr import discriminator_inputs

            for p in self.d_trainable:
                p.requires_grad_(True)
            d_indices = self.schedule.sample_indices(latent.shape[0], g_index, 0, 1000)
            real_in, t_real = discriminator_inputs(hr_latent, noise, d_indices, self.schedule)
            fake_in, t_fake = discriminator_inputs(latent.detach(), noise, d_indices, self.schedule)
            loss_d = hinge_d_loss(self.discriminator(real_in, t_real, self.prior.cond, return_all=True),
                                  self.discriminator(fake_in, t_fake, self.prior.cond, return_all=True))
            acc.backward(loss_d)
            self.d_optimizer.step()
            self.d_optimizer.zero_grad(set_to_none=True)
            logs["discriminator"] = float(loss_d.detach())
        if self.ema is not None:
            self.ema.step(self.trainable)
        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        return logs

    def _on_every_rank(self, finite: bool) -> bool:
        """True only if `finite` holds in every process, so that all of them skip the same steps."""
        if self.accelerator.num_processes == 1:
            return finite
        flag = torch.tensor([0.0 if finite else 1.0], device=self.accelerator.device)
        return float(self.accelerator.reduce(flag, reduction="sum")) == 0.0

    def _count_nonfinite(self, step: int, logs: dict[str, float]) -> None:
        """Count a skipped step; stop the run when `train.max_nonfinite_steps` come in a row."""
        if not logs["nonfinite"]:
            self.state.streak = []
            return
        self.state.nonfinite_steps += 1
        self.state.streak.append(step)
        if len(self.state.streak) >= self.cfg.train.max_nonfinite_steps:
            newest = self.checkpoints.latest()
            kept = f"the last good checkpoint is {newest}" if newest else "no checkpoint had been written yet"
            raise TrainingDiverged(
                f"{self.cfg.name}: steps {self.state.streak[0]}-{self.state.streak[-1]} all had a non-finite loss or "
                f"gradient and were skipped (train.max_nonfinite_steps = {self.cfg.train.max_nonfinite_steps}); "
                f"stopped, {kept}. Lower optim.lr or check the data, then continue with --resume"
            )

    def run(self) -> "DistillRecipe":
        from tqdm.auto import tqdm

        acc = self.accelerator
        bar = tqdm(total=self.stop_at, initial=self.state.step, desc=self.cfg.name, unit="step",
                   disable=not (self.progress and acc.is_main_process), dynamic_ncols=True)
        self.data.start(self.state.step, self.stop_at)
        last = time.time()
        while self.state.step < self.stop_at:
            step = self.state.step
            logs = self.train_step(step)
            self.state.step = step + 1
            self._count_nonfinite(self.state.step, logs)
            now = time.time()
            self.state.seconds += now - last
            last = now
            if acc.is_main_process and (self.state.step % self.cfg.train.log_every == 0 or self.state.step == self.stop_at):
                row = {"step": self.state.step, "seconds": round(self.state.seconds, 3), **logs}
                self.state.history.append(row)
                self.log.append([row])
                if self.cfg.train.log_with:
                    acc.log({k: v for k, v in logs.items() if v == v}, step=self.state.step)  # NaN rows stay in log.csv
                bar.set_postfix(loss=f"{logs['total']:.4f}", refresh=False)
            bar.update(1)
            due = self.state.step % self.cfg.train.checkpoint_every == 0 or self.state.step == self.stop_at
            if due and not self.state.streak:  # during a run of skipped steps the newest checkpoint stays the good one
                self._save_checkpoint()
        bar.close()
        if self.cfg.train.log_with:
            acc.end_training()
        return self

    # -- save -----------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write the student (release layout for LoRA students, a model folder otherwise) + metrics/report."""
        from compress.models.release import write_tsdsr_release
        from compress.quality.cost import count_params, machine_info

        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        if self.state.step < self.cfg.train.steps:
            print(f"stopped at step {self.state.step} of {self.cfg.train.steps}; resume with --resume")
            return None
        trainee = acc.unwrap_model(self.trainee)
        if self.ema is not None:
            self.ema.store(self.trainable)
            self.ema.copy_to(self.trainable)
        student = trainee.student
        target = self.out / MODEL_DIR
        if self.cfg.model.student_init == "lora":
            transformer = self._unsharded_student_transformer() if self.sharding else student.transformer
            with atomic_dir(target, overwrite=True) as tmp:
                write_tsdsr_release(
                    tmp, transformer, student.vae, student.prompt_embeds, student.pooled_prompt_embeds,
                    half_precision=self.cfg.train.save_half, transformer_adapter=STUDENT_ADAPTER,
                    null_prompt_embeds=self.prior.uncond.prompt_embeds,
                    null_pooled_prompt_embeds=self.prior.uncond.pooled,
                )
        else:
            from compress.models.lora import unwrap_lora

            saved = copy.deepcopy(student)
            unwrap_lora(saved.transformer, merge=True)
            saved.save_pretrained(target, overwrite=True)
        if self.ema is not None:
            self.ema.restore(self.trainable)
        last = [r for r in self.state.history[-20:] if not float(r.get("nonfinite") or 0)]  # skipped steps: no loss
        logged = {k: [float(r[k]) for r in last if r.get(k) not in (None, "")] for k in LOG_COLUMNS}
        final = {k: sum(v) / len(v) for k, v in logged.items() if v and k not in ("step", "seconds", "lr", "nonfinite")}
        metrics = {
            "recipe": self.cfg.name,
            "steps": self.state.step,
            "train_seconds": round(self.state.seconds, 1),
            "nonfinite_steps_skipped": self.state.nonfinite_steps,
            "processes": acc.num_processes,
            "final_losses_mean_last_20": {k: round(v, 6) for k, v in final.items()},
            "perceptual_loss": self.perceptual_name,
            "trainable_parameters": sum(p.numel() for p in self.trainable),
            "prior_sharding": self.sharding,
            "student_parameters": {"transformer": count_params(student.transformer), "vae": count_params(student.vae)},
            "machine": machine_info(),
        }
        write_json(self.out / "metrics.json", metrics)
        lines = [
            f"# Distillation run `{self.cfg.name}`", "", self.cfg.description, "",
            f"- steps: {self.state.step} ({metrics['train_seconds']} s on {acc.num_processes} process(es), "
            f"{metrics['machine'].get('cpu_model', '')})",
            f"- perceptual loss: {self.perceptual_name}",
            f"- steps skipped for a non-finite loss or gradient: {self.state.nonfinite_steps}",
            f"- trainable parameters: {metrics['trainable_parameters']:,}",
            *([f"- frozen prior transformer sharded over {self.sharding['processes']} processes: "
               f"{self.sharding['frozen_transformer_bytes_per_process'] / 2**20:.1f} MiB each of "
               f"{self.sharding['frozen_transformer_bytes'] / 2**20:.1f} MiB"] if self.sharding else []),
            "- final losses (mean of the last 20 logged steps): "
            + ", ".join(f"{k} {v:.4g}" for k, v in final.items()),
            f"- student: `{target}` ({'TSD-SR release layout' if self.cfg.model.student_init == 'lora' else 'model folder'})",
            "- files: config.yaml, log.csv, metrics.json, checkpoints/, model/",
        ]
        with atomic_path(self.out / "report.md") as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        return target


def run_recipe(cfg: RecipeConfig, out: Path | str, resume: bool = False, max_steps: int | None = None,
               progress: bool = True) -> DistillRecipe:
    recipe = DistillRecipe(cfg, out, resume=resume, max_steps=max_steps, progress=progress)
    recipe.load().setup().run().save()
    return recipe
