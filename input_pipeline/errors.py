"""The error every data source raises for the user's data or data flags.

A module of its own so that the modules ``base`` builds on (``selection``) can raise
it without importing ``base``.
"""


class DataError(ValueError):
    """A problem with the user's data or data flags, reported as one line."""
