"""README's graft-train synopses match the real parsers, flag for flag, so that they cannot drift.

A synopsis is a README code block without a language tag whose lines start
with ``graft-train <command>`` (continuation lines are indented). In it,
``[--flag VALUE]`` is optional and ``--flag VALUE`` required; VALUE in capitals
is a placeholder, any other VALUE is the default (``a|b|c``: the default first,
every one a choice). Examples elsewhere in README may use any real flag.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from training import cli

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```(\S*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
OPTIONAL = re.compile(r"\[([^\[\]]*)\]")
FLAG = re.compile(r"(--[a-z0-9][a-z0-9-]*)(?:\s+([^\s\[\]|]+(?:\|[^\s\[\]|]+)*))?")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")


@dataclass(frozen=True)
class Shown:
    """One flag as a synopsis shows it."""

    optional: bool
    value: str | None


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Option string -> action, --help left out."""
    return {option: action for action in parser._actions for option in action.option_strings
            if not isinstance(action, argparse._HelpAction)}


def _blocks() -> list[tuple[str, str]]:
    return [(match.group(1), match.group(2)) for match in FENCE.finditer(README.read_text(encoding="utf-8"))]


def _synopses() -> list[tuple[str, str]]:
    """(command, its synopsis text) for every graft-train line of every untagged block."""
    found = []
    commands = set(_subparsers())
    for language, body in _blocks():
        if language:
            continue
        for line in body.splitlines():
            words = line.split()
            if line.startswith("graft-train ") and len(words) > 1 and words[1] in commands:
                found.append([words[1], " ".join(words[2:])])
            elif line.startswith((" ", "\t")) and found and line.strip():
                found[-1][1] += " " + line.strip()
    return [tuple(item) for item in found]


def _shown(text: str) -> dict[str, Shown]:
    flags: dict[str, Shown] = {}
    for group in OPTIONAL.findall(text):
        for alternative in group.split(" | "):
            for flag, value in FLAG.findall(alternative):
                flags[flag] = Shown(True, value or None)
    for flag, value in FLAG.findall(OPTIONAL.sub(" ", text)):
        flags[flag] = Shown(False, value or None)
    return flags


def _default_shown(action: argparse.Action, value: str) -> str | None:
    """Why ``value`` misstates ``action``'s default or choices; None when it is right."""
    literals = [word for word in value.split("|") if not PLACEHOLDER.fullmatch(word)]
    if not literals:
        return None
    if action.choices is not None and not set(literals) <= set(action.choices):
        return f"shows {sorted(set(literals) - set(action.choices))}, which are not choices"
    first = value.split("|")[0]
    if PLACEHOLDER.fullmatch(first):
        return None
    default = action.default
    same = float(first) == default if isinstance(default, float) else first == str(default)
    return None if same else f"shows {first} as the default, the parser's is {default!r}"


def test_readme_has_a_synopsis_of_every_subcommand():
    assert {command for command, _ in _synopses()} == set(_subparsers())


@pytest.mark.parametrize("command, text", _synopses(), ids=lambda value: value if " " not in value else "")
def test_a_synopsis_shows_every_flag_and_only_real_ones(command, text):
    actions = _actions(_subparsers()[command])
    shown = _shown(text)
    assert sorted(set(actions) - set(shown)) == [], f"README's {command} synopsis lacks these flags"
    assert sorted(set(shown) - set(actions)) == [], f"README's {command} synopsis shows flags it does not have"


@pytest.mark.parametrize("command, text", _synopses(), ids=lambda value: value if " " not in value else "")
def test_a_synopsis_shows_what_is_optional_and_the_defaults(command, text):
    actions = _actions(_subparsers()[command])
    problems = []
    for flag, seen in _shown(text).items():
        action = actions[flag]
        if seen.optional == action.required:
            problems.append(f"{flag} is {'required' if action.required else 'optional'}")
        if seen.value is not None and (wrong := _default_shown(action, seen.value)):
            problems.append(f"{flag} {wrong}")
    assert problems == []


def test_every_flag_in_a_readme_example_exists():
    parsers = _subparsers()
    unknown = []
    for language, body in _blocks():
        if not language:
            continue
        # An example's command line may continue over lines ending in a backslash.
        for line in body.replace("\\\n", " ").splitlines():
            match = re.search(r"graft-train\s+([a-z]+)\s(.*)", line)
            if match and match.group(1) in parsers:
                actions = _actions(parsers[match.group(1)])
                unknown += [f"{match.group(1)} {flag}" for flag in re.findall(r"(?<!\S)(--[a-z0-9-]+)", match.group(2))
                            if flag.split("=")[0] not in actions]
    assert unknown == []


def test_the_parser_of_this_test_reads_brackets_alternatives_and_defaults():
    shown = _shown("--data DIR [--val-data DIR | --val-split 0.2] [--head gap|seed] [--no-augment] --repo DIR")
    assert shown == {"--data": Shown(False, "DIR"), "--val-data": Shown(True, "DIR"),
                     "--val-split": Shown(True, "0.2"), "--head": Shown(True, "gap|seed"),
                     "--no-augment": Shown(True, None), "--repo": Shown(False, "DIR")}
    action = argparse.ArgumentParser().add_argument("--head", choices=("gap", "seed"), default="gap")
    assert _default_shown(action, "gap|seed") is None
    assert "default" in _default_shown(action, "seed|gap")
    assert "not choices" in _default_shown(action, "gap|mlp")
    assert _default_shown(action, "NAME") is None
