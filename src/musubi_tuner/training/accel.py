"""Accelerator set-up (specs/training.md §13): process group, DDP kwargs, dynamo, trackers and run directories."""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)


def process_group_backend() -> str:
    """``gloo`` whenever CUDA is unavailable (CPU multi-process runs) or on Windows, else ``nccl``."""
    if sys.platform == "win32" or not torch.cuda.is_available():
        return "gloo"
    return "nccl"


def run_name(args: Any) -> str:
    """The tracker run directory name ``<log_prefix><YYYYmmddHHMMSS>``."""
    return f"{args.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S', time.localtime())}"


def _require(package: str, choice: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise UserError(f"--log_with {choice}: the {package} package is not installed (pip install {package})")


def _log_with(args: Any, project_dir: str | None) -> list[Any] | None:
    """Trackers for ``Accelerator(log_with=...)``; ``--logging_dir`` alone means TensorBoard (musubi behaviour)."""
    choice = args.log_with
    if choice is None:
        if not args.logging_dir:
            return None
        choice = "tensorboard"
    if choice in ("tensorboard", "all", "jsonl") and not args.logging_dir:
        raise UserError(f"--log_with {choice} needs --logging_dir")
    if choice in ("tensorboard", "all"):
        _require("tensorboard", choice)
    if choice in ("wandb", "all"):
        _require("wandb", choice)
    if choice == "jsonl":
        from musubi_tuner.training.trackers import JsonlTracker

        return [JsonlTracker(Path(project_dir).name, project_dir)]
    return {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}[choice]


def prepare_accelerator(args: Any, tracker_run: str | None = None, *, sharded: bool = False):
    """Build the ``Accelerator``; ``tracker_run`` reuses a run directory name (resume continues the same curves).

    ``sharded``: an FSDP config is active and the trainer shards the frozen DiT itself (``training.fsdp``), so
    accelerate is built as for data-parallel training. Processes launched as a group that end up outside one
    process group are refused (they would train unsynchronised)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin

    project_dir = None
    if args.logging_dir:
        project_dir = str(Path(args.logging_dir) / (tracker_run or run_name(args)))
    log_with = _log_with(args, project_dir)
    if args.wandb_api_key and log_with and "wandb" in log_with:
        import wandb  # type: ignore[import-not-found]

        wandb.login(key=args.wandb_api_key)
    kwargs_handlers: list[Any] = []
    pg: dict[str, Any] = {"backend": process_group_backend()}
    if args.ddp_timeout:
        pg["timeout"] = datetime.timedelta(minutes=args.ddp_timeout)
    if sys.platform == "win32" and tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4):
        pg["init_method"] = "env://?use_libuv=False"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched with several processes
        kwargs_handlers.append(InitProcessGroupKwargs(**pg))
    if args.ddp_gradient_as_bucket_view or args.ddp_static_graph:
        # kept for old command lines: the network is not DDP-wrapped (gradients are averaged by one all-reduce)
        logger.info("--ddp_gradient_as_bucket_view / --ddp_static_graph: no effect, the network is not DDP-wrapped")
        kwargs_handlers.append(
            DistributedDataParallelKwargs(
                gradient_as_bucket_view=args.ddp_gradient_as_bucket_view, static_graph=args.ddp_static_graph
            )
        )
    dynamo = None
    if args.dynamo_backend and args.dynamo_backend.upper() != "NO":
        dynamo = TorchDynamoPlugin(
            backend=args.dynamo_backend.lower(),
            mode=args.dynamo_mode or "default",
            fullgraph=args.dynamo_fullgraph,
            dynamic=args.dynamo_dynamic,
        )
    # several processes without CUDA: accelerate only sets up MULTI_CPU (gloo, working barriers) with cpu=True
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    from musubi_tuner.training.fsdp import check_world, fsdp_env_hidden

    with fsdp_env_hidden() if sharded else contextlib.nullcontext():
        accelerator = Accelerator(
            cpu=multi_cpu,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=project_dir),
            dynamo_plugin=dynamo,
            kwargs_handlers=kwargs_handlers,
        )
    check_world(accelerator)
    accelerator.tracker_run_name = Path(project_dir).name if project_dir else None
    if accelerator.num_processes > 1:
        logger.info(
            f"process {accelerator.process_index} of {accelerator.num_processes}: "
            f"{accelerator.distributed_type.value}, backend {accelerator.state.backend}"
        )
    return accelerator


def tracker_init_kwargs(args: Any, wandb_run_id: str | None) -> dict[str, Any]:
    """``init_kwargs`` of ``init_trackers``: ``--log_tracker_config`` TOML, wandb run name, and the resumed run id."""
    kwargs: dict[str, Any] = {}
    if args.log_tracker_config:
        import toml

        path = Path(args.log_tracker_config)
        if not path.is_file():
            raise UserError(f"--log_tracker_config: file not found: {path}")
        kwargs = toml.loads(path.read_text(encoding="utf-8"))
    if args.wandb_run_name:
        kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
    if wandb_run_id:
        kwargs.setdefault("wandb", {}).update(id=wandb_run_id, resume="allow")
    return kwargs


def wandb_run_id(accelerator: Any) -> str | None:
    """The id of the active wandb run (stored in states so a resume continues it)."""
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "wandb":
            return getattr(tracker.run, "id", None)
    return None


def sanitized_config(args: Any) -> dict[str, Any]:
    """Arguments loggable by trackers (no secrets, only scalars)."""
    out = {}
    for k, v in vars(args).items():
        if k in ("wandb_api_key", "huggingface_token"):
            continue
        if isinstance(v, (int, float, str, bool)):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = str(v)
    return out


def apply_cuda_flags(args: Any) -> None:
    """``--cuda_allow_tf32``, ``--cuda_cudnn_benchmark`` and ``--fp16_accumulation``."""
    if args.fp16_accumulation:
        enable_fp16_accumulation()
    if args.cuda_allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.cuda_cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


def num_loader_workers(args: Any) -> int:
    """``min(--max_data_loader_n_workers, cpu_count)``."""
    return max(0, min(args.max_data_loader_n_workers, os.cpu_count() or 1))


def enable_fp16_accumulation() -> None:
    """``--fp16_accumulation``: let CUDA fp16 matmuls accumulate in fp16 (torch >= 2.7), with the warning it deserves."""
    backend = torch.backends.cuda.matmul
    if not hasattr(backend, "allow_fp16_accumulation"):
        raise UserError(f"--fp16_accumulation needs torch >= 2.7 (this is {torch.__version__})")
    backend.allow_fp16_accumulation = True
    logger.warning(
        "--fp16_accumulation: fp16 matmuls accumulate in fp16; this loses precision and is generally harmful for "
        "training (it only affects fp16 matmuls on CUDA)"
    )
