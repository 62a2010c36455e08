"""Wan LoRA training pieces (specs/wan.md §9): the DiT inputs of a cached batch and the two-expert model pair.

- ``build_dit_kwargs``: T5 states (the model zero-pads to 512), I2V / Fun-Control condition channels ``y`` from the
  cache, CLIP tokens, TI2V per-token timesteps, one-frame RoPE time indices (``f_indices``).
- ``WanExpertPair``: the Wan 2.2 A14B high- and low-noise experts as one module (``high_noise`` / ``low_noise``), so
  one LoRA network spans both (``--expert both``); ``split_expert_state_dict`` writes each expert's LoRA on its own.
  Block swap runs on each expert's own blocks; with ``--offload_inactive_dit`` only the active expert is on the device
  (its block swap engaged), the other waits whole in host memory.
- ``route_timesteps``: one side of the boundary for the whole batch, so each step runs one expert.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from musubi_tuner.networks.arch_targets import register_model_class
from musubi_tuner.utils.errors import UserError
from musubi_tuner.wan.caching import text_from_batch
from musubi_tuner.wan.conditioning import fun_control_y, ti2v_token_timesteps
from musubi_tuner.wan.configs import TaskConfig
from musubi_tuner.wan.models.dit import WanModel
from musubi_tuner.wan.one_frame import check_one_frame_task

EXPERTS = ("high", "low")
EXPERT_ATTR = {"high": "high_noise", "low": "low_noise"}
KOHYA_PREFIX = "lora_unet_"


class WanExpertPair(nn.Module):
    """Both Wan 2.2 experts under ``high_noise`` / ``low_noise``; ``forward`` runs the expert named by ``expert``.

    ``offload_inactive``: ``activate(name, device)`` puts the named expert on ``device`` (non-swapped weights on the
    device, swapped blocks laid out by its offloader) and the other one whole in host memory (block swap off there, so
    nothing of it stays on the device). Without it both experts stay placed and ``activate`` only records the name.
    The block-swap methods of the trainer's contract apply to the experts that are placed on the device.
    """

    def __init__(self, high: WanModel, low: WanModel, *, offload_inactive: bool = False):
        super().__init__()
        self.high_noise = high
        self.low_noise = low
        self.offload_inactive = offload_inactive
        self.active: str | None = "low" if offload_inactive else None  # the trainer loads the low-noise expert on the device
        self.blocks_to_swap = 0
        self._swap: tuple[int, Any] | None = None  # (blocks, BlockSwapConfig) while block swap is on
        self._swap_training = True

    def expert(self, name: str) -> WanModel:
        return getattr(self, EXPERT_ATTR[name])

    def _placed(self) -> list[WanModel]:
        """The experts that live on the device (both, or only the active one with ``offload_inactive``)."""
        if not self.offload_inactive:
            return [self.high_noise, self.low_noise]
        return [self.expert(self.active)] if self.active else []

    @property
    def in_dim(self) -> int:
        return self.low_noise.in_dim

    def _block_lists(self) -> list[nn.ModuleList]:
        return [self.high_noise.blocks, self.low_noise.blocks]

    def to_dtype(self, dtype: torch.dtype) -> WanExpertPair:
        self.high_noise.to_dtype(dtype)
        self.low_noise.to_dtype(dtype)
        return self

    def enable_gradient_checkpointing(self, activation_cpu_offloading: bool = False) -> None:
        for m in (self.high_noise, self.low_noise):
            m.enable_gradient_checkpointing(activation_cpu_offloading)

    def disable_gradient_checkpointing(self) -> None:
        for m in (self.high_noise, self.low_noise):
            m.disable_gradient_checkpointing()

    # -- block swap (the trainer's contract, per expert) -------------------------------------------------------------

    def enable_block_swap(self, num_blocks: int, config: Any) -> None:
        """``num_blocks`` of each expert's blocks swap (clamped per expert as for one DiT)."""
        self._swap = (num_blocks, config)
        for m in self._placed():
            m.enable_block_swap(num_blocks, config)
        probe = self._placed()[0] if self._placed() else self.low_noise
        self.blocks_to_swap = probe.blocks_to_swap if probe.offloaders is not None else num_blocks
        if self.blocks_to_swap == 0:
            self._swap = None

    def disable_block_swap(self) -> None:
        for m in (self.high_noise, self.low_noise):
            m.disable_block_swap()
        self._swap = None
        self.blocks_to_swap = 0

    def move_to_device_except_swap_blocks(self, device: torch.device | str) -> None:
        for m in self._placed():
            m.move_to_device_except_swap_blocks(device)

    def prepare_block_swap_before_forward(self) -> None:
        for m in self._placed():
            m.prepare_block_swap_before_forward()

    def switch_block_swap_for_inference(self) -> None:
        self._swap_training = False
        for m in self._placed():
            m.switch_block_swap_for_inference()

    def switch_block_swap_for_training(self) -> None:
        self._swap_training = True
        for m in self._placed():
            m.switch_block_swap_for_training()

    def activate(self, name: str, device: torch.device | str) -> None:
        """Make ``name`` the expert that runs next; with ``offload_inactive`` swap the two between host and device."""
        if not self.offload_inactive or name == self.active:
            self.active = name
            return
        if self.active is not None:
            old = self.expert(self.active)
            old.disable_block_swap()  # its offloader's layout would be stale once the whole model moves
            old.to("cpu")
        self.active = name
        new = self.expert(name)
        if self._swap is None:
            new.to(device)
            return
        new.enable_block_swap(*self._swap)
        new.move_to_device_except_swap_blocks(device)
        if self._swap_training:
            new.switch_block_swap_for_training()
        else:
            new.switch_block_swap_for_inference()

    def to(self, *args: Any, **kwargs: Any) -> WanExpertPair:
        """``nn.Module.to``, except that with ``offload_inactive`` the inactive expert stays in host memory (a dtype
        given is still applied to it)."""
        if not self.offload_inactive:
            return super().to(*args, **kwargs)
        _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        for name in EXPERTS:
            m = self.expert(name)
            if name == self.active:
                m.to(*args, **kwargs)
            elif dtype is not None:
                m.to(dtype=dtype)
        return self

    def forward(self, *args: Any, expert: str, **kwargs: Any) -> torch.Tensor:
        return self.expert(expert)(*args, **kwargs)


register_model_class("WanExpertPair", "wan")


def split_expert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"high": sd, "low": sd}`` from a LoRA over ``WanExpertPair`` (kohya names, the expert prefix removed)."""
    out: dict[str, dict[str, torch.Tensor]] = {"high": {}, "low": {}}
    for k, v in sd.items():
        for name, attr in EXPERT_ATTR.items():
            prefix = f"{KOHYA_PREFIX}{attr}_"
            if k.startswith(prefix):
                out[name][KOHYA_PREFIX + k[len(prefix) :]] = v
                break
        else:
            raise ValueError(f"LoRA key {k!r} belongs to neither expert")
    return out


def route_timesteps(t: torch.Tensor, boundary: float, resample: Any, max_rounds: int = 32) -> tuple[torch.Tensor, str]:
    """Put the whole batch on the side of the boundary of its first sample: ``(t, "high"|"low")``.

    Samples on the other side are redrawn with ``resample(k) -> (k,)``; after ``max_rounds`` they are clamped.
    """
    expert = "high" if float(t[0]) >= boundary else "low"
    t = t.clone()
    for _ in range(max_rounds):
        bad = (t < boundary) if expert == "high" else (t >= boundary)
        if not bad.any():
            return t, expert
        t[bad] = resample(int(bad.sum())).to(t)
    if expert == "high":
        t = t.clamp(min=boundary)
    else:
        t = t.clamp(max=torch.nextafter(torch.tensor(boundary), torch.tensor(0.0)).item())
    return t, expert


def build_dit_kwargs(
    task: TaskConfig, model_in_dim: int, x_t: torch.Tensor, batch: dict[str, Any], timesteps: torch.Tensor, device: torch.device
) -> dict[str, Any]:
    """Arguments of ``WanModel.forward`` for a cached batch (``x_t (B, C, F, H, W)``, ``timesteps`` = 1000·t, (B,))."""
    b = x_t.shape[0]
    kwargs: dict[str, Any] = {"x": x_t, "context": [c.to(device) for c in text_from_batch(batch)]}
    extra = model_in_dim - x_t.shape[1]
    ys = []
    if task.control:
        ctrl = batch.get("latents_control")
        if ctrl is None:
            raise UserError(f"{task.name} (Fun-Control) needs control latents: cache a dataset with control videos")
        img = batch.get("latents_image")  # (B, 4 mask + 16 latent, F', h, w) when cached with --i2v
        ys.append(fun_control_y(ctrl, img[:, 4:] if img is not None else None))
    elif task.i2v:
        img = batch.get("latents_image")
        if img is None:
            raise UserError(f"task {task.name} trains image-to-video: cache the latents with --i2v (latents_image missing)")
        ys.append(img)
    if ys:
        y = torch.cat([t.to(device=device, dtype=x_t.dtype) for t in ys], dim=1)
        if y.shape[1] != extra:
            raise UserError(
                f"the cached condition has {y.shape[1]} channels; the DiT expects {extra} beyond the {x_t.shape[1]} latent channels"
            )
        kwargs["y"] = y
    elif extra:
        raise UserError(f"the DiT takes {model_in_dim} input channels but the task {task.name} provides {x_t.shape[1]}")
    if task.clip:
        clip = batch.get("clip")
        if clip is None:
            raise UserError(f"task {task.name} needs CLIP image tokens: cache the latents with --clip")
        flf2v_cache = clip.dim() == 4  # (B, 2, 257, 1280): first + last frame tokens
        if flf2v_cache != task.flf2v:
            raise UserError(
                f"{batch.get('item_keys', ['?'])[0]}: the latent cache holds "
                + ("first + last frame conditions (FLF2V)" if flf2v_cache else "first-frame conditions (I2V)")
                + f" but --task {task.name} trains "
                + (
                    "FLF2V: re-cache with wan_cache_latents.py --task flf2v-14B"
                    if task.flf2v
                    else "I2V: re-cache with --task " + task.name
                )
            )
        # FLF2V: (2B, 257, 1280), first and last image of each sample in that order (the DiT's layout)
        kwargs["clip_fea"] = (clip.flatten(0, 1) if flf2v_cache else clip).to(device)
    f_indices = batch.get("f_indices")
    if f_indices is not None:
        check_one_frame_task(task, f"{batch.get('item_keys', ['?'])[0]}: one-frame cache (f_indices)")
        if f_indices.shape[-1] != x_t.shape[2]:
            raise UserError(
                f"{batch.get('item_keys', ['?'])[0]}: f_indices lists {f_indices.shape[-1]} frames, the latents have {x_t.shape[2]}"
            )
        kwargs["frame_indices"] = f_indices.long()
    t = timesteps.to(device)
    if task.ti2v:
        f, h, w = x_t.shape[2], x_t.shape[3] // 2, x_t.shape[4] // 2
        t = ti2v_token_timesteps(t, (f, h, w), first_frame_clean=False)
    kwargs["timestep"] = t
    assert len(kwargs["context"]) == b
    return kwargs
