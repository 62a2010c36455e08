"""``estimate_memory.py train|generate <the usual arguments>``: the pre-flight memory estimate (docs/memory.md).

The arguments are those of the architecture's train or generate script, parsed and validated by that script exactly
as for a real run; the architecture is recognised from them (``--task``) or named with ``--arch``. Only file headers
are read and no CUDA context is created. Extra options: ``--gpu 24,32,48,80``, ``--suggest``, ``--frames_sweep``,
``--gpu_memory``, ``--memory_margin``, ``--estimate_json PATH``.

    python estimate_memory.py train --task k5-lite-t2v-5s-sd --dit k5.safetensors --dataset_config data.toml \\
        --network_module networks.lora_kandinsky --network_dim 32 --output_dir out --output_name x --suggest --gpu 24,48
"""

from __future__ import annotations

import importlib
import sys

from musubi_tuner.memory.hooks import ARCHITECTURES, hooks_for_argv
from musubi_tuner.utils.errors import UserError, cli_entry

USAGE = f"usage: estimate_memory.py {{train,generate}} [--arch {{{','.join(ARCHITECTURES)}}}] <arguments of the script>"


def _pop_arch(argv: list[str]) -> tuple[str | None, list[str]]:
    rest, arch = [], None
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a == "--arch":
            if i + 1 >= len(argv):
                raise UserError("--arch needs a value: " + ", ".join(ARCHITECTURES))
            arch = argv[i + 1]
            next(it, None)
        elif a.startswith("--arch="):
            arch = a.split("=", 1)[1]
        else:
            rest.append(a)
    return arch, rest


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Entry point (``argv`` defaults to ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__)
        return
    mode, rest = argv[0], argv[1:]
    if mode not in ("train", "generate"):
        raise UserError(f"first argument must be 'train' or 'generate', got {mode!r}\n{USAGE}")
    arch, rest = _pop_arch(rest)
    hooks = hooks_for_argv(rest, arch)
    target = hooks.train_script if mode == "train" else hooks.generate_script
    if not target:
        raise UserError(f"the memory estimator cannot model {hooks.name} {mode} yet")
    module, func = target.split(":")
    if "--estimate_memory" not in rest:
        rest.append("--estimate_memory")
    getattr(importlib.import_module(module), func)(rest)


if __name__ == "__main__":
    main()
