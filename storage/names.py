"""Repository names and tags, validated with the registry's own grammar."""

import re

from .errors import InvalidName

MAX_NAME_LENGTH = 255
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
COMPONENT_RE = re.compile(_COMPONENT)
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)


def is_component(text: str) -> bool:
    return COMPONENT_RE.fullmatch(text) is not None


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"repository name over {MAX_NAME_LENGTH} characters: {name[:40]!r}…")
    if NAME_RE.fullmatch(name) is None:
        raise InvalidName(f"invalid repository name {name!r}")
    return name


def validate_tag(tag: str) -> str:
    if TAG_RE.fullmatch(tag) is None:
        raise InvalidName(f"invalid tag {tag!r}")
    return tag
