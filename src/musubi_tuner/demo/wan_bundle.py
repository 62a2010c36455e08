"""Tiny random-weight Wan bundles in the files users download (specs/wan.md §1):

- ``<task>_dit.safetensors``: the DiT in the official key layout (ComfyUI-repackaged style, fp32, tiny dims as JSON
  in the ``wan_dit_config`` metadata); two-expert tasks get ``..._high_noise.safetensors`` / ``..._low_noise...``.
- ``Wan2.1_VAE.pth``: the 2.1 VAE in the official key layout (``torch.save`` of a plain state dict; base width 8,
  the real level/block layout so diffusers' converter applies); ``vae_diffusers/`` the same weights for diffusers.
- ``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl/`` (the official ckpt-dir layout): a 2-layer UMT5 encoder
  (width 32) in the official T5 key layout, with a Unigram tokenizer trained offline.
- ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``: an open-clip ``visual.*`` ViT (width 32, 3 layers,
  patch 14, 224 px → 257 tokens) with its dims in ``<file>.json`` (real files need none).

The DiT text width is the T5 width (32); CLIP tokens are 1280 wide only in the real model, so tiny I2V DiTs take
the tiny CLIP width as ``image_dim``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.demo.snapshot_io import read_manifest, seeded, write_json
from musubi_tuner.utils.atomic import make_temp_dir, save_safetensors_atomic
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.wan.configs import dit_params_for, get_task_config

logger = get_logger(__name__)

BUNDLE_VERSION = 1
MANIFEST = "wan_bundle.json"
T5_WIDTH = 32
CLIP_WIDTH = 32
TINY_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
}
TINY_VAE22_CONFIG: dict[str, Any] = {
    "base_dim": 8,
    "decoder_base_dim": 8,
    "z_dim": 48,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
}


def tiny_dit_params(task: str) -> dict[str, Any]:
    """The task's DiT arguments at tiny width: 4 heads of 16 (RoPE 8/4/4), FFN 128, 2 blocks, text width 32."""
    p = dit_params_for(get_task_config(task))
    p.update(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=T5_WIDTH)
    if p["image_dim"] is not None:
        p["image_dim"] = CLIP_WIDTH
    p["patch_size"] = list(p["patch_size"])
    return p


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Seeded random parameters that keep activations O(1) (norm weights ≈ 1, modulations small)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith(".weight"):
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith(".bias") or "emb_pos" in name:
                val = 0.02 * torch.randn(p.shape, generator=g)
            elif "modulation" in name:
                val = 0.1 * torch.randn(p.shape, generator=g)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                val = torch.randn(p.shape, generator=g) / fan_in**0.5
            p.copy_(val.to(p.dtype))


def write_tiny_dit(path: Path, task: str, seed: int) -> Path:
    """One official-layout DiT file for ``task``."""
    from musubi_tuner.wan.models.dit import WanModel

    params = tiny_dit_params(task)
    model = WanModel(**params)
    randomize_(model, seed)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_safetensors_atomic(sd, path, metadata={"wan_dit_config": json.dumps(params, sort_keys=True), "format": "pt"})
    return path


_RES = (
    ("norm1.gamma", "residual.0.gamma"),
    ("conv1.", "residual.2."),
    ("norm2.gamma", "residual.3.gamma"),
    ("conv2.", "residual.6."),
)


def _res(rest: str) -> str:
    for a, b in _RES:
        if rest.startswith(a):
            return b + rest[len(a) :]
    if rest.startswith("conv_shortcut."):
        return "shortcut." + rest[len("conv_shortcut.") :]
    return rest


def diffusers_vae_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKLWan`` (2.1 layout, 2 blocks per level) → official ``Wan2.1_VAE.pth`` keys."""
    out = {}
    for k, v in sd.items():
        if k.startswith("quant_conv."):
            o = "conv1." + k[len("quant_conv.") :]
        elif k.startswith("post_quant_conv."):
            o = "conv2." + k[len("post_quant_conv.") :]
        elif m := re.match(r"^(encoder|decoder)\.conv_in\.(.+)$", k):
            o = f"{m[1]}.conv1.{m[2]}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)$", k):
            o = f"{m[1]}.middle.{2 * int(m[2])}.{_res(m[3])}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", k):
            o = f"{m[1]}.middle.1.{m[2]}"
        elif m := re.match(r"^(encoder|decoder)\.norm_out\.(.+)$", k):
            o = f"{m[1]}.head.0.{m[2]}"
        elif m := re.match(r"^(encoder|decoder)\.conv_out\.(.+)$", k):
            o = f"{m[1]}.head.2.{m[2]}"
        elif m := re.match(r"^encoder\.down_blocks\.(\d+)\.(.+)$", k):
            o = f"encoder.downsamples.{m[1]}.{_res(m[2])}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k):
            o = f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_res(m[3])}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", k):
            o = f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
        else:
            raise ValueError(f"no official name for VAE key {k}")
        out[o] = v
    return out


def write_tiny_vae(out_dir: Path, seed: int) -> tuple[Path, Path]:
    """``Wan2.1_VAE.pth`` (official keys) and ``vae_diffusers/`` with the same weights."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with seeded(seed):
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
    sd = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    official = diffusers_vae_to_official(sd)
    back = convert_wan_vae_to_diffusers(dict(official))
    if set(back) != set(sd):  # our inverse must be what diffusers' converter undoes
        raise RuntimeError(f"tiny Wan VAE: official key layout does not round-trip ({sorted(set(back) ^ set(sd))[:4]})")
    pth = out_dir / "Wan2.1_VAE.pth"
    torch.save(official, pth)
    vae.save_pretrained(out_dir / "vae_diffusers", safe_serialization=True)
    return pth, out_dir / "vae_diffusers"


def write_tiny_vae22(out_dir: Path, seed: int) -> Path:
    """The Wan 2.2 VAE (48 channels, ×16) as a diffusers directory."""
    from diffusers import AutoencoderKLWan

    with seeded(seed):
        vae = AutoencoderKLWan(**TINY_VAE22_CONFIG)
    vae.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _train_t5_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from musubi_tuner.demo.tokenizer_corpus import corpus_lines

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" +", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(corpus_lines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return tok


def write_tiny_umt5(out_dir: Path, seed: int) -> Path:
    """Official-layout UMT5 encoder ``.pth`` plus the tokenizer at ``google/umt5-xxl`` next to it."""
    from transformers import UMT5Config, UMT5EncoderModel

    from musubi_tuner.wan.text_encoders import umt5_official_to_hf

    tok_dir = out_dir / "google" / "umt5-xxl"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_t5_tokenizer()
    tok.save(str(tok_dir / "tokenizer.json"))
    write_json(
        tok_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "T5TokenizerFast",
            "pad_token": "<pad>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "model_max_length": 512,
        },
    )
    write_json(tok_dir / "special_tokens_map.json", {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})
    cfg = UMT5Config(
        vocab_size=tok.get_vocab_size(),
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    with seeded(seed):
        model = UMT5EncoderModel(cfg)
    hf = model.state_dict()
    official: dict[str, torch.Tensor] = {}
    names = ["token_embedding.weight", "norm.weight"]
    for n in range(cfg.num_layers):
        for part in (
            "norm1",
            "attn.q",
            "attn.k",
            "attn.v",
            "attn.o",
            "pos_embedding.embedding",
            "norm2",
            "ffn.gate.0",
            "ffn.fc1",
            "ffn.fc2",
        ):
            names.append(f"blocks.{n}.{part}.weight")
    for name in names:
        official[name] = hf[umt5_official_to_hf(name)].detach().to(torch.bfloat16).contiguous()
    path = out_dir / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(official, path)
    return path


def write_tiny_clip(out_dir: Path, seed: int) -> Path:
    """An open-clip ``visual.*`` ViT (width 32, 3 layers, 224 px, patch 14) as ``.pth`` + its dims in ``<file>.json``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = dict(
        hidden_size=CLIP_WIDTH,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    with seeded(seed):
        model = CLIPVisionModel(CLIPVisionConfig(**cfg))
    sd = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["embeddings.class_embedding"],
        "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["post_layernorm.weight"],
        "visual.ln_post.bias": sd["post_layernorm.bias"],
        "visual.proj": torch.zeros(CLIP_WIDTH, 16),
    }
    for n in range(cfg["num_hidden_layers"]):
        b, o = f"encoder.layers.{n}", f"visual.transformer.resblocks.{n}"
        for kind in ("weight", "bias"):
            out[f"{o}.attn.in_proj_{kind}"] = torch.cat([sd[f"{b}.self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            for ours, theirs in (
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("attn.out_proj", "self_attn.out_proj"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                out[f"{o}.{ours}.{kind}"] = sd[f"{b}.{theirs}.{kind}"]
    path = out_dir / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save({k: v.detach().to(torch.float16).contiguous() for k, v in out.items()}, path)
    write_json(path.with_suffix(path.suffix + ".json"), cfg)
    return path


@dataclass(frozen=True)
class WanBundle:
    """Paths of a tiny Wan bundle (absolute)."""

    root: Path
    task: str
    dit: Path  # the low-noise expert for two-expert tasks
    dit_high_noise: Path | None
    vae: Path
    vae_diffusers: Path
    vae22: Path | None
    t5: Path
    clip: Path | None
    dit_config: dict

    @classmethod
    def from_manifest(cls, root: Path) -> WanBundle:
        root, data, p = read_manifest(root, MANIFEST, "Wan")
        return cls(
            root=root,
            task=data["task"],
            dit=p["dit"],
            dit_high_noise=p.get("dit_high_noise"),
            vae=p["vae"],
            vae_diffusers=p["vae_diffusers"],
            vae22=p.get("vae22"),
            t5=p["t5"],
            clip=p.get("clip"),
            dit_config=data["dit_config"],
        )


def write_wan_bundle(out_dir: str | os.PathLike, *, task: str = "t2v-1.3B", seed: int = 0) -> WanBundle:
    """Write (or reuse) a tiny Wan bundle for ``task`` into ``out_dir`` atomically."""
    cfg = get_task_config(task)
    root = Path(out_dir).resolve()
    if (root / MANIFEST).is_file():
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        if data.get("version") == BUNDLE_VERSION and data.get("task") == task and data.get("seed") == seed:
            return WanBundle.from_manifest(root)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root}: exists and is not a tiny Wan bundle for task {task}, seed {seed}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root.parent, prefix=f".{root.name}.")
    try:
        stem = task.replace(".", "_")
        paths: dict[str, str | None] = {}
        if cfg.two_experts:
            write_tiny_dit(tmp / f"wan2.2_{stem}_low_noise.safetensors", task, seed)
            write_tiny_dit(tmp / f"wan2.2_{stem}_high_noise.safetensors", task, seed + 100)
            paths.update(dit=f"wan2.2_{stem}_low_noise.safetensors", dit_high_noise=f"wan2.2_{stem}_high_noise.safetensors")
        else:
            write_tiny_dit(tmp / f"wan_{stem}.safetensors", task, seed)
            paths.update(dit=f"wan_{stem}.safetensors", dit_high_noise=None)
        write_tiny_vae(tmp, seed + 1)
        paths.update(vae="Wan2.1_VAE.pth", vae_diffusers="vae_diffusers")
        paths["vae22"] = None
        if cfg.ti2v:
            write_tiny_vae22(tmp / "vae22_diffusers", seed + 2)
            paths["vae22"] = "vae22_diffusers"
        write_tiny_umt5(tmp, seed + 3)
        paths["t5"] = "models_t5_umt5-xxl-enc-bf16.pth"
        paths["clip"] = None
        if cfg.clip:
            write_tiny_clip(tmp, seed + 4)
            paths["clip"] = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
        write_json(
            tmp / MANIFEST,
            {"version": BUNDLE_VERSION, "task": task, "seed": seed, "dit_config": tiny_dit_params(task), "paths": paths},
        )
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote tiny Wan bundle (task %s, seed %d) to %s", task, seed, root)
    return WanBundle.from_manifest(root)
