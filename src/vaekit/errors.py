"""The one exception type a user can cause; the CLI prints its message without a traceback."""


class VaekitError(Exception):
    """An error the user can fix: bad path, bad config value, mismatched checkpoint.

    The message says what went wrong and what to do about it.
    """
