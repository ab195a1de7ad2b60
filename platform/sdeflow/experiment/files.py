"""Reading the text files a user or a run folder hands the CLI (YAML and JSON) safely: one-line errors
for a missing, non-UTF-8 or malformed file, a value too long to read, nesting too deep to parse, and a
cap on a YAML document's size with aliases expanded (a kilobyte "anchor bomb" can expand to gigabytes
when copied)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import ConfigError, SdeflowError


def read_utf8(path: str | Path, what: str, error: type[SdeflowError] = ConfigError) -> str:
    """The text of ``path`` (``what`` it is, for the message); unreadable or non-UTF-8 bytes are one line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}); "
                    f"save the {what} as UTF-8") from None


def read_json(path: str | Path, what: str, advice: str, error: type[SdeflowError] = SdeflowError) -> Any:
    """The JSON value in ``path``; bad bytes, bad JSON, a number too long to read or nesting too deep to
    parse is one line ending in ``advice`` (what the user can do)."""
    text = read_utf8(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {advice}") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise error(f"{path}: unreadable value ({str(e).split(';')[0]}); {advice}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read; {advice}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; a missing file or malformed YAML is a one-line ConfigError."""
    path = Path(path)
    text = read_utf8(path, "experiment file")
    try:
        data = safe_load_capped(text, str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


MAX_YAML_NODES = 100_000
"""Largest YAML document read, in nodes after expanding aliases (a config has a few hundred)."""


def safe_load_capped(text: str, source: str, limit: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load``, refusing a document whose aliases expand past ``limit`` nodes (an "anchor
    bomb" of a kilobyte can expand to gigabytes when the config is copied or written back)."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{source}: YAML nested too deeply to read; an experiment is a few levels deep") from None
        if node is None:
            return None
        size = _expanded_size(node, {}, limit)
        if size > limit:
            raise ConfigError(f"{source}: YAML document expands to more than {limit:,} nodes (aliases counted); "
                              "an experiment needs a few hundred: remove the repeated anchors")
        try:
            return loader.construct_document(node)
        except ValueError as e:  # e.g. an integer of more digits than Python converts (4,300)
            raise ConfigError(f"{source}: unreadable value ({str(e).split(';')[0]})") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int], limit: int) -> int:
    """Nodes under ``node`` with every alias expanded, computed once per distinct node."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = limit + 1  # a cycle (an alias inside its own anchor) expands without end
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo, limit) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, limit) + _expanded_size(v, memo, limit) for k, v in node.value)
    memo[id(node)] = min(size, limit + 1)
    return memo[id(node)]
