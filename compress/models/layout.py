"""Where a model's files live, for every layout the toolkit reads; no torch, so the fail-fast checks of
`compress.models.preflight` can use it before anything heavy is imported.

The TSD-SR release layout (TSD-SR README, github.com/Microtreei/TSD-SR; the release's Google Drive folder),
relative to a release root, is described in `compress/models/release.py`, which loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compress.models.errors import ModelLoadError

# The built-in models and the sample photo, inside the installed package (compress/assets/).
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
# The built-in reference student (TSD-SR release layout) and its reconstruction-only baseline (LoRAs and
# embeddings only; it loads on REFERENCE_DIR / "base").
REFERENCE_DIR = ASSETS_DIR / "reference"
REFERENCE_REC_DIR = ASSETS_DIR / "reference-rec"
SAMPLE_IMAGE = ASSETS_DIR / "samples" / "astronaut_lr.png"

# A saved student (`OneStepSR.save_pretrained`): student_config.json, conditioning.safetensors, and one
# diffusers folder per network.
STUDENT_CONFIG_NAME = "student_config.json"
CONDITIONING_NAME = "conditioning.safetensors"
FORMAT_TAG = "tinysr-toolkit/one-step-sr"
STUDENT_FORMAT_VERSION = 1  # the newest student_config.json "version" this toolkit reads
COMPONENTS = ("transformer", "vae")
# A diffusers model folder's weights
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

LORA_SUBDIR = Path("checkpoint/tsdsr")
EMBEDDING_SUBDIR = Path("dataset/default")
TRANSFORMER_LORA = "transformer.safetensors"
VAE_LORA = "vae.safetensors"
PROMPT_EMBEDS = "prompt_embeds.pt"
POOLED_EMBEDS = "pool_embeds.pt"
NULL_EMBEDDING_SUBDIR = Path("dataset/null")  # TSD-SR's null-prompt embeddings (CFG's unconditional branch)
PRIOR_BASE_SUBDIR = Path("base")  # where a prior folder keeps its diffusers base (transformer/, vae/, scheduler/)
BASE_PARTS = ("transformer", "vae", "scheduler")
# Where a base model is looked for inside a release root, in order.
BASE_CANDIDATES = ("base", "stable-diffusion-3-medium-diffusers")

HOW_TO_GET = (
    "TSD-SR's LoRA and embedding files come from the release linked in the TSD-SR README "
    "(github.com/Microtreei/TSD-SR: checkpoint/tsdsr/*.safetensors, dataset/default/*.pt); the base model is "
    "stabilityai/stable-diffusion-3-medium-diffusers in diffusers layout (transformer/, vae/, scheduler/). "
    "Download them on a machine with access and copy them here; this toolkit never downloads."
)


@dataclass(frozen=True)
class ReleasePaths:
    base: Path
    lora_dir: Path
    embedding_dir: Path

    @property
    def files(self) -> dict[str, Path]:
        return {
            "base transformer config": self.base / "transformer" / "config.json",
            "base VAE config": self.base / "vae" / "config.json",
            "transformer LoRA": self.lora_dir / TRANSFORMER_LORA,
            "VAE-encoder LoRA": self.lora_dir / VAE_LORA,
            "prompt embedding": self.embedding_dir / PROMPT_EMBEDS,
            "pooled prompt embedding": self.embedding_dir / POOLED_EMBEDS,
        }


TEACHER_LORA = Path("checkpoint/teacher/teacher.safetensors")  # TSD-SR's teacher LoRA (training only)


@dataclass(frozen=True)
class PriorPaths:
    """The files of a prior folder: the SD3 base (``base/`` or ``stable-diffusion-3-medium-diffusers/``, as for a
    release, see `find_base`), the four embedding files and the optional teacher LoRA."""

    root: Path
    base: Path

    @property
    def transformer(self) -> Path:
        return self.base / "transformer"

    @property
    def vae(self) -> Path:
        return self.base / "vae"

    @property
    def scheduler(self) -> Path:
        return self.base / "scheduler"

    @property
    def teacher_lora(self) -> Path:
        return self.root / TEACHER_LORA

    @property
    def embeddings(self) -> dict[str, Path]:
        """``{"prompt_embeds", "pool_embeds", "null_prompt_embeds", "null_pool_embeds"} -> file``."""
        return {
            "prompt_embeds": self.root / EMBEDDING_SUBDIR / PROMPT_EMBEDS,
            "pool_embeds": self.root / EMBEDDING_SUBDIR / POOLED_EMBEDS,
            "null_prompt_embeds": self.root / NULL_EMBEDDING_SUBDIR / PROMPT_EMBEDS,
            "null_pool_embeds": self.root / NULL_EMBEDDING_SUBDIR / POOLED_EMBEDS,
        }

    @property
    def looked_for_base(self) -> list[Path]:
        return [self.root / name for name in BASE_CANDIDATES]


def find_base(root: Path) -> Path | None:
    """The SD3 base inside a release or prior root: the first of `BASE_CANDIDATES` holding ``transformer/``.

    One rule for the student's release loader (`release_paths`) and distillation's prior (`prior_paths`), so a
    TSD-SR download with the SD3 folder beside ``checkpoint/`` loads both ways."""
    found = [root / name for name in BASE_CANDIDATES if (root / name / "transformer").is_dir()]
    return found[0] if found else None


def prior_paths(root: Path | str) -> PriorPaths:
    """The file layout of the prior folder at ``root`` (the TSD-SR release layout with the base inside); where
    no base exists yet (a folder being written), ``base/``."""
    root = Path(root)
    return PriorPaths(root, find_base(root) or root / PRIOR_BASE_SUBDIR)


def is_release_root(path: Path) -> bool:
    return (Path(path) / LORA_SUBDIR).is_dir() or (Path(path) / EMBEDDING_SUBDIR).is_dir()


def release_paths(root: Path, base: Path | None = None) -> ReleasePaths:
    """Resolve a release root (+ optional separate base folder) into the folders the loader reads."""
    root = Path(root)
    if base is None:
        base = find_base(root)
        if base is None:
            looked = [root / name for name in BASE_CANDIDATES]
            raise ModelLoadError(
                f"no SD3 base model found for release {root}: looked for {', '.join(str(p) for p in looked)} "
                "(a diffusers folder with transformer/ and vae/). Pass it with --base-model. " + HOW_TO_GET
            )
    return ReleasePaths(base=Path(base), lora_dir=root / LORA_SUBDIR, embedding_dir=root / EMBEDDING_SUBDIR)


def check_release_files(paths: ReleasePaths) -> None:
    missing = [f"{what} ({path})" for what, path in paths.files.items() if not path.is_file()]
    if missing:
        raise ModelLoadError("TSD-SR release incomplete, missing: " + "; ".join(missing) + ". " + HOW_TO_GET)




def locate_model(spec: str | Path | None, flag: str = "--model") -> tuple[str, str | Path]:
    """What a `--model` value names, decided from the files alone (no torch), so that loading
    (`compress.models.resolve.load_model`) and the fail-fast checks (`compress.models.preflight`) agree:

    ("preset", "preset:NAME[@SEED]"), ("artifact", folder with manifest.json), ("student", folder with
    student_config.json: a run folder's model/ too) or ("release", TSD-SR release root). None is the built-in
    reference student when this checkout ships one, else the tiny preset. Anything else raises ModelLoadError."""
    from compress.runtime.manifest import MANIFEST_NAME

    if spec is None:
        spec = REFERENCE_DIR if REFERENCE_DIR.is_dir() else "preset:tiny"
    if str(spec).startswith("preset:"):
        return "preset", str(spec)
    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(
            f"{flag} {spec}: no such folder. Give a folder saved by this toolkit (with {STUDENT_CONFIG_NAME}), "
            "a TSD-SR release root (checkpoint/tsdsr/ + dataset/default/), or preset:NAME."
        )
    if (path / MANIFEST_NAME).is_file() and not (path / STUDENT_CONFIG_NAME).is_file():
        return "artifact", path
    if not (path / STUDENT_CONFIG_NAME).is_file() and (path / "model" / STUDENT_CONFIG_NAME).is_file():
        path = path / "model"  # a run folder (prune's or distill's OUT): its model
    if (path / STUDENT_CONFIG_NAME).is_file():
        return "student", path
    if is_release_root(path):
        return "release", path
    raise ModelLoadError(
        f"{flag} {path}: not a model folder. Looked for {path / STUDENT_CONFIG_NAME} (saved student) and "
        f"{path / 'checkpoint/tsdsr'} / {path / 'dataset/default'} (TSD-SR release); found neither."
    )
