"""The words of the procedural video set: shapes, colours, motions, background textures, and the prompt grammar.

Every prompt of :mod:`dit_sparse.data.procedural` reads

    "<a|an> <colour> <shape> <motion> on a [<texture>] <colour> background"

with ``<motion>`` one of ``moving left|right|up|down``, ``bouncing``, ``growing``, ``shrinking`` or
``turning <colour>``. :data:`VOCABULARY` lists every word that can occur, in a fixed order, so the
embedded default model's word-level tokenizer can be built from it. :func:`parse_prompt` reads a prompt
back into its attributes (and says which word it does not understand).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "COLORS",
    "DIRECTIONS",
    "MOTIONS",
    "SHAPES",
    "TEXTURES",
    "VOCABULARY",
    "PromptAttributes",
    "compose_prompt",
    "parse_prompt",
]

# Colours as sRGB in [0, 1]; distinct enough to tell apart after an 8x8-compressing VAE.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.67, 0.27),
    "blue": (0.16, 0.35, 0.86),
    "yellow": (0.94, 0.82, 0.20),
    "purple": (0.55, 0.27, 0.78),
    "orange": (0.96, 0.55, 0.12),
    "white": (0.94, 0.94, 0.94),
    "black": (0.10, 0.10, 0.10),
    "gray": (0.50, 0.50, 0.50),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "ring")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# "turning" takes a target colour: "turning green".
MOTIONS: tuple[str, ...] = tuple(f"moving {d}" for d in DIRECTIONS) + ("bouncing", "growing", "shrinking", "turning")
TEXTURES: tuple[str, ...] = ("striped", "checkered", "dotted")

_GRAMMAR_WORDS = ("a", "an", "on", "background", "moving", "bouncing", "growing", "shrinking", "turning")

# Fixed order: a tokenizer built from it gives every word the same id on every machine.
VOCABULARY: tuple[str, ...] = _GRAMMAR_WORDS + DIRECTIONS + SHAPES + tuple(COLORS) + TEXTURES


@dataclass(frozen=True)
class PromptAttributes:
    """What a procedural prompt asks for. ``target_color`` is set only for ``motion == "turning"``;
    ``texture`` is None for a plain background."""

    color: str
    shape: str
    motion: str
    background: str
    texture: str | None = None
    target_color: str | None = None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def compose_prompt(attrs: PromptAttributes) -> str:
    """The prompt for ``attrs``, e.g. ``"a red circle moving left on a striped blue background"``."""
    motion = f"turning {attrs.target_color}" if attrs.motion == "turning" else attrs.motion
    background = f"{attrs.texture} {attrs.background}" if attrs.texture else attrs.background
    return f"{_article(attrs.color)} {attrs.color} {attrs.shape} {motion} on a {background} background"


def _expect(words: list[str], pos: int, allowed, what: str, prompt: str) -> str:
    if pos >= len(words):
        raise ValueError(f"prompt {prompt!r} ends too early: expected {what} ({', '.join(allowed)})")
    if words[pos] not in allowed:
        raise ValueError(
            f"prompt {prompt!r}: word {pos + 1} is {words[pos]!r}, expected {what} ({', '.join(allowed)}); "
            "prompts read '<a|an> <colour> <shape> <motion> on a [<texture>] <colour> background'"
        )
    return words[pos]


def parse_prompt(prompt: str) -> PromptAttributes:
    """Read a procedural prompt back into its attributes.

    Case and a trailing full stop are ignored. Raises ValueError naming the first word that does not
    fit the grammar of the module docstring.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    words = prompt.lower().strip().rstrip(".").split()
    colors = tuple(COLORS)
    _expect(words, 0, ("a", "an"), "an article", prompt)
    color = _expect(words, 1, colors, "a colour", prompt)
    shape = _expect(words, 2, SHAPES, "a shape", prompt)
    verb = _expect(words, 3, ("moving", "bouncing", "growing", "shrinking", "turning"), "a motion", prompt)
    pos, target = 4, None
    if verb == "moving":
        motion = f"moving {_expect(words, 4, DIRECTIONS, 'a direction', prompt)}"
        pos = 5
    elif verb == "turning":
        motion, target = "turning", _expect(words, 4, colors, "a colour", prompt)
        pos = 5
    else:
        motion = verb
    _expect(words, pos, ("on",), "'on'", prompt)
    _expect(words, pos + 1, ("a",), "'a'", prompt)
    texture = None
    if pos + 2 < len(words) and words[pos + 2] in TEXTURES:
        texture = words[pos + 2]
        pos += 1
    background = _expect(words, pos + 2, colors, "a background colour", prompt)
    _expect(words, pos + 3, ("background",), "'background'", prompt)
    if len(words) > pos + 4:
        raise ValueError(f"prompt {prompt!r} goes on after 'background': {' '.join(words[pos + 4:])!r}")
    return PromptAttributes(color, shape, motion, background, texture, target)
