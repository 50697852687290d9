"""The one exception type users see as a one-line message (CLI exits non-zero with it)."""


class EngineError(Exception):
    """Bad input or an impossible request: printed as `error: <message>`, no traceback."""
