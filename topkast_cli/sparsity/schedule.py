"""When masks change: one schedule object that every method uses (as jaxpruner's scheduler is
shared by its algorithms).

A schedule has a period `every`, and a window (`begin`, `end`] of optimizer steps in which
masks may change. `begin` and `end` are step counts or fractions of the run (0 < x < 1),
turned into steps by `resolve(total_steps)`; `end` may be None (no end). Steps are counted as
in the trainer's hooks: `updates_at(step)` asks whether masks change after optimizer step
`step` (1-based).

How the methods use it:

- Top-KAST: every=refresh_interval, end=exploration_steps, update_at_end: masks are
  refreshed every `every` steps, and once more when they lock at the end (refinement).
- SET / RigL: every=update_interval, end=end_steps: an update at the end only if it falls on
  the period; RigL's cosine drop fraction follows `progress`.
- GMP: every=prune_interval, begin=begin_steps, end=end_steps, update_at_end: pruning steps
  are counted from `begin`, the cubic count follows `progress`.
"""

from __future__ import annotations

from ..errors import UserError, check_int


def check_steps(key: str, value):
    """A schedule point: null, a step count >= 0, or a fraction 0 < x < 1 of the run."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, float) and 0.0 < value < 1.0:
        return value
    raise UserError(f"{key}={value!r} must be null, a step count >= 0, or a fraction of the run in (0, 1)")


def resolve_steps(value, total_steps: int | None) -> int | None:
    """Steps for a value of `check_steps`; a fraction needs the run's length (else None)."""
    if isinstance(value, float):
        return round(value * total_steps) if total_steps is not None else None
    return value


class MaskSchedule:
    """Masks change after step t (1-based) when begin < t <= end (no end: end = None) and
    (t - begin) is a multiple of `every`, or t == end and `update_at_end`.

    `begin_at` / `end_at` are the points as given (counts or fractions); `begin` / `end` are
    the steps they resolve to (None while a fraction waits for the run's length). `names`
    are the config keys of (every, begin, end), used in error messages.
    """

    def __init__(
        self,
        every: int,
        begin: int | float = 0,
        end: int | float | None = None,
        update_at_end: bool = False,
        names: tuple[str, str, str] = ("every", "begin", "end"),
    ):
        self.names = names
        self.every = check_int(names[0], every)
        self.begin_at = check_steps(names[1], begin)
        self.end_at = check_steps(names[2], end)
        if self.begin_at is None:
            raise UserError(f"{names[1]} must be set (a step count or a fraction of the run)")
        if type(self.begin_at) is type(self.end_at) and self.begin_at > self.end_at:
            raise UserError(f"{names[1]}={begin} is after {names[2]}={end}")
        self.update_at_end = bool(update_at_end)
        self.resolve(None)

    def resolve(self, total_steps: int | None) -> "MaskSchedule":
        """Turn points given as fractions into steps of a run of `total_steps` (None: unknown)."""
        self.begin = resolve_steps(self.begin_at, total_steps)
        self.end = resolve_steps(self.end_at, total_steps)
        if self.begin is not None and self.end is not None and self.begin > self.end:
            raise UserError(f"{self.names[1]} ({self.begin} steps) is after {self.names[2]} ({self.end})")
        return self

    @property
    def resolved(self) -> bool:
        """Whether every point is a step count (a fraction needs `resolve(total_steps)`)."""
        return self.begin is not None and (self.end_at is None or self.end is not None)

    def ended(self, step: int) -> bool:
        """True once `step` steps are done and the window is over (step >= end): the last
        update, if any, happened after step `end`. Never with no end."""
        return self.end is not None and step >= self.end

    def updates_at(self, step: int) -> bool:
        """Whether masks change after optimizer step `step` (1-based)."""
        if step <= self.begin or (self.end is not None and step > self.end):
            return False
        return (step - self.begin) % self.every == 0 or (self.update_at_end and step == self.end)

    def progress(self, step: int) -> float:
        """Share of the window done after `step` steps: 0 up to `begin`, 1 from `end` on,
        linear in between. Needs an end."""
        if self.end is None or self.begin is None:
            raise ValueError("progress needs a resolved begin and end (resolve(total_steps))")
        if step >= self.end:
            return 1.0
        if step <= self.begin:
            return 0.0
        return (step - self.begin) / (self.end - self.begin)

    def __repr__(self) -> str:
        return (f"MaskSchedule(every={self.every}, begin={self.begin_at!r}, end={self.end_at!r}, "
                f"update_at_end={self.update_at_end})")
