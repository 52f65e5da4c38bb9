"""Typed, self-validating configuration of a distillation run, loaded from a YAML preset.

A preset (distill/presets/*.yaml) fills these sections; command-line flags override single keys. Every
check names the offending key as `section.key` so a bad preset or flag is fixed in one look.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compress.schedules import SCHEDULES

PRESET_DIR = Path(__file__).resolve().parent / "presets"
LAST_INDEX = 999  # the cleanest schedule entry; DASM endpoints are clamped to it (``min(..., 999)`` in train.py)
FAKE_SCORE_WEIGHTINGS = ("logit_normal", "sigma_sqrt", "none")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the fix."""


@dataclass
class TSDConfig:
    """Hyper-parameters of the TSD gradient (defaults: TSD-SR's ``train/train.py`` / ``script/train.sh``).

    ``vsd_weight`` is lambda: the VSD share (0.7); the TSM share is ``1 - vsd_weight``. ``index_low``/``index_high``
    bound the teacher index like ``randint(50, 950)``. DASM is off by default because the released ``train.sh``
    (the stage-1 recipe) does not pass ``--use_dasm``; the paper turns it on in later stages (TSD-SR paper,
    training details of its experiments: stage 1 without DASM, later stages with it).
    """

    vsd_weight: float = 0.7
    guidance: float = 7.5
    index_low: int = 50
    index_high: int = 950
    dasm: bool = False
    dasm_points: int = 4
    dasm_step: int = 50
    dasm_weights: tuple[float, ...] = (1.0, 0.3, 0.3, 0.3)
    dasm_random_bias: int = 25

    def __post_init__(self) -> None:
        self.dasm_weights = tuple(float(w) for w in self.dasm_weights)
        if not (math.isfinite(self.vsd_weight) and 0.0 <= self.vsd_weight <= 1.0):
            raise ValueError(f"vsd_weight must be in [0, 1], got {self.vsd_weight}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0.0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if not 0 <= self.index_low < self.index_high <= LAST_INDEX + 1:
            raise ValueError(
                f"index_low/index_high must satisfy 0 <= index_low < index_high <= {LAST_INDEX + 1}, "
                f"got index_low={self.index_low}, index_high={self.index_high}"
            )
        if self.dasm_points < 1:
            raise ValueError(f"dasm_points must be >= 1, got {self.dasm_points}")
        if self.dasm_step < 1:
            raise ValueError(f"dasm_step must be >= 1, got {self.dasm_step}")
        if len(self.dasm_weights) != self.dasm_points:
            raise ValueError(
                f"dasm_weights must have dasm_points={self.dasm_points} entries, got {len(self.dasm_weights)}"
            )
        if not all(math.isfinite(w) and w >= 0 for w in self.dasm_weights):
            raise ValueError(f"dasm_weights must be finite and >= 0, got {self.dasm_weights}")
        # The endpoint must stay above the start index, or the points would walk towards *higher* noise.
        if not 0 <= self.dasm_random_bias < self.dasm_step * self.dasm_points:
            raise ValueError(
                f"dasm_random_bias must be in [0, dasm_step * dasm_points = {self.dasm_step * self.dasm_points}), "
                f"got {self.dasm_random_bias}"
            )

    @property
    def num_points(self) -> int:
        """Number of evaluation points whose gradients are summed (1 without DASM)."""
        return self.dasm_points if self.dasm else 1

    @property
    def point_weights(self) -> tuple[float, ...]:
        return self.dasm_weights if self.dasm else (1.0,)


@dataclass
class ModelSection:
    """Which networks take part.

    prior:      "builtin" (the shipped reference release, compress/assets/reference) or a prior folder: the
                text-to-image flow prior (teacher score model), its VAE and the default/null prompt embeddings in
                the TSD-SR release layout, `base/{transformer,vae,scheduler}` +
                `dataset/default/{prompt,pool}_embeds.pt` + `dataset/null/{prompt,pool}_embeds.pt`
                (`compress.models.release.prior_paths`; scripts/train_reference.py writes it, and a TSD-SR
                release root with the SD3 base in base/ and the null embeddings is one).
                Needed by tsd, hf_score and adversarial terms and by `student_init: lora`.
    student_init: "lora"  -> student = prior transformer + fresh LoRA, prior VAE + encoder LoRA (TSD-SR);
                  a model spec (folder, release root, preset:NAME) -> that student, re-distilled.
    kd_teacher: model spec of the uncompressed student for knowledge distillation (None: not used;
                "builtin": the shipped reference student).
    teacher_lora: TSD-SR's teacher LoRA on the prior (its --use_teacher_lora): "release" (the prior root's
                  checkpoint/teacher/teacher.safetensors), a .safetensors path, or None (the plain prior teaches).
    The student's, the fake score's and the teacher's LoRAs are adapters on the prior's one frozen transformer,
    switched per call (no copies of it).
    """

    prior: str | None = None
    student_init: str = "lora"
    student_rank: int = 64
    vae_rank: int = 64
    fake_rank: int = 64
    trainable: str = "lora"  # lora | full (full: every transformer weight of a loaded student)
    kd_teacher: str | None = None
    discriminator_blocks: int = 2
    teacher_lora: str | None = None

    def teacher_lora_file(self) -> Path:
        """The teacher LoRA file `teacher_lora` names; a missing one is one error (no torch needed)."""
        from compress.models.errors import ModelLoadError
        from compress.models.layout import REFERENCE_DIR, prior_paths

        root = REFERENCE_DIR if self.prior == "builtin" else self.prior
        path = prior_paths(root).teacher_lora if self.teacher_lora == "release" else Path(self.teacher_lora)
        if not path.is_file():
            raise ModelLoadError(f"model.teacher_lora: {path} not found; TSD-SR's teacher LoRA is "
                                 "checkpoint/teacher/teacher.safetensors of its release (a separate download linked "
                                 "from the TSD-SR README); set model.teacher_lora=null to teach with the plain prior")
        return path

    def validate(self) -> None:
        for key in ("student_rank", "vae_rank", "fake_rank", "discriminator_blocks"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.trainable not in ("lora", "full"):
            raise ConfigError(f"model.trainable must be lora or full, got {self.trainable!r}")
        if self.student_init == "lora" and not self.prior:
            raise ConfigError("model.student_init: lora needs model.prior (a prior folder with base/ and dataset/)")
        if self.teacher_lora and not self.prior:
            raise ConfigError("model.teacher_lora needs model.prior: the teacher LoRA is an adapter on the prior")
        if self.teacher_lora and self.teacher_lora != "release" and not str(self.teacher_lora).endswith(".safetensors"):
            raise ConfigError(f"model.teacher_lora must be release, a .safetensors file or null, got {self.teacher_lora!r}")


@dataclass
class LossSection:
    """Weights of the student objective (0 switches a term off) and their settings."""

    perceptual: float = 1.0  # LPIPS / ST-LPIPS of the decoded student vs HR (TSD-SR gamma_1)
    perceptual_net: str = "auto"  # auto | lpips | stlpips; the resolved name is recorded in the run folder
    latent_mse: float = 1.0  # MSE(z_student, z_HR) in latent space
    pixel_l1: float = 0.0
    tsd: float = 1.0  # TSD-SR's target score distillation (gamma_2)
    tsd_settings: TSDConfig = field(default_factory=TSDConfig)
    fake_weighting: str = "logit_normal"  # weighting of the fake-score flow-matching loss
    kd_latent_l1: float = 0.0  # TinySR stage 1/2: L1 to the teacher student's output latent
    kd_latent_mse: float = 0.0  # TAD-SR's vanilla distillation: MSE to the teacher student's output latent
    kd_feature: float = 0.0  # MSE between matched transformer block outputs (same block count)
    hf_score: float = 0.0  # TAD-SR high-frequency score distillation against the teacher student's latent
    adversarial: float = 0.0  # time-aware latent discriminator on the prior's blocks (TinySR lambda_7, TAD-SR)

    WEIGHTS = ("perceptual", "latent_mse", "pixel_l1", "tsd", "kd_latent_l1", "kd_latent_mse", "kd_feature",
               "hf_score", "adversarial")

    def validate(self) -> None:
        for name in self.WEIGHTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"loss.{name} must be a number >= 0, got {value!r}")
        if self.perceptual_net not in ("auto", "lpips", "stlpips"):
            raise ConfigError(f"loss.perceptual_net must be auto, lpips or stlpips, got {self.perceptual_net!r}")
        if self.fake_weighting not in ("logit_normal", "sigma_sqrt", "none"):
            raise ConfigError(f"loss.fake_weighting must be logit_normal, sigma_sqrt or none, got {self.fake_weighting!r}")
        active = [n for n in self.WEIGHTS if getattr(self, n) > 0]
        if not active:
            raise ConfigError("loss: every weight is 0; switch on at least one term")

    @property
    def needs_prior(self) -> bool:
        return self.tsd > 0 or self.hf_score > 0 or self.adversarial > 0

    @property
    def needs_kd_teacher(self) -> bool:
        return self.kd_latent_l1 > 0 or self.kd_latent_mse > 0 or self.kd_feature > 0 or self.hf_score > 0


@dataclass
class OptimSection:
    lr: float = 5e-6
    lr_fake: float = 1e-6
    lr_discriminator: float = 5e-6
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant (after warm-up)
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes' 8-bit AdamW: a quarter of the state memory)

    def validate(self) -> None:
        for key in ("lr", "lr_fake", "lr_discriminator"):
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(f"optim.{key} must be in (0, 1), got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be {' or '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.grad_clip <= 0:
            raise ConfigError(f"optim.grad_clip must be > 0, got {self.grad_clip}")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise ConfigError(f"optim.optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
        self.betas = tuple(self.betas)  # YAML gives a list


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 4  # per process
    hr_size: int = 128  # HR crop side; LR = hr_size / 4
    data: str | None = None  # a folder of HR images (any depth); None: the bundled training photos
    pairs: list | None = None  # [LR_DIR, HR_DIR]: pre-degraded pairs matched by name (then no degradation is applied)
    # per-image HQ prompt embeddings for teacher and fake score (compress.data.prompts: NAME.safetensors or TSD-SR's
    # prompt_embeds/ + pool_embeds/); None: they see the fixed default prompt
    prompt_embeds: str | None = None
    num_workers: int = 0  # DataLoader worker processes building batches ahead (0: in the training process)
    degradation: str = "realesrgan"  # realesrgan | bicubic | mixed
    bicubic_fraction: float = 0.3  # share of bicubic-only pairs when degradation is mixed
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    log_with: list = field(default_factory=list)  # trackers besides log.csv: tensorboard and/or wandb (accelerate)
    gradient_checkpointing: bool = False
    # shard the frozen prior transformer's weights across the processes (torch FSDP2 fully_shard, a unit a block);
    # the adapters stay whole on every process and DDP averages their gradients (multi-process launches only)
    shard_prior: bool = False
    ema_decay: float = 0.0  # 0: no EMA; else the EMA weights are the ones saved
    save_half: bool = True  # store the final base weights in fp16 (release layout)
    # a step with a non-finite loss or gradient is skipped (no update) and counted; this many in a row stop the
    # run, its newest checkpoint being the last good one
    max_nonfinite_steps: int = 5

    def validate(self) -> None:
        for key in ("steps", "batch_size", "checkpoint_every", "log_every", "keep_checkpoints", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.hr_size < 32 or self.hr_size % 32:
            raise ConfigError(f"train.hr_size must be a multiple of 32 (>= 32), got {self.hr_size}")
        if self.data is not None and not Path(self.data).is_dir():
            raise ConfigError(f"train.data: {self.data} is not a folder; give a folder of HR images (any depth)")
        if self.pairs is not None:
            if not isinstance(self.pairs, (list, tuple)) or len(self.pairs) != 2:
                raise ConfigError(f"train.pairs must be [LR_DIR, HR_DIR], got {self.pairs!r}")
            for folder in self.pairs:
                if not Path(folder).is_dir():
                    raise ConfigError(f"train.pairs: {folder} is not a folder")
            if self.data is not None:
                raise ConfigError("train.data and train.pairs are two sources of training data; give one")
        if self.prompt_embeds is not None and not Path(self.prompt_embeds).is_dir():
            raise ConfigError(f"train.prompt_embeds: {self.prompt_embeds} is not a folder of per-image embeddings")
        if isinstance(self.log_with, str):  # --set train.log_with=tensorboard
            self.log_with = [self.log_with]
        if not isinstance(self.log_with, list) or [t for t in self.log_with if t not in ("tensorboard", "wandb")]:
            raise ConfigError(f"train.log_with must be a list of tensorboard and/or wandb, got {self.log_with!r}")
        if self.num_workers < 0:
            raise ConfigError(f"train.num_workers must be >= 0, got {self.num_workers}")
        if self.degradation not in ("realesrgan", "bicubic", "mixed"):
            raise ConfigError(f"train.degradation must be realesrgan, bicubic or mixed, got {self.degradation!r}")
        if not 0 <= self.bicubic_fraction <= 1:
            raise ConfigError(f"train.bicubic_fraction must be in [0, 1], got {self.bicubic_fraction}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"train.mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.seed < 0:
            raise ConfigError(f"train.seed must be >= 0, got {self.seed}")


@dataclass
class RecipeConfig:
    """One distillation run: models, loss, optimiser, training loop."""

    name: str = "custom"
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self) -> "RecipeConfig":
        self.model.validate()
        self.loss.validate()
        self.optim.validate()
        self.train.validate()
        if self.loss.needs_prior and not self.model.prior:
            raise ConfigError("loss.tsd / hf_score / adversarial need model.prior (the teacher score model)")
        if self.train.prompt_embeds is not None and not (self.loss.tsd > 0 or self.loss.hf_score > 0):
            raise ConfigError("train.prompt_embeds condition the teacher and the fake score; this recipe has neither "
                              "(loss.tsd and loss.hf_score are 0): leave train.prompt_embeds unset")
        if self.loss.needs_kd_teacher and not self.model.kd_teacher:
            raise ConfigError("loss.kd_latent_l1 / kd_feature / hf_score need model.kd_teacher (a student to distil from)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RecipeConfig":
        return _build(cls, data, "").validate()

    @classmethod
    def from_yaml(cls, path: Path | str, overrides: dict[str, Any] | None = None) -> "RecipeConfig":
        path = resolve_preset(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a preset is a mapping of sections, got {type(data).__name__}")
        for dotted, value in (overrides or {}).items():
            apply_override(data, dotted, value)
        return cls.from_dict(data)


def resolve_preset(name_or_path: Path | str) -> Path:
    """A preset name (`reference-tsd`) or a YAML path -> the file; names list what exists when missing."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown preset {name_or_path!r}; available: {', '.join(list_presets())}")
    return candidate


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set data['a']['b'] for 'a.b' (values are parsed as YAML scalars: 1e-4, true, null)."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if isinstance(value, str) else value


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    try:
        instance = cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from None
    return instance


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
