"""Library warnings once per process.

torch, DeepSpeed, transformers and ColossalAI warn from inside every training step (a ZeRO-3 run
printed torch's `reduce_scatter_tensor` FutureWarning once per collective: thousands of lines).
Python's own once-per-location registry does not hold: every change of the warning filters (any
`warnings.catch_warnings()` block, which libraries enter per step) clears it. `install()` shows
each warning once per process, keyed by (category, message text), whatever the filters say, and
does the same for WARNING records of the libraries' loggers. Errors are untouched: a filter that
turns a warning into an exception raises before anything is shown, and log records above WARNING
always pass.

Called at the start of every worker process (engine.worker.run) and in the launcher
(engine.preflight.resolve_job).
"""
from __future__ import annotations

import logging
import os
import warnings

# loggers whose records are filtered on the logger itself (records logged on it directly) and on
# the handlers it has when install() runs (records of its children that reach those handlers)
LIBRARY_LOGGERS = ("DeepSpeed", "transformers", "colossalai", "bitsandbytes", "torch", "py.warnings")

# loggers that only say an optional extra is missing, nothing a run needs: quiet below ERROR.
# bitsandbytes (peft imports it; transformers' scheduler module imports peft) warns on every CPU with
# AVX-512 BF16 that its optional hub kernel for 4-bit matmuls could not be loaded; 4-bit runs would
# fail on their own, loudly.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)

# warnings (and WARNING records) that only say an optional extra is missing or which device a library
# picked: library noise, shown with ENGINE_VERBOSE=1. ColossalAI warns at import that tensornvme (async
# checkpoint writes) and apex (fused RMSNorm/LayerNorm kernels) are not installed; DeepSpeed says it
# set its accelerator to CPU on a machine without a GPU, which is what the run asked for.
# PEFT calling transformers' deprecated `is_gradient_checkpointing` is one library warning about another:
# nothing a user can act on either.
OPTIONAL_EXTRAS = ("install the latest tensornvme", "install apex from source", "Setting accelerator to CPU",
                   "`is_gradient_checkpointing` is deprecated")


def _library_noise(text: str) -> bool:
    return os.environ.get("ENGINE_VERBOSE", "") in ("", "0") and any(s in text for s in OPTIONAL_EXTRAS)


_seen_warnings: set[tuple[type, str]] = set()
_installed = False


class OncePerMessage(logging.Filter):
    """Passes a WARNING record the first time its (logger, message) is seen in this process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        try:
            key = (record.name, record.getMessage())
        except Exception:  # a malformed record: let logging report it as usual
            return True
        if _library_noise(key[1]):
            return False
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_log_filter = OncePerMessage()


def install() -> None:
    """Idempotent; affects only this process."""
    global _installed
    if _installed:
        return
    _installed = True
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        key = (category, str(message))
        if key in _seen_warnings or _library_noise(key[1]):
            return
        _seen_warnings.add(key)
        shown(message, category, filename, lineno, file, line)

    showwarning.__wrapped__ = shown  # type: ignore[attr-defined]
    warnings.showwarning = showwarning
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:  # transformers' save_pretrained/from_pretrained progress bars: noise in a training log
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    targets = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    for logger in targets:
        logger.addFilter(_log_filter)
    handlers = [h for logger in (logging.getLogger(), *targets) for h in logger.handlers]
    if logging.lastResort is not None:  # what records reaching an unconfigured root are printed by
        handlers.append(logging.lastResort)
    for handler in handlers:
        if _log_filter not in handler.filters:
            handler.addFilter(_log_filter)
