"""FLUX.2 hooks of the memory estimator (``musubi_tuner.memory.hooks``; docs/memory.md).

The training batch is the layout ``CachedDataset.load_batch`` yields for FLUX.2 caches: ``latents`` ``(B, 128, h, w)``
(images, no frame axis), ``ctx_vec`` ``(B, 512, 3·hidden)`` and, for editing datasets, ``latents_control_{i}``
``(B, 128, hi, wi)`` per reference image. Sizes and dtypes come from the cache headers. The step (``call_dit``) packs
target and reference tokens and builds ids from shapes only, so it traces as it runs; there is no text mask.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from musubi_tuner.dataset.cache_format import read_header
from musubi_tuner.flux_2.configs import TEXT_MAX_LENGTH, model_version_names
from musubi_tuner.memory.cache_headers import cache_dtype, cache_entry, numel, torch_dtype
from musubi_tuner.memory.dataset_scan import largest_cached_step
from musubi_tuner.memory.hooks import StepShape, argv_names_one_of
from musubi_tuner.utils.errors import UserError

LATENT_CHANNELS = 128


class Flux2MemoryHooks:
    """``ArchMemoryHooks`` for FLUX.2 (dev, klein)."""

    name = "flux_2"
    train_script = "musubi_tuner.flux_2_train_network:main"
    generate_script = "musubi_tuner.flux_2_generate_image:main"

    def detect(self, argv: list[str]) -> bool:
        """``--model_version`` naming a FLUX.2 variant (dev is its default: pass ``--arch flux_2`` without it)."""
        return argv_names_one_of(argv, "--model_version", set(model_version_names()))

    def step_shape(self, args: argparse.Namespace, trainer: Any, train_group: Any) -> StepShape:
        """The largest step (B · target and reference tokens) over the training datasets; text is always 512 tokens."""
        step = largest_cached_step(
            train_group.datasets,
            lambda shape, refs: numel(shape[-2:]) + sum(numel(r[0][-2:]) for r in refs),
            with_controls=True,
            missing=f"{args.dataset_config}: no cached latents found; run flux_2_cache_latents.py first",
        )
        te, _ = read_header(step.item.te_path)
        ctx = cache_entry(te, "ctx_vec")
        if ctx is None:
            raise UserError(f"{step.item.te_path}: no FLUX.2 text embeddings (ctx_vec); run flux_2_cache_text_encoder_outputs.py")
        details = {
            "latent_dtype": cache_dtype(step.entries, "latents"),
            "references": [list(shape[-3:]) for shape, _ in step.controls],
            "reference_dtypes": [dtype for _, dtype in step.controls],
            "text_dim": int(ctx["shape"][-1]),
            "text_dtype": ctx["dtype"],
        }
        return step.step_shape(int(ctx["shape"][-2]), details)

    def make_fake_batch(self, args: argparse.Namespace, shape: StepShape) -> dict[str, Any]:
        d = shape.details
        b = shape.batch
        batch: dict[str, Any] = {
            "latents": torch.empty(b, *shape.latent, dtype=torch_dtype(d["latent_dtype"])),
            "ctx_vec": torch.empty(b, shape.text_len, d["text_dim"], dtype=torch_dtype(d["text_dtype"])),
        }
        for i, (ref, dtype) in enumerate(zip(d["references"], d["reference_dtypes"])):
            batch[f"latents_control_{i}"] = torch.empty(b, *ref, dtype=torch_dtype(dtype))
        return batch

    def prepare_trace(self, trainer: Any, transformer: Any) -> tuple[Any, list[str]]:
        return transformer, []  # no mask, no sparse attention: the step traces as it runs

    def attention_dims(self, transformer: Any, shape: StepShape) -> tuple[int, int, int]:
        cfg = transformer.config
        heads = int(cfg["num_heads"])
        image = numel(shape.latent[-2:]) + sum(numel(r[-2:]) for r in shape.details.get("references", []))
        return heads, int(cfg["hidden_size"]) // heads, image + shape.text_len

    def frame_choices(self, shape: StepShape) -> list[int]:
        return []  # images: no frame axis to sweep


MEMORY_HOOKS = Flux2MemoryHooks()


def loaded_text_encoder_bytes(path: str, version: Any, fp8: bool, tokenizer: str | None) -> int:
    """The text encoder's weights as ``Flux2TextEncoder`` holds them, from the checkpoint headers: its real loader run
    on fake tensors. Only the layers up to the last output layer, no LM head nor vision tower (a quarter of Mistral 3's
    file), Linears in block fp8 with ``--fp8_text_encoder``, a scaled-fp8 file as stored or dequantised."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from musubi_tuner.flux_2.text_encoders import Flux2TextEncoder
    from musubi_tuner.memory.training import quiet_logs
    from musubi_tuner.utils.safetensors_utils import header_only_reads

    with quiet_logs(), header_only_reads(), FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        model = Flux2TextEncoder(path, version, dtype=torch.bfloat16, fp8=fp8, tokenizer=tokenizer).model
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())


def estimate_flux2_generation(args: argparse.Namespace) -> dict[str, Any]:
    """``flux_2_generate_image.py --estimate_memory``: the generation estimate for parsed, validated arguments.

    Reference images count at the size they will be encoded at (their header size, ``reference_size``); the VAE encode
    of the references and the decode are counted as VAE weights only.
    """
    from PIL import Image

    from blissful_tuner.generation_loop import load_jobs
    from musubi_tuner.flux_2.generate.args import validate_job
    from musubi_tuner.flux_2.models.loading import load_dit
    from musubi_tuner.flux_2.pipeline import reference_size
    from musubi_tuner.flux_2.sampling import build_img_ids, build_txt_ids
    from musubi_tuner.memory.generation import GenerationPlan, estimate_generation, weights_bytes
    from musubi_tuner.memory.run import resolve_gpu_total
    from musubi_tuner.utils.dtypes import parse_dtype

    version = args.version
    jobs = load_jobs(args, validate=validate_job)  # the same per-line checks as a real run (sizes, reference images)
    sizes = set()
    for job in jobs:
        a = job.args
        h, w = int(a.height) // 16, int(a.width) // 16
        refs = []
        for path in a.control_image_path or []:
            with Image.open(path) as img:  # reads the header: the size only
                rw, rh = reference_size(img.size, (int(a.width), int(a.height)), not a.no_resize_control)
            refs.append((rh // 16, rw // 16))
        sizes.add(((h, w), tuple(refs)))
    shapes = sorted(sizes, key=lambda s: numel(s[0]) + sum(numel(r) for r in s[1]))
    notes = ["--lora_weight: LoRAs are merged on load and add no memory; they are not read"] if args.lora_weight else []
    notes.append("VAE encode / decode activations are not modelled (weights only)")
    dtype = parse_dtype(args.dit_dtype, torch.bfloat16, flag="--dit_dtype")

    def build() -> torch.nn.Module:
        return load_dit(version, args.dit, device="cpu", dtype=dtype, fp8_scaled=args.fp8_scaled, attn_mode="sdpa")

    def inputs_for(shape):
        (h, w), refs = shape

        def make(dit: torch.nn.Module) -> dict[str, Any]:
            tokens = h * w + sum(rh * rw for rh, rw in refs)
            ctx_dim = dit.config["context_in_dim"]
            return {
                "img": torch.empty(1, tokens, dit.in_channels, dtype=dit.compute_dtype),
                "img_ids": build_img_ids((h, w), list(refs)),
                "txt": torch.empty(1, TEXT_MAX_LENGTH, ctx_dim, dtype=dit.compute_dtype),
                "txt_ids": build_txt_ids(TEXT_MAX_LENGTH),
                "timesteps": torch.empty(1),
                "guidance": torch.empty(1) if dit.guidance_embed else None,
            }

        return make

    te = loaded_text_encoder_bytes(args.text_encoder, version, bool(args.fp8_text_encoder), getattr(args, "tokenizer", None))
    vae = weights_bytes(args.vae) if args.vae else 0
    # x, noise and the velocity in fp32; true CFG (klein base) keeps a second velocity
    state = [(3 + int(version.uses_cfg)) * LATENT_CHANNELS * numel(s[0]) * 4 for s in shapes]
    gpu_total, gpu_name = resolve_gpu_total(args)
    (bh, bw), brefs = shapes[-1]
    plan = GenerationPlan(
        title=f"flux_2 {version.name} generation — latent {bh}x{bw}"
        + (f" + {len(brefs)} reference(s)" if brefs else "")
        + f" — GPU {gpu_name}",
        build_dit=build,
        dit_inputs=[inputs_for(s) for s in shapes],
        call_dit=lambda dit, kw: dit(**kw),
        sampler_state=state,
        blocks_to_swap=int(args.blocks_to_swap or 0),
        text_encoders={"text encoder": (te, not args.text_encoder_cpu)},
        vae=vae,
        notes=notes,
    )
    return estimate_generation(args, plan, gpu_total, gpu_name, "flux_2")
