"""``python -m pipedream replay [PATH] [--repeat N]``: a telemetry pipeline over a real log.

Each line of a dpkg log becomes a typed event (``Status``, ``Action``,
``Startup``, ``Conffile``) and goes through this pipeline::

    events ─ tap: RateMeter (events/s)
      split(Status)
      ├─ statuses ─ map(state) ─ batch(256, timeout=50 ms) ─ sink: count states
      └─ rest ─ split(Action)
               ├─ actions ─ sink: count actions (install, upgrade, ...)
               └─ other ─ sink: count other events (startup, conffile)

``PATH`` defaults to ``/var/log/dpkg.log`` (Debian, Ubuntu) and falls back to
a sample shipped with the package. Lines that do not parse are counted and
reported; blank lines are skipped. At the end it prints throughput, per-stage
counts and drops; long runs show their progress on stderr.

The source relay is observable (the default): the reader yields to the loop
every ``CHUNK`` lines, and any message a stage still lost is counted in
"drops", never hidden.
"""

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional

from . import _backend
from .channel import Relay
from .errors import Empty, RelayClosed, RelayError

__all__ = ["Event", "Status", "Action", "Startup", "Conffile", "parse_line",
           "RateMeter", "Report", "replay", "default_path", "main"]

DEFAULT_LOG = "/var/log/dpkg.log"
SAMPLE_LOG = os.path.join(os.path.dirname(__file__), "data", "sample.log")

#: Lines sent between two yields to the event loop (lets the stages keep up).
CHUNK = 512
#: Seconds between two progress lines on stderr.
PROGRESS_EVERY = 0.5


# -- events ----------------------------------------------------------------------

@dataclass
class Event:
    """One line of a dpkg log."""
    when: datetime


@dataclass
class Status(Event):
    """``status <state> <package> <version>``: a package changed state."""
    state: str
    package: str
    version: Optional[str]


@dataclass
class Action(Event):
    """``<action> <package> <old version> <new version>``: dpkg acted on a package."""
    action: str
    package: str
    old_version: Optional[str]
    new_version: Optional[str]


@dataclass
class Startup(Event):
    """``startup <scope> <command>``: dpkg started a run (``archives unpack``...)."""
    scope: str
    command: str


@dataclass
class Conffile(Event):
    """``conffile <path> <decision>``: what happened to a configuration file."""
    path: str
    decision: str


ACTIONS = frozenset({"install", "upgrade", "remove", "purge", "configure", "trigproc"})


def _version(text):
    return None if text == "<none>" else text


def parse_line(line):
    """The event for one dpkg log line, or None if it does not parse."""
    parts = line.split()
    if len(parts) < 5:
        return None
    try:
        when = datetime.fromisoformat(parts[0] + " " + parts[1])
    except ValueError:
        return None
    kind = parts[2]
    if len(parts) == 6:
        if kind == "status":
            return Status(when, parts[3], parts[4], _version(parts[5]))
        if kind in ACTIONS:
            return Action(when, kind, parts[3], _version(parts[4]), _version(parts[5]))
    elif len(parts) == 5:
        if kind == "startup":
            return Startup(when, parts[3], parts[4])
        if kind == "conffile":
            return Conffile(when, parts[3], parts[4])
    return None


# -- the tap and the report ----------------------------------------------------------

class RateMeter:
    """A tap: counts events and tracks their rate (mean, and peak over 0.1 s windows)."""

    WINDOW = 0.1

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self.count = 0
        self.first = self.last = None
        self.peak = 0.0
        self._window_start = None
        self._window_count = 0

    def observe(self, _event):
        now = self._clock()
        if self.first is None:
            self.first = self._window_start = now
        self.last = now
        self.count += 1
        self._window_count += 1
        elapsed = now - self._window_start
        if elapsed >= self.WINDOW:
            self.peak = max(self.peak, self._window_count / elapsed)
            self._window_start, self._window_count = now, 0

    @property
    def mean(self):
        """Events per second between the first and the last event seen."""
        if self.first is None or self.last == self.first:
            return 0.0
        return self.count / (self.last - self.first)


@dataclass
class Report:
    """What a replay saw. ``stages``: messages that reached each stage."""
    path: str
    core: str
    lines: int = 0
    unparsed: int = 0
    events: int = 0
    stages: Counter = field(default_factory=Counter)
    states: Counter = field(default_factory=Counter)
    actions: Counter = field(default_factory=Counter)
    other: Counter = field(default_factory=Counter)
    batches: int = 0
    dropped: int = 0
    errors: int = 0
    elapsed: float = 0.0
    rate_mean: float = 0.0
    rate_peak: float = 0.0

    def format(self):
        def counts(counter):
            return ", ".join("%s %d" % item for item in counter.most_common()) or "-"

        lines_per_s = self.lines / self.elapsed if self.elapsed else 0.0
        mean_batch = self.stages["states"] / self.batches if self.batches else 0.0
        out = [
            "replay %s (%s core)" % (self.path, self.core),
            "  lines      %d read, %d events, %d unparsed" % (self.lines, self.events, self.unparsed),
            "  stages     events %d -> statuses %d, actions %d, other %d"
            % (self.stages["events"], self.stages["statuses"], self.stages["actions"],
               self.stages["other"]),
            "             statuses -> states %d -> %d batches (mean size %.1f)"
            % (self.stages["states"], self.batches, mean_batch),
            "  states     " + counts(self.states),
            "  actions    " + counts(self.actions),
            "  other      " + counts(self.other),
            "  drops      %d" % self.dropped,
            "  errors     %d" % self.errors,
            "  throughput %.0f lines/s (%.3f s)" % (lines_per_s, self.elapsed),
            "  rate tap   mean %.0f events/s, peak %s"
            % (self.rate_mean, "%.0f events/s" % self.rate_peak if self.rate_peak
               else "- (run shorter than one %.1f s window)" % RateMeter.WINDOW),
        ]
        return "\n".join(out) + "\n"


def _core_label():
    return "python" if _backend.core.__name__.endswith("_py") else "cython"


# -- the pipeline ------------------------------------------------------------------

def _counter(report, stage, counter=None, key=None):
    """A sink/tap function counting what reaches ``stage`` (and by ``key``)."""
    def count(value):
        report.stages[stage] += 1
        if counter is not None:
            counter[key(value)] += 1
    return count


async def replay(lines, repeat=1, path="-", progress=None):
    """Run the pipeline over ``lines`` (``repeat`` times); return a ``Report``.

    ``progress(done, total)`` is called about every ``PROGRESS_EVERY`` seconds.
    """
    report = Report(path, _core_label())
    rates = RateMeter()

    tx, events = Relay.channel()
    errors = events.subscribe(RelayError)
    events.tap(Event, rates.observe)
    events.tap(Event, _counter(report, "events"))

    statuses, rest = events.split(Status)
    actions, other = rest.split(Action)
    statuses.tap(Status, _counter(report, "statuses"))
    states = statuses.map(Status, lambda status: status.state)
    states.tap(str, _counter(report, "states"))
    batches = states.batch(str, 256, timeout=0.05)

    def count_states(batch):
        report.batches += 1
        report.states.update(batch)

    batches.sink(list, count_states)
    actions.sink(Action, _counter(report, "actions", report.actions, lambda a: a.action))
    other.sink(Event, _counter(report, "other", report.other, lambda e: type(e).__name__))

    total = len(lines) * repeat
    start = last_progress = time.perf_counter()
    done = blank = 0
    for _ in range(repeat):
        for line in lines:
            done += 1
            if not line.strip():
                blank += 1
            else:
                event = parse_line(line)
                if event is None:
                    report.unparsed += 1
                else:
                    tx.send_nowait(event)
                    report.events += 1
            if done % CHUNK == 0:
                await asyncio.sleep(0)  # let the stages run
                now = time.perf_counter()
                if progress is not None and now - last_progress >= PROGRESS_EVERY:
                    progress(done, total)
                    last_progress = now
    report.lines = done - blank
    await tx.aclose()          # closes, then waits until every stage has drained
    report.elapsed = time.perf_counter() - start

    relays = [tx, statuses, rest, actions, other, states, batches]
    report.dropped = sum(relay.dropped for relay in relays)
    report.errors = _count_buffered(errors)
    report.rate_mean, report.rate_peak = rates.mean, rates.peak
    return report


def _count_buffered(sub):
    count = 0
    while True:
        try:
            sub.recv_nowait()
        except (Empty, RelayClosed):
            return count
        count += 1


# -- command line ---------------------------------------------------------------------

def default_path():
    """``/var/log/dpkg.log`` if it is readable here, else the shipped sample."""
    if os.access(DEFAULT_LOG, os.R_OK):
        return DEFAULT_LOG
    return SAMPLE_LOG


def _print_progress(done, total):
    sys.stderr.write("replay: %d/%d lines (%d%%)\n" % (done, total, 100 * done // total))
    sys.stderr.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m pipedream replay",
        description="Replay a dpkg log through a pipedream telemetry pipeline "
                    "(split, map, batch, a counting sink, a rate tap) and print "
                    "throughput, per-stage counts and drops.")
    parser.add_argument("path", nargs="?", default=None,
                        help="a dpkg log (default: %s if readable, else the shipped sample)"
                        % DEFAULT_LOG)
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="replay the file N times (default 1)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1, got %d" % args.repeat)
    path = args.path or default_path()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        sys.stderr.write("python -m pipedream replay: cannot read %s: %s\n" % (path, exc))
        return 2
    report = asyncio.run(replay(lines, args.repeat, path, _print_progress))
    sys.stdout.write(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
