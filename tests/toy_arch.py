"""A tiny DiT-like test architecture that plugs into ``NetworkTrainer`` through the hooks only.

``ToyDiT`` (4-channel latents, cross-attention to variable-length text, timestep modulation) uses the shared
``BlockSwapMixin`` and ``GradientCheckpointingMixin``; ``ToyTrainer`` implements every abstract hook. Caches are
written through the real dataset drivers with deterministic toy encoders (architecture short name ``wan``, which
the dataset table already knows). Run as a script (``accelerate launch tests/toy_arch.py ...``) for subprocess tests.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from musubi_tuner.dataset.batching import pad_varlen
from musubi_tuner.hv_train_network import DiTOutput, NetworkTrainer, read_config_from_file, setup_parser_common
from musubi_tuner.modules.checkpointing import GradientCheckpointingMixin
from musubi_tuner.modules.offloading import BlockSwapMixin
from musubi_tuner.training.sampling import load_sample_prompts
from musubi_tuner.utils.atomic import save_safetensors_atomic
from musubi_tuner.utils.errors import cli_entry

LATENT_CHANNELS = 4
TEXT_DIM = 16
SPATIAL = 8  # pixels per latent cell
ARCH = "wan"
NETWORK_MODULE = "networks.lora"


class ToyBlock(nn.Module):
    """Modulated cross-attention + MLP block."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, *, temb: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(temb).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        k, v = self.to_kv(ctx).chunk(2, dim=-1)
        attn = F.scaled_dot_product_attention(self.to_q(h), k, v, attn_mask=ctx_mask[:, None, :])
        x = x + attn
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ToyDiT(BlockSwapMixin, GradientCheckpointingMixin, nn.Module):
    """Latents ``(B, 4, F, H, W)`` → velocity of the same shape; timesteps on the 0..1000 scale."""

    def __init__(self, dim: int = 32, num_blocks: int = 4):
        super().__init__()
        self.dim = dim
        self.x_in = nn.Linear(LATENT_CHANNELS, dim)
        self.t_in = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.ctx_in = nn.Linear(TEXT_DIM, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(num_blocks))
        self.out = nn.Linear(dim, LATENT_CHANNELS)

    def _block_lists(self) -> list[nn.ModuleList]:
        return [self.blocks]

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() / 1000.0)[:, None] * 1000.0 * freqs[None]
        return self.t_in(torch.cat([args.cos(), args.sin()], dim=-1).to(self.x_in.weight.dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        self.prepare_block_swap_before_forward()
        b, c, f, h, w = x.shape
        tokens = self.x_in(x.flatten(2).transpose(1, 2))
        temb = self.time_embedding(t)
        ctx = self.ctx_in(ctx)
        for i, block in enumerate(self.blocks):
            self._before_block(0, i)
            tokens = self._checkpointed(block, tokens, temb=temb, ctx=ctx, ctx_mask=ctx_mask)
            self._after_block(0, i)
        return self.out(tokens).transpose(1, 2).reshape(b, c, f, h, w)


# ---------------------------------------------------------------------------------------------------------------
# deterministic toy encoders (shared by caching, training and sampling: identical conditioning)


def encode_text(caption: str) -> torch.Tensor:
    """``(L, TEXT_DIM)`` float32: one row per word (at least one), from a hash of the word."""
    words = caption.split() or [""]
    rows = []
    for word in words[:16]:
        seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:4], "little")
        rows.append(torch.randn(TEXT_DIM, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows)


def encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, F, H, W)`` in [-1, 1] → ``(B, 4, F', H/8, W/8)``: RGB means + luminance contrast per 8×8 cell,
    frames 1 + 4k kept (a ×4 temporal stride)."""
    pixels = pixels[:, :3, ::4]
    b, c, f, h, w = pixels.shape
    flat = pixels.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    mean = F.avg_pool2d(flat, SPATIAL)
    contrast = F.avg_pool2d(flat.mean(1, keepdim=True) ** 2, SPATIAL) - mean.mean(1, keepdim=True) ** 2
    lat = torch.cat([mean, contrast * 4], dim=1)
    return lat.reshape(b, f, LATENT_CHANNELS, h // SPATIAL, w // SPATIAL).permute(0, 2, 1, 3, 4)


class ToyVAE:
    """Decoder of ``encode_pixels``: nearest upsampling of the RGB means, frames repeated ×4."""

    dtype = torch.float32

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        rgb = latents[:, :3].float()
        rgb = rgb.repeat_interleave(SPATIAL, dim=-1).repeat_interleave(SPATIAL, dim=-2)
        if rgb.shape[2] > 1:
            rgb = torch.cat([rgb[:, :, :1], rgb[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
        return ((rgb + 1) / 2).clamp(0, 1)


def cache_dataset(dataset_config: str | Path) -> None:
    """Write latent and text-encoder caches of a dataset config through the real caching drivers."""
    from musubi_tuner.dataset.latent_caching import cache_latents
    from musubi_tuner.dataset.text_caching import cache_text_encoder_outputs

    ns = argparse.Namespace(
        dataset_config=str(dataset_config), num_workers=1, skip_existing=False, keep_cache=False, batch_size=None
    )

    def latents(batch):
        lat = encode_pixels(batch.pixels)
        return [{"latents": lat[i]} for i in range(lat.shape[0])]

    def texts(items):
        return [{"varlen_ctx": encode_text(it.caption)} for it in items]

    cache_latents(ns, architecture=ARCH, encode=latents)
    cache_text_encoder_outputs(ns, architecture=ARCH, encode=texts)


def write_image_dataset(
    root: Path, n: int = 4, *, batch_size: int = 1, size: int = 32, validation_items: int = 0, seed: int = 0
) -> Path:
    """``n`` PNG images (coloured rectangles) with captions + a dataset TOML (and an optional validation dataset);
    caches written through the real drivers. Returns the dataset config path."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    tables = []
    for name, count, is_val in (("train", n, False), ("val", validation_items, True)):
        if not count:
            continue
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colours = ["red", "green", "blue", "yellow", "white", "purple"]
        for i in range(count):
            colour = colours[rng.randrange(len(colours))]
            img = Image.new("RGB", (size, size), "black")
            x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
            ImageDraw.Draw(img).rectangle([x0, y0, x0 + size // 2, y0 + size // 2], fill=colour)
            img.save(folder / f"{name}_{i:03d}.png")
            (folder / f"{name}_{i:03d}.txt").write_text(f"a {colour} square number {i}", encoding="utf-8")
        val = "validation = true\n" if is_val else ""
        tables.append(
            f'[[datasets]]\nimage_directory = "{folder.as_posix()}"\ncache_directory = "{(root / (name + "_cache")).as_posix()}"\n'
            f"batch_size = {batch_size}\n{val}"
        )
    config = root / "dataset.toml"
    config.write_text(
        f'[general]\nresolution = [{size}, {size}]\ncaption_extension = ".txt"\nenable_bucket = false\n\n' + "\n".join(tables),
        encoding="utf-8",
    )
    cache_dataset(config)
    return config


def write_toy_dit(path: Path, seed: int = 0, dim: int = 32, num_blocks: int = 4) -> Path:
    """A random-weight toy DiT checkpoint."""
    torch.manual_seed(seed)
    model = ToyDiT(dim, num_blocks)
    save_safetensors_atomic(model.state_dict(), path, {"toy_dim": str(dim), "toy_blocks": str(num_blocks)})
    return path


# ---------------------------------------------------------------------------------------------------------------


class ToyTrainer(NetworkTrainer):
    """The toy architecture's trainer: hooks only."""

    @property
    def architecture(self) -> str:
        return ARCH

    @property
    def architecture_full_name(self) -> str:
        return "wan"

    def handle_model_specific_args(self, args: argparse.Namespace) -> None:
        self._i2v_training = False
        self._control_training = False
        self.default_guidance_scale = 1.0
        self.default_discrete_flow_shift = 3.0
        self.vae_frame_stride = 4
        self.default_vae_dtype = torch.float32

    def load_transformer(self, accelerator, args, dit_path, attn_mode, split_attn, loading_device, dit_weight_dtype):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(dit_path, "pt") as f:
            md = f.metadata() or {}
        model = ToyDiT(int(md.get("toy_dim", 32)), int(md.get("toy_blocks", 4)))
        model.load_state_dict(load_file(dit_path), strict=True)
        return model.to(loading_device, dit_weight_dtype or torch.float32)

    def load_vae(self, args, vae_dtype, vae_path):
        return ToyVAE()

    def process_sample_prompts(self, args, accelerator, sample_prompts):
        prompts = load_sample_prompts(sample_prompts)
        for p in prompts:
            p["ctx"] = encode_text(p.get("prompt") or "")
        return prompts

    def call_dit(self, args, accelerator, transformer, latents, batch, noise, noisy_model_input, timesteps, network_dtype):
        ctx, mask = pad_varlen(batch["ctx"])
        dtype = transformer.x_in.weight.dtype
        pred = transformer(noisy_model_input.to(dtype), timesteps, ctx.to(accelerator.device, dtype), mask.to(accelerator.device))
        return DiTOutput(pred=pred, target=noise - latents, extra={})

    def do_inference(self, accelerator, args, sample_parameter, vae, dit_dtype, transformer, generator):
        p = sample_parameter
        f = (p["frame_count"] - 1) // 4 + 1
        shape = (1, LATENT_CHANNELS, f, p["height"] // SPATIAL, p["width"] // SPATIAL)
        device = accelerator.device
        x = torch.randn(shape, generator=generator, device=device)
        ctx, mask = pad_varlen([p["ctx"]])
        ctx, mask = ctx.to(device), mask.to(device)
        ts = torch.linspace(1, 0, p["sample_steps"] + 1)
        shift = p["discrete_flow_shift"]
        ts = shift * ts / (1 + (shift - 1) * ts)
        for t, t_next in zip(ts[:-1], ts[1:]):
            v = transformer(x, torch.full((1,), float(t) * 1000, device=device), ctx, mask)
            x = x + (t_next - t) * v
        return vae.decode(x)


class FixedNoiseToyTrainer(ToyTrainer):
    """Noise and t derived from each item's cache file name, so batching, accumulation and multi-process data
    parallelism can be compared exactly."""

    def process_batch(self, args, accelerator, transformer, latents, batch, noise, network_dtype, timesteps=None):
        seeds = [int(hashlib.sha256(Path(k).name.encode()).hexdigest()[:8], 16) for k in batch["item_keys"]]
        noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        t = torch.tensor([(s % 1000) / 1000 for s in seeds])
        noise = noise.to(latents.device, latents.dtype)
        return super().process_batch(args, accelerator, transformer, latents, batch, noise, network_dtype, timesteps=t)


class RecordingSGDScheduleFree(torch.optim.SGD):
    """A stand-in schedule-free optimizer (the name ends in ``schedulefree``) that records its train/eval switches."""

    calls: list[str] = []

    def train(self) -> None:
        RecordingSGDScheduleFree.calls.append("train")

    def eval(self) -> None:
        RecordingSGDScheduleFree.calls.append("eval")


def toy_parser() -> argparse.ArgumentParser:
    parser = setup_parser_common()
    parser.add_argument("--dit_dtype", type=str, default="float32", help="toy DiT dtype")
    parser.add_argument("--toy_fixed_noise", action="store_true", help="use FixedNoiseToyTrainer")
    return parser


def common_argv(config: Path, dit: Path, out: Path, *extra: str) -> list[str]:
    """A short toy run: LoRA rank 4, lr 1e-2, no loader workers, fixed seed, fp32."""
    return [
        "--dataset_config", str(config), "--dit", str(dit), "--network_module", NETWORK_MODULE, "--network_dim", "4",
        "--network_alpha", "4", "--output_dir", str(out), "--output_name", "toy", "--learning_rate", "1e-2",
        "--max_data_loader_n_workers", "0", "--seed", "1", "--max_train_steps", "4", *extra,
    ]  # fmt: skip


def run(argv: list[str]) -> None:
    """Parse ``argv`` like the script would and train."""
    parser = toy_parser()
    args = parser.parse_args(argv)
    args = read_config_from_file(args, parser, argv)
    (FixedNoiseToyTrainer() if args.toy_fixed_noise else ToyTrainer()).train(args)


@cli_entry
def main() -> None:
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
