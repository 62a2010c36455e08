"""Training estimate: trace the trainer's own step on fake tensors, then add the formulas (specs/memory_estimator.md).

The traced step is the one ``NetworkTrainer._train_step`` runs — the architecture's ``process_batch`` (noise level,
``call_dit``, ``compute_loss``), backward, gradient clipping, the optimizer step and ``zero_grad(set_to_none=True)`` —
on a DiT loaded by the architecture's real loader from the checkpoint *header* (``header_only_reads``: fp8 layout,
targets and float32 islands come from the same code as a real load) with the real network module applied. Block swap,
activation offload, bitsandbytes states, workspaces, context and allocator slack are formulas (``formulas``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from musubi_tuner.memory import formulas
from musubi_tuner.memory.hooks import ArchMemoryHooks, StepShape
from musubi_tuner.memory.tracker import CUDA_ALLOCATION_GRANULARITY, LiveTensorTracker, TraceResult
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class Settings:
    """The memory-relevant training settings; ``Settings.from_args`` reads them from the command line."""

    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    activation_offload: bool = False
    fp8: bool = False
    optimizer: str = "AdamW"
    blocks_to_swap: int = 0
    pinned: bool = False
    latent: tuple[int, ...] | None = None  # None: the dataset's largest bucket

    @classmethod
    def from_args(cls, args: Any) -> Settings:
        return cls(
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=bool(args.gradient_checkpointing),
            activation_offload=bool(args.gradient_checkpointing and args.gradient_checkpointing_cpu_offload),
            fp8=bool(args.fp8_base or args.fp8_scaled),
            optimizer=str(args.optimizer_type or "AdamW"),
            blocks_to_swap=int(args.blocks_to_swap or 0),
            pinned=bool(args.use_pinned_memory_for_block_swap),
        )

    def flags(self) -> list[str]:
        """These settings as command-line flags (what a suggestion tells the user to pass)."""
        out = []
        if self.mixed_precision != "no":
            out.append(f"--mixed_precision {self.mixed_precision}")
        if self.gradient_checkpointing:
            out.append("--gradient_checkpointing")
        if self.activation_offload:
            out.append("--gradient_checkpointing_cpu_offload")
        if self.fp8:
            out.append("--fp8_base --fp8_scaled")
        if self.optimizer != "AdamW":
            out.append(f"--optimizer_type {self.optimizer}")
        if self.blocks_to_swap:
            out.append(f"--blocks_to_swap {self.blocks_to_swap}")
        return out


@dataclass
class StepTrace:
    """One traced step and what the formulas need from the traced model."""

    result: TraceResult
    weights: int  # frozen DiT parameters + buffers
    trainable: int  # network parameters
    trainable_numels: list[int]
    swap_saved: list[int]  # device bytes saved by --blocks_to_swap S, index S
    largest_block: list[int]  # largest swapped block's bytes for S
    largest_weight: int  # largest single DiT tensor (load-time read buffer)
    optimizer_traced: bool
    attention: tuple[int, int, int]  # heads, head_dim, tokens
    notes: list[str] = field(default_factory=list)


class TraceAccelerator:
    """What the traced step uses of ``accelerate.Accelerator``, on the fake CPU device (no CUDA is touched)."""

    def __init__(self, mixed_precision: str):
        self.device = torch.device("cpu")
        self.mixed_precision = mixed_precision
        self.num_processes = 1
        self.sync_gradients = True
        self.is_main_process = True

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.autocast("cpu", dtype=dtype)


def _optimizer_kind(name: str) -> str:
    """``torch`` (traced), ``bnb8`` (bitsandbytes 8-bit: formula) or ``unknown`` (8 B/param assumed)."""
    low = name.lower()
    if "8bit" in low or low.startswith("bitsandbytes"):
        return "bnb8"
    from musubi_tuner.training.optimizers import resolve_optimizer_class

    try:
        cls = resolve_optimizer_class(name)
    except UserError:
        return "unknown"
    return "torch" if cls.__module__.startswith("torch.optim") else "unknown"


def _trace_args(args: Any, settings: Settings, network_dim: int | None) -> Any:
    a = copy.copy(args)
    a.mixed_precision = settings.mixed_precision
    a.gradient_checkpointing = settings.gradient_checkpointing
    a.gradient_checkpointing_cpu_offload = False  # on a CPU trace the host copy is a no-op; §8.4 formula instead
    a.fp8_base = a.fp8_scaled = settings.fp8
    a.blocks_to_swap = 0  # §8.3 formula
    a.base_weights = None  # merged into the weights: no memory of its own
    a.network_weights = None  # only the shapes matter; the rank comes from the header (dim_from_weights)
    a.dim_from_weights = False
    a.compile = False
    if network_dim is not None:
        a.network_dim = network_dim
    return a


def network_dim_from_header(path: str) -> int:
    """The largest LoRA/LoHa rank in a network file, from its safetensors header (``--dim_from_weights``)."""
    from musubi_tuner.utils.safetensors_utils import open_weights

    with open_weights(path) as reader:
        ranks = [reader.get_shape(k)[0] for k in reader.keys() if k.endswith(("lora_down.weight", "hada_w1_b", "hada_w2_b"))]
    if not ranks:
        raise UserError(f"{path}: no LoRA/LoHa down weights found (--network_weights with --dim_from_weights)")
    return max(ranks)


def trace_training_step(trainer: Any, args: Any, hooks: ArchMemoryHooks, shape: StepShape, settings: Settings) -> StepTrace:
    """Trace one training step with ``settings`` on fake tensors (nothing is read but headers, nothing is computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from musubi_tuner.hv_train_network import _cast_floating, _Run
    from musubi_tuner.modules.checkpointing import record_kept_input_bytes
    from musubi_tuner.training.noise import apply_noise_options
    from musubi_tuner.utils.safetensors_utils import header_only_reads

    dim = network_dim_from_header(args.network_weights) if args.dim_from_weights else None
    a = _trace_args(args, settings, dim)
    if settings.latent is not None:
        shape = shape.with_latent(settings.latent)
    run = _Run(args=a)
    run.accelerator = TraceAccelerator(settings.mixed_precision)
    trainer._resolve_dit_dtypes(run)
    kind = _optimizer_kind(settings.optimizer)
    extra_notes = []
    attn_mode = getattr(trainer, "attn_mode", "sdpa")
    if attn_mode != "sdpa":  # other backends' kernels cannot run on fake CPU tensors; their memory is flash-style too
        extra_notes.append(f"attention backend {attn_mode} traced as PyTorch SDPA (same O(L) memory class)")
        trainer.attn_mode = "sdpa"
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = LiveTensorTracker(round_to=CUDA_ALLOCATION_GRANULARITY)
    try:
        with header_only_reads(), fake:
            trainer._load_dit(run)
    finally:
        trainer.attn_mode = attn_mode
    with header_only_reads(), fake:
        trainer._create_network(run)
        transformer = run.transformer
        if run.dit_weight_dtype is not None:
            _cast_floating(transformer, run.dit_weight_dtype)
        transformer.train() if a.gradient_checkpointing else transformer.eval()
        run.network.prepare_grad_etc(transformer)
        params, _ = run.network.prepare_optimizer_params(unet_lr=a.learning_rate)
        params = list(params) + list(trainer.extra_trainable_params(a, transformer))
        trainable = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        optimizer = None
        if kind == "torch":
            from musubi_tuner.training.optimizers import get_optimizer

            a.optimizer_type = settings.optimizer
            optimizer = get_optimizer(a, params)[2]
        batch = hooks.make_fake_batch(a, shape)
        traced_dit, notes = hooks.prepare_trace(trainer, transformer)
        tracker.register_module(transformer)
        tracker.register(trainable, "trainable")
        tracker.register(batch, "inputs")
        with tracker, record_kept_input_bytes() as kept:
            # the sequence of NetworkTrainer._train_step, without its float(loss) (no data on fake tensors)
            latents = trainer.scale_shift_latents(batch["latents"]).to(run.accelerator.device)
            noise = apply_noise_options(a, latents, torch.randn_like(latents))
            with run.accelerator.autocast():
                loss, _ = trainer.process_batch(a, run.accelerator, traced_dit, latents, batch, noise, run.network_dtype)
            tracker.set_phase("backward")
            loss.backward()
            del loss, latents, noise
            tracker.set_phase("optimizer")
            if a.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, a.max_grad_norm)
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        tracker.result.kept_block_inputs = list(kept)
        weights = sum(t.numel() * t.element_size() for t in [*transformer.parameters(), *transformer.buffers()])
        train_bytes = sum(p.numel() * p.element_size() for p in trainable)
        max_swap = formulas.max_blocks_to_swap(transformer, training=True) if hasattr(transformer, "_split_blocks_to_swap") else 0
        swap = [formulas.block_swap_saved(transformer, s, training=True) for s in range(max_swap + 1)]
        largest = max((t.numel() * t.element_size() for t in transformer.state_dict().values()), default=0)
        attention = hooks.attention_dims(transformer, shape)
    trace = StepTrace(
        result=tracker.result,
        weights=weights,
        trainable=train_bytes,
        trainable_numels=[p.numel() for p in trainable],
        swap_saved=[s[0] for s in swap],
        largest_block=[s[1] for s in swap],
        largest_weight=largest,
        optimizer_traced=optimizer is not None,
        attention=attention,
        notes=extra_notes + list(notes),
    )
    del run, transformer, traced_dit, optimizer, batch, params, trainable
    gc.collect()
    return trace


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Loader/network INFO lines of every trace would bury the report; keep warnings."""
    import logging

    root = logging.getLogger("musubi_tuner")
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)
