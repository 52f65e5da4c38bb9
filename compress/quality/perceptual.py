"""Perceptual and no-reference quality metrics behind one offline-safe registry.

Why a registry of its own instead of calling ``pyiqa.create_metric`` directly: pyiqa (and torchvision, CLIP,
timm under it) silently *downloads* weights on first use. On machines without hub access that either fails
after a long retry loop or, worse, a caller catches the error and reports nothing. Here every metric declares
the exact files it needs; :func:`build_metric` checks them **before** constructing anything and returns a
:class:`SkippedMetric` whose ``reason`` names each missing file, the full path that was looked at and where to
get it. When all files are present the metric is built with downloads actively blocked, so a file that pyiqa
unexpectedly wants still fails loudly instead of reaching the network.

Registered metrics (``kind`` "fr" = full reference, called as ``metric(sr, hr)``; "nr" = no reference,
``metric(sr)``; NR metrics ignore ``hr`` so evaluation loops can call every metric the same way):

* ``psnr_y``, ``ssim_y`` - :mod:`compress.quality.fidelity` (pyiqa-identical, no files needed).
* ``stlpips``, ``stlpips-vgg`` - shift-tolerant LPIPS (Ghildyal & Liu, ECCV 2022) from the stlpips-pytorch wheel,
  which ships the full trained networks: works offline. It is *not* LPIPS; report it as ST-LPIPS.
* ``lpips``, ``dists``, ``niqe``, ``musiq``, ``maniqa``, ``maniqa-pipal``, ``clipiqa`` - pyiqa, the metric set
  TSD-SR / TinySR report (the papers use ``maniqa-pipal``; pyiqa's plain ``maniqa`` is the KonIQ model).

Cache locations are read at call time: ``torch.hub.get_dir()`` (``$TORCH_HOME/hub``, default
``~/.cache/torch/hub``) for ``pyiqa/``, ``checkpoints/`` and ``clip/``, and
``huggingface_hub.constants.HF_HUB_CACHE`` for timm backbones.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import sys
import types
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from . import fidelity

MetricKind = Literal["fr", "nr"]
ScoreFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

__all__ = [
    "CacheLocations",
    "Metric",
    "MetricUnavailableError",
    "OfflineDownloadBlockedError",
    "RequiredFile",
    "SkippedMetric",
    "available_metrics",
    "build_metric",
    "metric_status",
    "registered_metrics",
    "required_files",
    "stlpips_module",
]

# Where pyiqa 0.1.16 fetches its own weight files from (pyiqa.archs.arch_util.get_url_from_name); a GitHub
# release mirror exists at https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/<file>.
PYIQA_WEIGHTS_URL = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/{filename}"
# OpenAI CLIP RN50, as listed in pyiqa/archs/clip_model.py (_MODELS). The SHA256 is part of the URL; pyiqa
# re-downloads the file when it does not match, so a present-but-wrong file must count as missing.
CLIP_RN50_SHA256 = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"
CLIP_RN50_URL = f"https://openaipublic.azureedge.net/clip/models/{CLIP_RN50_SHA256}/RN50.pt"
# MANIQA builds timm.create_model('vit_base_patch8_224', pretrained=True); timm resolves that to this HF repo.
MANIQA_TIMM_REPO = "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"
# timm tries the safetensors file first and falls back to the pickle.
MANIQA_TIMM_FILENAMES = ("model.safetensors", "pytorch_model.bin")
# Weight files per pyiqa metric, as named in pyiqa 0.1.16's default_model_urls (tests check they still match).
PYIQA_WEIGHT_FILES = {
    "lpips": "LPIPS_v0.1_alex-df73285e.pth",
    "dists": "DISTS_weights-f5e65c96.pth",
    "niqe": "niqe_modelparameters.mat",
    "musiq": "musiq_koniq_ckpt-e95806b9.pth",
    "maniqa": "ckpt_koniq10k.pt",
    "maniqa-pipal": "MANIQA_PIPAL-ae6d356b.pth",
}


class MetricUnavailableError(RuntimeError):
    """Raised when a skipped metric is called: a missing metric must never turn into a number."""


class OfflineDownloadBlockedError(RuntimeError):
    """Raised when, despite the file checks, a library tries to download while a metric is being built."""


# --------------------------------------------------------------------------------------------------------------
# Cache locations and required files
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheLocations:
    """The cache roots that pyiqa, torchvision, CLIP and timm read, resolved at the moment of the check."""

    torch_hub: Path
    hf_hub: Path

    @classmethod
    def current(cls) -> CacheLocations:
        import huggingface_hub.constants

        return cls(torch_hub=Path(torch.hub.get_dir()), hf_hub=Path(huggingface_hub.constants.HF_HUB_CACHE))

    @property
    def pyiqa(self) -> Path:
        return self.torch_hub / "pyiqa"

    @property
    def torchvision_checkpoints(self) -> Path:
        return self.torch_hub / "checkpoints"

    @property
    def clip(self) -> Path:
        return self.torch_hub / "clip"


@dataclass(frozen=True)
class RequiredFile:
    """One weight file a metric needs: what it is, where it is looked for, and how to obtain it."""

    description: str
    display_path: str  # the full path looked at (for HF caches: the snapshot path pattern)
    how_to_get: str
    locate: Callable[[], Path | None]
    sha256: str | None = None

    def problem(self) -> str | None:
        """None when the file is usable, otherwise one sentence saying what is wrong and how to fix it."""
        found = self.locate()
        if found is None:
            return f"missing {self.description}: looked for {self.display_path}; {self.how_to_get}"
        if self.sha256 is not None and _sha256_of(found) != self.sha256:
            return (
                f"{self.description} at {found} does not have the expected SHA256 {self.sha256} "
                f"(the loader would try to re-download it); {self.how_to_get}"
            )
        return None


def _file_in_torch_cache(description: str, path: Path, url: str, sha256: str | None = None) -> RequiredFile:
    return RequiredFile(
        description=description,
        display_path=str(path),
        how_to_get=f"download {url} and place it at {path}",
        locate=lambda: path if path.is_file() else None,
        sha256=sha256,
    )


def _pyiqa_weight_file(caches: CacheLocations, metric: str) -> RequiredFile:
    filename = PYIQA_WEIGHT_FILES[metric]
    path = caches.pyiqa / filename
    url = PYIQA_WEIGHTS_URL.format(filename=filename)
    how_to_get = f"download {filename} from pyiqa's weight repo ({url}) and place it at {path}"
    if metric == "niqe":
        how_to_get = (
            "run `python scripts/install_niqe_params.py` (extracts it from the basicsr 1.4.2 sdist on PyPI), or "
            + how_to_get
        )
    return RequiredFile(
        description=f"pyiqa weights {filename}",
        display_path=str(path),
        how_to_get=how_to_get,
        locate=lambda: path if path.is_file() else None,
    )


def _torchvision_backbone_file(caches: CacheLocations, weights_enum_name: str) -> RequiredFile:
    import torchvision.models

    url = getattr(torchvision.models, weights_enum_name).IMAGENET1K_V1.url
    filename = url.rsplit("/", 1)[-1]
    return _file_in_torch_cache(
        f"torchvision ImageNet backbone {filename}", caches.torchvision_checkpoints / filename, url
    )


def _hf_cached_file(caches: CacheLocations, repo_id: str, filenames: tuple[str, ...]) -> RequiredFile:
    repo_folder = caches.hf_hub / f"models--{repo_id.replace('/', '--')}"

    def locate() -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        for filename in filenames:
            cached = try_to_load_from_cache(repo_id, filename, cache_dir=caches.hf_hub)
            if isinstance(cached, str):
                return Path(cached)
        return None

    display_path = f"{repo_folder}/snapshots/<revision>/{filenames[0]} (or {', '.join(filenames[1:])})"
    how_to_get = (
        f"on a machine with internet run `hf download {repo_id} {filenames[0]} --cache-dir <dir>` and copy "
        f"<dir>/{repo_folder.name} to {repo_folder}"
    )
    return RequiredFile(f"timm backbone {repo_id}", display_path, how_to_get, locate)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_of(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


# --------------------------------------------------------------------------------------------------------------
# Metric objects
# --------------------------------------------------------------------------------------------------------------


class Metric:
    """A ready metric. ``metric(sr, hr=None)`` takes B x 3 x H x W tensors in [0, 1] and returns B scores.

    Scores come back detached, float32, on the CPU (they are for reporting; use :func:`stlpips_module` for a
    differentiable loss).
    """

    available = True

    def __init__(
        self,
        name: str,
        kind: MetricKind,
        lower_is_better: bool,
        score_fn: ScoreFn,
        device: torch.device,
        module: torch.nn.Module | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.lower_is_better = lower_is_better
        self.device = device
        self.module = module  # the underlying network, kept so callers can inspect or move it
        self._score_fn = score_fn

    def __call__(self, sr: torch.Tensor, hr: torch.Tensor | None = None) -> torch.Tensor:
        sr = _as_unit_range_batch(sr, "sr").to(self.device)
        if self.kind == "fr":
            if hr is None:
                raise ValueError(f"{self.name} is a full-reference metric: call it as metric(sr, hr)")
            hr = _as_unit_range_batch(hr, "hr").to(self.device)
            if hr.shape != sr.shape:
                raise ValueError(f"{self.name}: SR {tuple(sr.shape)} and HR {tuple(hr.shape)} differ in shape")
        else:
            hr = None  # no-reference: the reference is deliberately ignored
        with torch.no_grad():
            scores = self._score_fn(sr, hr)
        return scores.detach().reshape(sr.shape[0]).to(device="cpu", dtype=torch.float32)

    def __repr__(self) -> str:
        return (
            f"Metric({self.name!r}, kind={self.kind!r}, lower_is_better={self.lower_is_better}, device={self.device})"
        )


@dataclass(frozen=True)
class SkippedMetric:
    """Stands in for a metric that cannot run offline here; ``reason`` says which file to bring and where."""

    name: str
    kind: MetricKind
    lower_is_better: bool
    reason: str
    missing: tuple[str, ...] = ()  # full paths (or path patterns) of the files that were not found

    available = False

    def __call__(self, sr: torch.Tensor, hr: torch.Tensor | None = None) -> torch.Tensor:
        raise MetricUnavailableError(f"metric {self.name!r} is unavailable: {self.reason}")


def _as_unit_range_batch(image: torch.Tensor, label: str) -> torch.Tensor:
    """Check B x 3 x H x W in [0, 1]; clamp only float round-off (pyiqa asserts the range strictly)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{label} must be a B x 3 x H x W tensor, got {shape}")
    low, high = float(image.min()), float(image.max())
    if low < -1e-4 or high > 1 + 1e-4:
        raise ValueError(f"{label} must be in [0, 1] (got min {low:.4f}, max {high:.4f}); clamp it first")
    return image.float().clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------
# ST-LPIPS (stlpips-pytorch wheel)
# --------------------------------------------------------------------------------------------------------------

_STLPIPS_NETS = ("alex", "vgg")


def _import_stlpips() -> types.ModuleType:
    """Import ``stlpips_pytorch.stlpips``, tolerating its undeclared IPython / torchsummary imports.

    The package imports ``IPython.embed`` and ``torchsummary.summary`` at module level but never calls them for
    scoring. If either is not installed, minimal stand-ins are registered only for the duration of the import.
    """
    try:
        return importlib.import_module("stlpips_pytorch.stlpips")
    except ModuleNotFoundError as error:
        if error.name not in ("IPython", "torchsummary"):
            raise
    stand_ins = {}
    for module_name, attribute in (("IPython", "embed"), ("torchsummary", "summary")):
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError:
            stand_in = types.ModuleType(module_name)
            setattr(stand_in, attribute, _unavailable_debug_helper(module_name, attribute))
            stand_ins[module_name] = stand_in
    absent = object()
    previous = {name: sys.modules.get(name, absent) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("stlpips_pytorch.stlpips")
    finally:
        for name, module in previous.items():
            if module is absent:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _unavailable_debug_helper(module_name: str, attribute: str) -> Callable[..., None]:
    def helper(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{module_name}.{attribute} is not installed (stand-in used to import stlpips_pytorch)")

    return helper


def stlpips_weights_path(net: str = "alex") -> Path:
    """Path of the shift-tolerant weights shipped inside the stlpips-pytorch wheel."""
    if net not in _STLPIPS_NETS:
        raise ValueError(f"ST-LPIPS net must be one of {_STLPIPS_NETS}, got {net!r}")
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("stlpips_pytorch is not installed (pip install stlpips-pytorch==0.0.2)")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    return package_dir / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"


def stlpips_module(net: str = "alex", *, trainable: bool = False) -> torch.nn.Module:
    """The ST-LPIPS network as a differentiable ``nn.Module`` (for a perceptual loss).

    Call it as ``module(x, y, normalize=True)`` with x, y in [0, 1] (``normalize`` maps them to [-1, 1]); it
    returns B x 1 x 1 x 1 distances. Gradients flow to the inputs; the weights are frozen unless ``trainable``.
    Weights are loaded from the wheel with a strict key check (only the ``lins.N`` aliases of ``linN`` may be
    absent from the file), so a broken install cannot silently give a randomly initialised metric.
    """
    weights_path = stlpips_weights_path(net)
    if not weights_path.is_file():
        raise FileNotFoundError(f"ST-LPIPS weights not found at {weights_path}; reinstall stlpips-pytorch==0.0.2")
    stlpips = _import_stlpips()
    module = stlpips.LPIPS(pretrained=False, net=net, variant="shift_tolerant", verbose=False)
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    result = module.load_state_dict(state_dict, strict=False)
    unexpected = list(result.unexpected_keys)
    # `lins` is an nn.ModuleList holding the same lin0..lin4 modules, so its keys are aliases, not extra weights.
    missing = [key for key in result.missing_keys if not key.startswith("lins.")]
    if missing or unexpected:
        raise RuntimeError(
            f"ST-LPIPS {net} weights do not match the network: missing {missing}, unexpected {unexpected}"
        )
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(trainable)
    return module


def _build_stlpips(net: str, device: torch.device) -> tuple[ScoreFn, torch.nn.Module]:
    module = stlpips_module(net).to(device)

    def score(sr: torch.Tensor, hr: torch.Tensor | None) -> torch.Tensor:
        return module(sr, hr, normalize=True)

    return score, module


# --------------------------------------------------------------------------------------------------------------
# pyiqa metrics, built with downloads blocked
# --------------------------------------------------------------------------------------------------------------


def _refuse_download(*args: object, **kwargs: object) -> None:
    target = args[0] if args else kwargs.get("url", "<unknown>")
    raise OfflineDownloadBlockedError(
        f"refusing to download {target}: metrics must run from pre-placed files (see compress.quality.perceptual)"
    )


@contextlib.contextmanager
def _temporarily_set(target: object, attribute: str, value: object) -> Iterator[None]:
    original = getattr(target, attribute)
    setattr(target, attribute, value)
    try:
        yield
    finally:
        setattr(target, attribute, original)


@contextlib.contextmanager
def _pyiqa_offline(caches: CacheLocations) -> Iterator[types.ModuleType]:
    """Import pyiqa and point it at ``caches`` with every download path of pyiqa/torchvision/CLIP/timm blocked.

    pyiqa freezes its cache folder (``DEFAULT_CACHE_DIR``) at import time; it is re-pointed here so the files
    this module checked are the files pyiqa loads, even if ``TORCH_HOME`` changed after pyiqa was imported.
    """
    import huggingface_hub.constants

    pyiqa = importlib.import_module("pyiqa")
    download_util = importlib.import_module("pyiqa.utils.download_util")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_temporarily_set(download_util, "DEFAULT_CACHE_DIR", str(caches.pyiqa)))
        stack.enter_context(_temporarily_set(download_util, "download_url_to_file", _refuse_download))
        stack.enter_context(_temporarily_set(torch.hub, "download_url_to_file", _refuse_download))
        stack.enter_context(_temporarily_set(urllib.request, "urlopen", _refuse_download))  # CLIP's downloader
        stack.enter_context(_temporarily_set(huggingface_hub.constants, "HF_HUB_OFFLINE", True))
        yield pyiqa


def _build_pyiqa(pyiqa_name: str, caches: CacheLocations, device: torch.device) -> tuple[ScoreFn, torch.nn.Module]:
    with _pyiqa_offline(caches) as pyiqa:
        model = pyiqa.create_metric(pyiqa_name, device=device)

    if model.metric_mode == "FR":

        def score(sr: torch.Tensor, hr: torch.Tensor | None) -> torch.Tensor:
            return model(sr, hr)

    else:

        def score(sr: torch.Tensor, hr: torch.Tensor | None) -> torch.Tensor:
            return model(sr)

    return score, model


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MetricSpec:
    name: str
    kind: MetricKind
    lower_is_better: bool
    required_files: Callable[[CacheLocations], list[RequiredFile]]
    build: Callable[[CacheLocations, torch.device], tuple[ScoreFn, torch.nn.Module | None]]


def _no_files(caches: CacheLocations) -> list[RequiredFile]:
    return []


def _fidelity_spec(name: str, function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> _MetricSpec:
    def build(caches: CacheLocations, device: torch.device) -> tuple[ScoreFn, None]:
        return (lambda sr, hr: function(sr, hr)), None

    return _MetricSpec(name, "fr", False, _no_files, build)


def _stlpips_spec(name: str, net: str) -> _MetricSpec:
    def files(caches: CacheLocations) -> list[RequiredFile]:
        path = stlpips_weights_path(net)
        return [
            RequiredFile(
                description=f"ST-LPIPS {net} weights (shipped in the stlpips-pytorch wheel)",
                display_path=str(path),
                how_to_get="pip install stlpips-pytorch==0.0.2",
                locate=lambda: path if path.is_file() else None,
            )
        ]

    return _MetricSpec(name, "fr", True, files, lambda caches, device: _build_stlpips(net, device))


def _pyiqa_spec(
    name: str,
    kind: MetricKind,
    lower_is_better: bool,
    files: Callable[[CacheLocations], list[RequiredFile]],
) -> _MetricSpec:
    return _MetricSpec(name, kind, lower_is_better, files, lambda caches, device: _build_pyiqa(name, caches, device))


_REGISTRY: dict[str, _MetricSpec] = {
    spec.name: spec
    for spec in (
        _fidelity_spec("psnr_y", fidelity.psnr_y),
        _fidelity_spec("ssim_y", fidelity.ssim_y),
        _stlpips_spec("stlpips", "alex"),
        _stlpips_spec("stlpips-vgg", "vgg"),
        _pyiqa_spec(
            "lpips",
            "fr",
            True,
            lambda c: [_torchvision_backbone_file(c, "AlexNet_Weights"), _pyiqa_weight_file(c, "lpips")],
        ),
        _pyiqa_spec(
            "dists",
            "fr",
            True,
            lambda c: [_torchvision_backbone_file(c, "VGG16_Weights"), _pyiqa_weight_file(c, "dists")],
        ),
        _pyiqa_spec("niqe", "nr", True, lambda c: [_pyiqa_weight_file(c, "niqe")]),
        _pyiqa_spec("musiq", "nr", False, lambda c: [_pyiqa_weight_file(c, "musiq")]),
        _pyiqa_spec(
            "maniqa",
            "nr",
            False,
            lambda c: [_hf_cached_file(c, MANIQA_TIMM_REPO, MANIQA_TIMM_FILENAMES), _pyiqa_weight_file(c, "maniqa")],
        ),
        _pyiqa_spec(
            "maniqa-pipal",
            "nr",
            False,
            lambda c: [
                _hf_cached_file(c, MANIQA_TIMM_REPO, MANIQA_TIMM_FILENAMES),
                _pyiqa_weight_file(c, "maniqa-pipal"),
            ],
        ),
        _pyiqa_spec(
            "clipiqa",
            "nr",
            False,
            lambda c: [
                _file_in_torch_cache(
                    "OpenAI CLIP RN50 weights RN50.pt", c.clip / "RN50.pt", CLIP_RN50_URL, CLIP_RN50_SHA256
                )
            ],
        ),
    )
}


def registered_metrics() -> list[str]:
    """Every metric name :func:`build_metric` knows, available here or not."""
    return list(_REGISTRY)


def _spec(name: str) -> _MetricSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(_REGISTRY)}") from None


def required_files(name: str, caches: CacheLocations | None = None) -> list[RequiredFile]:
    """The files metric ``name`` needs, resolved against the current (or given) caches."""
    return _spec(name).required_files(caches or CacheLocations.current())


def _problems(name: str, caches: CacheLocations) -> tuple[list[str], list[str]]:
    problems, paths = [], []
    for required in required_files(name, caches):
        problem = required.problem()
        if problem is not None:
            problems.append(problem)
            paths.append(required.display_path)
    return problems, paths


def metric_status() -> dict[str, str | None]:
    """Per registered metric: None when it can be built offline here, otherwise the reason it cannot."""
    caches = CacheLocations.current()
    status: dict[str, str | None] = {}
    for name in _REGISTRY:
        problems, _ = _problems(name, caches)
        status[name] = "; ".join(problems) if problems else None
    return status


def available_metrics() -> list[str]:
    """Names of the metrics whose files are all present, i.e. that :func:`build_metric` will really build."""
    return [name for name, reason in metric_status().items() if reason is None]


def build_metric(name: str, device: str | torch.device = "cpu") -> Metric | SkippedMetric:
    """Build metric ``name`` on ``device``, or return a :class:`SkippedMetric` explaining which files are missing.

    Never downloads: files are checked first, and downloads are blocked while the metric is constructed.
    """
    spec = _spec(name)
    device = torch.device(device)
    caches = CacheLocations.current()
    problems, missing_paths = _problems(name, caches)
    if problems:
        return SkippedMetric(name, spec.kind, spec.lower_is_better, "; ".join(problems), tuple(missing_paths))
    score_fn, module = spec.build(caches, device)
    return Metric(name, spec.kind, spec.lower_is_better, score_fn, device, module)
