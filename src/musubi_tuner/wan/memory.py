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
from typing import Any

import torch

from musubi_tuner.dataset.cache_format import batch_key, read_header
from musubi_tuner.memory.hooks import StepShape
from musubi_tuner.utils.errors import UserError
from musubi_tuner.wan.configs import task_names

_CONDITIONS = ("latents_image", "clip", "latents_control")


class _OneExpert:
    """A ``WanExpertPair`` as the traced step sees it with ``--expert both``: always the low-noise expert (routing reads
    timestep values). Attribute reads go to the pair, so its parameters stay registered."""

    def __init__(self, pair: torch.nn.Module):
        self._pair = pair

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._pair.expert("low")(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pair, name)


class WanMemoryHooks:
    """``ArchMemoryHooks`` for Wan 2.1 / 2.2."""

    name = "wan"
    train_script = "musubi_tuner.wan_train_network:main"
    generate_script = "musubi_tuner.wan_generate_video:main"

    def detect(self, argv: list[str]) -> bool:
        """``--task`` naming a Wan task (``t2v-14B`` is the scripts' default: pass ``--arch wan`` without it)."""
        names = set(task_names())
        for i, a in enumerate(argv):
            value = a.split("=", 1)[1] if a.startswith("--task=") else None
            if a == "--task" and i + 1 < len(argv):
                value = argv[i + 1]
            if value in names:
                return True
        return False

    def step_shape(self, args: argparse.Namespace, trainer: Any, train_group: Any) -> StepShape:
        """The largest bucket (B·F·H·W) over the training datasets, with the longest caption of that dataset."""
        best = None
        buckets = set()
        for ds in train_group.datasets:
            for item in ds.items:
                if item.latent_shape is None:
                    continue
                buckets.add(tuple(item.latent_shape))
                size = ds.batch_size * _numel(item.latent_shape)
                if best is None or size > best[0]:
                    best = (size, ds, item)
        if best is None:
            raise UserError(f"{args.dataset_config}: no cached latents found; run wan_cache_latents.py first")
        _, ds, item = best
        entries, _ = read_header(item.latent_path)
        details: dict[str, Any] = {"latent_dtype": _dtype(entries, "latents")}
        for key in _CONDITIONS:
            e = _entry(entries, key)
            if e is not None:
                details[key] = [int(s) for s in e["shape"]]
                details[key + "_dtype"] = e["dtype"]
        text_len, text_dim, text_dtype = 0, 0, "bfloat16"
        for other in ds.items:  # the longest caption of the dataset (text length is per item)
            te, _ = read_header(other.te_path)
            e = _entry(te, "t5")
            if e is None:
                raise UserError(f"{other.te_path}: no Wan T5 states (varlen_t5); run wan_cache_text_encoder_outputs.py")
            if int(e["shape"][-2]) > text_len:
                text_len, text_dim, text_dtype = int(e["shape"][-2]), int(e["shape"][-1]), e["dtype"]
        details.update(text_dim=text_dim, text_dtype=text_dtype)
        return StepShape(
            batch=ds.batch_size,
            latent=tuple(int(s) for s in item.latent_shape),
            text_len=text_len,
            buckets=len(buckets),
            details=details,
        )

    def make_fake_batch(self, args: argparse.Namespace, shape: StepShape) -> dict[str, Any]:
        d = shape.details
        b = shape.batch
        c, f, h, w = shape.latent
        batch: dict[str, Any] = {
            "latents": torch.empty(b, c, f, h, w, dtype=_torch_dtype(d["latent_dtype"])),
            "t5": [torch.empty(shape.text_len, d["text_dim"], dtype=_torch_dtype(d["text_dtype"])) for _ in range(b)],
        }
        for key in ("latents_image", "latents_control"):
            if key in d:  # same frames / size as the target (the bucket), own channel count
                batch[key] = torch.empty(b, d[key][0], f, h, w, dtype=_torch_dtype(d[key + "_dtype"]))
        if "clip" in d:
            batch["clip"] = torch.empty(b, *d["clip"], dtype=_torch_dtype(d["clip_dtype"]))
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


def _numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _entry(entries: dict[str, dict], name: str) -> dict | None:
    for key, e in entries.items():
        if batch_key(key)[0] == name:
            return e
    return None


_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _dtype(entries: dict[str, dict], name: str) -> str:
    e = _entry(entries, name)
    return e["dtype"] if e is not None else "float32"


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, _DTYPES.get(name, name))


MEMORY_HOOKS = WanMemoryHooks()
