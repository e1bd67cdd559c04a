"""User-facing error type.

A ``UserError`` means the input (config, data, checkpoint, command line) is
wrong, not the code. The entry points catch it, print its message and exit
with status 2 without touching any existing output. Messages name the key or
path, the value that was given, and what to change.
"""


class UserError(Exception):
    """Bad user input; the message says what to change. Exit status 2."""
