"""Reading what a person typed on the `torchship` command line: NAME=VALUE pairs, lists of
levels, and the one error line (exit status 2) when something cannot be read."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

__all__ = ["concurrency_levels", "fail", "key_values"]


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with status 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def concurrency_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        fail(f"--concurrency {text!r} is not a list of positive integers; pass e.g. 1,4,8")
    return levels


def key_values(pairs: tuple[str, ...], option: str, parse_json: bool) -> dict[str, Any]:
    """NAME=VALUE pairs; with `parse_json`, values that read as JSON (3, 0.5, [1,4]) are typed."""
    result: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            fail(f"{option} {pair!r} is not NAME=VALUE; pass e.g. {option} epochs=20")
        if parse_json:
            try:
                value = json.loads(value)
            except ValueError:
                pass  # a plain string
        result[name] = value
    return result

