"""Live latent previews (``--preview_latent_every N``, ``--preview_vae PATH``; specs/generation.md §2).

Every N steps the previewer estimates the clean latent ``x̂ = x_t − σ·ε`` (flow matching: ``x_t = (1−σ)·x0 + σ·ε``),
normalises it globally, turns it into RGB and overwrites ``<save_path>/latent_preview.png`` (one frame) or
``latent_preview.mp4`` (several) atomically, so a viewer never sees a half-written file. A preview failure is
logged once and never aborts generation.

RGB decoding:
- **latent2rgb** (default): ``rgb = M·z + b`` per latent pixel with a fixed per-family ``LatentRGBTable``, min–max
  normalised over the whole clip, upscaled ×8 (bicubic). ``HUNYUAN_VIDEO_RGB`` (the widely used ComfyUI factors
  for the HunyuanVideo VAE) is the default for Kandinsky 5 video latents, which use that VAE; it is an
  approximation meant for judging composition and motion, not colours. ``WAN21_RGB`` is provided for Wan 2.1,
  ``FLUX1_RGB`` for FLUX.1-VAE latents (Kandinsky 5 Image Lite).
  Other families pass their own table.
- **tiny decoder**: a callable ``(1, C, F, H, W) latent → (F, 3, H', W')`` RGB in [0, 1] (``load_preview_decoder``
  wraps a diffusers ``AutoencoderTiny`` directory, e.g. TAESD/taef1 for 16-channel FLUX-VAE images, decoding frame
  by frame). The decoder stays on CPU and moves to the compute device only while a preview is decoded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from blissful_tuner.blissful_logger import get_logger
from musubi_tuner.utils.errors import UserError

logger = get_logger(__name__)

PREVIEW_STEM = "latent_preview"


@dataclass(frozen=True)
class LatentRGBTable:
    """A linear latent→RGB map: ``factors`` is ``C × 3`` (one row per latent channel), ``bias`` has 3 entries."""

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float]

    @property
    def channels(self) -> int:
        return len(self.factors)


# ComfyUI latent2rgb factors for the HunyuanVideo VAE (HunyuanVideo, FramePack, Kandinsky 5 video). Approximate.
HUNYUAN_VIDEO_RGB = LatentRGBTable(
    factors=(
        (-0.0395, -0.0331, 0.0445),
        (0.0696, 0.0795, 0.0518),
        (0.0135, -0.0945, -0.0282),
        (0.0108, -0.0250, -0.0765),
        (-0.0209, 0.0032, 0.0224),
        (-0.0804, -0.0254, -0.0639),
        (-0.0991, 0.0271, -0.0669),
        (-0.0646, -0.0422, -0.0400),
        (-0.0696, -0.0595, -0.0894),
        (-0.0799, -0.0208, -0.0375),
        (0.1166, 0.1627, 0.0962),
        (0.1165, 0.0432, 0.0407),
        (-0.2315, -0.1920, -0.1355),
        (-0.0270, 0.0401, -0.0821),
        (-0.0616, -0.0997, -0.0727),
        (0.0249, -0.0469, -0.1703),
    ),
    bias=(0.0259, -0.0192, -0.0761),
)

# ComfyUI latent2rgb factors for the Wan 2.1 VAE (Wan 2.1 / 2.2 14B). Approximate.
WAN21_RGB = LatentRGBTable(
    factors=(
        (-0.1299, -0.1692, 0.2932),
        (0.0671, 0.0406, 0.0442),
        (0.3568, 0.2548, 0.1747),
        (0.0372, 0.2344, 0.1420),
        (0.0313, 0.0189, -0.0328),
        (0.0296, -0.0956, -0.0665),
        (-0.3477, -0.4059, -0.2925),
        (0.0166, 0.1902, 0.1975),
        (-0.0412, 0.0267, -0.1364),
        (-0.1293, 0.0740, 0.1636),
        (0.0680, 0.3019, 0.1128),
        (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699),
        (0.0060, -0.0633, 0.0005),
        (0.3477, 0.2275, 0.2950),
        (0.1984, 0.0913, 0.1861),
    ),
    bias=(-0.1835, -0.0868, -0.3360),
)

# ComfyUI latent2rgb factors for the FLUX.1 VAE (FLUX.1, Kandinsky 5 Image Lite). Approximate.
FLUX1_RGB = LatentRGBTable(
    factors=(
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    bias=(-0.0329, -0.0718, -0.0851),
)

PreviewDecoder = Callable[[torch.Tensor], torch.Tensor]


def to_cfhw(latent: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """One sample as ``(C, F, H, W)`` from ``(B, C, F, H, W)``, ``(C, F, H, W)``, ``(C, H, W)`` or, with
    ``channels_last``, ``(B, F, H, W, C)`` / ``(F, H, W, C)`` / ``(H, W, C)`` (Kandinsky 5). Batch item 0 is used."""
    x = latent
    if channels_last:
        if x.ndim == 5:
            x = x[0]
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ValueError(f"expected a channels-last latent, got shape {tuple(latent.shape)}")
        return x.permute(3, 0, 1, 2)
    if x.ndim == 5:
        x = x[0]
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"expected a (C, F, H, W) latent, got shape {tuple(latent.shape)}")
    return x


def denoised_estimate(x_t: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x̂ = x_t − σ·ε``, globally normalised ``(x̂ − mean) / (std + 1e-9)`` (float32)."""
    x = x_t.float() - float(sigma) * noise.float().to(x_t.device)
    return (x - x.mean()) / (x.std() + 1e-9)


def latent_to_rgb(latent_cfhw: torch.Tensor, table: LatentRGBTable, *, upscale: int = 8) -> torch.Tensor:
    """``(C, F, H, W)`` latent → ``(F, 3, H·upscale, W·upscale)`` in [0, 1] (linear map, clip-wide min–max)."""
    c = latent_cfhw.shape[0]
    if c != table.channels:
        raise ValueError(f"the latent has {c} channels but the preview table has {table.channels}")
    m = torch.tensor(table.factors, dtype=torch.float32, device=latent_cfhw.device)  # (C, 3)
    b = torch.tensor(table.bias, dtype=torch.float32, device=latent_cfhw.device)
    rgb = torch.einsum("cfhw,cr->frhw", latent_cfhw.float(), m) + b.view(1, 3, 1, 1)
    lo, hi = rgb.min(), rgb.max()
    rgb = (rgb - lo) / (hi - lo) if hi > lo else torch.zeros_like(rgb)
    if upscale > 1:
        rgb = F.interpolate(rgb, scale_factor=upscale, mode="bicubic", align_corners=False)
    return rgb.clamp(0, 1)


def load_preview_decoder(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float16
) -> PreviewDecoder:
    """A tiny decoder for ``--preview_vae``: a diffusers ``AutoencoderTiny`` directory (TAESD family).

    The weights stay on CPU; each call moves the model to ``device`` for the decode and back. fp8 dtypes are
    replaced by float16. The returned callable maps ``(1, C, F, H, W)`` to ``(F, 3, H', W')`` in [0, 1].
    """
    from diffusers import AutoencoderTiny

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--preview_vae: expected a diffusers AutoencoderTiny directory, got {p}")
    if dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
        dtype = torch.float16
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # fp16 convolutions are slow or missing on CPU
    try:
        model = AutoencoderTiny.from_pretrained(str(p), torch_dtype=dtype).eval()
    except Exception as e:
        raise UserError(f"--preview_vae: cannot load {p} as AutoencoderTiny ({e})") from None

    @torch.no_grad()
    def decode(latent: torch.Tensor) -> torch.Tensor:
        model.to(device)
        try:
            x = to_cfhw(latent).permute(1, 0, 2, 3).to(device=device, dtype=dtype)  # frames as a batch
            images = model.decode(x).sample.float()
            return ((images + 1) / 2).clamp(0, 1).cpu()
        finally:
            model.to("cpu")

    return decode


class LatentPreviewer:
    """Writes ``latent_preview.png`` / ``.mp4`` into ``save_dir`` every ``every`` steps.

    Call ``previewer(step_index, x_t, sigma)`` after each step (``sigma`` = the remaining noise level after the
    step, 0-based ``step_index``); it writes when ``(step_index + 1) % every == 0``. ``noise`` is the initial noise
    ε (pass ``update_noise`` when a scheduler injects fresh noise). Never raises: a failure is logged once and
    previews stop.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        every: int,
        noise: torch.Tensor,
        *,
        table: LatentRGBTable | None = HUNYUAN_VIDEO_RGB,
        decoder: PreviewDecoder | None = None,
        channels_last: bool = False,
        fps: int = 24,
        upscale: int = 8,
    ) -> None:
        if every < 1:
            raise UserError(f"--preview_latent_every must be >= 1 (got {every})")
        if decoder is None and table is None:
            raise ValueError("a preview needs a latent→RGB table or a decoder")
        self.save_dir = Path(save_dir)
        self.every = every
        self.noise = noise.detach().clone()
        self.table = table
        self.decoder = decoder
        self.channels_last = channels_last
        # latent2rgb shows latent frames (4× fewer than pixel frames); a tiny VAE restores the pixel rate.
        self.fps = max(1, fps // 4) if decoder is None else fps
        self.upscale = upscale
        self.disabled = False
        self.written: Path | None = None

    def update_noise(self, noise: torch.Tensor) -> None:
        """Replace ε (schedulers that inject fresh noise each step)."""
        self.noise = noise.detach().clone()

    def due(self, step_index: int) -> bool:
        """Whether ``step_index`` (0-based) gets a preview."""
        return not self.disabled and (step_index + 1) % self.every == 0

    def render(self, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
        """The preview frames ``(F, 3, H, W)`` in [0, 1] for the current latent."""
        est = denoised_estimate(x_t, self.noise, sigma)
        est = to_cfhw(est, channels_last=self.channels_last)
        if self.decoder is not None:
            return self.decoder(est.unsqueeze(0)).float().clamp(0, 1)
        return latent_to_rgb(est, self.table, upscale=self.upscale)  # type: ignore[arg-type]

    def write(self, frames: torch.Tensor) -> Path:
        """Write ``(F, 3, H, W)`` frames to the preview file (atomically replaced)."""
        from blissful_tuner.media_output import save_png, save_video

        video = frames.permute(1, 0, 2, 3)  # (3, F, H, W)
        if frames.shape[0] == 1:
            path = save_png(video[:, 0], self.save_dir / f"{PREVIEW_STEM}.png")
        else:
            path = save_video(video, self.save_dir / f"{PREVIEW_STEM}.mp4", fps=self.fps, codec="h264", container="mp4")
        self.written = path
        return path

    def __call__(self, step_index: int, x_t: torch.Tensor, sigma: float) -> Path | None:
        """Write a preview when due; returns the file written (``None`` when not due or disabled)."""
        if not self.due(step_index):
            return None
        try:
            with torch.no_grad():
                return self.write(self.render(x_t, sigma))
        except Exception as e:  # a preview must never abort generation
            self.disabled = True
            logger.warning(f"latent preview failed and is now off: {e}")
            return None
