"""Qwen-Image hooks of the memory estimator (``musubi_tuner.memory.hooks``; docs/memory.md).

The training batch is the layout ``CachedDataset.load_batch`` yields for Qwen-Image caches: ``latents``
``(B, 16, F, h, w)`` (F = 1; Layered: the composite and each layer, multiple targets), ``latents_control_{i}``
``(B, 16, 1, hi, wi)`` per control image (Edit, Layered) and ``vl_embed`` as a per-item list of ``(L_i, 3584)``
(variable-length ``varlen_vl_embed``, padded with a key mask in the step). Sizes and dtypes come from the cache headers.

The text key mask needs data (``bool(mask.all())``): the traced step calls the DiT without it. The mask is KB-sized and
picks the same SDPA kernel class, so the estimate is unchanged by it (spec §11).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from musubi_tuner.memory.cache_headers import cache_dtype, cache_entry, numel, torch_dtype
from musubi_tuner.memory.dataset_scan import largest_cached_step, longest_text_cache
from musubi_tuner.memory.hooks import StepShape, TracedDiT, argv_names_one_of
from musubi_tuner.qwen_image.caching import TE_KEY
from musubi_tuner.qwen_image.configs import DEFAULT_MAX_SEQUENCE_LENGTH, LATENT_CHANNELS, PATCH_SIZE, VAE_SCALE, version_names

_MASK_NOTE = "text key mask traced as absent (KB-sized; spec §11)"


class _MaskFreeDiT(TracedDiT):
    """The DiT as the traced step sees it: called without ``encoder_hidden_states_mask`` (third argument), whose
    ``bool(mask.all())`` needs data."""

    def __call__(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, *args: Any, **kwargs: Any):
        return self._dit(hidden_states, encoder_hidden_states, None, *args, **kwargs)


class QwenImageMemoryHooks:
    """``ArchMemoryHooks`` for Qwen-Image (original, edit, edit-2509/2511, layered)."""

    name = "qwen_image"
    train_script = "musubi_tuner.qwen_image_train_network:main"
    generate_script = "musubi_tuner.qwen_image_generate_image:main"

    def detect(self, argv: list[str]) -> bool:
        """``--model_version`` naming a Qwen-Image version, or the legacy ``--edit`` / ``--edit_plus`` (``original`` is
        the default: pass ``--arch qwen_image`` without them)."""
        return any(a in ("--edit", "--edit_plus") for a in argv) or argv_names_one_of(argv, "--model_version", set(version_names()))

    def step_shape(self, args: argparse.Namespace, trainer: Any, train_group: Any) -> StepShape:
        """The largest step (B · target and control tokens) over the training datasets, with the longest caption of
        that dataset (text length is per item; the batch pads to its longest)."""
        step = largest_cached_step(
            train_group.datasets,
            lambda shape, controls: numel(shape[1:]) + sum(numel(c[0][1:]) for c in controls),
            with_controls=True,
            missing=f"{args.dataset_config}: no cached latents found; run qwen_image_cache_latents.py first",
        )
        te = longest_text_cache(
            step.dataset.items,
            TE_KEY,
            f"{{path}}: no Qwen-Image text embeddings (varlen_{TE_KEY}); run qwen_image_cache_text_encoder_outputs.py",
        )
        text = cache_entry(te, TE_KEY)
        details = {
            "latent_dtype": cache_dtype(step.entries, "latents"),
            "controls": [list(shape) for shape, _ in step.controls],
            "control_dtypes": [dtype for _, dtype in step.controls],
            "text_dim": int(text["shape"][-1]),
            "text_dtype": text["dtype"],
        }
        return step.step_shape(int(text["shape"][-2]), details)

    def make_fake_batch(self, args: argparse.Namespace, shape: StepShape) -> dict[str, Any]:
        d = shape.details
        b = shape.batch
        batch: dict[str, Any] = {
            "latents": torch.empty(b, *shape.latent, dtype=torch_dtype(d["latent_dtype"])),
            TE_KEY: [torch.empty(shape.text_len, d["text_dim"], dtype=torch_dtype(d["text_dtype"])) for _ in range(b)],
        }
        for i, (c, dtype) in enumerate(zip(d["controls"], d["control_dtypes"])):
            batch[f"latents_control_{i}"] = torch.empty(b, *c, dtype=torch_dtype(dtype))
        return batch

    def prepare_trace(self, trainer: Any, transformer: Any) -> tuple[Any, list[str]]:
        return _MaskFreeDiT(transformer), [_MASK_NOTE]

    def attention_dims(self, transformer: Any, shape: StepShape) -> tuple[int, int, int]:
        cfg = transformer.config
        image = _tokens(shape.latent) + sum(_tokens(c) for c in shape.details.get("controls", []))
        return int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"]), image + shape.text_len

    def frame_choices(self, shape: StepShape) -> list[int]:
        return []  # images (Layered's frames are its layers, fixed by the dataset)


def _tokens(latent: tuple[int, ...] | list[int]) -> int:
    """Packed tokens of a latent ``(C, F, h, w)``: ``F · h/2 · w/2``."""
    _, f, h, w = latent
    return int(f) * (int(h) // PATCH_SIZE) * (int(w) // PATCH_SIZE)


MEMORY_HOOKS = QwenImageMemoryHooks()


def estimate_qwen_image_generation(args: argparse.Namespace) -> dict[str, Any]:
    """``qwen_image_generate_image.py --estimate_memory``: the generation estimate for parsed, validated arguments.

    Control images count at the size they will be encoded at (their header size, ``control_size``). The prompt's
    length is not known before Qwen2.5-VL runs: the text is counted at its cap (512 tokens), an upper bound.
    """
    from PIL import Image

    from blissful_tuner.generation_loop import load_jobs
    from musubi_tuner.memory.generation import GenerationPlan, estimate_generation, text_encoder_bytes, weights_bytes
    from musubi_tuner.memory.run import resolve_gpu_total
    from musubi_tuner.qwen_image.configs import PIXEL_STEP
    from musubi_tuner.qwen_image.generate.images import control_size
    from musubi_tuner.qwen_image.generate.plan import FIELD_MAP, controls_of, validate_job
    from musubi_tuner.qwen_image.models.loading import load_dit
    from musubi_tuner.qwen_image.packing import img_shapes_for
    from musubi_tuner.utils.dtypes import parse_dtype

    version = args.version
    jobs = load_jobs(args, field_map=FIELD_MAP, size_multiple=PIXEL_STEP, validate=validate_job)
    sizes = set()
    cfg_used = False
    for job in jobs:
        a = job.args
        out_wh = (int(a.width), int(a.height))
        blend = bool(a.mask_path) or a.rcm_threshold is not None
        controls = []
        for i, path in enumerate(controls_of(job)):
            with Image.open(path) as img:  # reads the header: the size only
                exact = a.resize_control_to_image_size or version.is_layered or (i == 0 and blend)
                cw, ch = control_size(img.size, out_wh, to_image_size=exact, to_official=a.resize_control_to_official_size)
            controls.append((ch // VAE_SCALE, cw // VAE_SCALE))
        frames = int(a.output_layers) + 1 if version.is_layered else 1
        sizes.add((frames, (int(a.height) // VAE_SCALE, int(a.width) // VAE_SCALE), tuple(controls)))
        cfg_used = cfg_used or float(a.guidance_scale) > 1.0
    shapes = sorted(sizes, key=lambda s: s[0] * numel(s[1]) + sum(numel(c) for c in s[2]))
    text_len = DEFAULT_MAX_SEQUENCE_LENGTH
    notes = [f"prompt length unknown before the text encoder runs: text counted at its {text_len}-token cap (upper bound)"]
    if args.lora_weight:
        notes.append("--lora_weight: LoRAs are merged on load and add no memory; they are not read")
    notes.append("VAE encode / decode activations are not modelled (weights only)")
    if args.fp8_vl:
        notes.append("--fp8_vl: text encoder weights estimated at half their bf16 file size (a scaled-fp8 file: its size)")
    dtype = parse_dtype(args.dit_dtype, torch.bfloat16, flag="--dit_dtype")

    def build() -> torch.nn.Module:
        return load_dit(
            version, args.dit, device="cpu", dtype=dtype, fp8_base=args.fp8, fp8_scaled=args.fp8_scaled, num_layers=args.num_layers
        )

    def inputs_for(shape):
        frames, (h, w), controls = shape

        def make(dit: torch.nn.Module) -> dict[str, Any]:
            img_shapes = img_shapes_for((h, w), frames, list(controls))
            tokens = sum(f * gh * gw for f, gh, gw in img_shapes)
            return {
                "hidden_states": torch.empty(1, tokens, dit.config["in_channels"], dtype=dit.compute_dtype),
                "encoder_hidden_states": torch.empty(1, text_len, dit.config["joint_attention_dim"], dtype=dit.compute_dtype),
                "encoder_hidden_states_mask": None,  # one prompt: all tokens real, the model skips the mask
                "timestep": torch.empty(1),
                "img_shapes": img_shapes,
                "additional_t_cond": torch.zeros(1, dtype=torch.long) if version.is_layered else None,
            }

        return make

    te = text_encoder_bytes(args.text_encoder, bool(args.fp8_vl))
    vae = weights_bytes(args.vae) if args.vae else 0
    # on the device per step (the latent itself stays on the host): the prediction in fp32, and with true CFG the
    # negative prediction and their combination
    state = [(1 + 2 * int(cfg_used)) * LATENT_CHANNELS * s[0] * numel(s[1]) * 4 for s in shapes]
    gpu_total, gpu_name = resolve_gpu_total(args)
    bf, (bh, bw), bcontrols = shapes[-1]
    plan = GenerationPlan(
        title=f"qwen_image {version.name} generation — latent {bf}x{bh}x{bw}"
        + (f" + {len(bcontrols)} control(s)" if bcontrols else "")
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
    return estimate_generation(args, plan, gpu_total, gpu_name, "qwen_image")
