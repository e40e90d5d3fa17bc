"""User-facing error types: one class per kind of mistake, caught once in the CLI.

Every message names the problem and what to do about it; the CLI prints it on one line and
exits non-zero without a traceback. Internal bugs are *not* MqcError and keep their traceback.
"""


class MqcError(Exception):
    """Base class of every error a user can cause and fix."""


class UnsupportedModelError(MqcError):
    """The model's architecture (or an op in it) is not handled by capture or rewriting."""


class InfeasibleBudgetError(MqcError):
    """No per-layer choice of bit-widths fits the requested memory budget."""


class InvalidWeightsError(MqcError):
    """Weights contain NaN/Inf or have a shape the numerics cannot handle."""


class ArtifactError(MqcError):
    """An artifact is missing, corrupted, truncated, of another version, or would be overwritten."""


class RecipeError(MqcError):
    """A recipe has an unknown key or an invalid value."""


class DataError(MqcError):
    """A corpus or text file is missing, empty, or too short for the requested use."""


class PassContractError(MqcError):
    """A pass pipeline cannot run: a required key has no producer, or passes form a cycle."""


class AnalysisError(MqcError):
    """An analysis directory is missing, incomplete, corrupted, made for another model or other
    settings, or cannot be written (a full disk)."""
