"""MkDocs hook: the docstrings' reStructuredText markup, as the API pages render it.

mkdocstrings (Google style) leaves three reST forms in the HTML: ``:class:`X```
becomes ``:class:<code>X</code>`` (shown as code ``X``), ``:math:`x``` becomes
``:math:<code>x</code>`` and a ``.. math::`` block a paragraph, in which
Markdown read ``_{a} ... _{b}`` as emphasis (both typeset by MathJax, as
``pymdownx.arithmatex`` marks the pages' own maths).
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:attr|class|data|exc|func|meth|mod|obj):(?=<code>)")
_INLINE_MATH = re.compile(r":math:<code>(.*?)</code>", re.DOTALL)
_BLOCK_MATH = re.compile(r"<p>\.\. math::\s*(.*?)</p>", re.DOTALL)
_EMPHASIS = re.compile(r"</?em>")


def _block(match: re.Match[str]) -> str:
    tex = _EMPHASIS.sub("_", match.group(1))
    return f'<div class="arithmatex">\\[{tex}\\]</div>'


def on_page_content(html: str, **kwargs: Any) -> str:
    """The page's HTML with role prefixes dropped and reST maths marked for MathJax."""
    html = _ROLE.sub("", html)
    html = _INLINE_MATH.sub(r'<span class="arithmatex">\\(\1\\)</span>', html)
    return _BLOCK_MATH.sub(_block, html)
