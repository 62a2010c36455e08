"""Directory and JSONL sources, captions, controls, frame folders, corrupt media."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dataset_media_helpers import write_image, write_toml, write_video

from musubi_tuner.dataset.config import resolve_datasets
from musubi_tuner.dataset.frames import fps_ratio
from musubi_tuner.dataset.media import MediaError, iter_video_frames, load_image, probe_video
from musubi_tuner.dataset.sources import list_items
from musubi_tuner.utils.errors import UserError


def dataset(tmp_path, body: str, arch: str = "qie"):
    cfg = write_toml(tmp_path / "c.toml", "[[datasets]]\n" + body)
    return resolve_datasets(cfg, architecture=arch)[0]


def test_directory_images_with_upper_case_and_controls(tmp_path):
    img, ctl = tmp_path / "img", tmp_path / "ctl"
    write_image(img / "a.png", (32, 32))
    write_image(img / "b.JPG", (32, 32))
    write_image(img / "c.Webp", (32, 32))
    (img / "notes.md").write_text("x")
    for stem in "abc":
        (img / f"{stem}.txt").write_text(f"caption {stem}\n")
    write_image(ctl / "a.png", (16, 16))
    write_image(ctl / "b_0000.png", (16, 16))
    write_image(ctl / "b_0001.png", (16, 16))
    write_image(ctl / "c_1.png", (16, 16))
    write_image(ctl / "c_0.png", (16, 16))
    p = dataset(tmp_path, f'image_directory = "{img}"\ncaption_extension = ".txt"\ncontrol_directory = "{ctl}"\n')
    items = list_items(p)
    assert [it.stem for it in items] == ["a", "b", "c"]
    assert [it.caption for it in items] == ["caption a", "caption b", "caption c"]
    assert [[c.name for c in it.controls] for it in items] == [["a.png"], ["b_0000.png", "b_0001.png"], ["c_0.png", "c_1.png"]]
    write_image(img / "d.png", (32, 32))
    (img / "d.txt").write_text("d")
    write_image(ctl / "d_1.png", (16, 16))
    with pytest.raises(UserError, match=r"control files of item 'd' .* found numbers \[1\] \(expected \[0\]\)"):
        list_items(p)
    (ctl / "d_1.png").unlink()
    with pytest.raises(UserError, match=r"no control file for item 'd' in control directory"):
        list_items(p)


def test_missing_caption_names_media_and_caption_path(tmp_path):
    img = tmp_path / "img"
    write_image(img / "a.png", (32, 32))
    p = dataset(tmp_path, f'image_directory = "{img}"\ncaption_extension = ".txt"\n')
    with pytest.raises(UserError, match=r"a\.png: caption file not found: .*a\.txt \(caption_extension = '\.txt'"):
        list_items(p)
    p = dataset(tmp_path, f'image_directory = "{img}"\n')
    with pytest.raises(UserError, match="caption_extension is not set"):
        list_items(p)


def test_multiple_target_grouping(tmp_path):
    img = tmp_path / "img"
    for name in ("image1", "image1_1", "image1_2", "image1_10", "other"):
        write_image(img / f"{name}.png", (16, 16), mode="RGBA")
        (img / f"{name}.txt").write_text(name)
    p = dataset(tmp_path, f'image_directory = "{img}"\ncaption_extension = ".txt"\nmultiple_target = true\n', arch="qil")
    items = list_items(p)
    assert [it.stem for it in items] == ["image1", "other"]
    assert [t.name for t in items[0].targets] == ["image1_1.png", "image1_2.png", "image1_10.png"]
    assert load_image(items[0].path, "RGBA").mode == "RGBA"
    write_image(img / "rgb.png", (16, 16))
    with pytest.raises(MediaError, match=r"rgb\.png: an alpha channel is required"):
        load_image(img / "rgb.png", "RGBA")


def test_jsonl_images_with_controls_relative_paths(tmp_path):
    data = tmp_path / "data"
    write_image(data / "pics" / "x.png", (32, 32))
    write_image(data / "pics" / "y.png", (32, 32))
    write_image(data / "ctl" / "x0.png", (16, 16))
    write_image(data / "ctl" / "x1.png", (16, 16))
    write_image(data / "ctl" / "y.png", (16, 16))
    rows = [
        {"image_path": "pics/x.png", "caption": "cx", "control_path_0": "ctl/x0.png", "control_path_1": "ctl/x1.png"},
        {"image_path": "pics/y.png", "caption": "cy", "control_path": str(data / "ctl" / "y.png")},
    ]
    (data / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    p = dataset(tmp_path, f'image_jsonl_file = "{data / "m.jsonl"}"\ncache_directory = "{tmp_path / "cache"}"\n')
    x, y = list_items(p)
    assert x.path == data / "pics" / "x.png" and x.caption == "cx"
    assert x.controls == [data / "ctl" / "x0.png", data / "ctl" / "x1.png"]
    assert y.controls == [data / "ctl" / "y.png"]


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    jl = tmp_path / "m.jsonl"
    jl.write_text('{"image_path": "a.png", "caption": "a"}\n{"image_path": "b.png"}\n')
    p = dataset(tmp_path, f'image_jsonl_file = "{jl}"\ncache_directory = "{tmp_path / "cache"}"\n')
    with pytest.raises(UserError, match=r"m\.jsonl: line 2: missing field 'caption'"):
        list_items(p)
    jl.write_text('{"image_path": "a.png", "caption": "a"}\n{"image_path": \n')
    with pytest.raises(UserError, match=r"m\.jsonl: line 2: invalid JSON"):
        list_items(p)
    jl.write_text('{"video_path": "a.mp4", "caption": "a", "control_path": "c.mp4"}\n{"video_path": "b.mp4", "caption": "b"}\n')
    p = dataset(tmp_path, f'video_jsonl_file = "{jl}"\ncache_directory = "{tmp_path / "cache"}"\n', arch="k5")
    with pytest.raises(UserError, match=r"line 2: missing field 'control_path' \(either every row"):
        list_items(p)


def test_video_directory_with_frame_folder_ordered_by_name(tmp_path):
    vid = tmp_path / "vid"
    write_video(vid / "clip.mp4", 5)
    for i, name in enumerate(["f10.png", "f02.png", "f01.png"]):
        write_image(vid / "frames" / name, (16, 16), color=(10 * (i + 1), 0, 0))
    (vid / "clip.txt").write_text("a clip")
    (vid / "frames.txt").write_text("frames")
    p = dataset(tmp_path, f'video_directory = "{vid}"\ncaption_extension = ".txt"\n', arch="wan")
    clip, frames = list_items(p)
    assert clip.stem == "clip" and frames.stem == "frames" and frames.caption == "frames"
    reds = [im.getpixel((0, 0))[0] for im in iter_video_frames(frames.path)]
    assert reds == [30, 20, 10]  # f01, f02, f10
    decoded = list(iter_video_frames(clip.path))
    assert len(decoded) == 5 and decoded[0].mode == "RGB" and decoded[0].size == (64, 48)
    assert len(list(iter_video_frames(clip.path, max_frames=2))) == 2
    # 30 -> 24 fps: frame 0 is dropped (floor(0.8) == floor(0)), frames 1..4 kept, in order
    ratio = fps_ratio(30.0, 24.0)
    assert probe_video(clip.path, ratio=ratio) == (4, (64, 48))
    assert probe_video(clip.path, ratio=ratio, max_frames=3) == (3, (64, 48))
    levels = [round(np.asarray(im).mean() / 8) for im in iter_video_frames(clip.path, ratio=ratio)]
    assert levels == [1, 2, 3, 4]


def test_corrupt_media_errors_name_file_and_decoder_message(tmp_path):
    bad_img = tmp_path / "bad.png"
    bad_img.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(MediaError, match=r"bad\.png: cannot decode image: .+"):
        load_image(bad_img)
    bad_vid = tmp_path / "bad.mp4"
    bad_vid.write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage" * 10)
    with pytest.raises(MediaError, match=r"bad\.mp4: cannot (open|decode) video.*"):
        list(iter_video_frames(bad_vid))
