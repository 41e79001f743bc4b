"""The one exception type a user can cause; the CLI prints its message without a traceback."""

import re

# `<webdataset.gopen.Pipe object at 0x7f3a...>`: what str() of a library's exception may carry about
# the objects it was given. It means nothing to a user and differs on every run.
_OBJECT_REPR = re.compile(r"<[\w.<>]*?(\w+) object at 0x[0-9a-fA-F]+>")


class VaekitError(Exception):
    """An error the user can fix: bad path, bad config value, mismatched checkpoint.

    The message says what went wrong and what to do about it.
    """


def plain_text(text):
    """`text` as one line of plain words: object reprs reduced to their class name, line breaks to spaces."""
    return re.sub(r"\s*[\r\n]+\s*", " ", _OBJECT_REPR.sub(r"\1", str(text))).strip()


def describe_exception(error):
    """'Type: message' of an exception raised inside a library, as plain one-line text for an error message."""
    return plain_text(f"{type(error).__name__}: {error}")
