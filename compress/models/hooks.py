"""Forward hooks on a student's transformer blocks, for feature distillation and pruning importance.

Hooks are registered for the duration of a `with` block and removed afterwards, so the same model can be
hooked by one caller while another runs it plainly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's block list (`transformer_blocks` of diffusers' SD3 and of this toolkit's pruned classes)."""
    return list(getattr(transformer, "transformer_blocks", []))


def register_block_hooks(transformer: nn.Module, sink: list) -> list:
    """Append the image-stream output of every block to `sink` on each forward; returns the hook handles."""

    def keep(_module, _inputs, output):
        sink.append(output[-1] if isinstance(output, tuple) else output)

    return [block.register_forward_hook(keep) for block in transformer_blocks(transformer)]


@contextmanager
def block_outputs(transformer: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Collect every block's image-stream output while the context is open (an empty list when disabled)."""
    sink: list[torch.Tensor] = []
    handles = register_block_hooks(transformer, sink) if enabled else []
    try:
        yield sink
    finally:
        for handle in handles:
            handle.remove()
