"""FLUX.2 sampling loop shared by the generator and the trainer's samples (specs/flux2.md §8).

Distilled klein variants and dev take one forward per step (dev with its embedded guidance); the klein base variants
run true CFG with a negative prompt. Reference images are VAE-encoded once, packed after the target tokens with
ids ``t = 10 + 10·i``, and the prediction is sliced back to the target tokens. Blissful features come in as
callables (``cfg_fn``, ``step_callback``), never as imports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from musubi_tuner.flux_2.configs import ModelVersion
from musubi_tuner.flux_2.models.dit import Flux2
from musubi_tuner.flux_2.sampling import build_img_ids, build_txt_ids, get_schedule, pack_latents, unpack_latents
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.images import image_to_tensor, load_image, resize_cover

CfgFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (step, cond, uncond) -> guided prediction
StepCallback = Callable[[int, torch.Tensor, float], object]  # (step, latents (1, 128, h, w), remaining noise level)


def check_image_size(width: int, height: int, flag: str = "--image_size") -> None:
    """FLUX.2 images must be multiples of 16 px (8× VAE, 2×2 patchify)."""
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise UserError(f"{flag}: width {width} and height {height} must be positive multiples of 16")


def reference_size(image_size: tuple[int, int], target: tuple[int, int], resize: bool = True) -> tuple[int, int]:
    """Size (W, H) a reference image is encoded at: its aspect kept with about the target's pixel count (or its own
    size with ``resize=False``), floored to multiples of 16."""
    w0, h0 = image_size
    if resize:
        s = ((target[0] * target[1]) / (w0 * h0)) ** 0.5
        w0, h0 = w0 * s, h0 * s
    return max(16, int(w0) // 16 * 16), max(16, int(h0) // 16 * 16)


def encode_reference_images(
    vae, paths: Sequence[str], target: tuple[int, int], *, resize: bool = True, flag: str = "--control_image_path"
) -> list[torch.Tensor]:
    """Each reference image → normalised latents ``(128, h, w)`` (float32, CPU)."""
    out = []
    for p in paths:
        img = load_image(p, flag)
        w, h = reference_size(img.size, target, resize)
        out.append(vae.encode(image_to_tensor(resize_cover(img, w, h)))[0].float().cpu())
    return out


def _guidance_vector(model: Flux2, guidance: float, b: int, device) -> torch.Tensor | None:
    return torch.full((b,), float(guidance), device=device) if model.guidance_embed else None


@torch.no_grad()
def sample_latents(
    dit: Flux2,
    version: ModelVersion,
    *,
    ctx: torch.Tensor,
    latent_hw: tuple[int, int],
    num_steps: int,
    guidance: float,
    generator: torch.Generator | None,
    device: torch.device | str,
    ctx_neg: torch.Tensor | None = None,
    references: Sequence[torch.Tensor] = (),
    noise: torch.Tensor | None = None,
    cfg_fn: CfgFn | None = None,
    step_callback: StepCallback | None = None,
    progress: bool = True,
    mu: float | None = None,
) -> torch.Tensor:
    """Denoise one image; returns normalised latents ``(128, h, w)`` float32 on the CPU.

    ``ctx`` / ``ctx_neg``: ``(L, D)`` text embeddings. ``guidance``: dev's embedded guidance, or the CFG scale of
    the klein base variants (true CFG only when ``ctx_neg`` is given and the scale is not 1). ``references``:
    normalised reference latents ``(128, hi, wi)``. ``mu``: the schedule's shift exponent (default: the
    empirical μ of the token and step counts; ``--flow_shift s`` is ``mu = ln s``).
    """
    device = torch.device(device)
    h, w = latent_hw
    dtype = dit.compute_dtype
    if noise is None:
        noise = torch.randn(1, dit.in_channels, h, w, generator=generator, dtype=torch.float32)
    x = noise.to(device, torch.float32)
    refs = [pack_latents(r[None].to(device, torch.float32)) for r in references]
    img_ids = build_img_ids((h, w), [tuple(r.shape[-2:]) for r in references], device=device)
    txt = ctx[None].to(device, dtype)
    txt_ids = build_txt_ids(txt.shape[1], device=device)
    use_cfg = ctx_neg is not None and version.uses_cfg and guidance != 1.0
    if use_cfg:
        txt = torch.cat([txt, ctx_neg[None].to(device, dtype)])
        txt_ids = txt_ids.expand(2, -1, -1)
        img_ids = img_ids.expand(2, -1, -1)
    b = txt.shape[0]
    g = _guidance_vector(dit, guidance, b, device)
    ts = get_schedule(num_steps, h * w, mu=mu).tolist()
    steps = range(num_steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="denoising", leave=False)
    n_target = h * w
    for i in steps:
        tokens = torch.cat([pack_latents(x), *refs], dim=1).to(dtype).expand(b, -1, -1)
        t = torch.full((b,), ts[i], device=device)
        pred = dit(tokens, img_ids, txt, txt_ids, t, g)[:, :n_target].float()
        if use_cfg:
            cond, uncond = pred[:1], pred[1:]
            pred = cfg_fn(i, cond, uncond) if cfg_fn is not None else uncond + guidance * (cond - uncond)
        x = x + (ts[i + 1] - ts[i]) * unpack_latents(pred, h, w)
        if step_callback is not None:
            step_callback(i, x, ts[i + 1])
    return x[0].cpu()


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``(128, h, w)`` → image ``(3, H, W)`` in [0, 1] (float32, CPU)."""
    return ((vae.decode(latents[None]) + 1) / 2).clamp(0, 1)[0].cpu()
