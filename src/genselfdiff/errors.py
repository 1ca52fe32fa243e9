"""Errors a user can cause and fix.

The CLI prints a :class:`UserError` as one sentence (exit status 2) and the napari
widgets show it as a notification; any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: a bad file, a wrong shape, a mismatched model."""
