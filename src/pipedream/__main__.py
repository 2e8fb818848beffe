"""``python -m pipedream``: the ``bench`` and ``replay`` commands.

Each command parses its own arguments; this only dispatches, importing the
command's module when it is asked for.
"""

import sys

USAGE = """usage: python -m pipedream COMMAND [ARGS]

commands:
  bench    pipedream side by side with stdlib baselines (python -m pipedream bench --help)
  replay   a telemetry pipeline over a real log file (python -m pipedream replay --help)
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from .bench import main as command_main
    elif command == "replay":
        try:
            from .replay import main as command_main
        except ImportError as exc:
            sys.stderr.write("python -m pipedream replay: not available (%s)\n" % exc)
            return 2
    else:
        sys.stderr.write("python -m pipedream: unknown command %r\n\n%s" % (command, USAGE))
        return 2
    return command_main(rest)


if __name__ == "__main__":
    sys.exit(main())
