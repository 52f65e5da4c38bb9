"""Differentiable perceptual loss for distillation, built offline only.

TSD-SR trains with ``pyiqa.create_metric('lpips', as_loss=True)`` (AlexNet LPIPS; TSD-SR's ``train/train.py``) and
TinySR's stage 2 with LPIPS (TinySR, Sec. 3.3). LPIPS needs torchvision's ImageNet AlexNet, which torchvision downloads on first use; this
module never downloads. ``"lpips"`` uses the ``lpips`` package (its calibrated linear layers ship inside the wheel)
with the AlexNet trunk read from the torch hub cache (``<torch hub>/checkpoints/alexnet-owt-7be5be79.pth``, the file
``compress.quality.perceptual`` also checks for pyiqa's LPIPS); ``"stlpips"`` is the shift-tolerant LPIPS whose full
weights ship in the stlpips-pytorch wheel (:func:`compress.quality.perceptual.stlpips_module`), so it always works
offline but is a different metric. ``"auto"`` picks LPIPS when its files are present, else ST-LPIPS; record the
resolved name in the run folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["PERCEPTUAL_NAMES", "PerceptualLoss", "build_perceptual_loss", "lpips_missing_files"]

PERCEPTUAL_NAMES = ("auto", "lpips", "stlpips")


class PerceptualLoss(nn.Module):
    """``loss(x, y)`` for images in [0, 1] (B, 3, H, W): the batch mean of the distance, differentiable in x and y.

    The wrapped network is frozen and stays in eval mode even when the training loop calls ``.train()``
    (LPIPS has dropout in its linear layers).
    """

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net = net
        self.name = name
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"perceptual loss needs two B x 3 x H x W images, got {tuple(x.shape)}, {tuple(y.shape)}")
        return self.net(x, y, normalize=True).mean()  # normalize: [0, 1] -> [-1, 1], as both packages expect


def _alexnet_checkpoint() -> tuple[Path, str]:
    import torchvision.models

    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def _lpips_linear_weights() -> Path | None:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "alex.pth"


def lpips_missing_files() -> list[str]:
    """One sentence per file that AlexNet LPIPS lacks here (empty when it can be built offline)."""
    problems = []
    alexnet, url = _alexnet_checkpoint()
    if not alexnet.is_file():
        problems.append(
            f"missing torchvision AlexNet weights {alexnet.name}: looked for {alexnet}; download {url} on a machine "
            f"with internet and place it there (or use perceptual='stlpips', which works offline)"
        )
    linear = _lpips_linear_weights()
    if linear is None or not linear.is_file():
        problems.append(
            f"missing LPIPS linear-layer weights (lpips/weights/v0.1/alex.pth, looked for {linear}); "
            "pip install lpips>=0.1.4"
        )
    return problems


def _refuse_download(*args: object, **kwargs: object) -> None:
    raise RuntimeError(f"refusing to download {args[0] if args else kwargs.get('url')}: perceptual losses are offline")


@contextlib.contextmanager
def _downloads_blocked() -> Iterator[None]:
    original = torch.hub.download_url_to_file
    torch.hub.download_url_to_file = _refuse_download
    try:
        yield
    finally:
        torch.hub.download_url_to_file = original


def _build_lpips() -> nn.Module:
    import lpips
    import torchvision.models

    alexnet_path, _ = _alexnet_checkpoint()
    with _downloads_blocked(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation noise from inside lpips
        # pnet_rand: build the trunk without torchvision fetching it; the cached ImageNet weights are loaded below.
        net = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False)
    state = torch.load(alexnet_path, map_location="cpu", weights_only=True)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    reference = torchvision.models.alexnet(weights=None).features
    reference.load_state_dict(features, strict=True)  # a truncated or foreign file fails here, not silently
    copied = set()
    for slice_module in net.net.children():  # lpips' slices hold AlexNet's `features` layers under their indices
        for index, layer in slice_module.named_children():
            layer.load_state_dict(reference[int(index)].state_dict())
            copied.add(int(index))
    # Every weighted layer must have landed (LPIPS stops before the final max-pool, which has no weights).
    weighted = {i for i, layer in enumerate(reference) if any(True for _ in layer.parameters())}
    if not weighted <= copied:
        raise RuntimeError(f"LPIPS AlexNet trunk lacks torchvision feature layers {sorted(weighted - copied)}")
    return net


def build_perceptual_loss(name: str = "auto", device: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """Build the perceptual loss ``name`` ("auto", "lpips", "stlpips") on ``device``, never downloading.

    Returns ``(module, resolved_name)``: ``module(x, y)`` takes images in [0, 1] and returns the batch-mean
    distance (a differentiable scalar; parameters frozen); ``resolved_name`` is "lpips" or "stlpips". Raises
    ValueError for an unknown name, or for "lpips" when a weight file is missing (naming the file and the fix).
    """
    if name not in PERCEPTUAL_NAMES:
        raise ValueError(f"unknown perceptual loss {name!r}; choose one of {PERCEPTUAL_NAMES}")
    if name == "auto":
        name = "stlpips" if lpips_missing_files() else "lpips"
    if name == "lpips":
        problems = lpips_missing_files()
        if problems:
            raise ValueError("perceptual='lpips' is unavailable offline: " + "; ".join(problems))
        net = _build_lpips()
    else:
        from compress.quality.perceptual import stlpips_module

        net = stlpips_module("alex", trainable=False)
    return PerceptualLoss(net, name).to(device), name
