"""The small built-in text corpus the tiny demo tokenizers are trained on.

It holds the Kandinsky 5 prompt templates (so template words become single tokens, like in the real Qwen
vocabulary) and the vocabulary of the synthetic captions (colours, shapes, motions), plus a little everyday
English so that arbitrary prompts still tokenize into a reasonable number of pieces. Byte-level BPE never fails on
unseen text; it just falls back to shorter pieces.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_SPECIAL = re.compile(r"<\|[a-z_]+\|>")

COLORS = ("red", "green", "blue", "yellow", "white", "purple", "orange", "cyan")
SHAPES = ("square", "circle", "triangle", "rectangle")
MOTIONS = ("moving right", "moving left", "moving up", "moving down", "bouncing", "standing still")
BACKGROUNDS = ("black", "dark gray", "navy", "dark green")

_EVERYDAY = """
A cat walks on the grass, realistic style. A dog runs along the beach at sunset. A woman in a red dress dances in
the rain. The camera slowly zooms in on a mountain lake. An old man reads a newspaper in a quiet cafe. Two children
play football in a sunny park. A car drives through a neon city at night. Waves crash against the rocks while birds
fly overhead. A close-up of a flower opening its petals. low quality, bad quality, worst quality, ugly, deformed,
static, 2D cartoon, cartoon, 2d animation, paintings, images, walking backwards, blurry, artifacts.
The quick brown fox jumps over the lazy dog. Hello world! Numbers: 0 1 2 3 4 5 6 7 8 9 10 24 30 60 100 512 1024.
"""


def caption_sentences() -> Iterator[str]:
    """Every caption the synthetic dataset can produce."""
    for color in COLORS:
        for shape in SHAPES:
            for motion in MOTIONS:
                for bg in BACKGROUNDS:
                    article = "an" if color[0] in "aeiou" else "a"
                    yield f"{article} {color} {shape} {motion} on a {bg} background"


def corpus_lines() -> list[str]:
    """The training corpus: templates (repeated so their words merge fully), captions and everyday English."""
    from musubi_tuner.kandinsky5.text_encoders import PROMPT_TEMPLATES

    lines: list[str] = []
    for parts in PROMPT_TEMPLATES.values():
        # special tokens are added to the vocabulary separately; keep them out of the merges
        text = _SPECIAL.sub("", "\n".join(parts).replace("{}", ""))
        lines.extend([text] * 8)
    lines.extend(caption_sentences())
    lines.extend([ln for ln in _EVERYDAY.strip().splitlines() if ln] * 4)
    return lines
