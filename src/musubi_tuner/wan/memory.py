"""Wan 2.1 / 2.2 hooks of the memory estimator (``musubi_tuner.memory.hooks``; docs/memory.md).

The training batch is the layout ``CachedDataset.load_batch`` yields for Wan caches: ``latents`` ``(B, C, F, H, W)``,
``t5`` as a per-item list of ``(L_i, 4096)`` (variable-length ``varlen_t5``; the model zero-pads to 512), plus
``latents_image`` (I2V: mask 4 + first-frame latent 16), ``clip`` ``(B, 257, 1280)`` (2.1 I2V) and ``latents_control``
(Fun-Control) when the cache has them. Sizes and dtypes come from the cache headers.

``--expert both`` (Wan 2.2 A14B) routes each batch to one expert by the value of its first timestep, which a fake-tensor
trace cannot read: the traced step runs the low-noise expert with both experts (and both LoRAs) resident — the step of
either expert allocates the same, the two share dims.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from musubi_tuner.memory.cache_headers import cache_dtype, cache_entry, numel, torch_dtype
from musubi_tuner.memory.dataset_scan import largest_cached_step, longest_text_cache
from musubi_tuner.memory.hooks import StepShape, TracedDiT, argv_names_one_of
from musubi_tuner.wan.configs import task_names

_CONDITIONS = ("latents_image", "clip", "latents_control")


class _OneExpert(TracedDiT):
    """A ``WanExpertPair`` as the traced step sees it with ``--expert both``: always the low-noise expert (routing reads
    timestep values). Attribute reads go to the pair."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._dit.expert("low")(*args, **kwargs)


class WanMemoryHooks:
    """``ArchMemoryHooks`` for Wan 2.1 / 2.2."""

    name = "wan"
    train_script = "musubi_tuner.wan_train_network:main"
    generate_script = "musubi_tuner.wan_generate_video:main"

    def detect(self, argv: list[str]) -> bool:
        """``--task`` naming a Wan task (``t2v-14B`` is the scripts' default: pass ``--arch wan`` without it)."""
        return argv_names_one_of(argv, "--task", set(task_names()))

    def step_shape(self, args: argparse.Namespace, trainer: Any, train_group: Any) -> StepShape:
        """The largest bucket (B·F·H·W) over the training datasets, with the longest caption of that dataset."""
        step = largest_cached_step(
            train_group.datasets, missing=f"{args.dataset_config}: no cached latents found; run wan_cache_latents.py first"
        )
        details: dict[str, Any] = {"latent_dtype": cache_dtype(step.entries, "latents")}
        for key in _CONDITIONS:
            e = cache_entry(step.entries, key)
            if e is not None:
                details[key] = [int(s) for s in e["shape"]]
                details[key + "_dtype"] = e["dtype"]
        te = longest_text_cache(
            step.dataset.items, "t5", "{path}: no Wan T5 states (varlen_t5); run wan_cache_text_encoder_outputs.py"
        )
        t5 = cache_entry(te, "t5")
        details.update(text_dim=int(t5["shape"][-1]), text_dtype=t5["dtype"])
        return step.step_shape(int(t5["shape"][-2]), details)

    def make_fake_batch(self, args: argparse.Namespace, shape: StepShape) -> dict[str, Any]:
        d = shape.details
        b = shape.batch
        c, f, h, w = shape.latent
        batch: dict[str, Any] = {
            "latents": torch.empty(b, c, f, h, w, dtype=torch_dtype(d["latent_dtype"])),
            "t5": [torch.empty(shape.text_len, d["text_dim"], dtype=torch_dtype(d["text_dtype"])) for _ in range(b)],
        }
        for key in ("latents_image", "latents_control"):
            if key in d:  # same frames / size as the target (the bucket), own channel count
                batch[key] = torch.empty(b, d[key][0], f, h, w, dtype=torch_dtype(d[key + "_dtype"]))
        if "clip" in d:
            batch["clip"] = torch.empty(b, *d["clip"], dtype=torch_dtype(d["clip_dtype"]))
        return batch

    def prepare_trace(self, trainer: Any, transformer: Any) -> tuple[Any, list[str]]:
        if trainer.expert_mode != "both":
            return transformer, []
        trainer.expert_mode = "low"  # the estimate process ends after the report; the real run never sees this
        notes = [
            "--expert both: one expert's step traced with both experts and both LoRAs on the GPU; "
            "--offload_inactive_dit (inactive expert on the host) is not modelled, so this is an upper bound with it"
        ]
        return _OneExpert(transformer), notes

    def attention_dims(self, transformer: Any, shape: StepShape) -> tuple[int, int, int]:
        model = transformer.expert("low") if hasattr(transformer, "expert") else transformer
        heads = int(model.num_heads)
        pt, ph, pw = model.patch_size
        _, f, h, w = shape.latent
        return heads, int(model.dim) // heads, (f // pt) * (h // ph) * (w // pw)

    def frame_choices(self, shape: StepShape) -> list[int]:
        if shape.frames <= 1:
            return []  # image dataset / t2i task
        return list(range(1, MAX_LATENT_FRAMES + 1))


MAX_LATENT_FRAMES = 41  # 161 video frames (4 per latent frame + 1)


MEMORY_HOOKS = WanMemoryHooks()


def _checkpoint_bytes(path: str, what: str, notes: list[str]) -> int:
    """Weights of a checkpoint: safetensors headers, else (official ``.pth`` / ``.bin``) the file size, said in a note —
    a pickle cannot be sized without loading it, and its tensors are nearly all of the file."""
    from pathlib import Path

    from musubi_tuner.memory.generation import weights_bytes

    p = Path(path)
    if (p.is_dir() and any(p.rglob("*.safetensors"))) or p.suffix == ".safetensors":
        return weights_bytes(p)
    files = [f for f in p.rglob("*") if f.suffix in (".pth", ".pt", ".bin")] if p.is_dir() else [p]
    notes.append(f"{what} {p.name}: not safetensors, weights taken as the file size")
    return sum(f.stat().st_size for f in files)


def _t5_bf16_bytes(path: str, notes: list[str]) -> int:
    """UMT5 without ``--fp8_t5``: the checkpoint's size, a scaled-fp8 file's fp8 weights counted dequantised (bf16)."""
    from musubi_tuner.memory.generation import scaled_fp8_bytes
    from musubi_tuner.wan.text_encoders import umt5_weights_file

    weights = umt5_weights_file(path)
    scaled = scaled_fp8_bytes(weights) if weights.suffix == ".safetensors" else 0
    return _checkpoint_bytes(path, "--t5", notes) + scaled


def _t5_fp8_bytes(path: str) -> int:
    """UMT5 as ``--fp8_t5`` loads it: the blocks' Linear weights at one byte per element, everything else in bfloat16
    (the 256k-token embedding above all, about a fifth of UMT5-XXL). Read from the checkpoint's tensor headers only."""
    from musubi_tuner.utils.safetensors_utils import open_weights
    from musubi_tuner.wan.text_encoders import umt5_weights_file

    total = 0
    with open_weights(umt5_weights_file(path)) as reader:
        keys = reader.keys()
        for key in keys:
            if key == "encoder.embed_tokens.weight" and "shared.weight" in keys:
                continue  # tied to shared.weight: one tensor in the model
            shape = reader.get_shape(key)
            linear = key.startswith(("blocks.", "encoder.block.")) and len(shape) == 2
            linear = linear and "pos_embedding" not in key and "relative_attention_bias" not in key
            total += math.prod(shape) * (1 if linear else 2)
    return total


def estimate_wan_generation(args: argparse.Namespace) -> dict[str, Any]:
    """``wan_generate_video.py --estimate_memory``: the generation estimate for parsed, validated arguments.

    The DiT forward is traced for every job's latent size in bfloat16 (what a CUDA run uses); Wan 2.2 A14B counts both
    experts' resident weights unless ``--offload_inactive_dit`` parks the inactive one on the host.
    """
    from blissful_tuner.generation_loop import load_jobs
    from musubi_tuner.memory.generation import GenerationPlan, estimate_generation
    from musubi_tuner.memory.run import resolve_gpu_total
    from musubi_tuner.wan.generate.generator import validate_job
    from musubi_tuner.wan.models.loading import load_dit

    task = args.task_config
    jobs = load_jobs(args, validate=validate_job, size_multiple=task.resolution_step)
    st, sh, sw = task.vae_stride
    shapes = sorted(
        {((int(j.args.video_length) - 1) // st + 1, int(j.args.height) // sh, int(j.args.width) // sw) for j in jobs},
        key=numel,
    )
    notes = []
    if args.lora_weight or getattr(args, "lora_weight_high_noise", None):
        notes.append("--lora_weight: LoRAs are merged on load and add no memory; they are not read")
    notes.append("VAE encode / decode activations are not modelled (weights only)")
    expert = "low" if task.two_experts else None
    copies = 2 if task.two_experts and not (args.offload_inactive_dit and not args.blocks_to_swap) else 1
    if task.two_experts and copies == 1:
        notes.append("--offload_inactive_dit: one expert on the GPU; the other one's host memory is not counted")

    def build() -> torch.nn.Module:
        return load_dit(
            task,
            args.dit,
            device="cpu",
            dtype=torch.bfloat16,
            fp8_base=bool(args.fp8_base),
            fp8_scaled=bool(args.fp8_scaled or args.fp8_fast),
            attn_mode="sdpa",
            expert=expert,
        )

    def inputs_for(shape: tuple[int, int, int]):
        def make(dit: torch.nn.Module) -> dict[str, Any]:
            f, h, w = shape
            dtype = dit.compute_dtype
            kw: dict[str, Any] = {
                "x": torch.empty(1, task.latent_channels, f, h, w, dtype=dtype),
                "timestep": torch.empty(1),
                "context": [torch.empty(512, dit.text_embedding[0].in_features, dtype=dtype)],
            }
            if dit.in_dim > task.latent_channels:
                kw["y"] = torch.empty(1, dit.in_dim - task.latent_channels, f, h, w, dtype=dtype)
            if dit.has_image_input:
                kw["clip_fea"] = torch.empty(2 if task.flf2v else 1, 257, dit.img_emb.proj[1].in_features)
            if task.ti2v:
                pt, ph, pw = dit.patch_size
                kw["timestep"] = torch.empty(1, (f // pt) * (h // ph) * (w // pw))
            return kw

        return make

    t5 = (_t5_fp8_bytes(args.t5) if args.fp8_t5 else _t5_bf16_bytes(args.t5, notes)) if args.t5 else 0
    te = {"UMT5": (t5, True)}
    if args.clip:
        te["CLIP"] = (_checkpoint_bytes(args.clip, "--clip", notes), True)
        notes.append("T5 and CLIP are counted together (the generator frees T5 first): an upper bound for that phase")
    vae = _checkpoint_bytes(args.vae, "--vae", notes) if args.vae else 0
    c = task.latent_channels
    state = [4 * c * numel(s) * 4 for s in shapes]  # x, the sampler's state and two velocities (CFG) in fp32
    gpu_total, gpu_name = resolve_gpu_total(args)
    f, h, w = shapes[-1]
    plan = GenerationPlan(
        title=f"wan {task.name} generation — latent {f}x{h}x{w} — GPU {gpu_name}",
        build_dit=build,
        dit_inputs=[inputs_for(s) for s in shapes],
        call_dit=lambda dit, kw: dit(**kw),
        sampler_state=state,
        blocks_to_swap=int(args.blocks_to_swap or 0),
        text_encoders=te,
        vae=vae,
        notes=notes,
        dit_copies=copies,
    )
    return estimate_generation(args, plan, gpu_total, gpu_name, "wan")
