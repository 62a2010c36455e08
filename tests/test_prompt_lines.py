"""Prompt-line parsing shared by training samples and generate scripts (musubi_tuner.utils.prompt_lines)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from musubi_tuner.utils.errors import UserError
from musubi_tuner.utils.prompt_lines import PromptSpec, load_prompt_file, parse_prompt_line, seed_to_int


def test_every_letter_is_parsed_and_typed():
    line = (
        "a cat jumps --w 832 --h 480 --f 17 --d 42 --s 30 --g 5.5 --l 4.0 --fs 7 --n blurry, low quality"
        " --i in.png --ei end.png --ci c1.png --ci c2.png --cim m1.png --cim m2.png --cn ctrl.mp4 --m mask.png"
        " --cs 1-10, e~2:6.0 --of target_index=1 --rcm_th 0.25 --rcm_rel_th yes --rcm_ks 5 --rcm_ds 0"
    )
    spec = parse_prompt_line(line, source="p.txt", line_number=3)
    assert spec.prompt == "a cat jumps"
    assert (spec.width, spec.height, spec.frame_count, spec.seed, spec.sample_steps) == (832, 480, 17, 42, 30)
    assert spec.guidance_scale == 5.5 and spec.cfg_scale == 4.0 and spec.discrete_flow_shift == 7.0
    assert spec.negative_prompt == "blurry, low quality"  # values may contain spaces and commas
    assert (spec.image_path, spec.end_image_path) == ("in.png", "end.png")
    assert spec.control_image_path == ["c1.png", "c2.png"]
    assert spec.control_image_mask_path == ["m1.png", "m2.png"]
    assert (spec.control_video_path, spec.mask_path) == ("ctrl.mp4", "mask.png")
    assert spec.cfg_schedule == "1-10, e~2:6.0"
    assert spec.one_frame == "target_index=1"
    assert spec.rcm_threshold == 0.25 and spec.rcm_relative_threshold is True
    assert (spec.rcm_kernel_size, spec.rcm_dilate_size) == (5, 0)
    assert spec.location == "p.txt:3"


def test_options_only_line_has_no_prompt_and_prompt_segment_is_never_an_option():
    spec = parse_prompt_line("  --w 512 --h 256")
    assert spec.prompt is None and spec.width == 512 and spec.height == 256
    # A prompt that starts like an option letter must not set the width (reference quirk).
    spec = parse_prompt_line("w 512 wide shot --h 64")
    assert spec.prompt == "w 512 wide shot" and spec.width is None and spec.height == 64


@pytest.mark.parametrize("value,expected", [("1", True), ("TRUE", True), ("yes", True), ("0", False), ("no", False)])
def test_boolean_values(value, expected):
    assert parse_prompt_line(f"x --rcm_rel_th {value}").rcm_relative_threshold is expected


@pytest.mark.parametrize(
    "line,option",
    [
        ("x --w abc", "--w"),
        ("x --w 0", "--w"),
        ("x --s 2.5", "--s"),
        ("x --g fast", "--g"),
        ("x --g nan", "--g"),
        ("x --rcm_rel_th maybe", "--rcm_rel_th"),
        ("x --i", "--i"),
    ],
)
def test_malformed_value_names_source_line_and_option(line, option):
    with pytest.raises(UserError) as e:
        parse_prompt_line(line, source="batch.txt", line_number=7)
    assert "batch.txt:7" in str(e.value) and option in str(e.value)


def test_unknown_letter_warns_by_default_and_errors_when_strict():
    spec = parse_prompt_line("x --zz 3 --w 64", source="f.txt", line_number=2)
    assert spec.width == 64
    with pytest.raises(UserError, match=r"f\.txt:2.*--zz"):
        parse_prompt_line("x --zz 3", source="f.txt", line_number=2, strict=True)
    seen = []
    parse_prompt_line("x --task t2v", unknown=lambda name, where: seen.append((name, where)))
    assert seen == [("--task", "prompt line")]


def test_string_seed_hash_is_documented_sha256_prefix():
    expected = int.from_bytes(hashlib.sha256(b"kitty").digest()[:4], "big")
    assert seed_to_int("kitty") == expected
    assert parse_prompt_line("x --d kitty").seed == expected
    assert parse_prompt_line("x --d 123").seed == 123
    assert seed_to_int("猫") == int.from_bytes(hashlib.sha256("猫".encode()).digest()[:4], "big")


def test_txt_file_skips_comments_and_blank_lines_and_reports_line_numbers(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("# header\n\nfirst --w 64\n   # indented comment\nsecond --d 5\n", encoding="utf-8")
    specs = load_prompt_file(p)
    assert [s.prompt for s in specs] == ["first", "second"]
    assert [s.index for s in specs] == [0, 1]
    assert [s.line_number for s in specs] == [3, 5]
    p.write_text("ok\nbad --h -1\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"prompts\.txt:2.*--h"):
        load_prompt_file(p)


def test_toml_subset_wins_over_defaults(tmp_path):
    p = tmp_path / "prompts.toml"
    p.write_text(
        '[prompt]\nwidth = 256\nheight = 128\nsample_steps = 10\nnegative_prompt = "bad"\n'
        '[[prompt.subset]]\nprompt = "one"\nwidth = 512\n'
        '[[prompt.subset]]\nprompt = "two"\ncontrol_image_path = ["a.png", "b.png"]\nseed = "kitty"\n',
        encoding="utf-8",
    )
    one, two = load_prompt_file(p)
    assert (one.prompt, one.width, one.height, one.sample_steps, one.negative_prompt) == ("one", 512, 128, 10, "bad")
    assert (two.width, two.control_image_path, two.seed, two.index) == (256, ["a.png", "b.png"], seed_to_int("kitty"), 1)
    p.write_text('[prompt]\n[[prompt.subset]]\nprompt = "x"\nwidth = "wide"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"prompts\.toml.*subset 1.*width"):
        load_prompt_file(p)


def test_json_list_of_dicts_and_strings(tmp_path):
    p = tmp_path / "prompts.json"
    p.write_text(json.dumps([{"prompt": "a", "width": 64, "control_image_path": "c.png"}, "b --h 32 --ci x.png"]), encoding="utf-8")
    a, b = load_prompt_file(p)
    assert (a.prompt, a.width, a.control_image_path) == ("a", 64, ["c.png"])
    assert (b.prompt, b.height, b.control_image_path, b.index) == ("b", 32, ["x.png"], 1)
    p.write_text(json.dumps([3]), encoding="utf-8")
    with pytest.raises(UserError, match="item 1"):
        load_prompt_file(p)


def test_spec_dict_is_what_the_trainer_reads():
    spec = parse_prompt_line("p --w 64 --ci a.png")
    d = dataclasses.asdict(spec)
    assert d["prompt"] == "p" and d["width"] == 64 and d["control_image_path"] == ["a.png"] and d["height"] is None
    assert PromptSpec(prompt="x", width=3).overrides() == {"prompt": "x", "width": 3}


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prompt_file(tmp_path / "nope.txt")
