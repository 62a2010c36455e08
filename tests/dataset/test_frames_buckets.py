"""Frame extraction, frame-rate dropping and buckets against values computed by hand / independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from musubi_tuner.dataset.buckets import BucketSelector, bucket_set, control_bucket, resize_to_bucket
from musubi_tuner.dataset.frames import extract_clips, fps_ratio, kept_frame_indices, round_to_4n1


def test_round_to_4n1():
    assert [round_to_4n1(n) for n in (1, 2, 4, 5, 8, 9, 24, 25, 129, 130)] == [1, 1, 1, 5, 5, 9, 21, 25, 129, 129]


def test_head():
    assert extract_clips("head", 30, (1, 25, 45)) == [(0, 1), (0, 25)]
    assert extract_clips("head", 10, (25,)) == []


def test_chunk():
    assert extract_clips("chunk", 22, (5,)) == [(0, 5), (5, 5), (10, 5), (15, 5)]
    assert extract_clips("chunk", 9, (9, 5)) == [(0, 9), (0, 5)]


def test_slide():
    assert extract_clips("slide", 20, (9,), frame_stride=5) == [(0, 9), (5, 9), (10, 9)]
    assert extract_clips("slide", 9, (9,), frame_stride=3) == [(0, 9)]


def test_uniform():
    # linspace(0, 40 - 9 = 31, 4) = 0, 10.33, 20.67, 31 -> integer starts 0, 10, 20, 31
    assert extract_clips("uniform", 40, (9,), frame_sample=4) == [(0, 9), (10, 9), (20, 9), (31, 9)]
    # duplicates (N == T) collapse to one clip
    assert extract_clips("uniform", 9, (9,), frame_sample=3) == [(0, 9)]


def test_full():
    assert extract_clips("full", 100, (1,), max_frames=129) == [(0, 97)]
    assert extract_clips("full", 200, (1,), max_frames=129) == [(0, 129)]
    assert extract_clips("full", 3, (25,), max_frames=129) == [(0, 1)]


def _accumulator(n: int, source: float, target: float) -> list[int]:
    """The reference accumulator: add target/source per frame, emit a frame each time it reaches 1."""
    step, acc, kept = target / source, 0.0, []
    for i in range(n):
        acc += step
        if acc >= 1.0 - 1e-9:
            acc -= 1.0
            kept.append(i)
    return kept


@pytest.mark.parametrize("source,target", [(30.0, 24.0), (60.0, 16.0), (29.97, 24.0), (25.0, 24.0), (48.0, 24.0)])
def test_fps_dropping_matches_accumulator(source, target):
    ratio = fps_ratio(source, target)
    kept = kept_frame_indices(300, ratio)
    assert kept == _accumulator(300, source, target)
    assert len(kept) == math.floor(300 * target / source + 1e-9)


def test_fps_never_duplicates():
    assert fps_ratio(24.0, 30.0) is None and fps_ratio(None, 24.0) is None
    assert kept_frame_indices(5, None) == [0, 1, 2, 3, 4]
    assert kept_frame_indices(6, fps_ratio(30.0, 15.0)) == [1, 3, 5]


def _reference_buckets(w: int, h: int, k: int) -> list[tuple[int, int]]:
    area = w * h
    s = int(area**0.5)
    out = set()
    width = (s // 2) // k * k
    while width < s + k:
        height = (area // width) // k * k
        out |= {(width, height), (height, width)}
        width += k
    return sorted(out)


def test_bucket_set_and_choice():
    buckets = bucket_set((960, 544), 16)
    assert buckets == _reference_buckets(960, 544, 16)
    assert (720, 720) in buckets and (736, 704) in buckets and all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    sel = BucketSelector((960, 544), enable_bucket=True, no_upscale=False, step=16)
    for size in [(1920, 1080), (1080, 1920), (500, 500), (3000, 1000)]:
        a = size[0] / size[1]
        best = min(buckets, key=lambda b: abs(b[0] / b[1] - a))
        assert sel.select(size) == best
    off = BucketSelector((960, 544), enable_bucket=False, no_upscale=True, step=16)
    assert off.buckets == [(960, 544)] and off.select((100, 300)) == (960, 544)


def test_bucket_no_upscale():
    sel = BucketSelector((512, 512), enable_bucket=True, no_upscale=True, step=16)
    assert sel.select((300, 200)) == (288, 192)  # small: own size floored to 16
    big = sel.select((1024, 768))
    assert big == min(sel.buckets, key=lambda b: abs(b[0] / b[1] - 1024 / 768))


def test_control_bucket():
    size, res, k = (1200, 800), (512, 512), 16
    a = 1.5
    iw, ih = math.sqrt(512 * 512 * a), math.sqrt(512 * 512 / a)
    cands = [((int(iw) // k + dw) * k, (int(ih) // k + dh) * k) for dw in range(-2, 3) for dh in range(-2, 3)]
    cands = [c for c in cands if c[0] * c[1] <= 512 * 512 and min(c) >= k]
    expected = min(cands, key=lambda c: (abs(c[0] / c[1] - a), -c[0] * c[1]))
    assert control_bucket(size, res, k) == expected
    assert control_bucket((40, 40), (32, 32), 16) == (32, 32)  # never larger than the control area


def test_resize_covers_and_centre_crops():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (90, 40, 110, 60))  # white square in the centre
    out = resize_to_bucket(img, (64, 64))
    assert out.size == (64, 64)
    arr = np.asarray(out)
    assert arr[32, 32].min() > 200 and arr[2, 2].max() < 30  # centre kept, corners black
    up = resize_to_bucket(Image.new("RGB", (10, 20)), (32, 48))
    assert up.size == (32, 48)


def test_batch_plan_epoch_order_depends_only_on_its_own_seed():
    import random

    from musubi_tuner.dataset.batching import BatchPlan

    def plan():
        p = BatchPlan(2)
        for i in range(7):
            p.add("a" if i % 2 else "b", i, num_repeats=2)
        return p

    def snapshot(p):
        return list(p.batches), {k: list(v) for k, v in p.buckets.items()}

    resumed_at_epoch_2 = plan()
    resumed_at_epoch_2.build(random.Random(2))
    uninterrupted = plan()
    uninterrupted.build(random.Random(1))
    uninterrupted.build(random.Random(2))
    assert snapshot(uninterrupted) == snapshot(resumed_at_epoch_2)
    uninterrupted.build(None)
    assert uninterrupted.buckets == {"a": [1, 1, 3, 3, 5, 5], "b": [0, 0, 2, 2, 4, 4, 6, 6]}
