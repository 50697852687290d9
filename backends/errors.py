"""The one exception type users see as a one-line message (the CLI exits non-zero with it).
It lives at the bottom of the stack, beside the backends, so a backend can raise it without
importing the engine; engine.errors re-exports it. Kept free of heavy imports (the CLI loads it first)."""


class EngineError(Exception):
    """Bad input or an impossible request: printed as `error: <message>`, no traceback."""


class Interrupted(EngineError):
    """The job was stopped by a signal after its workers wrote a checkpoint: printed as
    `stopped: <message>`, exit code 128 + the signal number (as shells report it)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
