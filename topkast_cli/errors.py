"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input (config value, path, checkpoint). Message: one line."""

    exit_code = 2


class RunFailed(UserError):
    """The run could not go on (loss diverged, disk full); what it wrote so far is kept."""

    exit_code = 1
