"""Progress of long checks: which check, how far, how long.

Check.execute opens a Tracker for each check when the Subject has a progress sink. The work reports to
it: the Subject's chunk loop ("inputs" done of a batch of work, Subject.chunks), the optimiser ("steps"
of its budget), the randomisation cascade ("steps"). The Tracker renders one line,

    occlusion-drop: inputs 4,200/7,980 · 12 s

and hands a ProgressEvent to the sink only once the check has run `delay` seconds (short checks stay
silent) and then at most every `interval` seconds, so reporting costs nothing measurable. A sink is any
callable taking a ProgressEvent; `finished` events close a check's line.

Sinks: under pytest the plugin writes the line in place on an interactive terminal and nothing when
output goes to a log (a CI job keeps its one summary line per check); in library use,
`tqdm_progress()` (a tqdm bar per check where tqdm is installed, else lines on stderr) or your own.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

#: Seconds a check runs before its progress is shown; seconds between two updates.
DELAY_S = 2.0
INTERVAL_S = 0.5


@dataclass
class ProgressEvent:
    check: str
    unit: str  # the unit of the innermost loop reported last ("inputs", "steps")
    done: int
    total: int
    elapsed_s: float
    line: str  # the whole state, e.g. "saliency-sanity: steps 3/11 · inputs 8/16 · 14 s"
    finished: bool = False


Sink = Callable[[ProgressEvent], None]


@dataclass
class Tracker:
    """The progress of one check; `update` is cheap enough to call after every chunk."""

    check: str
    sink: Sink
    delay_s: float = DELAY_S
    interval_s: float = INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    start: float = 0.0
    levels: dict[str, tuple[int, int]] = field(default_factory=dict)  # unit -> (done, total), outer first
    shown: bool = False
    _last: float = -1e18
    _unit: str = ""

    def __post_init__(self) -> None:
        self.start = self.clock()

    def update(self, unit: str, done: int, total: int) -> None:
        self.levels[unit] = (int(done), int(total))
        self._unit = unit
        now = self.clock()
        if now - self.start < self.delay_s or now - self._last < self.interval_s:
            return
        self._last, self.shown = now, True
        self.sink(self._event(now))

    def finish(self) -> None:
        """Close the line (only when one was shown)."""
        if self.shown:
            self.sink(self._event(self.clock(), finished=True))

    def _event(self, now: float, finished: bool = False) -> ProgressEvent:
        elapsed = now - self.start
        parts = [f"{unit} {done:,}/{total:,}" for unit, (done, total) in self.levels.items()]
        line = f"{self.check}: {' · '.join(parts + [f'{elapsed:.0f} s'])}"
        done, total = self.levels.get(self._unit, (0, 0))
        return ProgressEvent(self.check, self._unit, done, total, elapsed, line, finished)


def tqdm_progress(file=None) -> Sink:
    """A sink for library use: one tqdm bar per check (of its outermost unit) where tqdm is installed,
    else the line on `file` (stderr) at each update."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    out = file or sys.stderr
    bars: dict[str, object] = {}

    def sink(event: ProgressEvent) -> None:
        if tqdm is None:
            if not event.finished:
                print(event.line, file=out, flush=True)
            return
        bar = bars.get(event.check)
        if bar is None:
            bar = bars[event.check] = tqdm(total=event.total, desc=event.check, unit=event.unit, file=out)
        bar.total, bar.n = event.total, event.done
        bar.set_postfix_str(event.line.split(": ", 1)[-1], refresh=False)
        bar.refresh()
        if event.finished:
            bar.close()
            del bars[event.check]

    return sink


def report(subject, unit: str, done: int, total: int) -> None:
    """Tell the check running on `subject` (if it tracks progress) that `done` of `total` `unit` are done."""
    tracker: Optional[Tracker] = getattr(subject, "tracker", None)
    if tracker is not None:
        tracker.update(unit, done, total)
