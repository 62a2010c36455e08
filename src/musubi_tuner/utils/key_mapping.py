"""Checkpoint key mapping declared as data: official (on-disk) key names → our module names, and back.

A ``KeyMap`` applies, in this order: dropped-key patterns (the key is skipped), the longest matching prefix rename,
then every regex rename in declaration order. ``inverse`` undoes the renames in reverse order, so an architecture can
load the official layout and save in it again. Regex renames must declare their inverse to be invertible.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from musubi_tuner.utils.errors import UserError


@dataclass(frozen=True)
class RegexRename:
    """``re.sub(pattern, repl, key)``; ``inverse_pattern`` / ``inverse_repl`` undo it (both or neither)."""

    pattern: str
    repl: str
    inverse_pattern: str | None = None
    inverse_repl: str | None = None

    def __post_init__(self) -> None:
        if (self.inverse_pattern is None) != (self.inverse_repl is None):
            raise ValueError(f"regex rename {self.pattern!r}: give both inverse_pattern and inverse_repl, or neither")
        re.compile(self.pattern)
        if self.inverse_pattern is not None:
            re.compile(self.inverse_pattern)


@dataclass(frozen=True)
class KeyMap:
    """An architecture's official → internal key mapping.

    ``prefixes``: ``(official_prefix, internal_prefix)`` pairs (the longest matching one applies).
    ``regexes``: ``RegexRename`` (or ``(pattern, repl[, inverse_pattern, inverse_repl])`` tuples), applied in order.
    ``dropped``: regexes (full match on the official key) for keys the model does not use.
    """

    prefixes: tuple[tuple[str, str], ...] = ()
    regexes: tuple[RegexRename, ...] = ()
    dropped: tuple[str, ...] = ()
    _dropped_re: tuple[re.Pattern, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regexes = tuple(r if isinstance(r, RegexRename) else RegexRename(*r) for r in self.regexes)
        object.__setattr__(self, "regexes", regexes)
        object.__setattr__(self, "prefixes", tuple((str(a), str(b)) for a, b in self.prefixes))
        object.__setattr__(self, "_dropped_re", tuple(re.compile(p) for p in self.dropped))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyMap:
        """Build from plain data: ``{"prefixes": {old: new}, "regexes": [[pat, repl, inv_pat, inv_repl]], "dropped": [...]}``."""
        unknown = set(data) - {"prefixes", "regexes", "dropped"}
        if unknown:
            raise UserError(f"key map: unknown field(s) {', '.join(sorted(unknown))}")
        prefixes = data.get("prefixes", {})
        if isinstance(prefixes, Mapping):
            prefixes = prefixes.items()
        return cls(
            prefixes=tuple(tuple(p) for p in prefixes),
            regexes=tuple(RegexRename(*r) if not isinstance(r, Mapping) else RegexRename(**r) for r in data.get("regexes", ())),
            dropped=tuple(data.get("dropped", ())),
        )

    def is_identity(self) -> bool:
        """True when the map renames and drops nothing."""
        return not (self.prefixes or self.regexes or self.dropped)

    def map(self, key: str) -> str | None:
        """The internal name of official ``key``, or ``None`` when the key is dropped."""
        if any(p.fullmatch(key) for p in self._dropped_re):
            return None
        key = _rename_prefix(key, self.prefixes)
        for r in self.regexes:
            key = re.sub(r.pattern, r.repl, key)
        return key

    def inverse(self, key: str) -> str:
        """The official name of internal ``key`` (raises ``ValueError`` when a regex rename has no inverse)."""
        for r in reversed(self.regexes):
            if r.inverse_pattern is None:
                raise ValueError(f"regex rename {r.pattern!r} declares no inverse")
            key = re.sub(r.inverse_pattern, r.inverse_repl, key)
        return _rename_prefix(key, tuple((b, a) for a, b in self.prefixes))

    def map_keys(self, keys: Iterable[str]) -> dict[str, str]:
        """``{official: internal}`` for the kept keys; two official keys mapping to one name is an error."""
        out: dict[str, str] = {}
        seen: dict[str, str] = {}
        for k in keys:
            m = self.map(k)
            if m is None:
                continue
            if m in seen:
                raise UserError(f"key map sends both {seen[m]!r} and {k!r} to {m!r}")
            seen[m] = k
            out[k] = m
        return out


def _rename_prefix(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    best = None
    for old, new in pairs:
        if key.startswith(old) and (best is None or len(old) > len(best[0])):
            best = (old, new)
    return key if best is None else best[1] + key[len(best[0]) :]


IDENTITY = KeyMap()
