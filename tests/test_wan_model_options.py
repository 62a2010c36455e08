"""Wan DiT with the shared memory options and LoRA-on-load: block swap + checkpointing parity, fp8 targets, pre-cast fp8
files, the ComfyUI ``model.diffusion_model.`` prefix with a LoRA, and a LoRA of another architecture refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from musubi_tuner.demo.wan_bundle import randomize_, tiny_dit_params
from musubi_tuner.modules.offloading import BlockSwapConfig
from musubi_tuner.networks.lora_wan import create_arch_network
from musubi_tuner.networks.merge import build_lora_delta_hook
from musubi_tuner.utils.errors import UserError
from musubi_tuner.wan.configs import get_task_config
from musubi_tuner.wan.models.dit import WanModel
from musubi_tuner.wan.models.loading import load_dit

TASK = get_task_config("t2v-1.3B")


def tiny(layers: int = 4, seed: int = 0) -> WanModel:
    p = tiny_dit_params("t2v-1.3B")
    p["num_layers"] = layers
    m = WanModel(**p)
    randomize_(m, seed)
    return m.requires_grad_(False)


def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([600.0]), [torch.randn(9, 32, generator=g)]


def fresh_lora(model):
    """A rank-4 LoRA applied to ``model`` with seeded non-zero up weights (so it changes the output)."""
    torch.manual_seed(5)
    net = create_arch_network(1.0, 4, 4, None, None, model)
    net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    for n, p in net.named_parameters():
        if "lora_up" in n:
            torch.nn.init.normal_(p, std=0.1)
    return net


def lora_step(model: WanModel) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net = fresh_lora(model)
    x, t, ctx = inputs()
    out = model(x, t, ctx)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


def test_block_swap_and_checkpointing_match_the_plain_step():
    ref_out, ref_grads = lora_step(tiny())
    model = tiny()
    model.enable_gradient_checkpointing(activation_cpu_offloading=True)
    model.enable_block_swap(2, BlockSwapConfig("cpu", supports_backward=True))
    model.switch_block_swap_for_training()
    out, grads = lora_step(model)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)


def _file(tmp_path, model: WanModel, name: str, prefix: str = "", dtype=torch.float32):
    path = tmp_path / name
    sd = {prefix + k: v.to(dtype) if v.dim() == 2 and ".blocks." in "." + k else v for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"wan_dit_config": json.dumps(model.config)})
    return path


def test_fp8_scaled_targets_only_block_linears(tmp_path):
    path = _file(tmp_path, tiny(2), "dit.safetensors")
    m = load_dit(TASK, path, dtype=torch.float32, fp8_base=True, fp8_scaled=True)
    fp8 = {n for n, p in m.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert len(fp8) == 2 * 10  # q/k/v/o self + cross, ffn.0, ffn.2 per block
    assert all(n.startswith("blocks.") and "norm" not in n and "modulation" not in n for n in fp8)
    assert m.text_embedding[0].weight.dtype == torch.float32 and m.head.head.weight.dtype == torch.float32
    x, t, ctx = inputs()
    ref = load_dit(TASK, path, dtype=torch.float32)
    assert (m(x, t, ctx) - ref(x, t, ctx)).abs().max() < 0.1 * ref(x, t, ctx).abs().max()


def test_precast_fp8_checkpoint_needs_fp8_base(tmp_path):
    path = _file(tmp_path, tiny(2), "dit_fp8_e4m3fn.safetensors", dtype=torch.float8_e4m3fn)
    m = load_dit(TASK, path, dtype=torch.bfloat16, fp8_base=True)
    assert m.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    x, t, ctx = inputs()
    assert torch.isfinite(m(x, t, ctx)).all()
    with pytest.raises(UserError, match="--fp8_scaled refuses unscaled fp8"):
        load_dit(TASK, path, dtype=torch.bfloat16, fp8_base=True, fp8_scaled=True)


def test_comfy_scaled_fp8_dit_file_computes_with_its_dequantised_weights(tmp_path):
    """ComfyUI's ``wan2.1_*_fp8_scaled.safetensors`` layout: ``model.diffusion_model.`` prefix, block Linears in
    float8_e4m3fn with a per-tensor ``scale_weight`` (W = q · s) and a ``scaled_fp8`` marker. With ``--fp8_base`` the
    weights stay as stored and the DiT computes exactly what the dequantised float32 model computes."""
    model = tiny(2)
    stored, dequantised = {}, {}
    for k, v in model.state_dict().items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2:
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            stored[k], stored[k.removesuffix("weight") + "scale_weight"] = q, scale.reshape(())
            dequantised[k] = q.float() * scale
        else:
            stored[k] = dequantised[k] = v
    stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    meta = {"wan_dit_config": json.dumps(model.config)}
    comfy, ref_path = tmp_path / "wan_fp8_scaled.safetensors", tmp_path / "dequantised.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in stored.items()}, str(comfy), metadata=meta)
    save_file({k: v.contiguous() for k, v in dequantised.items()}, str(ref_path), metadata=meta)
    m = load_dit(TASK, comfy, dtype=torch.float32, fp8_base=True)
    assert m.blocks[1].ffn[2].weight.dtype == torch.float8_e4m3fn
    ref = load_dit(TASK, ref_path, dtype=torch.float32)
    x, t, ctx = inputs()
    assert torch.allclose(m(x, t, ctx), ref(x, t, ctx), rtol=1e-5, atol=1e-6)


def test_comfy_prefix_takes_the_same_lora_with_every_module(tmp_path):
    model = tiny(2)
    net = create_arch_network(1.0, 4, 4, None, None, model)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    lora = tmp_path / "lora.safetensors"
    net.save_weights(str(lora), torch.float32, {"ss_network_module": "networks.lora_wan"})
    plain = _file(tmp_path, model, "plain.safetensors")
    comfy = _file(tmp_path, model, "comfy.safetensors", prefix="model.diffusion_model.")
    keys = list(model.state_dict())
    merged = [
        load_dit(TASK, p, dtype=torch.float32, lora_deltas=build_lora_delta_hook([lora], [1.0], keys)) for p in (plain, comfy)
    ]
    base = load_dit(TASK, plain, dtype=torch.float32)
    for name in ("blocks.0.self_attn.q.weight", "blocks.1.ffn.2.weight", "blocks.1.cross_attn.o.weight"):
        a, b, c = (dict(m.named_parameters())[name] for m in (*merged, base))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_lora_of_another_architecture_is_refused(tmp_path):
    model = tiny(2)
    other = tmp_path / "k5_lora.safetensors"
    save_file(
        {"lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_down.weight": torch.zeros(4, 64),
         "lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_up.weight": torch.zeros(64, 4)},
        str(other),
    )  # fmt: skip
    path = _file(tmp_path, model, "plain.safetensors")
    with pytest.raises(UserError, match="k5_lora.safetensors"):
        load_dit(TASK, path, dtype=torch.float32, lora_deltas=build_lora_delta_hook([other], [1.0], list(model.state_dict())))


def test_diffusers_lora_file_loads_in_diffusers_and_matches_our_model(tmp_path):
    """``--lora_format diffusers``: the file loads with ``load_lora_adapter`` on diffusers' model (every key names a
    module there, every module gets its adapter) and gives our LoRA-applied output (I2V: k_img/v_img included)."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from musubi_tuner.wan.lora_formats import kohya_to_diffusers
    from musubi_tuner.wan.models.loading import DIFFUSERS_KEY_MAP

    cfg = dict(num_attention_heads=4, attention_head_dim=16, in_channels=36, out_channels=16, text_dim=32, ffn_dim=128,
               num_layers=2, image_dim=24, added_kv_proj_dim=64)  # fmt: skip
    ref = WanTransformer3DModel(**cfg).eval()
    sd = {k: torch.randn_like(v) * 0.2 + ("norm" in k and "weight" in k) for k, v in ref.state_dict().items()}
    ref.load_state_dict(sd)
    mapped = DIFFUSERS_KEY_MAP.map_keys(sd.keys())
    ours = WanModel(in_dim=36, dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, image_dim=24).eval()
    ours.load_state_dict({mapped[k]: v for k, v in sd.items() if k in mapped})
    net = create_arch_network(1.0, 4, 2, None, None, ours)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    net.apply_to(None, ours, apply_text_encoder=False, apply_unet=True)
    kohya = tmp_path / "k.safetensors"
    net.save_weights(str(kohya), torch.float32, {})
    converted, _ = kohya_to_diffusers(load_file(str(kohya)), {}, "k")
    modules = dict(ref.named_modules())
    assert {k.rsplit(".lora_", 1)[0].removeprefix("transformer.") for k in converted} <= set(modules)
    assert any(".attn2.add_k_proj.lora_A" in k for k in converted) and any(".ffn.net.0.proj.lora_B" in k for k in converted)
    ref.load_lora_adapter(converted, prefix="transformer", adapter_name="wan")
    with_adapter = {n for n, m in ref.named_modules() if hasattr(m, "lora_A") and "wan" in m.lora_A}
    assert len(with_adapter) == len(net.unet_loras) == 2 * 12
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g)
    ctx, clip = torch.randn(1, 512, 32, generator=g), torch.randn(1, 257, 24, generator=g)
    t = torch.tensor([300.0])
    with torch.no_grad():
        want = ours(x, t, ctx, clip_fea=clip, y=y)
        got = ref(torch.cat([x, y], 1), t, ctx, encoder_hidden_states_image=clip, return_dict=False)[0]
    assert (got - want).abs().max() / want.abs().max() < 3e-5


def _pair_steps(swap: bool, offload: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[str, bool, bool]]]:
    """Forward + backward of a LoRA over a two-expert pair, experts high, low, high (the trainer's activation)."""
    from musubi_tuner.wan.training import WanExpertPair

    pair = WanExpertPair(tiny(4, seed=0), tiny(4, seed=1), offload_inactive=offload)
    net = fresh_lora(pair)
    if swap:
        pair.enable_block_swap(2, BlockSwapConfig("cpu", supports_backward=True, debug=True))
        pair.move_to_device_except_swap_blocks("cpu")
        pair.switch_block_swap_for_training()
    outs, state = [], []
    x, t, ctx = inputs()
    for expert in ("high", "low", "high"):
        pair.activate(expert, "cpu")
        out = pair(x, t, ctx, expert=expert)
        out.square().mean().backward()
        outs.append(out.detach())
        other = "low" if expert == "high" else "high"
        on = pair.expert(expert).offloaders is not None
        swapped = on and any(e[0] == "swap" for e in pair.expert(expert).offloaders[0].events)
        state.append((expert, swapped, pair.expert(other).offloaders is not None))
    return outs, [p.grad.clone() for p in net.parameters()], state


@pytest.mark.parametrize("offload", [True, False])
def test_expert_pair_block_swap_runs_on_the_active_expert(offload):
    """``--expert both`` with ``--blocks_to_swap``: the same outputs and LoRA gradients as without block swap; with
    ``--offload_inactive_dit`` only the active expert swaps (the inactive one has no offloader, it waits whole on the
    host), without it both experts keep their own."""
    ref_outs, ref_grads, _ = _pair_steps(swap=False, offload=offload)
    outs, grads, state = _pair_steps(swap=True, offload=offload)
    for o, r in zip(outs, ref_outs):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert all(active_swapped for _, active_swapped, _ in state)
    assert [other_swaps for *_, other_swaps in state] == [not offload] * 3


def test_expert_pair_keeps_the_inactive_expert_on_the_host():
    """``--offload_inactive_dit``: the trainer's ``transformer.to(device)`` places only the active expert (``meta``
    stands in for the GPU: it shows placement without data)."""
    from musubi_tuner.wan.training import WanExpertPair

    def devices(m: WanModel) -> set[str]:
        return {p.device.type for p in m.parameters()}

    pair = WanExpertPair(tiny(4, seed=0), tiny(4, seed=1), offload_inactive=True)
    pair.to("meta")
    assert devices(pair.low_noise) == {"meta"} and devices(pair.high_noise) == {"cpu"}
    pair = WanExpertPair(tiny(4, seed=0), tiny(4, seed=1), offload_inactive=True)
    pair.to(torch.float64)  # a dtype still reaches both
    assert {p.dtype for p in pair.parameters()} == {torch.float64}
