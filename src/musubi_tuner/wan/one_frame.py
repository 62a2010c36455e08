"""Wan one-frame inference and training (specs/wan.md §8; musubi-tuner's "one frame" mode on the Wan 2.1 I2V model).

One output image is generated as one latent frame placed at a chosen RoPE time index (``target_index``) next to one
or more clean control frames (``control_index``, ascending; the i-th control image goes to the i-th smallest
index). The DiT sees ``F = 1 + controls`` latent frames, ordered by index, whose RoPE time positions are those indices
(``frame_indices``, cached as ``f_indices``) instead of ``0..F−1``. The 20 condition channels hold, per frame: mask 1
(all 4 channels) and the control image's own latent on control frames; mask 0 and the latent of an all-zero image
(grey in [-1, 1]) on the target frame. Every image is VAE-encoded alone as a one-frame clip.

The option string (``--one_frame_inference`` / sample-line ``--of``) is comma-separated: ``target_index=N``
(required), ``control_index=A[;B…]`` (default ``0``), and FramePack's ``no_2x`` / ``no_4x`` / ``no_post``, which
Wan accepts and ignores (it has no 2x/4x clean latents and no post latent).

The same ``encode_one_frame`` builds the training cache (``wan_cache_latents.py --one_frame``) and the generator's
condition, so a LoRA trained on it sees at inference exactly the inputs it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from musubi_tuner.utils.errors import UserError

FRAMEPACK_ONLY = ("no_2x", "no_4x", "no_post")
MAX_INDEX = 1023  # the DiT has 1024 RoPE positions per axis


@dataclass(frozen=True)
class OneFrameOptions:
    """Where the generated frame and the control frames sit on the RoPE time axis."""

    target_index: int
    control_indices: tuple[int, ...] = (0,)

    @property
    def frame_indices(self) -> tuple[int, ...]:
        """RoPE time index of each latent frame, ascending (what is cached as ``f_indices``)."""
        return tuple(sorted((*self.control_indices, self.target_index)))

    @property
    def target_position(self) -> int:
        """Position of the generated frame among ``frame_indices``."""
        return self.frame_indices.index(self.target_index)

    def check(self, where: str) -> OneFrameOptions:
        """Raise a UserError naming ``where`` for indices that cannot describe one generated frame."""
        every = (*self.control_indices, self.target_index)
        bad = [i for i in every if not 0 <= i <= MAX_INDEX]
        if bad:
            raise UserError(f"{where}: frame index {bad[0]} is outside 0..{MAX_INDEX}")
        if not self.control_indices:
            raise UserError(f"{where}: one-frame mode needs at least one control index")
        if len(set(self.control_indices)) != len(self.control_indices):
            raise UserError(f"{where}: control indices {list(self.control_indices)} repeat an index")
        if self.target_index in self.control_indices:
            raise UserError(f"{where}: target_index={self.target_index} is also a control index")
        return self


def check_one_frame_task(task: Any, flag: str) -> None:
    """One-frame mode needs the 20-channel I2V condition: i2v-14B, flf2v-14B or i2v-A14B (not T2V, TI2V-5B, -FC)."""
    if not task.i2v or task.control or task.ti2v:
        raise UserError(f"{flag}: one-frame mode runs on the image-to-video tasks (i2v-14B, flf2v-14B, i2v-A14B), not {task.name}")


def _int(text: str, option: str, where: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise UserError(f"{where}: option {option!r}: {text.strip()!r} is not an integer") from None


def parse_one_frame_options(text: str, where: str = "--one_frame_inference") -> OneFrameOptions:
    """``"target_index=9,control_index=0"`` → ``OneFrameOptions``; a UserError names the bad option and ``where``."""
    target: int | None = None
    controls: tuple[int, ...] | None = None
    for raw in str(text).split(","):
        opt = raw.strip()
        if not opt or opt in FRAMEPACK_ONLY:
            continue
        name, eq, value = opt.partition("=")
        name = name.strip()
        if name == "target_index" and eq:
            target = _int(value, opt, where)
        elif name == "control_index" and eq:
            controls = tuple(_int(v, opt, where) for v in value.split(";"))
        else:
            raise UserError(
                f"{where}: unknown one-frame option {opt!r} (Wan takes target_index=N, control_index=A;B, "
                f"and ignores {', '.join(FRAMEPACK_ONLY)})"
            )
    if target is None:
        raise UserError(f"{where}: {text!r} has no target_index=N (the RoPE time index of the generated frame)")
    return OneFrameOptions(target, controls if controls is not None else (0,)).check(where)


def dataset_one_frame_options(params: Any) -> OneFrameOptions:
    """The options of an image dataset from ``fp_1f_target_index`` / ``fp_1f_clean_indices`` (both required)."""
    where = f"{params.config_path}: {params.table}"
    missing = [k for k in ("fp_1f_target_index", "fp_1f_clean_indices") if getattr(params, k) is None]
    if missing:
        raise UserError(f"{where}: one-frame caching (--one_frame) needs {' and '.join(missing)} in the dataset")
    if params.is_video:
        raise UserError(f"{where}: one-frame training takes image datasets (target image + control images)")
    return OneFrameOptions(int(params.fp_1f_target_index), tuple(int(i) for i in params.fp_1f_clean_indices)).check(
        f"{where}: fp_1f_target_index / fp_1f_clean_indices"
    )


def _encode_image(vae: Any, image: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` or ``(B, 3, 1, H, W)`` in [-1, 1] → normalised latent ``(B, C, 1, h, w)`` float32."""
    if image.dim() == 4:
        image = image[:, :, None]
    return vae.encode(image).float()


def encode_one_frame(
    vae: Any, controls: list[torch.Tensor], options: OneFrameOptions, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y (B, 4 + C, F, h, w), latents (B, C, F, h, w) or None)`` for ``options``.

    ``controls``: one ``(B, 3, [1,] H, W)`` tensor per control index (ascending), in [-1, 1]; ``target`` (training):
    the image to learn, placed at the target frame of ``latents`` with the control latents at their frames.
    """
    if len(controls) != len(options.control_indices):
        raise UserError(
            f"one-frame: {len(options.control_indices)} control index(es) {list(options.control_indices)} but "
            f"{len(controls)} control image(s)"
        )
    ctrl = [_encode_image(vae, c) for c in controls]
    b, c, _, h, w = ctrl[0].shape
    grey = controls[0].new_zeros(1, 3, 1, *controls[0].shape[-2:])
    blank = _encode_image(vae, grey).expand(b, -1, -1, -1, -1)
    frames = len(options.frame_indices)
    y = torch.zeros(b, 4 + c, frames, h, w)
    lat = torch.zeros(b, c, frames, h, w) if target is not None else None
    tgt = _encode_image(vae, target) if target is not None else None
    ci = 0
    for j, index in enumerate(options.frame_indices):
        if index == options.target_index:
            y[:, 4:, j] = blank[:, :, 0].cpu()
            if lat is not None:
                lat[:, :, j] = tgt[:, :, 0].cpu()
        else:
            y[:, :4, j] = 1.0
            y[:, 4:, j] = ctrl[ci][:, :, 0].cpu()
            if lat is not None:
                lat[:, :, j] = ctrl[ci][:, :, 0].cpu()
            ci += 1
    return y, lat


def target_positions(y: torch.Tensor) -> torch.Tensor:
    """``(B,)`` position of each sample's generated frame: the frame whose mask (channel 0 of ``y``) is 0."""
    mask = y[:, 0, :, 0, 0]
    return (mask == 0).float().argmax(dim=1)
