"""The ``cronfile`` command: :mod:`.app` parses arguments and prints; the command bodies
(:mod:`.validate`, :mod:`.plan`) are plain functions that return data and an exit code."""

from cronfile.cli.app import main

__all__ = ["main"]
