"""Qwen-Image generator LoRA options: ``--include_patterns`` / ``--exclude_patterns`` (one regex per LoRA, upstream
semantics: keep what the include regex finds, then drop what the exclude regex finds) leave the filtered modules'
weights unchanged, both when merging while loading and with ``--save_merged_model``; ``--lycoris`` is a no-op (LoHa
files load without it)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from musubi_tuner.networks import loha
from musubi_tuner.networks.lora_qwen_image import create_arch_network
from musubi_tuner.networks.merge import build_lora_delta_hook
from musubi_tuner.qwen_image.configs import get_model_version
from musubi_tuner.qwen_image.models.loading import load_dit, model_keys
from musubi_tuner.qwen_image_generate_image import main

ORIGINAL = get_model_version("original")


def _randomised(net, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return net


@pytest.fixture(scope="module")
def adapters(qwen_bundle, tmp_path_factory):
    """A LoRA and a LoHa for the tiny DiT with random non-zero factors (kohya layout)."""
    dit = load_dit(ORIGINAL, qwen_bundle.dit, dtype=torch.float32)
    d = tmp_path_factory.mktemp("qi_filters")
    lora, loha_path = d / "lora.safetensors", d / "loha.safetensors"
    _randomised(create_arch_network(1.0, 4, 2, None, None, dit), 3).save_weights(str(lora), torch.float32, None)
    net = _randomised(loha.create_arch_network(1.0, 2, 2, None, None, dit), 4)
    net.save_weights(str(loha_path), torch.float32, {"ss_network_module": "networks.loha"})
    return lora, loha_path


def _changed(base: dict, merged: dict) -> set[str]:
    return {k for k in base if k.endswith(".weight") and not torch.equal(base[k], merged[k])}


def test_filters_while_loading_leave_excluded_modules_unchanged(qwen_bundle, adapters):
    lora, _ = adapters
    base = load_dit(ORIGINAL, qwen_bundle.dit, dtype=torch.float32).state_dict()

    def merged(**patterns):
        hook = build_lora_delta_hook([str(lora)], [1.0], model_keys(qwen_bundle.dit), **patterns)
        return load_dit(ORIGINAL, qwen_bundle.dit, dtype=torch.float32, lora_deltas=hook).state_dict()

    everything = _changed(base, merged())
    assert len(everything) == 2 * 12  # 12 Linears per block, 2 blocks
    no_mlp = _changed(base, merged(exclude_patterns=[r"img_mlp"]))
    assert no_mlp == {k for k in everything if "img_mlp" not in k} and len(no_mlp) == 20
    only_q = _changed(base, merged(include_patterns=[r"attn_to_q"], exclude_patterns=[r"blocks_1_"]))
    assert only_q == {"transformer_blocks.0.attn.to_q.weight"}


def _merge_cli(qwen_bundle, lora, out, *extra):
    argv = ["--dit", str(qwen_bundle.dit), "--text_encoder", str(qwen_bundle.text_encoder), "--save_path", str(out.parent)]
    main([*argv, "--lora_weight", str(lora), "--save_merged_model", str(out), "--device", "cpu", *extra])
    return load_file(str(out))


def test_save_merged_model_applies_the_patterns_per_lora(qwen_bundle, adapters, tmp_path):
    lora, loha_path = adapters
    base = load_file(str(qwen_bundle.dit))
    out = _merge_cli(qwen_bundle, lora, tmp_path / "a.safetensors", "--include_patterns", "txt_mlp")
    assert _changed(base, out) == {f"transformer_blocks.{i}.txt_mlp.net.{j}.weight" for i in (0, 1) for j in ("0.proj", "2")}
    # two LoRAs: the first pattern filters the first file only
    argv = ["--lora_weight", str(lora), str(loha_path), "--exclude_patterns", ".*", "--lora_multiplier", "1", "1"]
    both = _merge_cli(qwen_bundle, lora, tmp_path / "b.safetensors", *argv)
    only_loha = _merge_cli(qwen_bundle, loha_path, tmp_path / "c.safetensors")
    assert all(torch.equal(both[k], only_loha[k]) for k in base)


def test_lycoris_is_a_noop_and_loha_loads_without_it(qwen_bundle, adapters, tmp_path, caplog):
    _, loha_path = adapters
    base = load_file(str(qwen_bundle.dit))
    plain = _merge_cli(qwen_bundle, loha_path, tmp_path / "plain.safetensors")
    with caplog.at_level(logging.INFO):
        lyco = _merge_cli(qwen_bundle, loha_path, tmp_path / "lyco.safetensors", "--lycoris")
    assert "--lycoris: nothing to do" in caplog.text
    assert len(_changed(base, plain)) == 24
    assert all(torch.equal(plain[k], lyco[k]) for k in base)


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--include_patterns", "a", "b"], "--include_patterns has 2 patterns for 1 LoRA file"),
        (["--exclude_patterns", "(unclosed"], "--exclude_patterns: '(unclosed' is not a valid regular expression"),
    ],
)
def test_bad_patterns_are_refused_by_name(qwen_bundle, adapters, tmp_path, capsys, extra, expect):
    lora, _ = adapters
    with pytest.raises(SystemExit) as e:
        _merge_cli(qwen_bundle, lora, tmp_path / "x.safetensors", *extra)
    assert e.value.code != 0 and expect in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
