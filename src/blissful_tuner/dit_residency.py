"""Where a generator's DiT lives between jobs: loaded once on first use, on the device (or block-swapped) while
sampling, parked in CPU memory while text encoders / the VAE run (``--offload_dit_during_sampling``), dropped
before decoding. Shared by the generate scripts; the architecture supplies only its loader."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from blissful_tuner.utils import compile_kwargs


def free_memory() -> None:
    """Return freed memory to the allocator (after a model is dropped or parked)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class DitResidency:
    """Holds one DiT for a generate run.

    ``load(device)`` builds the model on ``device`` (``"cpu"`` when blocks swap or the DiT is parked between stages).
    ``args`` supplies ``blocks_to_swap``, ``use_pinned_memory_for_block_swap``, ``offload_dit_during_sampling`` and
    the compile options (``blissful_tuner.utils.compile_kwargs``).
    """

    def __init__(self, args: Any, device: torch.device, load: Callable[[torch.device | str], Any]):
        self.args = args
        self.device = device
        self._load = load
        self.model: Any = None
        self.on_device = False

    @property
    def swap(self) -> int:
        return int(getattr(self.args, "blocks_to_swap", 0) or 0)

    def _enable_block_swap(self) -> None:
        from musubi_tuner.modules.offloading import BlockSwapConfig

        config = BlockSwapConfig(
            self.device,
            supports_backward=False,
            use_pinned_memory=bool(getattr(self.args, "use_pinned_memory_for_block_swap", False)),
        )
        self.model.enable_block_swap(self.swap, config)

    def load(self) -> Any:
        """Load once (LoRA merging, fp8 and compile happen here); the model stays off the device until ``get``."""
        if self.model is None:
            parked = self.swap > 0 or getattr(self.args, "offload_dit_during_sampling", False)
            self.model = self._load("cpu" if parked else self.device)
            if self.swap > 0:
                self._enable_block_swap()
            kw = compile_kwargs(self.args)
            if kw is not None:
                for blocks in self.model._block_lists():
                    for block in blocks:
                        block.compile(**kw)
            self.on_device = False
        return self.model

    def get(self) -> Any:
        """The DiT ready to sample on the device (block swap laid out for inference)."""
        model = self.load()
        if not self.on_device:
            if self.swap > 0:
                if model.offloaders is None:  # swap was disabled when the DiT was parked on the CPU
                    self._enable_block_swap()
                model.move_to_device_except_swap_blocks(self.device)
                model.switch_block_swap_for_inference()
            else:
                model.to(self.device)
            self.on_device = True
        return model

    def park(self) -> None:
        """Move the DiT to CPU memory (only with ``--offload_dit_during_sampling`` on a GPU)."""
        if self.model is None or not self.on_device or not getattr(self.args, "offload_dit_during_sampling", False):
            return
        if self.device.type == "cpu":
            return
        if self.swap > 0:
            self.model.disable_block_swap()
        self.model.to("cpu")
        self.on_device = False
        free_memory()

    def free(self) -> None:
        """Drop the DiT (after the last job is sampled; decoding needs the memory)."""
        if self.model is not None and getattr(self.model, "offloaders", None):
            self.model.disable_block_swap()
        self.model = None
        self.on_device = False
        free_memory()
