"""Resumable state directories (specs/training.md §10–11).

A state directory holds what ``accelerator.save_state`` writes (optimizer, LR scheduler, RNG states of every
process), the network weights in full precision (``network.safetensors``) and ``train_state.json``
(``current_step``, ``current_epoch``, ``steps_in_epoch``, ``seed``, tracker run ids, version). It is written into
``<name>.tmp`` and renamed when complete, so a process killed while saving leaves the previous state intact.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.utils.atomic import atomic_write_text, is_out_of_space, out_of_space_message, save_safetensors_atomic
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.log import get_logger

logger = get_logger(__name__)

TRAIN_STATE_FILE = "train_state.json"
MUSUBI_STATE_FILE = "musubi_training_state.json"  # musubi-tuner PR #1011 proposal; read when present
NETWORK_FILE = "network.safetensors"
ACCELERATE_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
KILL_HOOK_ENV = "MUSUBI_TUNER_TEST_KILL_DURING_SAVE"  # tests: SIGKILL the main process mid-save at this step


@dataclass
class TrainState:
    """What ``train_state.json`` stores.

    ``current_epoch`` is the 1-based epoch in progress and ``steps_in_epoch`` the number of data-loader batches
    each process has consumed in it (equal to the batches per epoch when the save was at the end of the epoch).
    """

    current_step: int = 0
    current_epoch: int = 0
    steps_in_epoch: int = 0
    batches_per_epoch: int = 0
    seed: int | None = None
    num_processes: int = 1
    gradient_accumulation_steps: int = 1
    tracker_run_name: str | None = None
    wandb_run_id: str | None = None
    network_module: str | None = None
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def product_version() -> str:
    try:
        from importlib.metadata import version

        return version("blissful-tuner")
    except Exception:  # not installed as a distribution (source checkout)
        return "unknown"


def _network_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        for k, v in network.state_dict().items()
    }


def save_state(accelerator: Any, final_dir: Path, network: torch.nn.Module, state: TrainState) -> None:
    """Write a complete state directory atomically (temp dir + rename). Every process must call it.

    A failed write (disk full...) removes the temp directory and raises one ``UserError`` naming the state; the
    previous state of that name is left untouched.
    """
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            save_safetensors_atomic(_network_state(network), tmp / NETWORK_FILE)
            if os.environ.get(KILL_HOOK_ENV) == str(state.current_step):
                logger.warning(f"{KILL_HOOK_ENV}: killing this process while saving {final_dir}")
                os.kill(os.getpid(), signal.SIGKILL)
            atomic_write_text(tmp / TRAIN_STATE_FILE, state.to_json())
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, UserError):
            raise
        if is_out_of_space(e):
            raise UserError(f"saving the state {final_dir}: {out_of_space_message(e)}; nothing was written") from None
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old = final_dir.with_name(final_dir.name + ".old")
        if final_dir.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        if old.exists():
            shutil.rmtree(old)
        logger.info(f"saved state {final_dir}")
    accelerator.wait_for_everyone()


def check_network_keys(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: Path) -> None:
    """Resuming with a different network type, rank or module set is an error naming the first mismatching key."""
    for key in sorted(set(expected) | set(found)):
        if key not in found:
            raise UserError(f"{source}: network key {key!r} missing from the state (different network type or modules?)")
        if key not in expected:
            raise UserError(f"{source}: state has network key {key!r} this network does not (different network type or modules?)")
        if tuple(expected[key].shape) != tuple(found[key].shape):
            raise UserError(
                f"{source}: network key {key!r} has shape {tuple(found[key].shape)} in the state but "
                f"{tuple(expected[key].shape)} here (different --network_dim?)"
            )


def load_network_from_state(state_dir: Path, network: torch.nn.Module) -> None:
    """Load the network weights saved in a state (ours: ``network.safetensors``; musubi-tuner: ``model.safetensors``)."""
    from safetensors.torch import load_file

    for name in (NETWORK_FILE, *ACCELERATE_MODEL_FILES):
        path = state_dir / name
        if path.is_file():
            break
    else:
        raise UserError(f"{state_dir}: no network weights in the state ({NETWORK_FILE} or model.safetensors)")
    if path.suffix == ".bin":
        found = torch.load(path, map_location="cpu", weights_only=True)
    else:
        found = load_file(str(path))
    found = {k.removeprefix("module."): v for k, v in found.items()}
    current = network.state_dict()
    check_network_keys(current, found, path)
    network.load_state_dict(found, strict=True)


def read_train_state(state_dir: Path) -> TrainState | None:
    """``train_state.json`` (or musubi's proposed ``musubi_training_state.json``); None when neither exists."""
    for name in (TRAIN_STATE_FILE, MUSUBI_STATE_FILE):
        path = state_dir / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path}: not valid JSON ({e})") from None
            except OSError as e:
                raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
            if not isinstance(data, dict):
                raise UserError(f"{path}: expected a JSON object")
            if "current_step" not in data:
                data["current_step"] = data.get("global_step", 0)
            return TrainState.from_dict(data)
    return None


INCOMPLETE_SUFFIXES = (".tmp", ".old")  # save_state's work names: an interrupted save, never a state to resume


def resolve_state_dir(path: str) -> Path:
    """The ``--resume`` directory; a missing directory or an interrupted save (``*-state.tmp``) is a ``UserError``."""
    state_dir = Path(path)
    if state_dir.name.endswith(INCOMPLETE_SUFFIXES):
        raise UserError(
            f"--resume: {state_dir} is an incomplete save from an interrupted run (its name ends with "
            f"{state_dir.suffix}); resume from a complete state directory"
        )
    if not state_dir.is_dir():
        hint = ""
        tmp = state_dir.with_name(state_dir.name + ".tmp")
        if tmp.is_dir():
            hint = f" ({tmp} is an incomplete save from an interrupted run; resume from an earlier state)"
        raise UserError(f"--resume: state directory not found: {state_dir}{hint}")
    return state_dir


def verify_state_dir(state_dir: Path, process_index: int = 0) -> None:
    """Check every file of a state directory before anything is loaded from it (``UserError`` naming the file).

    ``accelerator.load_state`` skips an unreadable RNG file with a log line and resumes with fresh random states, so
    the run silently diverges; a truncated weights file would fail deep inside the loader. Here: the network weights
    must parse (``safetensors`` header and sizes), the optimizer / scheduler / RNG files written by
    ``accelerator.save_state`` must exist and pass their zip CRC check (``torch.save`` writes zip archives), and
    ``train_state.json`` must be valid JSON.
    """
    import zipfile

    from musubi_tuner.utils.safetensors_utils import open_weights

    required = ("optimizer.bin", "scheduler.bin", f"random_states_{process_index}.pkl")
    missing = [name for name in required if not (state_dir / name).is_file()]
    if missing:
        raise UserError(f"--resume {state_dir}: {', '.join(missing)} missing from the state (incomplete or not a state directory)")
    for path in sorted(state_dir.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            with open_weights(path) as reader:
                for key in reader.keys():
                    reader.get_tensor(key)  # reads every byte: a state's network is small
        elif path.suffix in (".bin", ".pkl", ".pt"):
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise UserError(f"--resume: {path} is unreadable ({e}); the state is damaged, resume from another one") from None
            if bad is not None:
                raise UserError(f"--resume: {path} is damaged (member {bad} fails its CRC check); resume from another state")
    read_train_state(state_dir)


def infer_train_state(
    scheduler_steps: int, num_processes: int, updates_per_epoch: int, grad_accum: int, batches: int
) -> TrainState:
    """For a musubi-tuner state without ``train_state.json``: position from the scheduler's step count."""
    step = scheduler_steps // max(1, num_processes)
    epoch_idx, in_epoch = divmod(step, max(1, updates_per_epoch))
    logger.warning(
        f"the state has no {TRAIN_STATE_FILE} (written by musubi-tuner?): inferred step {step} from the LR scheduler "
        f"({scheduler_steps} scheduler steps / {num_processes} processes), epoch {epoch_idx + 1}"
    )
    return TrainState(
        current_step=step,
        current_epoch=epoch_idx + 1,
        steps_in_epoch=min(batches, in_epoch * grad_accum),
        batches_per_epoch=batches,
        num_processes=num_processes,
        gradient_accumulation_steps=grad_accum,
    )
