"""Typed errors.

Nothing below the CLI prints or exits.  Library code raises one of these; the CLI turns any
``UserError`` into one ``error: ...`` line on stderr and exit code 2.  Anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input a user can fix: the message is the whole story, no traceback needed."""


class ModelNotFoundError(UserError):
    """A path or hub id that does not lead to a model."""


class CorruptModelError(UserError):
    """Model files that exist but cannot be read (truncated, malformed, missing tensors)."""


class UnsupportedError(UserError):
    """A valid input we deliberately do not handle (architecture, GGUF tensor type, op...)."""


class BadArgumentError(UserError):
    """A flag value or spec that does not parse."""
