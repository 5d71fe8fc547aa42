"""The one error type users see. Each message names the problem and the fix."""

from __future__ import annotations


class FiddlerError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


class ModelFolderError(FiddlerError):
    """The model folder is missing, incomplete or corrupt."""


class UnsupportedModelError(FiddlerError):
    """The model is readable but fiddlerc cannot compile it (not MoE, remote code, ...)."""


class OptionError(FiddlerError):
    """A command-line or API option is malformed (a size, a dtype, a device)."""


class BudgetError(FiddlerError):
    """The GPU memory budget cannot hold what the plan needs."""


class PlanError(FiddlerError):
    """plan.json is malformed, from another format version, or fails verification."""


class ArtifactError(FiddlerError):
    """A compiled folder was edited, is incomplete, or does not match its model's weights."""
