"""Strings a server sent, made safe to print and to name files with. The default channel is plaintext,
so anyone on the path can write them: a layer named ``../../x`` or ``/abs/path`` must not choose where
the client writes, and a label holding ``ESC [2J`` must not drive the user's terminal (issue 28)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

# C0 (with TAB, CR and LF), DEL and C1 controls, the bidi overrides that reorder what follows on screen
# ("Trojan Source"), and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_UNSAFE_IN_FILE_NAMES = re.compile(r"[^A-Za-z0-9._-]")
MAX_FILE_STEM_CHARS = 100  # far under the 255 bytes most file systems allow, leaving room for "-<n>.png"
# Names that Windows opens as devices whatever the extension: "CON.png" is the console.
_WINDOWS_DEVICES = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
                              *(f"lpt{i}" for i in range(10))})


def printable(text: object) -> str:
    """``text`` with every control character written as its escape (``\\x1b``, ``\\r``, ``\\u202e``), so a
    terminal shows what was sent instead of obeying it. Idempotent: the escapes are printable."""
    return _CONTROLS.sub(_escape, str(text))


def _escape(match: re.Match) -> str:
    return repr(match.group())[1:-1] if ord(match.group()) < 0x100 else f"\\u{ord(match.group()):04x}"


def file_stem(name: str) -> str:
    """``name`` as one safe file name without extension: only ``[A-Za-z0-9._-]``, no leading dot (so
    never ``.`` or ``..``, nor hidden), never empty, not a Windows device, at most MAX_FILE_STEM_CHARS."""
    stem = _UNSAFE_IN_FILE_NAMES.sub("_", name)
    stem = "_" * (len(stem) - len(stem.lstrip("."))) + stem.lstrip(".")
    if not stem or stem.split(".")[0].casefold() in _WINDOWS_DEVICES:
        stem = "_" + stem
    if len(stem) > MAX_FILE_STEM_CHARS:  # cut, and keep apart names that share their first characters
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        stem = f"{stem[:MAX_FILE_STEM_CHARS - 9]}-{digest}"
    return stem


def file_names(names: Iterable[str]) -> dict[str, str]:
    """A distinct safe stem for each name (see ``file_stem``), in the names' order. Names that are
    already safe keep their stem; the rest, and any that collide when case is ignored (as on macOS and
    Windows), get ``-2``, ``-3``, ... so no two files overwrite each other."""
    names = list(dict.fromkeys(names))
    stems = {name: file_stem(name) for name in names}
    taken: set[str] = set()
    chosen: dict[str, str] = {}
    for name in sorted(names, key=lambda n: stems[n] != n):  # stable: the safe names claim theirs first
        stem, n = stems[name], 1
        while stem.casefold() in taken:
            n += 1
            stem = f"{stems[name]}-{n}"
        taken.add(stem.casefold())
        chosen[name] = stem
    return {name: chosen[name] for name in names}


def inside(root: str | Path, path: str | Path) -> Path:
    """``path``, after checking that it resolves (links followed) inside ``root``; ValueError otherwise."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        raise ValueError(f"refusing to write {printable(path)}: it resolves outside {printable(root)}")
    return Path(path)
