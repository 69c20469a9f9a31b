"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class MakdError(Exception):
    """A problem with the user's input (file, row, option) that the user can fix."""
