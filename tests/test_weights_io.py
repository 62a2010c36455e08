"""Streaming weights reader, key mapping and strict loading into meta models."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.key_mapping import KeyMap, RegexRename
from musubi_tuner.utils.model_loading import load_weights_into_model
from musubi_tuner.utils.safetensors_utils import load_safetensors_metadata, open_weights, resolve_weight_files


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3),
        "a.bias": torch.randn(4, dtype=torch.bfloat16),
        "b.idx": torch.arange(5, dtype=torch.int64),
        "c.fp8": torch.randn(2, 8).to(torch.float8_e4m3fn),
        "d.flag": torch.tensor([True, False]),
        "e.empty": torch.zeros(0, 3),
    }


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn else torch.equal(a, b)


def test_single_file_all_dtypes_metadata_and_shapes(tmp_path):
    ref = _tensors()
    path = tmp_path / "m.safetensors"
    save_file(ref, path, metadata={"ss_name": "ünïcode"})
    with open_weights(path) as r:
        assert set(r.keys()) == set(ref) and len(r) == len(ref)
        assert r.metadata() == {"ss_name": "ünïcode"} == load_safetensors_metadata(path)
        for k, v in ref.items():
            assert r.get_shape(k) == tuple(v.shape) and r.get_dtype(k) == v.dtype
            _assert_same(r.get_tensor(k), v)
        assert r.get_tensor("a.weight", dtype=torch.float16).dtype == torch.float16


def test_iter_tensors_hook_then_dtype(tmp_path):
    ref = _tensors()
    path = tmp_path / "m.safetensors"
    save_file(ref, path)
    seen = []

    def hook(key, t):
        seen.append((key, t.dtype))
        return t * 2 if key == "a.weight" else t

    with open_weights(path) as r:
        out = dict(r.iter_tensors(dtype=torch.bfloat16, hook=hook, keys=["a.weight", "b.idx"]))
    assert seen == [("a.weight", torch.float32), ("b.idx", torch.int64)]  # hook sees the stored dtype
    assert torch.equal(out["a.weight"], (ref["a.weight"] * 2).bfloat16())
    assert out["b.idx"].dtype == torch.int64  # integers are never converted


def _write_shards(tmp_path, n=3):
    ref = {f"layer{i}.weight": torch.randn(2, 2) for i in range(2 * n)}
    keys = list(ref)
    weight_map = {}
    for s in range(n):
        name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        part = {k: ref[k] for k in keys[2 * s : 2 * s + 2]}
        save_file(part, tmp_path / name, metadata={"shard": str(s)})
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ref


@pytest.mark.parametrize("entry", ["model-00002-of-00003.safetensors", "model.safetensors.index.json", "."])
def test_split_files_from_any_shard_index_or_directory(tmp_path, entry):
    ref = _write_shards(tmp_path)
    with open_weights(tmp_path / entry) as r:
        assert len(r.files) == 3 and sorted(r.keys()) == sorted(ref)
        for k, v in ref.items():
            assert torch.equal(r.get_tensor(k), v)
        assert r.file_of("layer5.weight").name == "model-00003-of-00003.safetensors"
        assert r.metadata()["shard"] == "0"


def test_missing_shard_and_missing_file_name_the_path(tmp_path):
    _write_shards(tmp_path)
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(UserError, match=r"model-00003-of-00003\.safetensors"):
        open_weights(tmp_path / "model-00001-of-00003.safetensors")
    with pytest.raises(UserError, match=r"model-00003-of-00003\.safetensors.*index\.json"):
        open_weights(tmp_path / "model.safetensors.index.json")
    with pytest.raises(UserError, match=r"nope\.safetensors: file not found"):
        open_weights(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="no .safetensors files"):
        (tmp_path / "empty").mkdir()
        open_weights(tmp_path / "empty")


def test_directory_without_index_and_duplicate_keys(tmp_path):
    save_file({"x": torch.ones(1)}, tmp_path / "a.safetensors")
    save_file({"y": torch.zeros(1)}, tmp_path / "b.safetensors")
    with open_weights(tmp_path) as r:
        assert sorted(r.keys()) == ["x", "y"]
    save_file({"x": torch.zeros(1)}, tmp_path / "c.safetensors")
    with pytest.raises(UserError, match=r"c\.safetensors.*'x'.*a\.safetensors"):
        open_weights(tmp_path)


def test_unreadable_or_truncated_header(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UserError, match=r"bad\.safetensors: unreadable safetensors header"):
        open_weights(bad)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(UserError, match=r"tiny\.safetensors"):
        load_safetensors_metadata(tiny)
    good = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(64, 64)}, good)
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"cut\.safetensors.*'w'"):
        open_weights(good)


def test_pt_files_only_with_weights_only(tmp_path):
    ref = _tensors()
    del ref["c.fp8"]
    torch.save(ref, tmp_path / "w.pt")
    torch.save({"state_dict": ref, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("w.pt", "wrapped.pth"):
        with open_weights(tmp_path / name) as r:
            assert set(r.keys()) == set(ref)
            for k, v in ref.items():
                _assert_same(r.get_tensor(k), v)

    # tensors of a memory-mapped .pth come out as copies: the model never keeps the mapping (and its pages) alive
    with open_weights(tmp_path / "w.pt") as r:
        if sys.platform == "linux":  # the mapping is found, so its pages are dropped as tensors are copied out
            assert r._pt_maps[tmp_path / "w.pt"]
        k = next(iter(ref))
        first = r.get_tensor(k)
        first.fill_(7)
        _assert_same(r.get_tensor(k), ref[k])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"evil\.pt: cannot load as weights with torch\.load\(weights_only=True\)"):
        open_weights(tmp_path / "evil.pt")


def test_resolve_list_of_paths(tmp_path):
    save_file({"x": torch.ones(1)}, tmp_path / "a.safetensors")
    (tmp_path / "s").mkdir()
    _write_shards(tmp_path / "s")
    files = resolve_weight_files([tmp_path / "a.safetensors", tmp_path / "s" / "model-00001-of-00003.safetensors"])
    assert [f.name for f in files] == ["a.safetensors"] + [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


# ---------------------------------------------------------------- key mapping


def test_keymap_prefix_regex_dropped_and_inverse():
    km = KeyMap(
        prefixes=(("model.diffusion_model.", ""), ("model.diffusion_model.head.", "final.")),
        regexes=(RegexRename(r"^blocks\.(\d+)\.attn\.q\.", r"layers.\1.to_q.", r"^layers\.(\d+)\.to_q\.", r"blocks.\1.attn.q."),),
        dropped=(r".*\._extra_state", r"model\.diffusion_model\.unused\..*"),
    )
    assert km.map("model.diffusion_model.blocks.3.attn.q.weight") == "layers.3.to_q.weight"
    assert km.map("model.diffusion_model.head.weight") == "final.weight"  # the longest prefix wins
    assert km.map("model.diffusion_model.unused.x") is None
    assert km.map("blocks.1.norm._extra_state") is None
    assert km.map("other.weight") == "other.weight"
    for k in ("model.diffusion_model.blocks.3.attn.q.weight", "model.diffusion_model.head.weight", "model.diffusion_model.x.y"):
        assert km.inverse(km.map(k)) == k
    assert KeyMap().is_identity() and not km.is_identity()


def test_keymap_from_dict_and_collisions():
    km = KeyMap.from_dict(
        {"prefixes": {"transformer.": ""}, "regexes": [[r"\.ff\.", ".mlp.", r"\.mlp\.", ".ff."]], "dropped": ["x"]}
    )
    assert km.map("transformer.b.ff.w") == "b.mlp.w" and km.inverse("b.mlp.w") == "transformer.b.ff.w"
    with pytest.raises(UserError, match="unknown field"):
        KeyMap.from_dict({"prefix": {}})
    with pytest.raises(UserError, match="'a.w'.*'b.w'"):
        KeyMap(prefixes=(("a.", "c."), ("b.", "c."))).map_keys(["a.w", "b.w"])
    with pytest.raises(ValueError, match="no inverse"):
        KeyMap(regexes=((r"a", "b"),)).inverse("b")


# ---------------------------------------------------------------- loading into models


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 4)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("table", torch.arange(4.0), persistent=False)

    def forward(self, x):
        return self.out(self.norm(self.proj(x))) + self.table


def _meta_net() -> Net:
    with torch.device("meta"):
        net = Net()
    net.table = torch.arange(4.0)  # non-persistent buffers are the model's job, created on a real device
    return net


def test_meta_load_matches_load_state_dict_and_leaves_no_meta(tmp_path):
    torch.manual_seed(0)
    ref = Net()
    sd = ref.state_dict()
    sd["step"] = torch.tensor(7)
    save_file(sd, tmp_path / "net.safetensors")
    normal = Net()
    normal.load_state_dict(sd)
    model = _meta_net()
    res = load_weights_into_model(model, tmp_path / "net.safetensors", progress=False)
    assert not res.missing and not res.unexpected
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.step.item() == 7 and model.proj.weight.requires_grad
    x = torch.randn(3, 8)
    assert torch.equal(model(x), normal(x))


def test_dtype_conversion_keep_fp32_and_cpu_model(tmp_path):
    ref = Net()
    save_file(ref.state_dict(), tmp_path / "net.safetensors")
    model = Net()  # built on CPU, tensors are replaced rather than copied into
    load_weights_into_model(model, tmp_path / "net.safetensors", dtype=torch.bfloat16, keep_in_fp32=("norm",), progress=False)
    assert model.proj.weight.dtype == torch.bfloat16 and model.norm.weight.dtype == torch.float32
    assert model.step.dtype == torch.int64
    assert torch.equal(model.proj.weight, ref.proj.weight.bfloat16())


def test_key_map_applied_while_loading(tmp_path):
    ref = Net()
    official = {f"model.diffusion_model.{k}".replace(".proj.", ".in_proj."): v for k, v in ref.state_dict().items()}
    official["model.diffusion_model.junk"] = torch.zeros(1)
    save_file(official, tmp_path / "official.safetensors")
    km = KeyMap(prefixes=(("model.diffusion_model.", ""),), regexes=((r"^in_proj\.", "proj."),), dropped=(r".*\.junk",))
    model = _meta_net()
    load_weights_into_model(model, tmp_path / "official.safetensors", key_map=km, progress=False)
    assert torch.equal(model.proj.weight, ref.proj.weight)


def test_strict_errors_name_file_and_keys(tmp_path):
    sd = Net().state_dict()
    sd.pop("out.bias")
    sd["extra.weight"] = torch.zeros(2)
    path = tmp_path / "bad.safetensors"
    save_file(sd, path)
    with pytest.raises(UserError) as e:
        load_weights_into_model(_meta_net(), path, progress=False)
    msg = str(e.value)
    assert "bad.safetensors" in msg and "out.bias" in msg and "extra.weight" in msg and "missing" in msg and "unexpected" in msg
    # strict=False reports instead, but a tensor left on meta is still an error
    with pytest.raises(UserError, match=r"still on the meta device: out\.bias"):
        load_weights_into_model(_meta_net(), path, strict=False, progress=False)
    cpu_model = Net()
    res = load_weights_into_model(cpu_model, path, strict=False, progress=False)
    assert res.missing == ["out.bias"] and res.unexpected == ["extra.weight"]


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    sd = Net().state_dict()
    sd["proj.weight"] = torch.zeros(16, 9)
    save_file(sd, tmp_path / "shape.safetensors")
    with pytest.raises(UserError, match=r"shape\.safetensors.*'proj\.weight'.*\[16, 9\].*\[16, 8\]"):
        load_weights_into_model(_meta_net(), tmp_path / "shape.safetensors", progress=False)


def test_split_checkpoint_loads_into_model(tmp_path):
    ref = Net()
    sd = ref.state_dict()
    keys = list(sd)
    save_file({k: sd[k] for k in keys[:3]}, tmp_path / "net-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[3:]}, tmp_path / "net-00002-of-00002.safetensors")
    model = _meta_net()
    load_weights_into_model(model, tmp_path / "net-00002-of-00002.safetensors", progress=False)
    x = torch.randn(2, 8)
    assert torch.equal(model(x), ref(x))


def test_plain_fp8_checkpoint_without_config_keeps_fp8_and_runs(tmp_path):
    ref = Net()
    sd = ref.state_dict()
    sd["proj.weight"] = sd["proj.weight"].to(torch.float8_e4m3fn)
    save_file(sd, tmp_path / "fp8.safetensors")
    kept = _meta_net()
    load_weights_into_model(kept, tmp_path / "fp8.safetensors", progress=False)
    assert kept.proj.weight.dtype == torch.float8_e4m3fn and not kept.proj.weight.requires_grad
    upcast = _meta_net()
    load_weights_into_model(upcast, tmp_path / "fp8.safetensors", dtype=torch.float32, progress=False)
    assert upcast.proj.weight.dtype == torch.float32
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(kept(x), upcast(x))
