"""What the engine reads tensors through: a model directory's safetensors or `.bin` files (io.weights), the
same with a LoRA adapter folded in (io.lora), or names and shapes only from Hub headers (a dry run)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Protocol

import torch

from mergebot.io.local import ResolvedModel
from mergebot.io.weights import TensorInfo


class TensorReader(Protocol):
    label: str  # names the model in errors
    directory: Path

    @property
    def adapter(self) -> ResolvedModel | None: ...  # a LoRA folded into every tensor it changes

    def keys(self) -> Collection[str]: ...  # every tensor's name

    def header(self, name: str) -> TensorInfo: ...  # dtype, shape, bytes (a ModelError when absent)

    def get(self, name: str) -> torch.Tensor: ...  # the tensor (a view where it can be)

    def prefetch(self, name: str) -> None: ...  # about to be read: read ahead

    def release(self, name: str) -> None: ...  # done with it: let its pages go
