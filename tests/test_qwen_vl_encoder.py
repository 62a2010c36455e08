"""Qwen2.5-VL loading for Qwen-Image: streamed into a meta model (bf16 identical to transformers' ``from_pretrained``,
``--fp8_vl`` quantised while streaming), ComfyUI's single file with an inferred config, and the release's template
tokenisation (prefix drops 34 / 64, one ``<|image_pad|>`` per merged patch) on the tiny encoder built with the
release's token ids."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from scaled_fp8_files import write_scaled_fp8_pair

from musubi_tuner.memory.generation import text_encoder_bytes
from musubi_tuner.qwen_image import vl_loading
from musubi_tuner.qwen_image.configs import MODEL_VERSIONS
from musubi_tuner.qwen_image.text_encoders import QwenVLEncoder, format_prompt
from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.hf_sources import single_file_tokenizer

T2I, EDIT, EDIT_PLUS = MODEL_VERSIONS["original"], MODEL_VERSIONS["edit"], MODEL_VERSIONS["edit-2509"]
PROMPTS = ["a red circle on a blue background", "a yellow triangle"]


def _image(size=(64, 48), color=(200, 30, 30)):
    return Image.new("RGB", size, color)


@pytest.fixture(scope="module")
def encoder(qwen_bundle):
    return QwenVLEncoder(qwen_bundle.text_encoder, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def reference(qwen_bundle, encoder):
    """The same snapshot loaded by transformers' ``from_pretrained`` (the previous loading path)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_bundle.text_encoder, dtype=torch.bfloat16).eval()
    ref = object.__new__(QwenVLEncoder)
    ref.__dict__.update(encoder.__dict__, model=model)
    return ref


def test_streamed_bf16_equals_from_pretrained(encoder, reference):
    for version, images in ((T2I, None), (EDIT_PLUS, [[_image()], [_image((40, 72)), _image()]])):
        ours = encoder.encode(PROMPTS, version, images=images)
        ref = reference.encode(PROMPTS, version, images=images)
        assert [o.shape for o in ours] == [r.shape for r in ref]
        for o, r in zip(ours, ref):
            assert torch.equal(o, r)


def test_fp8_vl_quantises_language_linears_while_streaming(qwen_bundle, encoder):
    fp8 = QwenVLEncoder(qwen_bundle.text_encoder, dtype=torch.bfloat16, fp8_vl=True)
    dtypes = {n: p.dtype for n, p in fp8.model.named_parameters()}
    assert dtypes["model.language_model.layers.0.mlp.gate_proj.weight"] == torch.float8_e4m3fn
    assert dtypes["model.language_model.layers.1.self_attn.q_proj.weight"] == torch.float8_e4m3fn
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight", "model.visual.blocks.0.attn.qkv.weight"):
        assert dtypes[name] == torch.bfloat16
    for version, images in ((T2I, None), (EDIT, [[_image()], [_image()]])):
        for q, r in zip(fp8.encode(PROMPTS, version, images=images), encoder.encode(PROMPTS, version, images=images)):
            assert q.shape == r.shape
            assert (q - r).abs().max() / r.abs().max() < 0.05


def _comfy_file(qwen_bundle, tmp_path, *, new_layout: bool = False):
    """The bundle's weights as one file without config.json (ComfyUI layout), tokenizer files in ``tokenizer/``."""
    folder = tmp_path / "text_encoders"
    (folder / "tokenizer").mkdir(parents=True)
    sd = load_file(qwen_bundle.text_encoder / "model.safetensors")
    assert any(k.startswith("model.layers.") for k in sd) and any(k.startswith("visual.") for k in sd)
    if new_layout:  # transformers >= 4.52 in-memory names
        sd = {("model.language_model." + k[6:] if k.startswith("model.") else "model." + k if k.startswith("visual.") else k): v
              for k, v in sd.items()}  # fmt: skip
    save_file(sd, folder / "qwen_2.5_vl_7b.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_bundle.text_encoder / name, folder / "tokenizer" / name)
    return folder / "qwen_2.5_vl_7b.safetensors"


@pytest.fixture
def tiny_release_table(qwen_bundle, monkeypatch):
    """The config table extended with the tiny encoder's entry (same lookup as for the 7B file)."""
    cfg = json.loads((qwen_bundle.text_encoder / "config.json").read_text())
    with vl_loading.open_weights(qwen_bundle.text_encoder / "model.safetensors") as reader:
        sig = vl_loading.file_signature(reader)
    assert sig == (152064, 32, 2, 32, 2)
    monkeypatch.setitem(vl_loading.RELEASED_VL_CONFIGS, sig, cfg)


@pytest.mark.parametrize("new_layout", [False, True])
def test_single_file_loads_like_the_snapshot(qwen_bundle, encoder, tiny_release_table, tmp_path, new_layout):
    path = _comfy_file(qwen_bundle, tmp_path, new_layout=new_layout)
    single = QwenVLEncoder(path, dtype=torch.bfloat16, vl_processor=None)
    assert single.source.single_file and single.source.tokenizer == path.parent / "tokenizer"
    for o, r in zip(single.encode(PROMPTS, T2I), encoder.encode(PROMPTS, T2I)):
        assert torch.equal(o, r)


def _scaled_fp8_files(qwen_bundle, tmp_path, **kw):
    """ComfyUI's ``qwen_2.5_vl_7b_fp8_scaled`` layout: every Linear of the language model, the vision blocks and the
    merger per-tensor scaled fp8 (embedding, norms, patch conv, lm_head bf16); with the bf16 file of ``q · scale``."""
    plain = _comfy_file(qwen_bundle, tmp_path)
    scaled, reference = plain.parent / "qwen_2.5_vl_7b_fp8_scaled.safetensors", plain.parent / "dequantised.safetensors"
    sd = {k: v.to(torch.bfloat16) for k, v in load_file(plain).items()}  # the tiny bundle is float32; ComfyUI's is bf16
    done = write_scaled_fp8_pair(
        sd, lambda k: k.startswith(("model.layers.", "visual.blocks.", "visual.merger.")), scaled, reference, **kw
    )
    assert "model.layers.1.self_attn.q_proj.weight" in done and "visual.blocks.0.attn.qkv.weight" in done
    return scaled, reference


def test_scaled_fp8_single_file_loads_as_its_dequantised_weights(qwen_bundle, tiny_release_table, tmp_path):
    scaled, reference = _scaled_fp8_files(qwen_bundle, tmp_path)
    proc = qwen_bundle.text_encoder  # the image processor, for the vision tower
    ref = QwenVLEncoder(reference, dtype=torch.bfloat16, vl_processor=proc)
    deq = QwenVLEncoder(scaled, dtype=torch.bfloat16, vl_processor=proc)  # no --fp8_vl: bf16 while streaming
    assert {p.dtype for p in deq.model.parameters()} == {torch.bfloat16}
    assert not any(hasattr(m, "scale_weight") for m in deq.model.modules())
    fp8 = QwenVLEncoder(scaled, dtype=torch.bfloat16, fp8_vl=True, vl_processor=proc)  # the file's fp8 weights and scales as stored
    for name in ("model.language_model.layers.0.mlp.gate_proj", "model.visual.blocks.1.attn.qkv"):
        lin = fp8.model.get_submodule(name)
        assert lin.weight.dtype == torch.float8_e4m3fn and lin.scale_weight.shape == (1,)
    with vl_loading.open_weights(scaled) as r:  # no dequantise → requantise round trip
        q = r.get_tensor("model.layers.0.mlp.gate_proj.weight")
        assert torch.equal(
            fp8.model.get_submodule("model.language_model.layers.0.mlp.gate_proj").weight.view(torch.uint8), q.view(torch.uint8)
        )
    # the memory estimator sizes both loads from the headers (the file's scalar scales aside)
    scales = [m.scale_weight for m in fp8.model.modules() if hasattr(m, "scale_weight")]
    for enc, flag in ((deq, False), (fp8, True)):
        loaded = sum(
            t.numel() * t.element_size()
            for t in [*(p for _, p in enc.model.named_parameters(remove_duplicate=False)), *(scales if flag else [])]
        )
        assert 0 <= text_encoder_bytes(scaled, flag) - loaded <= 8 * len(scales)
    for version, prompts, imgs in ((T2I, PROMPTS, None), (EDIT, PROMPTS[:1], [[_image((28, 28))]])):
        want = ref.encode(prompts, version, images=imgs)
        for enc in (deq, fp8):
            for got, w in zip(enc.encode(prompts, version, images=imgs), want, strict=True):
                assert torch.equal(got, w)


def test_scaled_fp8_scale_without_its_weight_is_refused(qwen_bundle, tiny_release_table, tmp_path):
    scaled, _ = _scaled_fp8_files(qwen_bundle, tmp_path)
    sd = load_file(scaled)
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}, scaled)
    with pytest.raises(
        UserError, match=r"fp8_scaled.safetensors: fp8 scale 'model.layers.1.mlp.up_proj.scale_weight' has no weight"
    ):
        QwenVLEncoder(scaled)
    save_file({**sd, "model.layers.1.mlp.nothing.scale_weight": torch.tensor(1.0)}, scaled)  # unknown stays an error
    with pytest.raises(UserError, match=r"1 unexpected key\(s\).*model.layers.1.mlp.nothing.scale_weight"):
        QwenVLEncoder(scaled)


def test_released_7b_signature_gives_the_release_config():
    cfg = vl_loading.RELEASED_VL_CONFIGS[(152064, 3584, 28, 1280, 32)]
    from transformers import Qwen2_5_VLConfig

    c = Qwen2_5_VLConfig(**cfg)
    assert (c.text_config.num_key_value_heads, c.text_config.intermediate_size, c.image_token_id) == (4, 18944, 151655)
    assert c.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert c.vision_config.fullatt_block_indexes == [7, 15, 23, 31]


def test_single_file_of_unknown_size_is_refused(qwen_bundle, tmp_path):
    path = _comfy_file(qwen_bundle, tmp_path)
    with pytest.raises(
        UserError, match=r"qwen_2.5_vl_7b.safetensors: a single-file Qwen2.5-VL of unknown size \(vocab 152064, hidden 32"
    ):
        QwenVLEncoder(path)


def test_single_file_tokenizer_search_order(qwen_bundle, tmp_path):
    weights = tmp_path / "te" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    with pytest.raises(UserError) as e:
        single_file_tokenizer(weights, None, "--text_encoder", tokenizer_flag="--vl_processor")
    msg = str(e.value)
    assert str(weights.parent) in msg and str(weights.parent / "tokenizer") in msg and "--vl_processor" in msg
    explicit = tmp_path / "tok"
    shutil.copytree(qwen_bundle.text_encoder, explicit)
    shutil.copy(qwen_bundle.text_encoder / "tokenizer.json", weights.parent / "tokenizer.json")
    assert single_file_tokenizer(weights, str(explicit), "--text_encoder", tokenizer_flag="--vl_processor") == explicit
    assert single_file_tokenizer(weights, None, "--text_encoder", tokenizer_flag="--vl_processor") == weights.parent
    with pytest.raises(UserError, match=r"missing: tokenizer directory not found \(--vl_processor\)"):
        single_file_tokenizer(weights, str(tmp_path / "missing"), "--text_encoder", tokenizer_flag="--vl_processor")


def test_tiny_encoder_has_the_release_token_ids(encoder):
    tok, cfg = encoder.tokenizer, encoder.model.config
    assert cfg.text_config.vocab_size == 152064
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                        "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}  # fmt: skip
    assert list(ids.values()) == [151643, 151644, 151645, 151652, 151653, 151655, 151656]
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id) == (151655, 151656, 151652)


def test_template_prefix_drops_the_release_token_counts(encoder):
    assert encoder.drop_tokens(T2I) == 34
    assert encoder.drop_tokens(EDIT) == encoder.drop_tokens(EDIT_PLUS) == 64
    tok = encoder.tokenizer
    inputs = encoder._inputs([format_prompt("a yellow triangle", T2I)], None, T2I)
    assert inputs["input_ids"][0, 34:].tolist() == tok("a yellow triangle<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    inputs = encoder._inputs([format_prompt("x", EDIT, 1)], [[_image()]], EDIT)
    assert inputs["input_ids"][0, 64].item() == 151652  # the kept part starts at <|vision_start|>
    inputs = encoder._inputs([format_prompt("x", EDIT_PLUS, 1)], [[_image()]], EDIT_PLUS)
    assert tok.decode(inputs["input_ids"][0, 64:68]) == "Picture 1:"


def test_one_image_pad_per_merged_patch(encoder):
    grid = encoder.image_processor()(images=[_image((56, 56))], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]  # the spec's check: a 56x56 image is 4 image tokens
    images = [[_image((64, 48)), _image((32, 96))]]
    inputs = encoder._inputs([format_prompt("blend them", EDIT_PLUS, 2)], images, EDIT_PLUS)
    per_image = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    assert (inputs["input_ids"] == 151655).sum().item() == sum(per_image)
    ids = inputs["input_ids"][0].tolist()
    starts = [i for i, t in enumerate(ids) if t == 151652]
    assert [ids[s + 1 : s + 1 + n].count(151655) for s, n in zip(starts, per_image)] == per_image
    assert [ids[s + 1 + n] for s, n in zip(starts, per_image)] == [151653, 151653]


def test_another_model_type_is_refused_by_name(qwen_bundle, tmp_path):
    te = tmp_path / "qwen3"
    shutil.copytree(qwen_bundle.text_encoder, te)
    cfg = json.loads((te / "config.json").read_text())
    (te / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3"}))
    with pytest.raises(UserError, match=r"--text_encoder is model_type 'qwen3'; Qwen-Image needs Qwen2.5-VL"):
        QwenVLEncoder(te)
