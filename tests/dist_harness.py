"""Run any architecture's trainer with noise and timesteps fixed per item, for multi-process comparisons.

``python tests/dist_harness.py musubi_tuner.kandinsky5_train_network:Kandinsky5NetworkTrainer <trainer argv>`` (under
``torchrun`` or ``accelerate launch``) trains with the real trainer class of that script, except that each item's
noise and ``t`` come from a hash of its cache file name, so a run with N processes and a one-process run over the
same global batch (gradient accumulation N) see identical inputs. Each process appends ``{"items", "loss"}`` per
training forward to ``<output_dir>/losses_<process>.jsonl``. The script module must offer ``setup_parser()``.

``python tests/dist_harness.py runs <plan.json>`` trains the runs of a JSON list of ``[spec, argv]`` one after the
other in the same processes (one launch, one process group, for several architectures).

``python tests/dist_harness.py cache-toy <dataset_config> <record_dir> [--skip_corrupt]`` caches the toy architecture's
dataset through the shared caching drivers and records which process encoded which item.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from musubi_tuner.training.args import read_config_from_file
from musubi_tuner.utils.errors import cli_entry


def item_seed(cache_path: str) -> int:
    return int(hashlib.sha256(Path(cache_path).name.encode()).hexdigest()[:8], 16)


def fixed_noise_trainer(trainer_cls: type) -> type:
    """A subclass of ``trainer_cls`` whose training forwards use per-item noise/timesteps and record their losses."""

    class FixedNoiseTrainer(trainer_cls):  # type: ignore[misc, valid-type]
        def process_batch(self, args, accelerator, transformer, latents, batch, noise, network_dtype, timesteps=None):
            if timesteps is not None:  # validation: already deterministic
                return super().process_batch(args, accelerator, transformer, latents, batch, noise, network_dtype, timesteps)
            seeds = [item_seed(k) for k in batch["item_keys"]]
            noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
            t = torch.tensor([0.05 + 0.9 * (s % 1000) / 1000 for s in seeds])
            noise = noise.to(latents.device, latents.dtype)
            loss, metrics = super().process_batch(args, accelerator, transformer, latents, batch, noise, network_dtype, t)
            self._forwards = getattr(self, "_forwards", -1) + 1
            record = {"forward": self._forwards, "items": [Path(k).name for k in batch["item_keys"]], "loss": float(loss.detach())}
            path = Path(args.output_dir) / f"losses_{accelerator.process_index}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            return loss, metrics

    FixedNoiseTrainer.__name__ = f"FixedNoise{trainer_cls.__name__}"
    return FixedNoiseTrainer


def resolve(spec: str) -> tuple[Any, type]:
    """``module:TrainerClass`` → (module, class)."""
    module_name, cls_name = spec.split(":")
    module = importlib.import_module(module_name)
    return module, getattr(module, cls_name)


def run(spec: str, argv: list[str]) -> None:
    """Parse ``argv`` with the script's parser and train with the fixed-noise subclass of its trainer."""
    module, cls = resolve(spec)
    parser = module.setup_parser()
    args = read_config_from_file(parser.parse_args(argv), parser, argv)
    fixed_noise_trainer(cls)().train(args)


def read_losses(output_dir: Path, accumulation: int = 1) -> dict[str, list[tuple[int, float]]]:
    """Per item (batch), ``(optimizer step, loss)`` of its training forwards in step order, over every process's
    record; forward ``k`` of a process belongs to step ``k // accumulation``."""
    per_item: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(output_dir).glob("losses_*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            per_item.setdefault("+".join(rec["items"]), []).append((rec["forward"] // accumulation, rec["loss"]))
    return {k: sorted(v) for k, v in per_item.items()}


def runs_in_one_group(plan: list[tuple[str, list[str]]]) -> None:
    """Train the runs of ``plan`` one after the other in one process group. ``Accelerator.end_training`` destroys
    the group, and a second rendezvous on the launcher's store hangs, so the group is kept until the last run ends."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda group=None: None
    try:
        for spec, argv in plan:
            run(spec, argv)
    finally:
        dist.destroy_process_group = destroy
    if dist.is_initialized():
        destroy()


def cache_toy(dataset_config: str, record_dir: str, skip_corrupt: bool = False) -> None:
    """Cache a toy dataset through the shared latent and text drivers; each process records the items it encoded
    in ``<record_dir>/encoded_<process>.txt`` (one ``latent:<name>`` / ``text:<name>`` per line)."""
    import argparse
    import os

    from toy_arch import ARCH, encode_pixels, encode_text

    from musubi_tuner.dataset.latent_caching import cache_latents
    from musubi_tuner.dataset.text_caching import cache_text_encoder_outputs

    record = Path(record_dir) / f"encoded_{os.environ.get('RANK', '0')}.txt"
    record.parent.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(
        dataset_config=dataset_config,
        num_workers=1,
        skip_existing=False,
        keep_cache=False,
        batch_size=None,
        skip_corrupt=skip_corrupt,
    )

    def latents(batch):
        with record.open("a", encoding="utf-8") as f:
            f.writelines(f"latent:{it.cache_path.name}\n" for it in batch.items)
        lat = encode_pixels(batch.pixels)
        return [{"latents": lat[i]} for i in range(lat.shape[0])]

    def texts(items):
        with record.open("a", encoding="utf-8") as f:
            f.writelines(f"text:{it.cache_path.name}\n" for it in items)
        return [{"varlen_ctx": encode_text(it.caption)} for it in items]

    cache_latents(ns, architecture=ARCH, encode=latents)
    cache_text_encoder_outputs(ns, architecture=ARCH, encode=texts)


@cli_entry
def main() -> None:
    if sys.argv[1] == "cache-toy":
        cache_toy(sys.argv[2], sys.argv[3], skip_corrupt="--skip_corrupt" in sys.argv[4:])
    elif sys.argv[1] == "runs":
        runs_in_one_group(json.loads(Path(sys.argv[2]).read_text(encoding="utf-8")))
    else:
        run(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
    main()
