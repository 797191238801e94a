"""The image builder's one error type, so the CLI can print it without a traceback."""

from __future__ import annotations


class BuildError(Exception):
    """A build cannot proceed; the message says why and what to do about it.

    Raised for an unknown template, a recipe with a bad field, a missing host
    tool, too little free disk space or a failed external command.
    """


class RecipeError(BuildError):
    """A recipe file is invalid; the message names the file and the field."""
