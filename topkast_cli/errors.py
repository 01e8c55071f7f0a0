"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input (config value, path, checkpoint). Message: one line."""

    exit_code = 2


class RunFailed(UserError):
    """The run could not go on (loss diverged, disk full); what it wrote so far is kept."""

    exit_code = 1


def check_int(key: str, value, lo: int = 1) -> int:
    """`value` must be an integer >= lo (not a bool), else one line naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise UserError(f"{key}={value!r} must be an integer >= {lo}")
    return value


def check_number(key: str, value, lo: float = 0.0, hi: float | None = None) -> float:
    """`value` must be a number in [lo, hi] (hi None: no upper bound)."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if bad or value < lo or (hi is not None and value > hi):
        allowed = f"a number >= {lo}" if hi is None else f"a number in [{lo}, {hi}]"
        raise UserError(f"{key}={value!r} must be {allowed}")
    return float(value)
