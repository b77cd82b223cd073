"""User-facing errors: the CLI turns these into one red line and an exit code, no traceback."""


class UserError(Exception):
    """A problem with the user's input (arguments, config, files), not a bug in the tool.

    The message must be one line that names the problem and, where possible, what is allowed.
    """

    exit_code = 2


class RunFailed(UserError):
    """A run stopped for a reason the user must act on (non-finite loss, full disk, ...)."""

    exit_code = 1
