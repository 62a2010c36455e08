"""FLUX.2 text encoders: parity with diffusers' prompt-embedding functions, fp8 for Qwen3 and Mistral 3, bad inputs."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from transformers import AutoTokenizer, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from musubi_tuner.flux_2.configs import get_model_version
from musubi_tuner.flux_2.text_encoders import Flux2TextEncoder, output_layers_for
from musubi_tuner.utils.errors import UserError

PROMPTS = ["a red cube on a wooden table", "two cats"]


def test_output_layer_remap():
    assert output_layers_for("qwen3", (9, 18, 27), 36) == (9, 18, 27)
    assert output_layers_for("qwen3", (9, 18, 27), 4) == (1, 2, 3)
    assert output_layers_for("mistral3", (10, 20, 30), 40) == (10, 20, 30)
    assert output_layers_for("mistral3", (10, 20, 30), 4) == (1, 2, 3)


def test_qwen3_matches_diffusers_klein(flux2_bundle):
    path = flux2_bundle.text_encoder_qwen3
    ours = Flux2TextEncoder(path, get_model_version("klein-9b"), dtype=torch.float32).encode(PROMPTS)
    model = Qwen3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(model, tok, PROMPTS, hidden_states_layers=(1, 2, 3))
    assert ours.shape == ref.shape == (2, 512, 48)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_mistral3_matches_diffusers_dev(flux2_bundle):
    path = flux2_bundle.text_encoder_mistral3
    ours = Flux2TextEncoder(path, get_model_version("dev"), dtype=torch.float32).encode(PROMPTS)
    model = Mistral3ForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        ref = Flux2Pipeline._get_mistral_3_small_prompt_embeds(model, tok, PROMPTS, hidden_states_layers=(1, 2, 3))
    assert ours.shape == ref.shape == (2, 512, 48)
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("kind, version", [("qwen3", "klein-4b"), ("mistral3", "dev")])
def test_fp8_text_encoder_close_to_bf16(flux2_bundle, kind, version):
    path = getattr(flux2_bundle, f"text_encoder_{kind}")
    v = get_model_version(version)
    bf16 = Flux2TextEncoder(path, v, dtype=torch.bfloat16).encode(PROMPTS).float()
    enc = Flux2TextEncoder(path, v, dtype=torch.bfloat16, fp8=True)
    fp8_weights = [n for n, p in enc.model.named_parameters() if p.dtype == torch.float8_e4m3fn]
    assert fp8_weights and all(n.startswith("layers.") for n in fp8_weights)
    fp8 = enc.encode(PROMPTS).float()
    rel = (fp8 - bf16).norm() / bf16.norm()
    assert 0 < rel.item() < 0.1


def test_wrong_encoder_for_version(flux2_bundle):
    with pytest.raises(UserError, match=r"text_encoder_mistral3: --text_encoder is Mistral 3.*klein-4b needs a Qwen3"):
        Flux2TextEncoder(flux2_bundle.text_encoder_mistral3, get_model_version("klein-4b"))
    with pytest.raises(UserError, match=r"--text_encoder is Qwen3, but --model_version dev needs a Mistral 3"):
        Flux2TextEncoder(flux2_bundle.text_encoder_qwen3, get_model_version("dev"))
    with pytest.raises(UserError, match="no config.json"):
        Flux2TextEncoder(flux2_bundle.root / "dit", get_model_version("dev"))


@pytest.fixture()
def bare_qwen3(flux2_bundle, tmp_path):
    """ComfyUI-style: the Qwen3 weights as one bare file, no config.json beside it; the tokenizer elsewhere."""
    import shutil

    src = flux2_bundle.text_encoder_qwen3
    (tmp_path / "text_encoders").mkdir()
    bare = tmp_path / "text_encoders" / "qwen_3_tiny.safetensors"
    shutil.copy(src / "model.safetensors", bare)
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tok / f)
    return bare, tok


def _with_tiny_release(monkeypatch, flux2_bundle):
    """The released-config table extended with the tiny encoder's config (what a real Qwen3-4B/8B entry holds)."""
    import json

    from musubi_tuner.flux_2 import text_encoders

    tiny = json.loads((flux2_bundle.text_encoder_qwen3 / "config.json").read_text())
    monkeypatch.setattr(text_encoders, "RELEASED_QWEN3_CONFIGS", {**text_encoders.RELEASED_QWEN3_CONFIGS, "tiny": tiny})


def test_bare_qwen3_file_config_from_shapes_and_tokenizer_search(flux2_bundle, bare_qwen3, monkeypatch):
    import shutil

    bare, tok = bare_qwen3
    v = get_model_version("klein-4b")
    # shapes match no released encoder: one message naming the shapes and the released ones
    with pytest.raises(
        UserError, match=r"qwen_3_tiny\.safetensors: no config.json.*hidden 16, 4 layers.*Qwen3-4B \(hidden 2560, 36 layers\)"
    ):
        Flux2TextEncoder(bare, v, tokenizer=str(tok))
    _with_tiny_release(monkeypatch, flux2_bundle)
    # no tokenizer beside the file: the message names where it looked and what to pass
    with pytest.raises(
        UserError,
        match=r"no tokenizer for this single text-encoder file.*text_encoders or .*text_encoders/tokenizer.*--tokenizer DIR",
    ):
        Flux2TextEncoder(bare, v)
    with pytest.raises(UserError, match=r"nowhere: tokenizer directory not found \(--tokenizer\)"):
        Flux2TextEncoder(bare, v, tokenizer=str(tok.parent / "nowhere"))
    ref = Flux2TextEncoder(flux2_bundle.text_encoder_qwen3, v, dtype=torch.float32).encode(PROMPTS)
    explicit = Flux2TextEncoder(bare, v, dtype=torch.float32, tokenizer=str(tok)).encode(PROMPTS)
    shutil.copytree(tok, bare.parent / "tokenizer")  # <file dir>/tokenizer is found without the flag
    found = Flux2TextEncoder(bare, v, dtype=torch.float32).encode(PROMPTS)
    assert torch.equal(explicit, ref) and torch.equal(found, ref)


def test_bare_qwen3_file_through_the_cache_script(flux2_bundle, bare_qwen3, monkeypatch):
    """``--text_encoder qwen_3_4b.safetensors --tokenizer DIR`` reaches the encoder from the script's command line."""
    from musubi_tuner.flux_2_cache_text_encoder_outputs import TextEncoderRun, setup_parser

    bare, tok = bare_qwen3
    _with_tiny_release(monkeypatch, flux2_bundle)
    argv = ["--dataset_config", "x.toml", "--model_version", "klein-4b", "--text_encoder", str(bare), "--tokenizer", str(tok),
            "--device", "cpu"]  # fmt: skip
    run = TextEncoderRun(setup_parser().parse_args(argv))
    assert run.encoder.hidden_size == 16 and run.encoder.cache_metadata()["flux2_text_encoder"] == "qwen3-16"


@pytest.mark.parametrize(
    "kind, version, new_spelling",
    [("qwen3", "klein-4b", False), ("qwen3", "klein-4b", True), ("mistral3", "dev", False)],
    ids=["qwen3-scale_weight", "qwen3-weight_scale", "mistral3"],
)
def test_scaled_fp8_file_loads_as_its_dequantised_weights(flux2_bundle, tmp_path, monkeypatch, kind, version, new_spelling):
    """ComfyUI's fp8 text-encoder files: every Linear of the decoder layers per-tensor scaled fp8 (the bare Qwen3 file
    with its config inferred from the shapes; Mistral's with its config.json beside it). Equal to the bf16 file of
    ``q · scale``, dequantised (no flag) or kept in fp8 (``--fp8_text_encoder``)."""
    import shutil

    from safetensors.torch import load_file
    from scaled_fp8_files import write_scaled_fp8_pair

    src = getattr(flux2_bundle, f"text_encoder_{kind}")
    folder = tmp_path / "text_encoders"
    folder.mkdir()
    if kind == "qwen3":
        _with_tiny_release(monkeypatch, flux2_bundle)
    else:
        shutil.copy(src / "config.json", folder / "config.json")
    scaled, reference = folder / f"{kind}_fp8_scaled.safetensors", folder / f"{kind}_dequantised.safetensors"
    done = write_scaled_fp8_pair(
        load_file(src / "model.safetensors"), lambda k: "layers." in k and "norm" not in k, scaled, reference,
        new_spelling=new_spelling,
    )  # fmt: skip
    assert any(k.endswith("layers.3.mlp.down_proj.weight") for k in done)
    v = get_model_version(version)
    want = Flux2TextEncoder(reference, v, dtype=torch.bfloat16, tokenizer=str(src)).encode(PROMPTS)
    for fp8 in (False, True):
        enc = Flux2TextEncoder(scaled, v, dtype=torch.bfloat16, fp8=fp8, tokenizer=str(src))
        fp8_weights = [n for n, p in enc.model.named_parameters() if p.dtype == torch.float8_e4m3fn]
        assert len(fp8_weights) == (3 * 7 if fp8 else 0)  # the 3 layers built, 7 Linears each
        assert torch.equal(enc.encode(PROMPTS), want), fp8


def test_scaled_fp8_comfy_quant_of_another_format_is_refused(flux2_bundle, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file
    from scaled_fp8_files import write_scaled_fp8_pair

    src = flux2_bundle.text_encoder_qwen3
    _with_tiny_release(monkeypatch, flux2_bundle)
    scaled = tmp_path / "qwen_3_fp8.safetensors"
    write_scaled_fp8_pair(
        load_file(src / "model.safetensors"), lambda k: "layers." in k and "norm" not in k, scaled, tmp_path / "ref.safetensors",
        new_spelling=True,
    )  # fmt: skip
    sd = load_file(scaled)
    sd["model.layers.0.mlp.up_proj.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(sd, str(scaled))
    with pytest.raises(UserError, match=r"'model.layers.0.mlp.up_proj.comfy_quant' declares quantisation format 'nvfp4'"):
        Flux2TextEncoder(scaled, get_model_version("klein-4b"), tokenizer=str(src))
