"""Stop signals: SIGINT and SIGTERM end a run after the current step, with last.ckpt written."""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("topkast")


class StopSignals:
    """Signals that end a run early, without losing it.

    SIGINT (Ctrl-C) and SIGTERM (what a cluster sends before it kills a job) ask the loop to
    stop after the current step: it writes last.ckpt, flushes the logs, and the process
    exits with 128 + the signal number (130, 143). A second one exits at once.

    A signal that someone else already handles with a Python function (submitit: SIGUSR2
    checkpoints and requeues the job, SIGTERM is logged and ignored) is not taken over but
    chained: the loop finishes the step, writes last.ckpt, then calls that handler, which
    decides (submitit requeues and exits; a requeued `resume=auto` job continues from the
    checkpoint). SIGUSR1/SIGUSR2 without such a handler, and ignored signals, are left
    alone. Handlers can only be installed from the main thread (elsewhere: no handling).

    With several ranks (`agree`), a signal to any rank stops every rank after the same step,
    and a chained one also stops the run once passed on. A launcher passes the signal it
    gets on to every rank, which the same signal may have reached directly (a process
    group's SIGTERM): the same signal again within `repeat_grace_s` is that copy, not a
    second request.

    DataLoader workers get a Ctrl-C or a cluster's SIGTERM too (the whole process group).
    They are forked with these handlers: there SIGINT is ignored (the main process stops
    after the step and shuts them down) and other signals do what they did before us.
    SIGTERM ends a worker (torch's own handler), which makes torch fail the main process
    wherever it is (SIGCHLD): once a stop is asked for, that failure is logged instead, a
    loader that broke off ends the epoch, and the loop checkpoints the step it has done
    (see `fit`).
    """

    OWN = (signal.SIGINT, signal.SIGTERM)
    CHAINABLE = tuple(getattr(signal, n) for n in ("SIGUSR1", "SIGUSR2") if hasattr(signal, n))

    def __init__(self, repeat_grace_s: float = 0.0, collective: bool = False):
        self.repeat_grace_s = repeat_grace_s
        # collective: what this process got takes effect at the next `agree`, on every rank
        # at once (the loop of each rank must take the same branches).
        self.collective = collective
        self._received_at = 0.0
        self.got: int | None = None  # the owned signal this process got
        self.got_chained: list[int] = []  # the chained signals this process got
        self.received: int | None = None  # an owned signal: stop after this step
        self.pending: list[int] = []  # chained signals: checkpoint, then call their handler
        self._previous: dict = {}
        self._chained: set[int] = set()
        self._on_child = None  # torch's SIGCHLD handler, wrapped once a stop is asked for
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.received is not None or bool(self.pending)

    @property
    def signalled(self) -> bool:
        """A stop is asked for, or this process got a signal not yet agreed on."""
        return self.requested or self.got is not None or bool(self.got_chained)

    def __enter__(self):
        self._pid = os.getpid()
        for sig in self.OWN + self.CHAINABLE:
            previous = signal.getsignal(sig)
            foreign = callable(previous) and previous is not signal.default_int_handler
            if previous in (signal.SIG_IGN, None) or (sig not in self.OWN and not foreign):
                continue
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to whoever runs us
                break
            self._previous[sig] = previous
            if foreign:
                self._chained.add(sig)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked child (see above)
            if signum != signal.SIGINT:
                signal.signal(signum, self._previous[signum])
                os.kill(os.getpid(), signum)
            return
        self._tolerate_worker_exits()
        name = signal.Signals(signum).name
        if signum in self._chained:
            if signum in self.got_chained:  # the second one does not wait for the step
                self._previous[signum](signum, frame)
            else:
                self.got_chained.append(signum)
                if not self.collective:
                    self.pending.append(signum)
                log.warning("received %s: writing last.ckpt after this step, then passing it on", name)
            return
        if self.got is not None:
            if signum == self.got and time.monotonic() - self._received_at < self.repeat_grace_s:
                return  # the launcher's copy of the same signal
            log.warning("received %s again: exiting now (last.ckpt is from an earlier step)", name)
            raise SystemExit(128 + signum)
        self.got, self._received_at = signum, time.monotonic()
        if not self.collective:
            self.received = signum
        log.warning("received %s: stopping after this step and writing last.ckpt (again to stop now)", name)

    def _tolerate_worker_exits(self) -> None:
        child = getattr(signal, "SIGCHLD", None)
        current = signal.getsignal(child) if child else None
        if callable(current) and current != self._worker_exited:
            self._previous.setdefault(child, current)
            self._on_child = current
            signal.signal(child, self._worker_exited)

    def _worker_exited(self, signum, frame):
        try:
            self._on_child(signum, frame)
        except RuntimeError as e:  # torch: "DataLoader worker (pid N) is killed by signal"
            log.warning("%s (after the stop signal)", str(e).strip().splitlines()[0])

    def agree(self, all_max) -> None:
        """Several ranks: after each step, adopt what any rank received (`all_max`: the
        element-wise maximum over ranks of a list of ints), so all stop after this step. A
        chained signal also ends the run: its handler (e.g. submitit's requeue) acts on
        rank 0 only."""
        flags = [self.got or 0] + [int(sig in self.got_chained) for sig in self.CHAINABLE]
        agreed = all_max(flags)
        if agreed[0] and self.received is None:
            self.received = agreed[0]
        for sig, on in zip(self.CHAINABLE, agreed[1:]):
            if not on or self.received is not None and sig in self.pending:
                continue
            if sig in self._chained:
                self.pending.append(sig)
            if self.received is None:
                self.received = int(sig)

    def pass_on(self) -> None:
        """After the checkpoint: call the handlers of chained signals (they may exit)."""
        while self.pending:
            sig = self.pending.pop(0)
            self._previous[sig](sig, None)

    def __exit__(self, *exc):
        if os.getpid() == self._pid:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        return False
