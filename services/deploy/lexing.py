"""The tokenizer both template languages of the job files share (Go templates, :mod:`services.deploy.gotemplate`;
HCL2 expressions, :mod:`services.deploy.jobspec`)."""

from __future__ import annotations

import re
from collections.abc import Callable


def tokens(pattern: re.Pattern[str], text: str, error: Callable[[int], Exception]) -> list[tuple[str, str]]:
    """``(kind, text)`` for each match of ``pattern`` (its named groups are the kinds) over ``text`` stripped, the
    whitespace between matches skipped. Raises ``error(position)`` where nothing (or only an empty match) fits."""
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = pattern.match(text, pos)
        if m is None or m.end() == pos:
            raise error(pos)
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out
