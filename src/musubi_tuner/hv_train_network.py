"""The one network-training loop of every architecture (specs/training.md §1–3).

``NetworkTrainer.train(args)`` runs a fixed sequence of private steps; architectures subclass it and implement the
hooks of §2 (``architecture``, ``load_transformer``, ``call_dit``...). The work itself lives in ``musubi_tuner.training``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from musubi_tuner.memory.options import check_memory_args
from musubi_tuner.training import resume as resume_mod
from musubi_tuner.training.accel import (
    apply_cuda_flags,
    num_loader_workers,
    prepare_accelerator,
    sanitized_config,
    tracker_init_kwargs,
    wandb_run_id,
)
from musubi_tuner.training.args import (
    check_dependent_options,
    check_unsupported_hf,
    parse_network_args,
    read_config_from_file,
    setup_parser_common,
)
from musubi_tuner.training.data import EpochSyncedDataset, make_loader
from musubi_tuner.training.fsdp import ShardingConfig, check_sharding_request, local_parameter_share, shard_model, take_turns
from musubi_tuner.training.lr_schedulers import current_lrs, get_lr_scheduler
from musubi_tuner.training.metadata import bucket_resolution, dataset_metadata, finalize_metadata, training_metadata
from musubi_tuner.training.noise import apply_noise_options
from musubi_tuner.training.optimizers import get_optimizer, is_schedule_free
from musubi_tuner.training.sampling import sample_images, should_sample
from musubi_tuner.training.saving import (
    check_lora_format,
    check_network_lora_format,
    epoch_name,
    lora_file,
    prune_epoch_saves,
    prune_step_saves,
    save_dtype,
    save_network_atomic,
    state_dir,
    step_name,
)
from musubi_tuner.training.timesteps import TimestepConfig, TimestepSampler, noisy_input, show_timesteps
from musubi_tuner.training.validation import should_validate, validation_loss
from musubi_tuner.utils.atomic import check_writable_dir
from musubi_tuner.utils.dtypes import parse_dtype
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger
from musubi_tuner.utils.model_loading import release_freed_heap

logger = get_logger(__name__)

__all__ = ["DiTOutput", "NetworkTrainer", "read_config_from_file", "setup_parser_common", "resolve_network_module"]


@dataclass
class DiTOutput:
    """What ``call_dit`` returns: the prediction, the target it is compared with, and extra tensors/metrics."""

    pred: torch.Tensor
    target: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_network_module(name: str) -> str:
    """``networks.lora`` → ``musubi_tuner.networks.lora``; a name without the prefix is imported as given."""
    return f"musubi_tuner.{name}" if name.startswith("networks.") else name


@dataclass
class _Run:
    """Everything one ``train()`` call builds (passed between the private steps)."""

    args: argparse.Namespace
    accelerator: Any = None
    session_id: int = 0
    started_at: float = 0.0
    train_group: Any = None
    val_group: Any = None
    dataset: EpochSyncedDataset | None = None
    loader: Any = None
    transformer: Any = None
    vae: Any = None
    network: Any = None
    network_module: str = ""
    net_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: Any = None
    optimizer_name: str = ""
    optimizer_desc: str = ""
    lr_descriptions: list[str] = field(default_factory=list)
    lr_scheduler: Any = None
    trainable_params: list[torch.nn.Parameter] = field(default_factory=list)
    sample_parameters: list[dict[str, Any]] | None = None
    dit_dtype: torch.dtype = torch.bfloat16
    dit_weight_dtype: torch.dtype | None = None
    network_dtype: torch.dtype = torch.float32
    metadata: dict[str, str] = field(default_factory=dict)
    state: resume_mod.TrainState = field(default_factory=resume_mod.TrainState)
    resume_dir: Path | None = None
    resumed_state: resume_mod.TrainState | None = None
    sharding: ShardingConfig | None = None  # an FSDP config is active: the frozen DiT is sharded (training/fsdp.py)
    base_weights_merged: bool = False
    updates_per_epoch: int = 1
    num_epochs: int = 1
    loss_window: deque = field(default_factory=deque)


class NetworkTrainer:
    """The common training loop. Subclasses implement the abstract hooks and may override the optional seams."""

    # set by handle_model_specific_args (defaults here)
    default_guidance_scale: float = 1.0
    default_discrete_flow_shift: float = 14.5
    vae_frame_stride: int = 4
    resolution_step: int = 16
    default_vae_dtype: torch.dtype = torch.float16
    _i2v_training: bool = False
    _control_training: bool = False

    def __init__(self) -> None:
        self.timestep_sampler: TimestepSampler | None = None
        self.image_timestep_sampler: TimestepSampler | None = None  # --image_flow_shift: single-frame video batches
        self.blocks_to_swap = 0

    # ------------------------------------------------------------------------------------------------------------
    # abstract hooks (§2.1)

    @property
    def architecture(self) -> str:
        """Short name (cache suffix), e.g. ``k5``."""
        raise NotImplementedError

    @property
    def architecture_full_name(self) -> str:
        """Full name for metadata, e.g. ``kandinsky5``."""
        raise NotImplementedError

    def handle_model_specific_args(self, args: argparse.Namespace) -> None:
        """Validate architecture options; set ``_i2v_training``, ``_control_training``, ``default_guidance_scale``..."""
        raise NotImplementedError

    def process_sample_prompts(self, args: argparse.Namespace, accelerator: Any, sample_prompts: str) -> list[dict[str, Any]]:
        """Parse the prompt file and pre-encode every prompt once; return one dict per prompt.

        Implementations usually call ``training.sampling.load_sample_prompts`` and add the embeddings.
        """
        raise NotImplementedError

    def do_inference(
        self,
        accelerator: Any,
        args: argparse.Namespace,
        sample_parameter: dict[str, Any],
        vae: Any,
        dit_dtype: torch.dtype,
        transformer: Any,
        generator: torch.Generator,
    ) -> torch.Tensor | None:
        """Generate one sample: ``(B, C, F, H, W)`` or ``(C, F, H, W)`` in [0, 1]; sizes and defaults are resolved."""
        raise NotImplementedError

    def load_vae(self, args: argparse.Namespace, vae_dtype: torch.dtype, vae_path: str | None) -> Any:
        """The VAE (kept on CPU); only called when sampling."""
        raise NotImplementedError

    def load_transformer(
        self,
        accelerator: Any,
        args: argparse.Namespace,
        dit_path: str,
        attn_mode: str,
        split_attn: bool,
        loading_device: torch.device | str,
        dit_weight_dtype: torch.dtype | None,
    ) -> torch.nn.Module:
        """Build and load the DiT (fp8 quantisation included)."""
        raise NotImplementedError

    def scale_shift_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Map cached latents to model space (identity when caches are already normalised)."""
        return latents

    def call_dit(
        self,
        args: argparse.Namespace,
        accelerator: Any,
        transformer: Any,
        latents: torch.Tensor,
        batch: dict[str, Any],
        noise: torch.Tensor,
        noisy_model_input: torch.Tensor,
        timesteps: torch.Tensor,
        network_dtype: torch.dtype,
    ) -> DiTOutput:
        """Run the DiT. ``timesteps`` is ``t·1000`` (shape (B,)); divide by 1000 for DiTs that take [0, 1]."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------------------
    # optional seams (§2.2)

    def compile_transformer(self, args: argparse.Namespace, transformer: torch.nn.Module) -> torch.nn.Module:
        """``torch.compile`` each block of each block list (the whole model when it has no block lists)."""
        if args.compile_cache_size_limit is not None:
            torch._dynamo.config.cache_size_limit = args.compile_cache_size_limit
        dynamic = {"true": True, "false": False, "auto": None, None: None}[args.compile_dynamic]
        opts = dict(backend=args.compile_backend, mode=args.compile_mode, dynamic=dynamic, fullgraph=args.compile_fullgraph)
        lists = transformer._block_lists() if hasattr(transformer, "_block_lists") else None
        if not lists:
            return torch.compile(transformer, **opts)
        for blocks in lists:
            for i in range(len(blocks)):
                blocks[i] = torch.compile(blocks[i], **opts)
        return transformer

    def convert_weight_keys(self, weights_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Convert foreign LoRA key layouts for ``--base_weights`` (pass-through by default)."""
        return weights_sd

    def get_noisy_model_input_and_timesteps(
        self,
        args: argparse.Namespace,
        noise: torch.Tensor,
        latents: torch.Tensor,
        batch: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``t`` (shape (B,), in [0, 1]; the batch's stratified pool slice when present) and ``x_t``."""
        assert self.timestep_sampler is not None
        sampler = self.timestep_sampler
        if self.image_timestep_sampler is not None and latents.dim() == 5 and latents.shape[2] == 1:
            sampler = self.image_timestep_sampler
        hw = (int(latents.shape[-2]), int(latents.shape[-1]))
        t = sampler.sample(latents.shape[0], hw, device=device, uniforms=batch.get("timesteps"))
        return noisy_input(latents, noise, t).to(dtype), t

    def _build_timestep_samplers(self, args: argparse.Namespace) -> None:
        """The run's timestep sampler, and with ``--image_flow_shift`` a second one for single-frame video batches."""
        timestep_config = TimestepConfig.from_args(args)
        self.timestep_sampler = TimestepSampler(timestep_config)
        self.image_timestep_sampler = None
        if args.image_flow_shift is not None:
            if args.image_flow_shift <= 0:
                raise UserError(f"--image_flow_shift must be > 0 (got {args.image_flow_shift})")
            self.image_timestep_sampler = TimestepSampler(replace(timestep_config, discrete_flow_shift=args.image_flow_shift))

    def compute_loss(self, args: argparse.Namespace, output: DiTOutput, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """``mean(weight · (pred − target)²)`` in float32, weight from ``--weighting_scheme`` at σ = t."""
        assert self.timestep_sampler is not None
        weight = self.timestep_sampler.loss_weight(t).to(output.pred.device)
        err = (output.pred.float() - output.target.float()) ** 2
        return (weight.view(-1, *([1] * (err.ndim - 1))) * err).mean()

    def process_batch(
        self,
        args: argparse.Namespace,
        accelerator: Any,
        transformer: Any,
        latents: torch.Tensor,
        batch: dict[str, Any],
        noise: torch.Tensor,
        network_dtype: torch.dtype,
        timesteps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One forward: noise level, DiT call, loss. ``timesteps`` (t in [0, 1]) fixes the noise level (validation)."""
        if timesteps is None:
            noisy, t = self.get_noisy_model_input_and_timesteps(args, noise, latents, batch, accelerator.device, network_dtype)
        else:
            t = timesteps.to(accelerator.device)
            noisy = noisy_input(latents, noise, t).to(network_dtype)
        output = self.call_dit(args, accelerator, transformer, latents, batch, noise, noisy, t * 1000.0, network_dtype)
        loss = self.compute_loss(args, output, t, batch)
        metrics = {
            k: float(v) for k, v in output.extra.items() if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)
        }
        return loss, metrics

    def on_transformer_loaded(self, args: argparse.Namespace, transformer: torch.nn.Module) -> None:
        """Called after the DiT is loaded, before block swap and the network."""

    def on_train_start(self, args: argparse.Namespace, accelerator: Any, transformer: Any, network: Any) -> None:
        """Called once before the first step."""

    def on_post_optimizer_step(self, args: argparse.Namespace, accelerator: Any, transformer: Any, network: Any, step: int) -> None:
        """Called after every optimizer step."""

    def on_post_save(self, args: argparse.Namespace, accelerator: Any, path: Path) -> None:
        """Called after a LoRA file is written (main process)."""

    def on_before_sample_images(
        self, accelerator: Any, args: argparse.Namespace, epoch: int | None, step: int, vae: Any, transformer: Any
    ) -> None:
        """Called before sampling."""

    def on_after_sample_images(
        self, accelerator: Any, args: argparse.Namespace, epoch: int | None, step: int, vae: Any, transformer: Any
    ) -> None:
        """Called after sampling."""

    def extra_trainable_params(self, args: argparse.Namespace, transformer: Any) -> list[dict[str, Any]]:
        """Extra optimizer parameter groups (besides the network's)."""
        return []

    def extra_metadata(self, args: argparse.Namespace) -> dict[str, str]:
        """Extra metadata keys of the saved LoRAs."""
        return {}

    def sample_metadata(
        self, args: argparse.Namespace, sample_parameter: dict[str, Any], *, seed: int, step: int
    ) -> dict[str, str]:
        """The ``bt_*`` generation metadata embedded in a training sample (the generate scripts' keys); architectures
        add theirs (task, resolved negative prompt...) through ``training.sampling.sample_generation_metadata``."""
        from musubi_tuner.training.sampling import sample_generation_metadata

        return sample_generation_metadata(args, sample_parameter, model_type=self.architecture_full_name, seed=seed, step=step)

    def on_datasets_loaded(self, args: argparse.Namespace, train_group: Any, val_group: Any | None) -> None:
        """Called once the cached datasets are indexed, before any model loads (e.g. to check latent geometry)."""

    def extra_step_logs(self, args: argparse.Namespace, step: int) -> dict[str, float]:
        """Extra values logged every step."""
        return {}

    def sample_images(
        self,
        accelerator: Any,
        args: argparse.Namespace,
        epoch: int | None,
        step: int,
        vae: Any,
        transformer: Any,
        sample_parameters: list[dict[str, Any]],
        dit_dtype: torch.dtype,
    ) -> None:
        """Sample every prompt (the base implementation; architectures may replace it)."""
        sample_images(
            self,
            accelerator,
            args,
            epoch=epoch,
            step=step,
            vae=vae,
            transformer=transformer,
            sample_parameters=sample_parameters,
            dit_dtype=dit_dtype,
        )

    # ------------------------------------------------------------------------------------------------------------
    # the pipeline (§1)

    def train(self, args: argparse.Namespace) -> None:
        """Run the whole training (or ``--show_timesteps``)."""
        if not self._validate_and_init(args):
            return
        run = _Run(args=args)
        self._start_session(run)
        self._load_datasets(run)
        if getattr(args, "estimate_memory", False):
            from musubi_tuner.memory.run import estimate_training

            estimate_training(self, run)  # headers only: nothing is loaded, no CUDA context
            return
        self._setup_accelerator(run)
        self._prepare_sampling(run)
        if run.sharding is None:
            self._load_dit(run)
            self._create_network(run)
        else:
            # one process of a host at a time loads the DiT into host memory, applies the network and shards it
            for _ in take_turns(run.accelerator):
                self._load_dit(run)
                self._create_network(run)
                self._shard_dit(run)
        self._create_optimizer_and_loader(run)
        self._prepare(run)
        self._resume(run)
        self._loop(run)

    def _validate_and_init(self, args: argparse.Namespace) -> bool:
        from musubi_tuner.modules.attention import attention_mode_from_args

        apply_cuda_flags(args)
        check_unsupported_hf(args)
        check_memory_args(args)
        if not args.dataset_config:
            raise UserError("--dataset_config is required")
        if not args.dit and not args.show_timesteps:
            raise UserError("--dit is required")
        if args.fp8_scaled and not args.fp8_base:
            raise UserError("--fp8_scaled needs --fp8_base")
        if args.gradient_accumulation_steps < 1:
            raise UserError("--gradient_accumulation_steps must be >= 1")
        if args.block_swap_ring_size < 1:
            raise UserError("--block_swap_ring_size must be >= 1")
        if args.disable_numpy_memmap:
            logger.info("--disable_numpy_memmap: no effect, no numpy memory maps are used")
        if args.adaptive_noise_scale is not None and not args.noise_offset:
            raise UserError("--adaptive_noise_scale needs --noise_offset")
        if args.noise_offset_random_strength and not args.noise_offset:
            raise UserError("--noise_offset_random_strength needs --noise_offset")
        self.attn_mode = attention_mode_from_args(args, training=True)
        self.handle_model_specific_args(args)
        self._build_timestep_samplers(args)
        if args.show_timesteps:
            show_timesteps(args)
            return False
        if not args.network_module:
            raise UserError("--network_module is required (e.g. networks.lora)")
        if args.dim_from_weights and not args.network_weights:
            raise UserError("--dim_from_weights needs --network_weights")
        if args.base_weights_multiplier and len(args.base_weights_multiplier) != len(args.base_weights or []):
            raise UserError("--base_weights_multiplier needs one value per --base_weights file")
        if not args.output_dir or not args.output_name:
            raise UserError("--output_dir and --output_name are required")
        check_lora_format(args.lora_format, self.architecture_full_name)
        check_dependent_options(args)
        self._check_dependencies(args)
        check_writable_dir(args.output_dir, "--output_dir")  # the LoRA is written at the end: fail now, not then
        if args.resume:
            resume_mod.verify_state_dir(resume_mod.resolve_state_dir(args.resume))
        return True

    def _check_dependencies(self, args: argparse.Namespace) -> None:
        """Import what the options need (optimizer, scheduler class, network module) before any model is loaded."""
        from musubi_tuner.training.optimizers import resolve_optimizer_class

        resolve_optimizer_class(args.optimizer_type)
        if args.lr_scheduler_type:
            from musubi_tuner.training.lr_schedulers import resolve_scheduler_class

            resolve_scheduler_class(args.lr_scheduler_type)
        module_name = resolve_network_module(args.network_module)
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"--network_module {args.network_module}: cannot import {module_name} ({e})") from None
        check = getattr(module, "check_save_format", None)
        if callable(check):
            check(args.lora_format, parse_network_args(args.network_args))

    def _start_session(self, run: _Run) -> None:
        args = run.args
        run.session_id = random.randint(0, 2**32 - 1)
        run.started_at = time.time()
        if args.resume:
            run.resume_dir = resume_mod.resolve_state_dir(args.resume)
            run.resumed_state = resume_mod.read_train_state(run.resume_dir)
            saved_seed = run.resumed_state.seed if run.resumed_state else None
            if args.seed is None and saved_seed is not None:
                args.seed = saved_seed
            elif saved_seed is not None and args.seed != saved_seed:
                logger.warning(f"--seed {args.seed} differs from the resumed run's seed {saved_seed}: the data order will differ")
        if args.seed is None:
            args.seed = random.randint(0, 2**32 - 1)

    def _load_datasets(self, run: _Run) -> None:
        from musubi_tuner.dataset.config import load_dataset_group, resolve_datasets

        args = run.args
        run.train_group = load_dataset_group(
            args.dataset_config,
            architecture=self.architecture,
            args=args,
            training=True,
            num_timestep_buckets=args.num_timestep_buckets,
            seed=args.seed,
        )
        if args.validate_every_n_steps or args.validate_every_n_epochs:
            run.val_group = load_dataset_group(
                args.dataset_config, architecture=self.architecture, args=args, training=False, validation=True
            )
        elif any(
            p.validation
            for p in resolve_datasets(args.dataset_config, architecture=self.architecture, args=args, check_sources=False)
        ):
            logger.info("validation datasets are configured but unused: pass --validate_every_n_steps or --validate_every_n_epochs")
        run.dataset = EpochSyncedDataset(run.train_group)
        self.on_datasets_loaded(args, run.train_group, run.val_group)

    def _setup_accelerator(self, run: _Run) -> None:
        args = run.args
        tracker_run = run.resumed_state.tracker_run_name if run.resumed_state else None
        run.sharding = ShardingConfig.from_env()
        if run.sharding is not None:
            check_sharding_request(run.sharding, args, cuda_available=torch.cuda.is_available())
            if run.sharding.activation_checkpointing and not args.gradient_checkpointing:
                logger.info("fsdp_activation_checkpointing: true → --gradient_checkpointing (the model's own checkpointing)")
                args.gradient_checkpointing = True
            if run.sharding.wrap_classes:
                logger.info("fsdp_transformer_layer_cls_to_wrap is ignored: the model's transformer block lists are sharded")
        run.accelerator = prepare_accelerator(args, tracker_run, sharded=run.sharding is not None)
        from accelerate.utils import set_seed

        # seed + process index: each process draws its own noise; the data order uses the shared seed and the
        # network's initial weights are broadcast from process 0
        set_seed(args.seed, device_specific=True)
        self._resolve_dit_dtypes(run)

    def _resolve_dit_dtypes(self, run: _Run) -> None:
        args = run.args
        run.dit_dtype = parse_dtype(getattr(args, "dit_dtype", None), torch.bfloat16, flag="--dit_dtype")
        if args.fp8_scaled:
            run.dit_weight_dtype = None
        elif args.fp8_base:
            run.dit_weight_dtype = torch.float8_e4m3fn
        else:
            run.dit_weight_dtype = run.dit_dtype

    def _prepare_sampling(self, run: _Run) -> None:
        args = run.args
        if not args.sample_prompts:
            return
        if not Path(args.sample_prompts).is_file():
            raise UserError(f"--sample_prompts: file not found: {args.sample_prompts}")
        run.sample_parameters = self.process_sample_prompts(args, run.accelerator, args.sample_prompts)
        run.vae = self.load_vae(args, parse_dtype(args.vae_dtype, self.default_vae_dtype, flag="--vae_dtype"), args.vae)

    def _load_dit(self, run: _Run) -> None:
        args, accelerator = run.args, run.accelerator
        self.blocks_to_swap = args.blocks_to_swap or 0
        # sharded runs load into host memory; shard_model moves each block's shard to the device
        loading_device = "cpu" if self.blocks_to_swap > 0 or run.sharding is not None else accelerator.device
        transformer = self.load_transformer(
            accelerator, args, args.dit, self.attn_mode, args.split_attn, loading_device, run.dit_weight_dtype
        )
        self.on_transformer_loaded(args, transformer)
        transformer.eval()
        transformer.requires_grad_(False)
        if self.blocks_to_swap > 0:
            from musubi_tuner.modules.offloading import BlockSwapConfig

            config = BlockSwapConfig(
                device=accelerator.device,
                supports_backward=True,
                use_pinned_memory=args.use_pinned_memory_for_block_swap,
                h2d_only=args.block_swap_h2d_only,
                ring_size=args.block_swap_ring_size,
            )
            transformer.enable_block_swap(self.blocks_to_swap, config)
            self.blocks_to_swap = transformer.blocks_to_swap  # clamped to what the model can swap (with a warning)
            transformer.move_to_device_except_swap_blocks(accelerator.device)
            transformer.switch_block_swap_for_training()
        run.transformer = transformer

    def _create_network(self, run: _Run) -> None:
        from safetensors.torch import load_file

        args, transformer = run.args, run.transformer
        run.network_module = resolve_network_module(args.network_module)
        try:
            module = importlib.import_module(run.network_module)
        except ImportError as e:
            raise UserError(f"--network_module {args.network_module}: cannot import {run.network_module} ({e})") from None
        for i, path in enumerate(args.base_weights or []):
            mult = args.base_weights_multiplier[i] if args.base_weights_multiplier else 1.0
            sd = self.convert_weight_keys(load_file(path))
            merger = _first(module.create_arch_network_from_weights(mult, sd, unet=transformer, for_inference=True))
            on_host = self.blocks_to_swap or run.sharding is not None
            merger.merge_to(None, transformer, sd, run.dit_dtype, "cpu" if on_host else run.accelerator.device)
            logger.info(f"merged base weights {path} x {mult}")
        run.net_kwargs = parse_network_args(args.network_args)
        if args.dim_from_weights:
            sd = load_file(args.network_weights)
            network = _first(
                module.create_arch_network_from_weights(
                    1.0, sd, unet=transformer, neuron_dropout=args.network_dropout, **run.net_kwargs
                )
            )
            # the metadata must describe the trained network, not the (ignored) --network_dim/--network_alpha
            args.network_dim, args.network_alpha = _dim_alpha_from_weights(sd, args.network_dim, args.network_alpha)
        elif hasattr(module, "create_arch_network"):
            network = _first(
                module.create_arch_network(
                    1.0,
                    args.network_dim,
                    args.network_alpha,
                    run.vae,
                    None,
                    transformer,
                    neuron_dropout=args.network_dropout,
                    **run.net_kwargs,
                )
            )
        else:  # LyCORIS-style modules
            network = _first(
                module.create_network(
                    1.0,
                    args.network_dim,
                    args.network_alpha,
                    run.vae,
                    None,
                    transformer,
                    neuron_dropout=args.network_dropout,
                    **run.net_kwargs,
                )
            )
        if network is None:
            raise UserError(f"--network_module {args.network_module}: the factory returned no network")
        if hasattr(network, "prepare_network"):
            network.prepare_network(args)
        network.apply_to(None, transformer, apply_text_encoder=False, apply_unet=True)
        check_network_lora_format(network, args.lora_format, self.architecture_full_name)
        if args.network_weights:
            info = network.load_weights(args.network_weights)
            logger.info(f"loaded network weights {args.network_weights}: {info}")
        if args.gradient_checkpointing:
            transformer.enable_gradient_checkpointing(args.gradient_checkpointing_cpu_offload)
        device = torch.device(run.accelerator.device)
        if any(t.device != device for t in [*network.parameters(), *network.buffers()]):
            network.to(device)  # (skipped when already there: the memory estimator's fake tensors cannot be swapped)
        run.network_dtype = next((p.dtype for p in network.parameters()), torch.float32)
        run.network = network

    def _shard_dit(self, run: _Run) -> None:
        """FSDP2: cast the loaded DiT to its weight dtype and shard it per transformer block (training/fsdp.py)."""
        import gc

        accelerator = run.accelerator
        assert run.sharding is not None
        if run.dit_weight_dtype is not None:
            _cast_floating(run.transformer, run.dit_weight_dtype)
        shard_model(run.transformer, run.sharding, accelerator.device)
        gc.collect()
        release_freed_heap()  # the full weights just freed: give the pages back before the next process loads
        local, total = local_parameter_share(run.transformer)
        logger.info(
            f"FSDP2: process {accelerator.process_index} of {accelerator.num_processes} holds {local:,} of {total:,} "
            f"DiT parameters ({100.0 * local / max(1, total):.1f}%)"
        )

    def _create_optimizer_and_loader(self, run: _Run) -> None:
        args, accelerator = run.args, run.accelerator
        params, run.lr_descriptions = run.network.prepare_optimizer_params(unet_lr=args.learning_rate)
        params = list(params) + list(self.extra_trainable_params(args, run.transformer))
        run.trainable_params = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        run.optimizer_name, desc, run.optimizer = get_optimizer(args, params)
        run.optimizer_desc = f"{run.optimizer_name}({desc})"
        workers = num_loader_workers(args)
        run.loader = make_loader(run.dataset, workers, args.persistent_data_loader_workers, args.seed)
        per_process = math.ceil(len(run.loader) / accelerator.num_processes)
        run.updates_per_epoch = math.ceil(per_process / args.gradient_accumulation_steps)
        if args.max_train_epochs is not None:
            args.max_train_steps = args.max_train_epochs * run.updates_per_epoch
            logger.info(f"--max_train_epochs {args.max_train_epochs}: {args.max_train_steps} steps")
        run.num_epochs = math.ceil(args.max_train_steps / run.updates_per_epoch)
        run.lr_scheduler = get_lr_scheduler(args, run.optimizer, accelerator.num_processes)

    def _prepare(self, run: _Run) -> None:
        args, accelerator = run.args, run.accelerator
        # the frozen DiT is not prepared (no DDP wrapper, nothing of it in states); the network is not DDP-wrapped
        # either because its forward is never called: gradients are averaged by one manual all-reduce (§20 #7)
        if run.sharding is not None:
            pass  # placed and cast by _shard_dit
        elif self.blocks_to_swap == 0:
            run.transformer.to(accelerator.device)
        else:
            run.transformer.prepare_block_swap_before_forward()
        if run.dit_weight_dtype is not None and self.blocks_to_swap == 0 and run.sharding is None:
            _cast_floating(run.transformer, run.dit_weight_dtype)
        if args.compile:
            run.transformer = self.compile_transformer(args, run.transformer)
        run.optimizer, run.loader, run.lr_scheduler = accelerator.prepare(run.optimizer, run.loader, run.lr_scheduler)
        if args.gradient_checkpointing:
            run.transformer.train()
        else:
            run.transformer.eval()
        run.network.prepare_grad_etc(run.transformer)
        if accelerator.num_processes > 1:
            import torch.distributed as dist

            for p in run.network.parameters():
                dist.broadcast(p.data, src=0)

    def _resume(self, run: _Run) -> None:
        args, accelerator = run.args, run.accelerator
        batches = len(run.loader)
        if run.resume_dir is None:
            run.state = resume_mod.TrainState(seed=args.seed, num_processes=accelerator.num_processes)
            return
        resume_mod.load_network_from_state(run.resume_dir, run.network)
        accelerator.load_state(str(run.resume_dir))  # optimizer, scheduler, RNG states (last: nothing draws after it)
        sched_steps = int(getattr(run.lr_scheduler.scheduler, "last_epoch", 0))
        state = run.resumed_state or resume_mod.infer_train_state(
            sched_steps, accelerator.num_processes, run.updates_per_epoch, args.gradient_accumulation_steps, batches
        )
        if (
            state.num_processes != accelerator.num_processes
            or state.gradient_accumulation_steps != args.gradient_accumulation_steps
        ):
            logger.warning(
                f"resuming with {accelerator.num_processes} processes / accumulation {args.gradient_accumulation_steps} "
                f"(saved: {state.num_processes} / {state.gradient_accumulation_steps}): the in-epoch data position is approximate"
            )
        if state.batches_per_epoch and state.batches_per_epoch != batches:
            logger.warning(f"the dataset now has {batches} batches per epoch (saved: {state.batches_per_epoch})")
        expected = state.current_step * accelerator.num_processes
        if sched_steps != expected:
            logger.warning(
                f"LR scheduler position {sched_steps} does not match step {state.current_step} x {accelerator.num_processes}"
            )
        logger.info(
            f"resumed from {run.resume_dir}: step {state.current_step}, epoch {state.current_epoch}, {state.steps_in_epoch} batches into it"
        )
        state.seed = args.seed
        state.num_processes = accelerator.num_processes
        run.state = state

    # ------------------------------------------------------------------------------------------------------------
    # the loop (§3)

    def _loop(self, run: _Run) -> None:
        args, accelerator, network = run.args, run.accelerator, run.network
        state = run.state
        self.on_train_start(args, accelerator, run.transformer, network)
        run.metadata = self._base_metadata(run)
        self._init_trackers(run)
        run.loss_window = deque(maxlen=max(1, len(run.loader)))
        schedule_free = is_schedule_free(args.optimizer_type)
        if schedule_free:
            _optimizer_mode(run.optimizer, train=True)
        progress = tqdm(
            total=args.max_train_steps, initial=state.current_step, desc="steps", disable=not accelerator.is_local_main_process
        )
        if state.current_step == 0:
            self._maybe_sample(run, step=0)
        first_epoch = max(1, state.current_epoch)
        skip = state.steps_in_epoch
        if skip >= len(run.loader):
            first_epoch, skip = first_epoch + 1, 0
        for epoch in range(first_epoch, run.num_epochs + 1):
            if state.current_step >= args.max_train_steps:
                break
            state.current_epoch = epoch
            run.dataset.use_epoch(epoch)
            network.on_epoch_start(run.transformer)
            loader = accelerator.skip_first_batches(run.loader, skip) if skip else run.loader
            state.steps_in_epoch, skip = skip, 0
            epoch_losses: list[float] = []
            for batch in loader:
                state.steps_in_epoch += 1
                loss, metrics = self._train_step(run, batch)
                epoch_losses.append(loss)
                if not accelerator.sync_gradients:
                    continue
                state.current_step += 1
                progress.update(1)
                self.on_post_optimizer_step(args, accelerator, run.transformer, network, state.current_step)
                logs = self._step_logs(run, loss, metrics)
                progress.set_postfix(loss=f"{logs['loss/average']:.4f}")
                self._after_step(run, logs)
                accelerator.log(logs, step=state.current_step)
                if state.current_step >= args.max_train_steps:
                    break
            if epoch_losses:
                accelerator.log({"loss/epoch": sum(epoch_losses) / len(epoch_losses)}, step=state.current_step)
            self._after_epoch(run, epoch)
        progress.close()
        self._finish(run)

    def _train_step(self, run: _Run, batch: dict[str, Any]) -> tuple[float, dict[str, float]]:
        args, accelerator, network = run.args, run.accelerator, run.network
        with accelerator.accumulate(network):
            network.on_step_start()
            latents = self.scale_shift_latents(batch["latents"]).to(accelerator.device)
            noise = apply_noise_options(args, latents, torch.randn_like(latents))
            with accelerator.autocast():
                loss, metrics = self.process_batch(args, accelerator, run.transformer, latents, batch, noise, run.network_dtype)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if accelerator.num_processes > 1:
                    _all_reduce_mean(run.trainable_params, accelerator.num_processes)
                if args.max_grad_norm:
                    accelerator.clip_grad_norm_(run.trainable_params, args.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients and args.scale_weight_norms:
            keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(args.scale_weight_norms, accelerator.device)
            metrics.update(
                {
                    "max_norm/keys_scaled": float(keys_scaled),
                    "max_norm/average_key_norm": float(mean_norm),
                    "max_norm/max_key_norm": float(max_norm),
                }
            )
        return float(loss.detach()), metrics

    def _step_logs(self, run: _Run, loss: float, metrics: dict[str, float]) -> dict[str, float]:
        run.loss_window.append(loss)
        logs = {"loss/current": loss, "loss/average": sum(run.loss_window) / len(run.loss_window), **metrics}
        lrs = current_lrs(run.lr_scheduler, run.optimizer)
        names = run.lr_descriptions or []
        for i, lr in enumerate(lrs):
            name = names[i] if i < len(names) else f"group{i}"
            logs[f"lr/{name}"] = lr
            group = run.optimizer.param_groups[i] if i < len(run.optimizer.param_groups) else {}
            if "d" in group:  # D-Adaptation / Prodigy
                logs[f"lr/d*lr/{name}"] = group["d"] * group.get("lr", lr)
        logs.update(self.extra_step_logs(run.args, run.state.current_step))
        return logs

    def _after_step(self, run: _Run, logs: dict[str, float]) -> None:
        args, step = run.args, run.state.current_step
        self._maybe_sample(run, step=step)
        if run.val_group is not None and should_validate(args, step=step):
            logs.update(self._validate(run))
        if args.save_every_n_steps and step % args.save_every_n_steps == 0 and step < args.max_train_steps:
            stem = step_name(args.output_name, step)
            self._save_lora(run, stem)
            if args.save_state:
                self._save_state(run, stem)
            if run.accelerator.is_main_process:
                prune_step_saves(args, step)

    def _after_epoch(self, run: _Run, epoch: int) -> None:
        args, accelerator = run.args, run.accelerator
        last = epoch >= run.num_epochs or run.state.current_step >= args.max_train_steps
        if args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0 and not last:
            stem = epoch_name(args.output_name, epoch)
            self._save_lora(run, stem)
            if args.save_state:
                self._save_state(run, stem)
            if accelerator.is_main_process:
                prune_epoch_saves(args, epoch)
        self._maybe_sample(run, epoch=epoch)
        if run.val_group is not None and should_validate(args, epoch=epoch):
            accelerator.log(self._validate(run), step=run.state.current_step)

    def _finish(self, run: _Run) -> None:
        args, accelerator = run.args, run.accelerator
        accelerator.wait_for_everyone()
        if args.save_state or args.save_state_on_train_end:
            self._save_state(run, args.output_name)
        self._save_lora(run, args.output_name)
        accelerator.end_training()
        logger.info(f"training finished at step {run.state.current_step}")

    # ------------------------------------------------------------------------------------------------------------
    # helpers of the loop

    def _maybe_sample(self, run: _Run, *, step: int | None = None, epoch: int | None = None) -> None:
        if run.sample_parameters is None or not should_sample(run.args, step=step, epoch=epoch):
            return
        if is_schedule_free(run.args.optimizer_type):
            _optimizer_mode(run.optimizer, train=False)
        self.sample_images(
            run.accelerator, run.args, epoch, run.state.current_step, run.vae, run.transformer, run.sample_parameters, run.dit_dtype
        )
        if is_schedule_free(run.args.optimizer_type):
            _optimizer_mode(run.optimizer, train=True)

    def _validate(self, run: _Run) -> dict[str, float]:
        logs = validation_loss(self, run.accelerator, run.args, run.val_group, run.transformer, run.network, run.network_dtype)
        logger.info(f"step {run.state.current_step}: validation loss {logs['loss/validation']:.5f}")
        return logs

    def _base_metadata(self, run: _Run) -> dict[str, str]:
        args = run.args
        return training_metadata(
            args,
            arch_full_name=self.architecture_full_name,
            session_id=run.session_id,
            training_started_at=run.started_at,
            num_train_items=run.train_group.num_train_items,
            num_batches_per_epoch=len(run.loader),
            num_epochs=run.num_epochs,
            optimizer_desc=run.optimizer_desc,
            datasets_json=dataset_metadata(run.train_group),
            network_args=run.net_kwargs,
            extra=self.extra_metadata(args),
        )

    def _init_trackers(self, run: _Run) -> None:
        args, accelerator = run.args, run.accelerator
        if not accelerator.log_with:
            return
        saved = run.resumed_state.wandb_run_id if run.resumed_state else None
        accelerator.init_trackers(
            args.log_tracker_name or "network_train",
            config=sanitized_config(args) if args.log_config else None,
            init_kwargs=tracker_init_kwargs(args, saved),
        )

    def _save_lora(self, run: _Run, stem: str) -> None:
        args, accelerator = run.args, run.accelerator
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        schedule_free = is_schedule_free(args.optimizer_type)
        if schedule_free:
            _optimizer_mode(run.optimizer, train=False)
        path = lora_file(args.output_dir, stem)
        md = finalize_metadata(
            run.metadata,
            args,
            self.architecture_full_name,
            steps=run.state.current_step,
            epoch=run.state.current_epoch,
            resolution=bucket_resolution(run.train_group),
        )
        save_network_atomic(run.network, path, save_dtype(args), md, args.lora_format, self.architecture_full_name)
        logger.info(f"saved {path}")
        if schedule_free:
            _optimizer_mode(run.optimizer, train=True)
        self.on_post_save(args, accelerator, path)

    def _save_state(self, run: _Run, stem: str) -> None:
        args, accelerator = run.args, run.accelerator
        state = run.state
        state.batches_per_epoch = len(run.loader)
        state.gradient_accumulation_steps = args.gradient_accumulation_steps
        state.tracker_run_name = getattr(accelerator, "tracker_run_name", None)
        state.wandb_run_id = wandb_run_id(accelerator)
        state.network_module = args.network_module
        state.version = resume_mod.product_version()
        resume_mod.save_state(accelerator, state_dir(args.output_dir, stem), run.network, state)


def _first(result: Any) -> Any:
    """Factories return the network; tolerate LyCORIS-style ``(network, weights_sd)`` tuples (§20 #3)."""
    return result[0] if isinstance(result, tuple) else result


def _dim_alpha_from_weights(sd: dict[str, torch.Tensor], dim: int | None, alpha: float) -> tuple[int | None, float]:
    """Rank (rows of the first ``lora_down``, or the ``hada_w1_b``/``lokr`` rank) and alpha of an adapter state dict."""
    for key in sorted(sd):
        if key.endswith((".lora_down.weight", ".hada_w1_b")):
            prefix = key.rsplit(".", 2 if key.endswith(".weight") else 1)[0]
            rank = int(sd[key].shape[0])
            a = sd.get(f"{prefix}.alpha")
            return rank, float(a) if a is not None else float(rank)
    return dim, alpha


def _cast_floating(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters/buffers that are not fp8 already (fp8 weights and their scales stay as loaded)."""
    fp8 = {torch.float8_e4m3fn, torch.float8_e5m2}
    to_dtype = getattr(module, "to_dtype", None)
    if callable(to_dtype) and dtype not in fp8:
        to_dtype(dtype)  # models with float32 islands (Kandinsky 5 modulations) keep them
        return
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() and t.dtype not in fp8 and dtype not in fp8 and t.dtype != dtype:
            t.data = t.data.to(dtype)


def _all_reduce_mean(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients across processes with one coalesced all-reduce."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def _optimizer_mode(optimizer: Any, *, train: bool) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    fn = getattr(inner, "train" if train else "eval", None)
    if callable(fn):
        fn()
