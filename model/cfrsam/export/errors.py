"""The export package's user-facing error."""


class ExportError(Exception):
    """A user-facing export/check failure (printed without a traceback)."""
