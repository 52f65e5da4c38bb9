"""TSD-SR's LoRA adapters, applied with peft, in the official file format.

TSD-SR (train/train.py, utils/util.py) adapts the SD3 transformer and the VAE *encoder* with
`LoraConfig(r=64, lora_alpha=64, init_lora_weights="gaussian")` and saves both through diffusers'
`save_lora_weights`, so every key carries a `transformer.` prefix, the VAE one included
(the official release's `checkpoint/tsdsr/{transformer,vae}.safetensors`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from compress.models.errors import ModelLoadError

# The exact target names of the official transformer LoRA. peft matches a module when its path equals a
# name or ends with "." + name, so `proj` also hits pos_embed.proj (a conv) and `linear` every adaLN linear.
TRANSFORMER_LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "proj",
    "linear",
    "proj_out",
]

# Fake-score ("reg") adapter of TSD-SR training: attention projections only.
FAKE_SCORE_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]

KEY_PREFIX = "transformer."


def vae_encoder_lora_targets(vae: nn.Module) -> list[str]:
    """Full module paths of the official VAE-encoder LoRA targets, for this VAE's structure.

    The official list names every encoder conv (conv_in, resnet conv1/conv2, conv_shortcut, downsamplers,
    conv_out), the mid-block attention q/k/v/out and `quant_conv`; on SD3 that is 31 existing modules.
    Deriving it from the module tree gives the same 31 on SD3 and the analogous set on smaller VAEs.
    """
    targets = []
    for name, module in vae.named_modules():
        if not name.startswith("encoder."):
            continue
        if isinstance(module, nn.Conv2d):
            targets.append(name)
        elif ".attentions." in name and name.rsplit(".attentions.", 1)[1].split(".", 1)[-1] in {
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
        }:
            targets.append(name)
    if getattr(vae, "quant_conv", None) is not None:
        targets.append("quant_conv")
    return targets


def lora_config(rank: int, target_modules: list[str], alpha: float | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )


def add_lora(model: nn.Module, rank: int, target_modules: list[str], adapter_name: str = "default", alpha=None):
    """Inject a LoRA adapter with TSD-SR's settings (gaussian A, zero B: the model is unchanged).

    A second adapter on the same model is how distillation shares one base transformer between the student, the
    fake score and the teacher (`set_active_adapters` picks one per call); peft's warning about it is expected.
    """
    import warnings

    from peft import inject_adapter_in_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(lora_config(rank, target_modules, alpha), model, adapter_name=adapter_name)
    return model


def adapter_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The weights of one named adapter (every LoRA layer's A and B of that name), in module order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    params = []
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            for attribute in layer.adapter_layer_names:
                adapters = getattr(layer, attribute)
                if adapter_name in adapters:
                    params.extend(adapters[adapter_name].parameters())
    return params


def set_active_adapters(model: nn.Module, names: tuple[str, ...]) -> None:
    """Make exactly `names` the active LoRA adapters of every layer (none: the base weights alone).

    A layer that lacks one of them runs without it (peft skips adapters a layer does not hold). Unlike peft's
    `set_adapter`, no `requires_grad` flag changes: which weights train is the optimiser's business, and a graph
    recorded under one adapter must still reach its weights when another becomes active before backward.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(bool(names))
        if names:
            layer.set_adapter(list(names))
    for param, flag in flags:
        param.requires_grad_(flag)


def active_adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The adapters active in `model` (the first LoRA layer's; `set_active_adapters` keeps every layer alike)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            return () if layer.disable_adapters else tuple(layer.active_adapters)
    return ()


@contextmanager
def adapters_active(model: nn.Module, names: tuple[str, ...] | None) -> Iterator[nn.Module]:
    """Run `model` with exactly the adapters `names` active inside the block, then restore the previous ones
    (None: no switch, whatever is active stays)."""
    if names is None:
        yield model
        return
    before = active_adapter_names(model)
    set_active_adapters(model, names)
    try:
        yield model
    finally:
        set_active_adapters(model, before)


def enable_adapter_aware_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing for a diffusers model whose LoRA adapters are switched between calls: each block is
    recomputed in the backward pass with the adapters that were active in its forward pass, not with whatever is
    active when the backward runs (the fake score's backward follows its forward after the student's adapter is
    back, and the default recomputation would then differentiate the wrong network)."""
    from torch.utils.checkpoint import checkpoint

    def checkpoint_with_adapters(block: nn.Module, *args):
        names = active_adapter_names(model)

        def contexts():  # (forward, recompute)
            return nullcontext(), adapters_active(model, names)

        return checkpoint(block.__call__, *args, use_reentrant=False, context_fn=contexts)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_adapters)


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with the official key layout: `transformer.<module path>.lora_A.weight`."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {KEY_PREFIX + key: value.detach().contiguous() for key, value in state.items()}


def save_lora_file(model: nn.Module, path: Path, adapter_name: str = "default") -> None:
    from safetensors.torch import save_file

    from compress.io import atomic_path

    state = {k: v.to("cpu") for k, v in lora_state_dict(model, adapter_name).items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing, truncated or corrupt file, or a NaN/inf tensor in it, into one
    clear error."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{what}: file not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises SafetensorError / OSError with terse texts
        raise ModelLoadError(
            f"{what}: {path} is not a readable safetensors file ({type(err).__name__}: {err}). "
            "It is probably truncated or corrupt: download or copy it again."
        ) from err
    from compress.models.checks import check_finite

    check_finite(tensors.items(), f"{what}: {path}")
    return tensors


def infer_lora_rank(state: dict[str, torch.Tensor], path: Path) -> int:
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise ModelLoadError(
            f"{path}: expected LoRA tensors '*.lora_A.weight' of one rank, found ranks {sorted(ranks) or 'none'}"
        )
    return ranks.pop()


def load_lora_file(
    model: nn.Module,
    path: Path,
    target_modules: list[str],
    what: str,
    rank: int | None = None,
    adapter_name: str = "default",
) -> int:
    """Inject an adapter into `model` and fill it from an official-format LoRA file, checking every key.

    Unlike TSD-SR's loader (which only reports leftovers), a missing, unexpected or wrong-shape tensor is an
    error: a partially applied LoRA silently gives a different model.
    """
    from peft import set_peft_model_state_dict

    path = Path(path)
    state = read_safetensors(path, what)
    bad_prefix = [k for k in state if not k.startswith(KEY_PREFIX)]
    if bad_prefix:
        raise ModelLoadError(
            f"{what}: {path}: keys must start with '{KEY_PREFIX}' (TSD-SR's save_lora_weights layout); "
            f"found {bad_prefix[:3]}"
        )
    file_rank = infer_lora_rank(state, path)
    if rank is not None and rank != file_rank:
        raise ModelLoadError(f"{what}: {path}: expected LoRA rank {rank}, the file has rank {file_rank}")
    add_lora(model, file_rank, target_modules, adapter_name)
    expected = lora_state_dict(model, adapter_name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"{what}: {path} does not match the model's LoRA layout (rank {file_rank})."]
        if missing:
            parts.append(f"Missing {len(missing)} key(s), e.g. {missing[:3]}.")
        if unexpected:
            parts.append(f"Unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}.")
        parts.append("Was the file written for this base model and these target modules?")
        raise ModelLoadError(" ".join(parts))
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ModelLoadError(
                f"{what}: {path}: tensor '{key}' has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(value.shape)}"
            )
    stripped = {k[len(KEY_PREFIX) :]: v for k, v in state.items()}
    result = set_peft_model_state_dict(model, stripped, adapter_name=adapter_name)
    leftovers = getattr(result, "unexpected_keys", None) or []
    if leftovers:
        raise ModelLoadError(f"{what}: {path}: peft could not place {len(leftovers)} tensor(s): {leftovers[:3]}")
    return file_rank


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA into its base weight (W' = W + scale * B A) and drop the peft wrappers."""
    return unwrap_lora(model, merge=True)


def unwrap_lora(model: nn.Module, merge: bool) -> nn.Module:
    """Replace every peft LoRA wrapper by its base layer, merging the adapter in first if `merge`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if merge:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base weights (every LoRA adapter off) inside the block; a model without LoRA is unchanged.

    peft's `enable_adapters` also switches `requires_grad` of the adapter weights; the flags are put back
    as they were, so a trainable adapter stays trainable and a frozen one frozen.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    active = [layer.active_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, adapters in zip(layers, active):
            layer.enable_adapters(True)
            layer.set_adapter(adapters)
        for param, flag in flags:
            param.requires_grad_(flag)
