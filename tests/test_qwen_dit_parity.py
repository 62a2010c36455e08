"""Qwen-Image DiT: parity with diffusers' QwenImageTransformer2DModel on tiny random configs (specs/qwen_image.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from musubi_tuner.qwen_image.configs import dit_params_for, get_model_version
from musubi_tuner.qwen_image.models.dit import QwenImageTransformer, rope_positions

TINY = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 16,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 4, 4),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (zero-initialised ones included), activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _pair(version: str, dtype=torch.float32, seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    v = get_model_version(version)
    cfg = {
        **TINY,
        "zero_cond_t": v.zero_cond_t,
        "use_additional_t_cond": v.use_additional_t_cond,
        "use_layer3d_rope": v.use_layer3d_rope,
    }
    ref = QwenImageTransformer2DModel(**cfg)
    _randomize(ref, seed)
    ours = QwenImageTransformer(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(dtype).eval(), ours.to(dtype).eval()


def _inputs(shapes, b=2, text_lens=(5, 3), seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = sum(f * h * w for f, h, w in shapes)
    x = torch.randn(b, s, 16, generator=g).to(dtype)
    lmax = max(text_lens)
    txt = torch.zeros(b, lmax, 16)
    mask = torch.zeros(b, lmax, dtype=torch.long)
    for i, n in enumerate(text_lens):
        txt[i, :n] = torch.randn(n, 16, generator=g)
        mask[i, :n] = 1
    t = torch.tensor([0.7, 0.25])[:b]
    return x, txt.to(dtype), mask, t


CASES = {
    "original": [(1, 4, 6)],
    "edit-2509": [(1, 4, 6), (1, 4, 4), (1, 2, 6)],  # target + two controls of other sizes
    "edit-2511": [(1, 4, 6), (1, 4, 4), (1, 2, 6)],
    "layered": [(1, 4, 4)] * 3 + [(1, 4, 4)],  # composite + 2 layers, then the condition image
}


@pytest.mark.parametrize("version", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 6e-2)])
def test_matches_diffusers_with_padded_text(version, dtype, tol):
    ref, ours = _pair(version, dtype)
    shapes = CASES[version]
    x, txt, mask, t = _inputs(shapes, dtype=dtype)
    extra = {"additional_t_cond": torch.zeros(2, dtype=torch.long)} if version == "layered" else {}
    with torch.no_grad():
        want = ref(x, txt, mask, t, img_shapes=[shapes] * 2, return_dict=False, **extra)[0]
        got = ours(x, txt, mask, t, shapes, **extra)
    assert got.shape == want.shape == (2, x.shape[1], 16)
    err = (got.float() - want.float()).abs().max().item()
    assert err < tol * max(1.0, want.float().abs().max().item()), err


def test_mask_equals_unpadded_and_matters():
    """Padded text + mask gives the unpadded result; ignoring the mask changes it (why we always mask)."""
    _, ours = _pair("original")
    shapes = CASES["original"]
    x, txt, mask, t = _inputs(shapes, text_lens=(5, 3))
    with torch.no_grad():
        padded = ours(x, txt, mask, t, shapes)
        alone = ours(x[1:], txt[1:, :3], None, t[1:], shapes)
        unmasked = ours(x, txt, None, t, shapes)
    assert (padded[1] - alone[0]).abs().max().item() < 1e-5
    assert (unmasked[1] - alone[0]).abs().max().item() > 1e-3


def test_variant_switches_change_the_output():
    """Layered RoPE / additional_t_cond and 2511's zero_cond_t are not no-ops (they are what the parity above pins)."""
    ref, ours = _pair("layered")
    shapes = CASES["layered"]
    x, txt, mask, t = _inputs(shapes)
    plain = QwenImageTransformer(**{**TINY, "use_additional_t_cond": True})
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        zeros = ours(x, txt, mask, t, shapes, additional_t_cond=torch.zeros(2, dtype=torch.long))
        ones = ours(x, txt, mask, t, shapes, additional_t_cond=torch.ones(2, dtype=torch.long))
        flat_rope = plain(x, txt, mask, t, shapes, additional_t_cond=torch.zeros(2, dtype=torch.long))
    assert (zeros - ones).abs().max() > 1e-2
    assert (zeros - flat_rope).abs().max() > 1e-3


def test_rope_positions_check_values():
    """§3 check: h = 4, w = 6 → rows −2..1, columns −3..2, text starts at 3; layered condition frame −1."""
    img, txt = rope_positions([(1, 4, 6)], 2)
    assert sorted(set(img[:, 1].tolist())) == [-2, -1, 0, 1]
    assert sorted(set(img[:, 2].tolist())) == [-3, -2, -1, 0, 1, 2]
    assert txt[:, 0].tolist() == [3, 4] and txt[0].tolist() == [3, 3, 3]
    img, txt = rope_positions([(1, 2, 2), (1, 2, 2), (1, 2, 2)], 1)
    assert [0, 1, 2] == sorted(set(img[:, 0].tolist()))
    img, txt = rope_positions([(1, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2)], 1, layered=True)
    assert img[-4:, 0].tolist() == [-1] * 4 and img[:4, 0].tolist() == [0] * 4
    assert txt[0, 0].item() == 3  # max(max_vid_index 1, number of images − 1 = 3)


def test_rope_positions_refuse_positions_beyond_the_table():
    """The ±4096 table bound, checked from the shapes alone (fake-tensor traces run this too)."""
    img, txt = rope_positions([(1, 2, 2)], 4095)  # text from max_vid 1: the last position is 4095, inside the table
    assert max(img.abs().max().item(), txt.abs().max().item()) == 4095
    for shapes, text_len in (([(1, 2, 2)], 4096), ([(1, 8192, 2)], 1)):  # text reaches 4096; rows reach −4096
        with pytest.raises(ValueError, match="RoPE position beyond"):
            rope_positions(shapes, text_len)


def test_full_size_params_match_the_spec():
    params = dit_params_for("original")
    with torch.device("meta"):
        model = QwenImageTransformer(**params)
    assert sum(p.numel() for p in model.parameters()) == 20_430_401_088
    assert dit_params_for("edit-2511")["zero_cond_t"] and dit_params_for("layered")["use_layer3d_rope"]


def test_sampling_sigmas_check_values():
    """§6: L = 4096 → μ = 0.69355; 50 steps start 1.0, 0.9897 and end 0.05848, 0.02, 0 (computed here independently)."""
    from musubi_tuner.qwen_image.configs import dynamic_shift_mu, sampling_sigmas

    mu = dynamic_shift_mu(4096)
    assert mu == pytest.approx(0.5 + (4096 - 256) * 0.4 / (8192 - 256), abs=1e-12)
    assert mu == pytest.approx(0.69355, abs=1e-5)
    sig = sampling_sigmas(50, mu=mu)
    assert len(sig) == 51 and sig[-1] == 0.0
    assert sig[0] == pytest.approx(1.0) and sig[1] == pytest.approx(0.9897, abs=1e-4)
    assert sig[-3] == pytest.approx(0.05848, abs=1e-5) and sig[-2] == pytest.approx(0.02, abs=1e-9)
    # static shift (--flow_shift): s·σ/(1+(s−1)σ) before the terminal stretch
    raw = [1.0, 0.5]
    shifted = [3.0 * s / (1 + 2.0 * s) for s in raw]
    stretch = (1 - shifted[-1]) / (1 - 0.02)
    assert sampling_sigmas(2, flow_shift=3.0)[:2] == pytest.approx([1 - (1 - s) / stretch for s in shifted])
