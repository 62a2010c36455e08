"""Config rules not covered by test_config.py: general vs command line, per-kind general keys, value bounds, missing
files, deprecated keys in [general], the chunk/slide single-frame warning."""

from __future__ import annotations

import argparse

import pytest
from dataset_media_helpers import write_toml

from musubi_tuner.dataset.config import resolve_datasets
from musubi_tuner.utils.errors import UserError


@pytest.fixture
def media(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "vid").mkdir()
    return tmp_path


def test_general_beats_command_line_and_general_video_keys_skip_image_datasets(media):
    cfg = write_toml(
        media / "c.toml",
        f"""
[general]
num_repeats = 2
target_frames = [9]
frame_extraction = "chunk"

[[datasets]]
image_directory = "{media / "img"}"

[[datasets]]
video_directory = "{media / "vid"}"
cache_directory = "{media / "cache"}"
""",
    )
    # the command line only fills what neither the file nor [general] sets; file-only keys never come from it
    args = argparse.Namespace(num_repeats=5, batch_size=3, cache_directory=str(media / "elsewhere"), resolution=None)
    img, vid = resolve_datasets(cfg, architecture="k5", args=args, runtime_params={"batch_size": 8, "resolution": 256})
    assert img.num_repeats == 2 and vid.num_repeats == 2  # general > command line
    assert img.batch_size == 3  # command line > runtime parameters
    assert img.resolution == (256, 256)  # runtime parameters (int -> [n, n]) > default
    assert img.cache_directory == str(media / "img")  # not taken from args.cache_directory
    assert vid.target_frames == (9,) and vid.frame_extraction == "chunk"
    assert img.target_frames == (1,)  # video keys of [general] do not reach image datasets (and are no error there)


@pytest.mark.parametrize(
    "line,expected",
    [
        ("batch_size = 0", r"key 'batch_size' \(line 3\): expected an integer >= 1, got 0"),
        ("num_repeats = -2", r"key 'num_repeats' \(line 3\): expected an integer >= 1"),
        ("resolution = [0, 64]", r"key 'resolution' \(line 3\): expected positive integers"),
        ("resolution = [64, 64, 3]", r"key 'resolution' \(line 3\): expected an integer or a \[width, height\]"),
        ('enable_bucket = "yes"', r"key 'enable_bucket' \(line 3\): expected true or false"),
        ("target_frames = []", r"key 'target_frames' \(line 3\): expected a list of integers"),
        ("source_fps = 0", r"key 'source_fps' \(line 3\): expected a positive number \(e\.g\. 30\.0\)"),
        ("source_fps = inf", r"key 'source_fps' \(line 3\): expected a positive number"),
        ("frame_stride = 0", r"key 'frame_stride' \(line 3\): expected an integer >= 1"),
    ],
)
def test_value_bounds(media, line, expected):
    cfg = write_toml(media / "c.toml", f'[[datasets]]\nvideo_directory = "{media / "vid"}"\n{line}\n')
    with pytest.raises(UserError, match=expected) as e:
        resolve_datasets(cfg, architecture="wan")
    assert str(cfg) in str(e.value) and "datasets[0]" in str(e.value)


def test_missing_jsonl_control_directory_and_config(media):
    cfg = write_toml(
        media / "c.toml", f'[[datasets]]\nimage_jsonl_file = "{media / "m.jsonl"}"\ncache_directory = "{media / "c"}"\n'
    )
    with pytest.raises(UserError, match=r"datasets\[0\]: key 'image_jsonl_file' \(line 2\): JSONL file not found: .*m\.jsonl"):
        resolve_datasets(cfg, architecture="qi")
    cfg = write_toml(
        media / "c.toml", f'[[datasets]]\nimage_directory = "{media / "img"}"\ncontrol_directory = "{media / "ctl"}"\n'
    )
    with pytest.raises(UserError, match=r"datasets\[0\]: key 'control_directory' \(line 3\): directory not found: .*ctl"):
        resolve_datasets(cfg, architecture="qie")
    with pytest.raises(UserError, match=r"dataset config not found: .*missing\.toml"):
        resolve_datasets(media / "missing.toml", architecture="qi")
    cfg = write_toml(media / "c.toml", "[general]\nresolution = 64\n")
    with pytest.raises(UserError, match=r"at least one \[\[datasets\]\] entry is required"):
        resolve_datasets(cfg, architecture="qi")


def test_deprecated_key_in_general_and_its_type_error_name_the_old_key(media, project_log):
    cfg = write_toml(
        media / "c.toml",
        f'[general]\nqwen_image_edit_no_resize_control = true\n[[datasets]]\nimage_directory = "{media / "img"}"\n',
    )
    (ds,) = resolve_datasets(cfg, architecture="qie")
    assert ds.no_resize_control is True
    assert "general: key 'qwen_image_edit_no_resize_control' (line 2): deprecated key, renamed to 'no_resize_control'" in (
        project_log.text
    )
    cfg = write_toml(
        media / "c.toml",
        f'[[datasets]]\nimage_directory = "{media / "img"}"\nqwen_image_edit_control_resolution = "big"\n',
    )
    with pytest.raises(UserError, match=r"key 'qwen_image_edit_control_resolution' \(line 3\): expected an integer or"):
        resolve_datasets(cfg, architecture="qie")


@pytest.mark.parametrize("mode", ["chunk", "slide"])
def test_single_frame_target_with_chunk_or_slide_warns(media, project_log, mode):
    cfg = write_toml(
        media / "c.toml",
        f'[[datasets]]\nvideo_directory = "{media / "vid"}"\ntarget_frames = [1, 9]\nframe_extraction = "{mode}"\n',
    )
    (ds,) = resolve_datasets(cfg, architecture="k5")
    assert ds.target_frames == (1, 9)
    assert f"datasets[0]: target_frames contains 1 with frame_extraction '{mode}'" in project_log.text


def test_two_deprecated_spellings_of_one_key_the_first_wins(media, project_log):
    cfg = write_toml(
        media / "c.toml",
        f'[[datasets]]\nimage_directory = "{media / "img"}"\nflux_kontext_no_resize_control = true\n'
        "qwen_image_edit_no_resize_control = false\n",
    )
    (ds,) = resolve_datasets(cfg, architecture="qie")
    assert ds.no_resize_control is True
    assert (
        "key 'qwen_image_edit_no_resize_control' (line 4): deprecated key ignored because 'flux_kontext_no_resize_control'"
        in project_log.text
    )
