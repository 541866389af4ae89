"""Command-line parsing shared by train.py and eval.py: ``key=value`` overrides are accepted anywhere on the line."""

from __future__ import annotations

import argparse


def is_override(token: str) -> bool:
    """``a.b=1`` style: has '=', does not start with '-', and the part before '=' is non-empty."""
    return not token.startswith("-") and "=" in token and token.index("=") > 0


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None,
                              dest: str = "overrides") -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that ``key=value`` tokens placed before or between options are added to
    the ``dest`` list (argparse alone takes only one contiguous run of positionals). Other unknown tokens, and
    overrides given to a (sub)command without ``dest``, exit with code 2 and say where overrides go."""
    args, extra = parser.parse_known_args(argv)
    overrides = [t for t in extra if is_override(t)]
    unknown = [t for t in extra if not is_override(t)]
    if overrides and not hasattr(args, dest):
        parser.error(f"unrecognized arguments: {' '.join(overrides)} (this command takes no key=value overrides)")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        setattr(args, dest, list(getattr(args, dest) or []) + overrides)
    return args
