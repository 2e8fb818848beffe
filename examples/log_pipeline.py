"""A telemetry pipeline over a dpkg log, with pipedream.

    python examples/log_pipeline.py [PATH]

PATH defaults to /var/log/dpkg.log, or the sample shipped with pipedream.
Each line becomes a typed event (``Status``, ``Action``, ... from
``pipedream.replay``), then:

    events ─ tap: rate
      split(Status)
      ├─ statuses ─ map(state) ─ batch(100, timeout=50 ms) ─ sink: count states
      └─ rest ─ only(Action) ─ filter(install/upgrade) ─ sink: count packages

``python -m pipedream replay`` is the fuller version (per-stage counts,
drops, progress, ``--repeat``).
"""

import asyncio
import sys
import time
from collections import Counter

from pipedream import Relay
from pipedream.replay import Action, Event, Status, default_path, parse_line


async def main(path):
    tx, events = Relay.channel()

    # A tap sees every event; here it measures the rate.
    seen = {"events": 0, "first": None, "last": None}

    def rate(_event):
        now = time.perf_counter()
        seen["events"] += 1
        seen["first"] = seen["first"] or now
        seen["last"] = now

    events.tap(Event, rate)

    # Split by kind: status lines on one side, everything else on the other.
    statuses, rest = events.split(Status)

    # Status lines: keep the state, batch the states, count them per batch.
    # (The intermediate relays need no name: the sink keeps the chain alive.)
    states = Counter()
    batches = []

    def count_states(batch):
        batches.append(len(batch))
        states.update(batch)

    statuses.map(Status, lambda s: s.state).batch(str, 100, timeout=0.05).sink(list, count_states)

    # Actions: which packages were installed or upgraded.
    installed = Counter()
    (rest.only(Action)
         .filter(Action, lambda a: a.action in ("install", "upgrade"))
         .sink(Action, lambda a: installed.update([a.action])))

    # Feed the log in. Lines that do not parse are counted, not fatal.
    unparsed = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            event = parse_line(line)
            if event is not None:
                tx.send_nowait(event)
            elif line.strip():
                unparsed += 1
            if number % 256 == 0:
                await asyncio.sleep(0)      # let the pipeline run

    await tx.aclose()   # close, then wait until every stage has drained

    elapsed = (seen["last"] or 0) - (seen["first"] or 0)
    print("events    %d (unparsed lines: %d)" % (seen["events"], unparsed))
    print("states    %d in %d batches: %s" % (
        sum(states.values()), len(batches),
        ", ".join("%s %d" % kv for kv in states.most_common())))
    print("packages  %s" % ", ".join("%s %d" % kv for kv in installed.most_common()))
    if elapsed > 0:
        print("rate      %.0f events/s" % (seen["events"] / elapsed))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else default_path()))
