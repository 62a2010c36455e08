"""Video/PNG/latent writing and bt_* metadata round trips (PyAV, PIL, safetensors)."""

from __future__ import annotations

import argparse
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from blissful_tuner import read_metadata as reader_cli
from blissful_tuner.media_output import (
    decoded_latent_stem,
    load_latent_file,
    output_stem,
    save_generation,
    save_latent,
    save_png,
    save_video,
    unique_path,
)
from blissful_tuner.metadata import prepare_metadata, read_metadata
from musubi_tuner.utils.errors import UserError

TEXT = "猫が跳ぶ — café\nsecond line"


def _frames(n=5, h=32, w=48):
    t = torch.linspace(0, 1, n).view(1, n, 1, 1)
    y = torch.linspace(0, 1, h).view(1, 1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, 1, w)
    return torch.cat([t.expand(1, n, h, w), y.expand(1, n, h, w), x.expand(1, n, h, w)], dim=0)  # (3, F, H, W)


def _decode(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _metadata():
    args = argparse.Namespace(
        prompt=TEXT,
        negative_prompt="ぼやけた",
        infer_steps=30,
        guidance_scale=5.0,
        cfgzerostar_scaling=False,
        cfgzerostar_init_steps=-1,
        cfgzerostar_multiplier=0.0,
        riflex_index=0,
        lora_weight=["/secret/dir/style.safetensors", "b.safetensors"],
        lora_multiplier=[0.8],
        task="k5-lite-t2v-5s-sd",
    )
    return prepare_metadata(args, model_type="Kandinsky 5 Lite", seeds=1234)


def test_prepare_metadata_keys():
    md = _metadata()
    assert md["bt_prompt"] == TEXT and md["bt_seeds"] == "1234" and md["bt_model_type"] == "Kandinsky 5 Lite"
    assert md["bt_infer_steps"] == "30" and md["bt_guidance_scale"] == "5.0"
    assert md["bt_lora_0"] == "style.safetensors: 0.8" and md["bt_lora_1"] == "b.safetensors: 1"
    assert "secret" not in json.dumps(md)
    for off in ("bt_cfgzerostar_scaling", "bt_cfgzerostar_init_steps", "bt_cfgzerostar_multiplier", "bt_riflex_index"):
        assert off not in md
    assert {"bt_creation_timestamp", "bt_tunerver"} <= set(md)


@pytest.mark.parametrize(
    "codec,container,expected_ext",
    [
        ("h264", "mp4", ".mp4"),
        ("h264", "mkv", ".mkv"),
        ("h265", "mp4", ".mp4"),
        ("prores", "mkv", ".mkv"),
        ("prores", "mp4", ".mkv"),
    ],
)
def test_video_codecs_and_containers_decode_back(tmp_path, codec, container, expected_ext):
    video = _frames(5, 64, 96)
    path = save_video(video, tmp_path / "out.mp4", fps=24, codec=codec, container=container)
    assert path.suffix == expected_ext and path.is_file()
    frames = _decode(path)
    assert len(frames) == 5 and frames[0].shape == (64, 96, 3)
    ref = (video.permute(1, 2, 3, 0).numpy() * 255).round()
    assert np.abs(frames[4].astype(float) - ref[4]).mean() < 6  # lossy, but the picture is there
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_odd_size_is_padded_and_single_frame_is_png(tmp_path):
    path = save_video(_frames(3, 17, 23), tmp_path / "odd.mp4")
    assert _decode(path)[0].shape == (18, 24, 3)
    png = save_video(_frames(1), tmp_path / "one.mp4")
    assert png.suffix == ".png" and Image.open(png).size == (48, 32)


@pytest.mark.parametrize("kind", ["png", "mp4", "mkv", "latent"])
def test_metadata_round_trip_with_non_ascii(tmp_path, kind):
    md = _metadata()
    if kind == "png":
        path = save_png(_frames(1)[:, 0], tmp_path / "a.png", md)
    elif kind == "latent":
        path = save_latent(torch.zeros(2, 3), tmp_path / "a_latent.safetensors", md)
    else:
        path = save_video(_frames(2), tmp_path / f"a.{kind}", container=kind, metadata=md)
    back = read_metadata(path, bt_only=True)
    assert back == md


def test_mp4_json_fallback_is_read_when_individual_tags_are_missing(tmp_path):
    path = tmp_path / "plain.mp4"
    with av.open(str(path), "w") as c:  # a file whose muxer kept only the standard comment tag
        c.metadata["comment"] = json.dumps({"bt_prompt": TEXT})
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
        for pk in s.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")):
            c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    assert read_metadata(path)["bt_prompt"] == TEXT


def test_latent_round_trip_and_musubi_keys(tmp_path):
    lat = torch.randn(3, 4, 5, 16, dtype=torch.bfloat16)
    p = save_latent(lat, tmp_path / "x_latent.safetensors", {"bt_seeds": "7"})
    back, md = load_latent_file(p)
    assert back.dtype == torch.bfloat16 and torch.equal(back, lat) and md["bt_seeds"] == "7"
    from safetensors.torch import save_file

    save_file({"latent": lat.float()}, str(tmp_path / "m.safetensors"), metadata={"seeds": "9", "height": "64"})
    _, md = load_latent_file(tmp_path / "m.safetensors")
    assert md["bt_seeds"] == "9" and md["bt_height"] == "64" and md["seeds"] == "9"
    torch.save({"latent": lat.float()}, tmp_path / "t.pt")
    assert torch.equal(load_latent_file(tmp_path / "t.pt")[0], lat.float())
    save_file({"a": lat.float(), "b": lat.float()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(UserError, match="no 'latent'"):
        load_latent_file(tmp_path / "two.safetensors")
    assert decoded_latent_stem(p) == "x"


def test_save_generation_output_types_and_names(tmp_path):
    md = _metadata()
    stem = output_stem(42, now=0.25)
    assert stem.endswith("-250_42")
    video, latent = _frames(3), torch.zeros(16, 1, 4, 6)
    files = save_generation(
        save_path=tmp_path,
        stem=stem,
        video=video,
        latent=latent,
        output_type="both",
        metadata=md,
        save_first_frame=True,
        save_last_frame=True,
    )
    names = sorted(p.name for p in files)
    assert names == sorted([f"{stem}_latent.safetensors", f"{stem}.mp4", f"{stem}_first.png", f"{stem}_last.png"])
    again = save_generation(save_path=tmp_path, stem=stem, video=video, output_type="video", metadata=None)
    assert again[0].name == f"{stem}_.mp4"  # never overwrites without --overwrite
    assert "bt_prompt" not in read_metadata(again[0])  # --no_metadata
    imgs = save_generation(save_path=tmp_path / "i", stem="s", video=video, latent=latent, output_type="latent_images")
    assert sorted(p.name for p in imgs) == ["s_frame00000.png", "s_frame00001.png", "s_frame00002.png", "s_latent.safetensors"]
    assert unique_path(files[0], overwrite=True) == files[0]
    with pytest.raises(UserError, match="output_type"):
        save_generation(save_path=tmp_path, stem="z", video=video, output_type="gif")


def test_reader_cli(tmp_path, capsys):
    path = save_png(_frames(1)[:, 0], tmp_path / "r.png", _metadata())
    reader_cli.main([str(path)])
    out = capsys.readouterr().out
    assert "bt_prompt: 猫が跳ぶ — café\\nsecond line" in out
    reader_cli.main([str(path), "--json"])
    assert json.loads(capsys.readouterr().out)[str(path)]["bt_seeds"] == "1234"
    with pytest.raises(SystemExit) as e:
        reader_cli.main([str(tmp_path / "missing.png")])
    assert e.value.code == 2


def test_tiny_h265_is_padded_instead_of_crashing(tmp_path):
    for _ in range(2):  # the libx265 heap corruption showed on the second small encode
        path = save_video(_frames(3, 48, 48), tmp_path / "tiny.mkv", codec="h265", container="mkv")
    assert _decode(path)[0].shape == (64, 64, 3)


def test_cfgzerostar_multiplier_recorded_only_with_zero_init_steps():
    def md(init_steps):
        args = argparse.Namespace(prompt="x", cfgzerostar_init_steps=init_steps, cfgzerostar_multiplier=0.5)
        return prepare_metadata(args, model_type="Kandinsky 5 Lite", seeds=1)

    assert md(2)["bt_cfgzerostar_init_steps"] == "2" and md(2)["bt_cfgzerostar_multiplier"] == "0.5"
    assert "bt_cfgzerostar_multiplier" not in md(-1)
