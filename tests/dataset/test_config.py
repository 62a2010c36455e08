"""Dataset config schema: acceptance, precedence, renames and every rejection of specs/dataset.md §2 / §9."""

from __future__ import annotations

import argparse
import json

import pytest
from dataset_media_helpers import write_toml

from musubi_tuner.dataset.config import resolve_datasets
from musubi_tuner.utils.errors import UserError


@pytest.fixture
def media(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "vid").mkdir()
    return tmp_path


def load(path, arch="k5", **kw):
    return resolve_datasets(path, architecture=arch, **kw)


def test_full_config_defaults_and_precedence(media):
    cfg = write_toml(
        media / "c.toml",
        f"""
[general]
resolution = 512
caption_extension = ".txt"
batch_size = 2
enable_bucket = true

[[datasets]]
image_directory = "{media / "img"}"
batch_size = 4
validation = true

[[datasets]]
video_directory = "{media / "vid"}"
cache_directory = "{media / "cache"}"
target_frames = [1, 25, 45]
frame_extraction = "slide"
frame_stride = 10
source_fps = 30
""",
    )
    args = argparse.Namespace(num_repeats=3, batch_size=None, bucket_no_upscale=None)
    img, vid = load(cfg, args=args, runtime_params={"num_repeats": 7, "max_frames": 65})
    assert img.kind == "image" and vid.kind == "video"
    assert img.resolution == (512, 512) and vid.resolution == (512, 512)  # general int -> [n, n]
    assert img.batch_size == 4 and vid.batch_size == 2  # dataset > general
    assert img.num_repeats == 3  # command line > runtime params
    assert vid.max_frames == 65  # runtime params > default
    assert img.bucket_no_upscale is False and img.enable_bucket is True
    assert img.cache_directory == str(media / "img")  # default: the media directory
    assert img.validation is True and vid.validation is False
    assert vid.target_frames == (1, 25, 45) and vid.frame_extraction == "slide" and vid.frame_stride == 10
    assert vid.source_fps == 30.0 and isinstance(vid.source_fps, float)  # product rule: int accepted
    assert vid.frame_sample == 1 and img.fp_latent_window_size == 9 and img.control_resolution is None


def test_json_config(media):
    cfg = media / "c.json"
    cfg.write_text(json.dumps({"datasets": [{"image_directory": str(media / "img"), "resolution": [640, 480]}]}))
    (ds,) = load(cfg, arch="qi")
    assert ds.resolution == (640, 480)


def test_unknown_key_names_table_line_and_suggestion(media):
    cfg = write_toml(
        media / "c.toml",
        f'[general]\nbatch_size = 1\n\n[[datasets]]\nimage_directory = "{media / "img"}"\n\n[[datasets]]\n'
        f'image_directory = "{media / "vid"}"\nresolutoin = 256\n',
    )
    with pytest.raises(UserError) as e:
        load(cfg)
    msg = str(e.value)
    assert str(cfg) in msg and "datasets[1]" in msg and "'resolutoin'" in msg
    assert "line 9" in msg and "did you mean 'resolution'" in msg


def test_wrong_type_names_key_line_and_expected(media):
    cfg = write_toml(media / "c.toml", f'[general]\nbatch_size = "2"\n[[datasets]]\nimage_directory = "{media / "img"}"\n')
    with pytest.raises(UserError, match=r"general: key 'batch_size' \(line 2\): expected an integer"):
        load(cfg)
    cfg = write_toml(media / "c.toml", f'[[datasets]]\nvideo_directory = "{media / "vid"}"\nframe_extraction = "all"\n')
    with pytest.raises(UserError, match=r"datasets\[0\]: key 'frame_extraction' \(line 3\): expected one of 'head'"):
        load(cfg)
    cfg = write_toml(media / "c.toml", f'[[datasets]]\nvideo_directory = "{media / "vid"}"\nsource_fps = "30"\n')
    with pytest.raises(UserError, match=r"source_fps.*30\.0"):
        load(cfg)


def test_key_of_other_dataset_kind_rejected(media):
    cfg = write_toml(media / "c.toml", f'[[datasets]]\nimage_directory = "{media / "img"}"\ntarget_frames = [1]\n')
    with pytest.raises(UserError, match=r"datasets\[0\]: key 'target_frames' \(line 3\): is not allowed in image datasets"):
        load(cfg)


def test_exactly_one_source(media):
    cfg = write_toml(media / "c.toml", f'[[datasets]]\nimage_directory = "{media / "img"}"\nvideo_directory = "{media / "vid"}"\n')
    with pytest.raises(UserError, match=r"datasets\[0\]: exactly one of"):
        load(cfg)


def test_missing_directory_names_index_key_and_path(media):
    cfg = write_toml(media / "c.toml", f'[[datasets]]\nimage_directory = "{media / "nope"}"\n')
    with pytest.raises(UserError, match=r"datasets\[0\]: key 'image_directory' \(line 2\): directory not found: .*nope"):
        load(cfg)
    # training reads only caches: the media directory may be gone
    assert load(cfg, check_sources=False)[0].cache_directory == str(media / "nope")


def test_duplicate_cache_directory(media):
    cfg = write_toml(
        media / "c.toml",
        f'[[datasets]]\nimage_directory = "{media / "img"}"\n[[datasets]]\nimage_directory = "{media / "img"}"\n',
    )
    with pytest.raises(UserError, match=r"datasets\[0\] and datasets\[1\] share the cache directory"):
        load(cfg)


def test_jsonl_requires_cache_directory(media):
    (media / "m.jsonl").write_text("")
    cfg = write_toml(media / "c.toml", f'[[datasets]]\nimage_jsonl_file = "{media / "m.jsonl"}"\n')
    with pytest.raises(UserError, match="cache_directory is required with a JSONL source"):
        load(cfg)


def test_deprecated_keys_renamed_with_warning(media, project_log):
    cfg = write_toml(
        media / "c.toml",
        f'[[datasets]]\nimage_directory = "{media / "img"}"\nqwen_image_edit_control_resolution = 256\n'
        "flux_kontext_no_resize_control = true\nno_resize_control = false\n",
    )
    (ds,) = load(cfg, arch="qie")
    assert ds.control_resolution == (256, 256)
    assert ds.no_resize_control is False  # the new key wins
    text = project_log.text
    assert "qwen_image_edit_control_resolution" in text and "renamed to 'control_resolution'" in text
    assert "flux_kontext_no_resize_control" in text and "using 'no_resize_control'" in text


def test_target_frames_rounding_and_uniform_to_head(media, project_log):
    cfg = write_toml(
        media / "c.toml",
        f'[[datasets]]\nvideo_directory = "{media / "vid"}"\ntarget_frames = [1, 24, 27, 25]\nframe_extraction = "uniform"\n',
    )
    (ds,) = load(cfg)
    assert ds.target_frames == (1, 21, 25)
    assert ds.frame_extraction == "head"
    assert "target_frames 24 rounded down to 21" in project_log.text and "datasets[0]" in project_log.text
    assert "uniform" in project_log.text
    cfg = write_toml(media / "c.toml", f'[[datasets]]\nvideo_directory = "{media / "vid"}"\ntarget_frames = [0]\n')
    with pytest.raises(UserError, match="values must be >= 1"):
        load(cfg)


def test_video_dataset_on_image_only_architecture(media):
    cfg = write_toml(media / "c.toml", f'[[datasets]]\nvideo_directory = "{media / "vid"}"\n')
    with pytest.raises(UserError, match=r"datasets\[0\]: Unsupported architecture 'qi'"):
        load(cfg, arch="qi")
    with pytest.raises(UserError, match="unknown architecture"):
        load(cfg, arch="sd15")


def test_syntax_errors_name_line_and_column(media):
    cfg = write_toml(media / "c.toml", "[general]\nresolution = [1, \n[[datasets]]\n")
    with pytest.raises(UserError, match=r"c\.toml: TOML syntax error: .*line \d+, column \d+"):
        load(cfg)
    bad = media / "c.json"
    bad.write_text('{"datasets": [\n  {"image_directory": 1,}\n]}')
    with pytest.raises(UserError, match=r"c\.json: JSON syntax error at line 2, column \d+"):
        load(bad)


def test_unknown_top_level_and_general_only_rules(media):
    cfg = write_toml(media / "c.toml", f'[general]\ncache_directory = "x"\n[[datasets]]\nimage_directory = "{media / "img"}"\n')
    with pytest.raises(UserError, match=r"general: key 'cache_directory' \(line 2\): is not allowed in \[general\]"):
        load(cfg)
    cfg = write_toml(media / "c.toml", "[[dataset]]\nimage_directory = 'x'\n")
    with pytest.raises(UserError, match=r"unknown top-level key 'dataset' \(line 1\)"):
        load(cfg)


@pytest.mark.parametrize(
    "name,arch",
    [("dataset_video_example.toml", "k5"), ("dataset_image_edit_example.toml", "qie"), ("dataset_image_example.json", "qi")],
)
def test_example_configs_are_valid(name, arch):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / name
    assert resolve_datasets(path, architecture=arch, check_sources=False)
