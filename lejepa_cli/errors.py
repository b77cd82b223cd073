"""User-facing errors: the CLI turns these into one red line and an exit code, no traceback."""


class UserError(Exception):
    """A problem with the user's input (arguments, config, files), not a bug in the tool.

    The message must be one line that names the problem and, where possible, what is allowed.
    """

    exit_code = 2


class RunFailed(UserError):
    """A run stopped for a reason the user must act on (non-finite loss, full disk, ...)."""

    exit_code = 1


def out_of_memory(error: BaseException) -> str | None:
    """What ran out when `error` is an allocation failure (MemoryError, torch's OutOfMemoryError,
    the CPU allocator's RuntimeError), in a few words; None for any other error."""
    import re

    text = str(error)
    if not (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or (isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))):
        return None
    if (found := re.search(r"tried to allocate ([0-9.]+) ?(bytes|[KMGT]iB)", text)) is not None:
        size = float(found[1]) / 2**20 if found[2] == "bytes" else None
        return f"could not allocate {f'{size:.0f} MiB' if size is not None else found[1] + ' ' + found[2]}"
    return "out of memory"
