"""A deterministic byte-pair-encoding trainer for the demo bundles' tokenizers.

``tokenizers``' ``BpeTrainer`` gives the end-of-word symbols (``a</w>``) their ids in the iteration order of a
randomly seeded hash map, and breaks ties between equally frequent pairs by those ids: with an end-of-word suffix, every
training run produces another vocabulary and merge list (so every demo run tokenized the captions differently and
trained another LoRA). This trainer breaks every tie by the symbols' text instead; the result is the same in every run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


def train_bpe(
    words: Counter[str], vocab_size: int, *, special_tokens: Iterable[str], alphabet: Iterable[str], suffix: str = ""
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of a BPE model over ``words`` (word → count; already normalized and pre-tokenized).

    Ids: the special tokens, then the sorted alphabet (with every character of the words), then the sorted
    end-of-word symbols, then one token per merge. Each merge joins the most frequent adjacent pair (ties: the
    smallest pair of texts) until ``vocab_size`` tokens exist or no pair is left.
    """
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for t in special_tokens:
        add(t)
    chars = set(alphabet) | {c for w in words for c in w}
    for c in sorted(chars):
        add(c)
    split = {w: [*w[:-1], w[-1] + suffix] for w in words if w}
    for s in sorted({sym[-1] for sym in split.values()}):
        add(s)
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, symbols in split.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        merges.append(best)
        add(merged)
        for w, symbols in split.items():
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            split[w] = out
    return vocab, merges
