"""The one exception type for mistakes a user can make (bad option, missing file, no match).

The CLI turns it into a single line on stderr and exit status 2; library callers can catch it.
Anything else that escapes is a bug in gpconv and keeps its traceback.
"""


class GPConvError(Exception):
    """A user-facing error: the message alone says what is wrong and how to fix it."""
