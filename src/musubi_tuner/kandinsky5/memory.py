"""Kandinsky 5 hooks of the memory estimator (``musubi_tuner.memory.hooks``; docs/memory.md).

The training batch is the layout ``CachedDataset.load_batch`` yields for K5 caches: ``latents`` ``(B, 16, F, H, W)``,
``text_embeds`` / ``pooled_embed`` as per-item lists (variable-length cache keys), plus ``latents_image`` (I2V first /
last frame) or ``latents_control_0`` (I2I source) when the task uses them. Sizes and dtypes come from the cache headers.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from musubi_tuner.kandinsky5.configs import task_names
from musubi_tuner.memory.cache_headers import cache_dtype, cache_entry, torch_dtype
from musubi_tuner.memory.dataset_scan import largest_cached_step, longest_text_cache
from musubi_tuner.memory.hooks import StepShape, TracedDiT, argv_names_one_of

MAX_LATENT_FRAMES = 61  # 241 video frames: the longest K5 task (10 s at 24 fps)


class _MaskFreeDiT(TracedDiT):
    """The DiT as the traced step sees it: called without the text key mask (§11: ``bool(mask.all())`` needs data;
    a mask is KB-sized and picks no other kernel by memory)."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs["text_mask"] = None
        return self._dit(*args, **kwargs)


class Kandinsky5MemoryHooks:
    """``ArchMemoryHooks`` for Kandinsky 5."""

    name = "kandinsky5"
    train_script = "musubi_tuner.kandinsky5_train_network:main"
    generate_script = "musubi_tuner.kandinsky5_generate_video:main"

    def detect(self, argv: list[str]) -> bool:
        """``--task`` naming a Kandinsky 5 task."""
        return argv_names_one_of(argv, "--task", set(task_names()))

    def step_shape(self, args: argparse.Namespace, trainer: Any, train_group: Any) -> StepShape:
        """The largest bucket (B·F·H·W) over the training datasets, with the longest text of that dataset's captions."""
        step = largest_cached_step(
            train_group.datasets, missing=f"{args.dataset_config}: no cached latents found; run kandinsky5_cache_latents.py first"
        )
        entries = step.entries
        details: dict[str, Any] = {"latent_dtype": cache_dtype(entries, "latents")}
        for key in ("latents_image", "latents_control_0", "latents_control"):
            if cache_entry(entries, key) is not None:
                details[key] = list(cache_entry(entries, key)["shape"])
                details[key + "_dtype"] = cache_dtype(entries, key)
        te = longest_text_cache(
            step.dataset.items,
            "text_embeds",
            "{path}: no Kandinsky 5 text embeddings; run kandinsky5_cache_text_encoder_outputs.py",
            also=("pooled_embed",),
        )
        text = cache_entry(te, "text_embeds")
        details.update(
            text_dim=int(text["shape"][-1]), pooled_dim=int(cache_entry(te, "pooled_embed")["shape"][-1]), text_dtype=text["dtype"]
        )
        return step.step_shape(int(text["shape"][-2]), details)

    def make_fake_batch(self, args: argparse.Namespace, shape: StepShape) -> dict[str, Any]:
        d = shape.details
        b = shape.batch
        c, f, h, w = shape.latent
        batch: dict[str, Any] = {
            "latents": torch.empty(b, c, f, h, w, dtype=torch_dtype(d["latent_dtype"])),
            "text_embeds": [torch.empty(shape.text_len, d["text_dim"], dtype=torch_dtype(d["text_dtype"])) for _ in range(b)],
            "pooled_embed": [torch.empty(d["pooled_dim"], dtype=torch_dtype(d["text_dtype"])) for _ in range(b)],
        }
        if "latents_image" in d:
            ic, ifr = d["latents_image"][0], d["latents_image"][1]
            batch["latents_image"] = torch.empty(b, ic, ifr, h, w, dtype=torch_dtype(d["latents_image_dtype"]))
        for key in ("latents_control_0", "latents_control"):
            if key in d:
                batch[key] = torch.empty(b, c, f, h, w, dtype=torch_dtype(d[key + "_dtype"]))
        return batch

    def prepare_trace(self, trainer: Any, transformer: Any) -> tuple[Any, list[str]]:
        notes = ["text key masks are traced as absent (KB-sized; spec §11)"]
        if trainer.nabla is not None:
            # flex-attention block masks are data-dependent: trace dense attention (flash-style memory is O(L) too)
            trainer.nabla = None
            notes.append("NABLA attention is not traceable: estimated with dense attention memory (spec §11)")
        return _MaskFreeDiT(transformer), notes

    def attention_dims(self, transformer: Any, shape: StepShape) -> tuple[int, int, int]:
        head_dim = int(transformer.head_dim)
        heads = int(transformer.model_dim) // head_dim
        pt, ph, pw = transformer.patch_size
        _, f, h, w = shape.latent
        return heads, head_dim, (f // pt) * (h // ph) * (w // pw)

    def frame_choices(self, shape: StepShape) -> list[int]:
        if shape.frames <= 1:
            return []  # image task / image dataset
        return list(range(1, MAX_LATENT_FRAMES + 1))


MEMORY_HOOKS = Kandinsky5MemoryHooks()


def estimate_k5_generation(args: argparse.Namespace) -> dict[str, Any]:
    """``kandinsky5_generate_video.py --estimate_memory``: the generation estimate for parsed, validated arguments."""
    from blissful_tuner.generation_loop import load_jobs
    from musubi_tuner.kandinsky5.generate.plan import validate_job
    from musubi_tuner.kandinsky5.models.loading import load_dit
    from musubi_tuner.memory.generation import GenerationPlan, estimate_generation, weights_bytes
    from musubi_tuner.memory.run import resolve_gpu_total
    from musubi_tuner.utils.dtypes import parse_dtype

    task = args.task_config
    jobs = load_jobs(args, validate=validate_job)  # the same per-line checks as a real run (sizes, frames, images)
    shapes = sorted({tuple(job.args.k5_plan.latent_shape) for job in jobs}, key=lambda s: s[0] * s[1] * s[2])
    notes = ["--lora_weight: LoRAs are merged on load and add no memory; they are not read"] if args.lora_weight else []
    nabla = any(job.args.k5_plan.nabla for job in jobs)
    if nabla:
        notes.append("NABLA attention is not traceable: estimated with dense attention memory (spec §11)")
    notes.append("VAE decode activations are not modelled (weights only; tiling settings change them most)")
    dtype = parse_dtype(args.dit_dtype, torch.bfloat16, flag="--dit_dtype") if args.dit_dtype else torch.bfloat16

    def build() -> torch.nn.Module:
        return load_dit(task, args.dit, device="cpu", dtype=dtype, fp8_scaled=args.fp8_scaled, attn_mode="sdpa")

    def inputs_for(shape: tuple[int, int, int]):
        def make(dit: torch.nn.Module) -> dict[str, Any]:
            f, h, w = shape
            cfg = dit.config
            return {
                "x": torch.empty(1, f, h, w, dit.in_channels, dtype=dit.compute_dtype),
                "text_embed": torch.empty(1, task.qwen_max_length, cfg["in_text_dim"], dtype=dit.compute_dtype),
                "pooled_text_embed": torch.empty(1, cfg["in_text_dim2"], dtype=dit.compute_dtype),
                "time": torch.empty(1),
            }

        return make

    te = {}
    qwen = weights_bytes(args.text_encoder_qwen)
    if getattr(args, "quantized_qwen", False):
        qwen = qwen * 9 // 32  # NF4: 4 bits + block absmax ≈ 4.5 bits per bf16 parameter
        notes.append("Qwen2.5-VL in NF4: weights estimated at 4.5 bits/parameter")
    te["Qwen2.5-VL"] = (qwen, not getattr(args, "text_encoder_cpu", False))
    te["CLIP"] = (weights_bytes(args.text_encoder_clip), True)
    vae = weights_bytes(args.vae) if args.vae else 0
    state = [4 * 16 * f * h * w * 4 for f, h, w in shapes]  # x, noise, two velocities (CFG) in fp32
    gpu_total, gpu_name = resolve_gpu_total(args)
    biggest = shapes[-1]
    plan = GenerationPlan(
        title=f"kandinsky5 {task.name} generation — latent {biggest[0]}x{biggest[1]}x{biggest[2]} — GPU {gpu_name}",
        build_dit=build,
        dit_inputs=[inputs_for(s) for s in shapes],
        call_dit=lambda dit, kw: dit(**kw),
        sampler_state=state,
        blocks_to_swap=int(args.blocks_to_swap or 0),
        text_encoders=te,
        vae=vae,
        notes=notes,
    )
    return estimate_generation(args, plan, gpu_total, gpu_name, "kandinsky5")
