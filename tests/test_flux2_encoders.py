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


def _with_tiny_release(monkeypatch, flux2_bundle, kind="qwen3"):
    """The released-config table extended with the tiny encoder's config (what a real Qwen3 / Mistral entry holds)."""
    import json

    from musubi_tuner.flux_2 import text_encoders

    tiny = json.loads((getattr(flux2_bundle, f"text_encoder_{kind}") / "config.json").read_text())
    monkeypatch.setattr(text_encoders, "RELEASED_TEXT_CONFIGS", {**text_encoders.RELEASED_TEXT_CONFIGS, "tiny": tiny})


def test_bare_qwen3_file_config_from_shapes_and_tokenizer_search(flux2_bundle, bare_qwen3, monkeypatch):
    import shutil

    bare, tok = bare_qwen3
    v = get_model_version("klein-4b")
    # shapes match no released encoder: one message naming the shapes and the released ones
    with pytest.raises(
        UserError,
        match=r"qwen_3_tiny\.safetensors: no config.json.*hidden 16, 4 layers.*Qwen3-4B \(vocab 151936, hidden 2560, 36 layers\)",
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


def comfy_mistral3_state_dict(hf_dir):
    """The tiny HF Mistral 3 weights in the layout of ComfyUI's ``mistral_3_small_flux2_bf16.safetensors``: the language
    model under ``model.`` (``model.embed_tokens``, ``model.layers.N``, ``model.norm``), the vision tower and projector
    at the top level, and the tokenizer (``tekken.json``) embedded as the uint8 tensor ``tekken_model``."""
    from safetensors.torch import load_file

    out = {}
    for key, t in load_file(hf_dir / "model.safetensors").items():
        for hf, comfy in (("model.language_model.", "model."), ("language_model.model.", "model."), ("model.", "")):
            if key.startswith(hf):
                key = comfy + key[len(hf) :]
                break
        out[key.removeprefix("language_model.")] = t
    out["tekken_model"] = torch.tensor(list(b'{"config": "tiny"}'), dtype=torch.uint8)
    assert {"model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight", "model.norm.weight"} <= set(out)
    assert any(k.startswith("vision_tower.") for k in out) and any(k.startswith("multi_modal_projector.") for k in out)
    return out


@pytest.fixture()
def bare_mistral3(flux2_bundle, tmp_path):
    """ComfyUI-style dev encoder: one bare file, no config.json; the tokenizer in another folder (FLUX.2-dev's
    ``tokenizer/``)."""
    import shutil

    from safetensors.torch import save_file

    src = flux2_bundle.text_encoder_mistral3
    (tmp_path / "text_encoders").mkdir()
    bare = tmp_path / "text_encoders" / "mistral_3_small_flux2_bf16.safetensors"
    save_file(comfy_mistral3_state_dict(src), str(bare))
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tok / f)
    return bare, tok


@pytest.mark.parametrize("fp8, pruned", [(False, False), (True, False), (False, True)], ids=["bf16", "fp8", "pruned"])
def test_bare_mistral3_file_equals_the_hf_directory(flux2_bundle, bare_mistral3, monkeypatch, fp8, pruned):
    """bf16 and ``--fp8_text_encoder``; ``pruned``: ComfyUI's pruned variant (the layers after the last one read and the
    final norm removed), recognised through ``BARE_LAYER_COUNTS`` (the tiny 4-layer model reads up to layer 3)."""
    from safetensors.torch import load_file, save_file

    from musubi_tuner.flux_2 import text_encoders

    bare, tok = bare_mistral3
    v = get_model_version("dev")
    _with_tiny_release(monkeypatch, flux2_bundle, "mistral3")
    if pruned:
        sd = {k: t for k, t in load_file(bare).items() if not k.startswith("model.layers.3.") and k != "model.norm.weight"}
        save_file(sd, str(bare))
        with pytest.raises(UserError, match=r"vocab 640, hidden 16, 3 layers\) match no released"):
            Flux2TextEncoder(bare, v, tokenizer=str(tok))
        monkeypatch.setattr(text_encoders, "BARE_LAYER_COUNTS", {"tiny": (3,)})
    want = Flux2TextEncoder(flux2_bundle.text_encoder_mistral3, v, dtype=torch.bfloat16, fp8=fp8).encode(PROMPTS)
    enc = Flux2TextEncoder(bare, v, dtype=torch.bfloat16, fp8=fp8, tokenizer=str(tok))
    assert enc.kind == "mistral3" and enc.layers == (1, 2, 3)
    assert any(p.dtype == torch.float8_e4m3fn for p in enc.model.parameters()) == fp8
    assert torch.equal(enc.encode(PROMPTS), want)


def test_bare_mistral3_file_of_unknown_shapes_names_the_known_configs(bare_mistral3, flux2_bundle, monkeypatch):
    bare, tok = bare_mistral3
    with pytest.raises(
        UserError,
        match=r"mistral_3_small_flux2_bf16\.safetensors: no config.json beside this single file \(--text_encoder\) and its "
        r"tensors \(vocab 640, hidden 16, 4 layers\) match no released text encoder.*Qwen3-4B .*"
        r"Mistral-Small-3\.x-24B \(vocab 131072, hidden 5120, 40 or 30 layers\)",
    ):
        Flux2TextEncoder(bare, get_model_version("dev"), tokenizer=str(tok))
    _with_tiny_release(monkeypatch, flux2_bundle, "mistral3")  # recognised, but it is not what klein needs
    with pytest.raises(UserError, match=r"--text_encoder is Mistral 3.*klein-4b needs a Qwen3"):
        Flux2TextEncoder(bare, get_model_version("klein-4b"), tokenizer=str(tok))


def test_released_mistral_small_config_builds_the_24b_decoder():
    """The table entry a real ``mistral_3_small_flux2_bf16.safetensors`` matches gives the released 24B geometry."""
    from musubi_tuner.flux_2 import text_encoders as te

    cfg = te.RELEASED_TEXT_CONFIGS["Mistral-Small-3.x-24B"]
    text = te.check_encoder_for_version(cfg, get_model_version("dev"), "mistral_3_small_flux2_bf16.safetensors")
    model = te._build_decoder("mistral3", text, 2)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert tuple(model.embed_tokens.weight.shape) == (131072, 5120)
    assert (attn.q_proj.out_features, attn.k_proj.out_features, mlp.gate_proj.out_features) == (32 * 128, 8 * 128, 32768)
    te._init_rotary_buffers(model, torch.device("cpu"))
    inv_freq = model.rotary_emb.inv_freq.double()  # RoPE θ 1e9 over head_dim 128: θ^(-2i/128)
    assert torch.allclose(inv_freq[[1, 63]], torch.tensor([1e9 ** (-2 / 128), 1e9 ** (-126 / 128)], dtype=torch.float64))
    assert model.norm.variance_epsilon == 1e-5 and model.config.sliding_window is None


def test_bare_mistral3_file_through_the_cache_script(flux2_bundle, bare_mistral3, tmp_path, monkeypatch):
    """``flux_2_cache_text_encoder_outputs.py --text_encoder mistral_3_small_flux2_bf16.safetensors --tokenizer DIR``
    caches what the HF directory encodes."""
    from safetensors.torch import load_file

    from musubi_tuner.dataset.cache_format import te_cache_glob
    from musubi_tuner.demo.flux2_data import write_flux2_dataset
    from musubi_tuner.flux_2.configs import ARCH
    from musubi_tuner.flux_2_cache_text_encoder_outputs import main

    bare, tok = bare_mistral3
    _with_tiny_release(monkeypatch, flux2_bundle, "mistral3")
    data = write_flux2_dataset(tmp_path / "data", n_images=1)
    main(["--dataset_config", str(data.t2i_toml), "--model_version", "dev", "--text_encoder", str(bare), "--tokenizer",
          str(tok), "--device", "cpu"])  # fmt: skip
    (cache,) = data.t2i_cache_dir.glob(te_cache_glob(ARCH))
    (ctx,) = load_file(cache).values()
    want = Flux2TextEncoder(flux2_bundle.text_encoder_mistral3, get_model_version("dev")).encode(list(data.captions.values()))
    assert torch.equal(ctx, want[0].to(ctx.dtype))


@pytest.mark.parametrize(
    "kind, version, new_spelling",
    [("qwen3", "klein-4b", False), ("qwen3", "klein-4b", True), ("mistral3", "dev", False)],
    ids=["qwen3-scale_weight", "qwen3-weight_scale", "mistral3"],
)
def test_scaled_fp8_file_loads_as_its_dequantised_weights(flux2_bundle, tmp_path, monkeypatch, kind, version, new_spelling):
    """ComfyUI's fp8 text-encoder files (``qwen_3_4b_fp8_scaled``, ``mistral_3_small_flux2_fp8``): every Linear of the
    decoder layers per-tensor scaled fp8, bare, the config inferred from the shapes. Equal to the bf16 file of
    ``q · scale``, dequantised (no flag) or kept in fp8 (``--fp8_text_encoder``)."""
    from safetensors.torch import load_file
    from scaled_fp8_files import write_scaled_fp8_pair

    src = getattr(flux2_bundle, f"text_encoder_{kind}")
    folder = tmp_path / "text_encoders"
    folder.mkdir()
    _with_tiny_release(monkeypatch, flux2_bundle, kind)
    weights = load_file(src / "model.safetensors") if kind == "qwen3" else comfy_mistral3_state_dict(src)
    scaled, reference = folder / f"{kind}_fp8_scaled.safetensors", folder / f"{kind}_dequantised.safetensors"
    done = write_scaled_fp8_pair(
        weights, lambda k: "layers." in k and "norm" not in k, scaled, reference,
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
