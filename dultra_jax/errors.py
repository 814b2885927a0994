"""The errors a user can cause, under one base: `UserError`.

A `UserError` is a mistake in what the user gave (a flag, a config key, a file, a directory, a
prompt), never a bug: its message names the culprit and says what was expected, and the
launchers (`dultra_jax.cli`) print it as one line, `NAME.py: error: MESSAGE`, with exit status 2
and no traceback. Anything else that escapes a launcher is a bug and keeps its traceback.

Each kind is also a `ValueError` (they were before there was a common base, and callers catch
them as such). The modules that raise them re-export them (`dultra_jax.config.ConfigError`,
`dultra_jax.sharding.ShardingError`, ...), so either import works.

Not here: `rewards.code.SandboxError`, raised when the code sandbox cannot be set up on this
machine (permissions, namespaces). That is the environment's fault, not the user's input, and its
traceback is what a bug report needs.
"""

from __future__ import annotations


class UserError(Exception):
    """The one base of every error a user can cause; the message names the culprit."""


class ConfigError(UserError, ValueError):
    """A config value is missing, unknown or inconsistent; the message names the key."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model; names the culprit."""


class ShardingError(UserError, ValueError):
    """A shape does not divide the mesh; the message names the array, the dim and the axis."""


class DataError(UserError, ValueError):
    """A data file, source or text that cannot be used as asked (message names the path / field)."""


class TokensError(UserError, ValueError):
    """A token file or array is malformed; the message names the file, the row and the value."""


class DistributedError(UserError, ValueError):
    """Inconsistent multi-process settings; the message names the flag."""
