"""Output writing of ``kandinsky5_generate_video.py``: ``--save_path DIR`` / ``--output FILE`` and
``--decode_from_latent`` (decode saved latents with their own metadata, no DiT or text encoder)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from blissful_tuner.media_output import decoded_latent_stem, load_latent_file, save_generation, save_latent
from musubi_tuner.kandinsky5.configs import get_task_config
from musubi_tuner.kandinsky5.pipeline import decode_latents
from musubi_tuner.kandinsky5.vae import K5Vae, load_k5_vae
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


def write_outputs(
    a: argparse.Namespace,
    latent: torch.Tensor,
    video: torch.Tensor | None,
    metadata: dict[str, str] | None,
    *,
    stem: str,
    fps: float,
) -> list[Path]:
    """Save to ``--save_path DIR`` (``<stem>.<ext>``, never overwriting unless ``--overwrite``) or to ``--output FILE``
    (exactly that file; ``<stem>_first.png`` / ``_last.png`` / ``_latent.safetensors`` beside it)."""
    common = dict(
        codec=a.codec,
        fps=fps,
        metadata=metadata,
        save_first_frame=a.save_first_frame,
        save_last_frame=a.save_last_frame,
        crf=a.crf,
        bitrate=a.video_bitrate,
    )
    if a.output:
        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        if a.output_type == "latent":
            return [save_latent(latent, out, metadata)]
        container = out.suffix.lower().lstrip(".") if out.suffix.lower() in (".mp4", ".mkv") else a.container
        if video is not None and video.shape[1] == 1 and out.suffix.lower() != ".png":
            logger.warning(f"--output {out}: a single frame is saved as {out.with_suffix('.png').name}")
        return save_generation(
            save_path=out.parent,
            stem=out.stem,
            video=video,
            latent=latent,
            output_type=a.output_type,
            container=container,
            overwrite=True,
            **common,
        )
    return save_generation(
        save_path=a.save_path,
        stem=stem,
        video=video,
        latent=latent,
        output_type=a.output_type,
        container=a.container,
        overwrite=a.overwrite,
        **common,
    )


def decode_saved_latents(args: argparse.Namespace) -> list[Path]:
    """``--decode_from_latent F…``: decode each saved latent with its own metadata; outputs named after the latent."""
    written: list[Path] = []
    vaes: dict[str, K5Vae] = {}
    device = torch.device(args.device)
    vae_dtype = parse_dtype(args.vae_dtype, torch.bfloat16, flag="--vae_dtype")
    for path in args.decode_from_latent:
        latent, md = load_latent_file(path)
        if latent.dim() == 5 and latent.shape[0] == 1:
            latent = latent[0]
        if latent.dim() != 4 or latent.shape[-1] != 16:
            raise UserError(f"{path}: expected a Kandinsky 5 latent (F, h, w, 16), got {tuple(latent.shape)}")
        task = get_task_config(md.get("bt_task", args.task))
        if task.vae not in vaes:
            vaes[task.vae] = load_k5_vae(args.vae, task.vae, vae_dtype, device, tiling=args.vae_tiling)
        video = decode_latents(vaes[task.vae], latent.float())
        fps = float(md["bt_fps"]) if "bt_fps" in md else float(args.fps)
        metadata = None if args.no_metadata else {k: v for k, v in md.items() if k.startswith("bt_")}
        decode_args = argparse.Namespace(**vars(args))
        decode_args.output_type = "images" if args.output_type in ("images", "latent_images") else "video"
        if not args.output:
            decode_args.save_path = args.save_path or str(Path(path).parent)
        files = write_outputs(decode_args, latent, video, metadata, stem=decoded_latent_stem(path), fps=fps)
        for p in files:
            logger.info(f"saved {p}")
        written.extend(files)
    return written
