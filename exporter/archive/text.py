"""Text from an archive, made inert for what it is rendered into.

Tensor names, run sources, revisions and format names come from files other people wrote.
Where they reach a terminal, a Markdown dataset card (rendered as HTML by the Hub) or a
matplotlib label, they must show as the characters they are:

- terminal: C0/C1 control characters (ESC starts ANSI sequences that recolour, retitle or
  rewrite the screen, ECMA-48), DEL and Unicode bidi controls become ``\\xNN`` / ``\\uNNNN``;
- Markdown: the same, then every character that CommonMark gives a meaning inline
  (``\\ ` * _ [ ] < > & | ~ $``) is escaped: backslash escapes for ASCII punctuation
  (CommonMark 0.31 section 2.4), entities for ``< > &`` so no HTML tag or entity survives,
  ``\\|`` so a table cell cannot be split (GFM "Tables"), ``\\$`` so the Hub's math renderer
  leaves it alone;
- code spans: a backtick fence longer than any run of backticks inside (CommonMark 6.1);
- matplotlib: ``$`` escaped, so no mathtext is parsed (matplotlib "Writing mathematical
  expressions": an unescaped pair of dollar signs starts math mode).
"""

from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_MARKDOWN = re.compile(r"([\\`*_\[\]|~$])")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
#: longest label drawn in a plot legend
MAX_LABEL = 80


def _escape_control(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_text(text: object) -> str:
    """``text`` with control characters written as escapes, on one line.

    Example:
        >>> terminal_text("w\\x1b[2J\\nx")
        'w\\\\x1b[2J\\\\x0ax'
    """
    return _CONTROL.sub(_escape_control, str(text))


def markdown_text(text: object) -> str:
    """``text`` as literal Markdown inline text (no markup, no HTML, no table cell break).

    Example:
        >>> markdown_text("<img src=x onerror=alert(1)> *[a](b)*")
        '&lt;img src=x onerror=alert(1)&gt; \\\\*\\\\[a\\\\](b)\\\\*'
    """
    escaped = _MARKDOWN.sub(r"\\\1", terminal_text(text))
    return "".join(_ENTITIES.get(c, c) for c in escaped)


def markdown_code(text: object, *, in_table: bool = False) -> str:
    """``text`` as an inline code span (shown verbatim); ``in_table`` escapes ``|``, which
    GFM tables split cells on even inside code spans.

    Example:
        >>> markdown_code("a`b")
        '``a`b``'
    """
    body = terminal_text(text)
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * (longest + 1)
    if body.startswith("`") or body.endswith("`"):
        body = f" {body} "
    if in_table:
        body = body.replace("|", "\\|")
    return f"{fence}{body}{fence}"


def plot_text(text: object) -> str:
    """``text`` for a matplotlib label or title: no control characters, no mathtext, at
    most :data:`MAX_LABEL` characters."""
    body = terminal_text(text)
    if len(body) > MAX_LABEL:
        body = body[:MAX_LABEL - 1] + "…"
    return body.replace("$", r"\$")
