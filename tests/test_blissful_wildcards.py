"""Prompt wildcards and seeds."""

from __future__ import annotations

import collections
import os
import random

import pytest
import torch

from blissful_tuner.prompt_management import WildcardExpander, expand_prompts, wildcard_rng
from blissful_tuner.seeds import make_generator, resolve_seed, seed_everything
from musubi_tuner.utils.errors import UserError


@pytest.fixture
def wc(tmp_path):
    root = tmp_path / "wc"
    (root / "colors").mkdir(parents=True)
    (root / "animal.txt").write_text("# animals\n\ncat\ndog:3\n  \n", encoding="utf-8")
    (root / "colors" / "autumn.txt").write_text("amber\nrust\n", encoding="utf-8")
    (root / "scene.txt").write_text("a __colors/autumn__ __animal__\n", encoding="utf-8")
    (root / "loop.txt").write_text("again __loop__\n", encoding="utf-8")
    (root / "zero.txt").write_text("never:0\nalways:1\n", encoding="utf-8")
    return root


def test_nesting_subdirectories_and_untouched_text(wc):
    exp = WildcardExpander(wc)
    out = exp.expand("photo of __scene__, __not_a_name__", wildcard_rng(1))
    words = out.split(", ")[0].split()
    assert words[:2] == ["photo", "of"] and words[3] in ("amber", "rust") and words[4] in ("cat", "dog")
    assert out.endswith("__not_a_name__")  # names cannot contain '_': left untouched
    assert exp.expand("__zero__", random.Random(0)) == "always"


def test_weights_are_respected(wc):
    exp = WildcardExpander(wc)
    rng = random.Random(0)
    counts = collections.Counter(exp.expand("__animal__", rng) for _ in range(2000))
    assert set(counts) == {"cat", "dog"}
    assert 0.70 < counts["dog"] / 2000 < 0.80  # weight 3 vs 1


def test_reproducible_from_seed_and_independent_of_global_rng(wc):
    texts = ("__animal__ __animal__ __colors/autumn__", "no __animal__")
    random.seed(123)
    a = expand_prompts(wc, 77, *texts)
    random.seed(999)
    random.random()
    b = expand_prompts(wc, 77, *texts)
    assert a == b
    outs = {tuple(expand_prompts(wc, s, *texts)) for s in range(30)}
    assert len(outs) > 1
    assert expand_prompts(wc, 1, None, "x") == [None, "x"]
    assert expand_prompts(None, 1, "__animal__") == ["__animal__"]


def test_confinement_and_errors(wc, tmp_path):
    exp = WildcardExpander(wc)
    outside = tmp_path / "secret.txt"
    outside.write_text("leak\n", encoding="utf-8")
    for name in ("../secret", "colors/../../secret", "/etc/passwd"):
        with pytest.raises(UserError, match="not allowed"):
            exp.expand(f"__{name}__", random.Random(0))
    os.symlink(outside, wc / "link.txt")
    with pytest.raises(UserError, match="outside"):
        exp.expand("__link__", random.Random(0))
    with pytest.raises(UserError, match="not found"):
        exp.expand("__missing__", random.Random(0))
    with pytest.raises(UserError, match="50 passes"):
        exp.expand("__loop__", random.Random(0))
    (wc / "badweight.txt").write_text("ok\nred:heavy\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"badweight\.txt:2"):
        exp.expand("__badweight__", random.Random(0))
    (wc / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="no options"):
        exp.expand("__empty__", random.Random(0))
    with pytest.raises(UserError, match="directory not found"):
        WildcardExpander(tmp_path / "nope")


def test_seeds():
    assert resolve_seed(5) == 5 and resolve_seed("5") == 5
    assert resolve_seed("kitty") == resolve_seed("kitty") != resolve_seed("kitten")
    assert 0 <= resolve_seed(None) < 2**32
    seed_everything(3)
    a = (random.random(), torch.rand(2))
    seed_everything(3)
    b = (random.random(), torch.rand(2))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    n1 = torch.randn(4, generator=make_generator(11, "cpu"))
    n2 = torch.randn(4, generator=make_generator(11))
    assert torch.equal(n1, n2)
