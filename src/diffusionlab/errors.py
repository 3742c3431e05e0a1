"""The one exception type for bad user input.

Every check on user-supplied values raises :class:`DiffusionLabError` (a ``ValueError``) whose message
names the bad value and what is allowed; the CLI prints that message on one line and exits non-zero.
"""


class DiffusionLabError(ValueError):
    """Bad input: the message names the offending value and what is allowed."""
