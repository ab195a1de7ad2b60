"""A griffe extension for the API reference: Sphinx roles in docstrings (``:class:`~sdeflow.Run```) become
Markdown code spans (`Run`), and RST's double backquotes single ones, so the docstrings read as they are
meant to in the site."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")


def markdown(text: str) -> str:
    """``text`` with its Sphinx roles as code spans (``~`` keeps only the last dotted name)."""
    return ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
