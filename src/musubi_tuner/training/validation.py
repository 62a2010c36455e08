"""Validation loss on the datasets marked ``validation = true``.

Every validation batch is evaluated at fixed quantiles ``q`` of the training timestep distribution (the method's
``t(u = q)``, range limits applied; qinglong mixtures use their main component) with noise drawn from a generator
seeded by ``--validation_seed``, the batch index and the quantile index, so successive evaluations are comparable.
Logs ``loss/validation`` (mean over quantiles) and ``loss/validation/q<q>`` per quantile.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from musubi_tuner.training.fsdp import is_sharded
from musubi_tuner.training.timesteps import TimestepSampler, t_from_uniform
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


def quantile_timesteps(sampler: TimestepSampler, quantiles: list[float], hw: tuple[int, int]) -> torch.Tensor:
    """``t`` at each quantile (shape (K,)), range limits applied (rescaled, or clamped with preserve_distribution_shape)."""
    cfg = sampler.cfg
    u = torch.tensor(quantiles, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    t = t_from_uniform(u, cfg, hw, choice=torch.zeros_like(u))
    if cfg.method != "sigma" and cfg.has_range:
        lo, hi = (x / 1000 for x in cfg.t_range_1000)
        t = t.clamp(lo, hi) if cfg.preserve_distribution_shape else t * (hi - lo) + lo
    return t.float()


def should_validate(args: Any, *, step: int | None = None, epoch: int | None = None) -> bool:
    if step is not None:
        return bool(args.validate_every_n_steps) and step % args.validate_every_n_steps == 0
    return bool(args.validate_every_n_epochs) and epoch is not None and epoch % args.validate_every_n_epochs == 0


def validation_loss(
    trainer: Any, accelerator: Any, args: Any, group: Any, transformer: Any, network: Any, network_dtype: torch.dtype
) -> dict[str, float]:
    """Mean validation loss over the validation batches (sharded across processes) at each quantile."""
    quantiles = list(args.validation_quantiles)
    sums = torch.zeros(len(quantiles), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros(1, dtype=torch.float64, device=accelerator.device)
    was_training = network.training
    network.train(False)
    try:
        with torch.no_grad():
            n, world = len(group), accelerator.num_processes
            # a sharded DiT runs collectives in every forward: every process runs the same number of batches (the
            # last round is padded with batch 0, whose loss is not counted)
            rounds = math.ceil(n / world) if is_sharded(transformer) else None
            indices = (
                range(accelerator.process_index, rounds * world, world) if rounds else range(accelerator.process_index, n, world)
            )
            for index in indices:
                counted = index < n
                batch = group[index if counted else 0]
                latents = trainer.scale_shift_latents(batch["latents"]).to(accelerator.device)
                hw = (int(latents.shape[-2]), int(latents.shape[-1]))
                ts = quantile_timesteps(trainer.timestep_sampler, quantiles, hw)
                for k, t in enumerate(ts):
                    g = torch.Generator().manual_seed(int(args.validation_seed) + 1000 * index + k)
                    noise = torch.randn(latents.shape, generator=g, dtype=torch.float32).to(latents.device, latents.dtype)
                    tb = t.repeat(latents.shape[0]).to(accelerator.device)
                    with accelerator.autocast():
                        loss, _ = trainer.process_batch(
                            args, accelerator, transformer, latents, batch, noise, network_dtype, timesteps=tb
                        )
                    if counted:
                        sums[k] += float(loss)
                count += int(counted)
    finally:
        network.train(was_training)
    sums = accelerator.reduce(sums, reduction="sum")
    count = accelerator.reduce(count, reduction="sum")
    per_q = (sums / count.clamp(min=1)).tolist()
    logs = {f"loss/validation/q{q:.2f}": v for q, v in zip(quantiles, per_q)}
    logs["loss/validation"] = sum(per_q) / len(per_q)
    return logs
