"""The one exception type users see as a one-line message: defined in backends.errors (below the
engine, so backends need not import the engine) and re-exported here for the engine's own modules."""
from backends.errors import EngineError, Interrupted

__all__ = ["EngineError", "Interrupted"]
