"""``python -m pipedream replay``: parsing, the pipeline's counts, the command line.

The pipeline runs on both cores (``relay_core``) over a small temp file whose
counts are known exactly.
"""

import os

import pytest

from pipedream import __main__ as cli
from pipedream import replay

from conftest import run

GOOD = """\
2025-06-24 14:36:25 startup archives unpack
2025-06-24 14:36:25 upgrade libudev1:amd64 252.36-1~deb12u1 252.38-1~deb12u1
2025-06-24 14:36:25 status half-configured libudev1:amd64 252.36-1~deb12u1
2025-06-24 14:36:25 status unpacked libudev1:amd64 252.38-1~deb12u1
2025-06-24 14:36:25 startup packages configure
2025-06-24 14:36:25 configure libudev1:amd64 252.38-1~deb12u1 <none>
2025-06-24 14:36:25 status half-configured libudev1:amd64 252.38-1~deb12u1
2025-06-24 14:36:25 status installed libudev1:amd64 252.38-1~deb12u1
2025-06-24 14:36:29 install perl-modules-5.36:all <none> 5.36.0-7+deb12u2
2025-06-24 14:36:29 status half-installed perl-modules-5.36:all 5.36.0-7+deb12u2
2025-06-24 14:43:06 purge less:amd64 590-2.1~deb12u2 <none>
2025-06-24 14:43:06 status not-installed less:amd64 <none>
2025-06-24 14:43:22 conffile /etc/ssh/ssh_config keep
"""

BAD = """\
this is not a dpkg line
2025-13-45 14:36:25 status installed foo:amd64 1.0
2025-06-24 14:36:25 status installed foo:amd64
2025-06-24 14:36:25 explode foo:amd64 1.0 2.0
2025-06-24 14:36:25 startup archives
\x00\x01\x02 binary junk
"""


@pytest.fixture
def log_file(tmp_path):
    path = tmp_path / "dpkg.log"
    # Bad lines and blank lines interleaved with the good ones.
    lines = []
    bad = BAD.splitlines()
    for i, line in enumerate(GOOD.splitlines()):
        lines.append(line)
        if i < len(bad):
            lines.append(bad[i])
        if i % 4 == 0:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_parse_line_kinds():
    status = replay.parse_line("2025-06-24 14:36:25 status installed libc-bin:amd64 2.36-9")
    assert isinstance(status, replay.Status)
    assert (status.state, status.package, status.version) == ("installed", "libc-bin:amd64", "2.36-9")
    assert status.when.isoformat() == "2025-06-24T14:36:25"
    action = replay.parse_line("2025-06-24 14:36:29 install perl:all <none> 5.36.0-7")
    assert isinstance(action, replay.Action)
    assert (action.action, action.old_version, action.new_version) == ("install", None, "5.36.0-7")
    assert isinstance(replay.parse_line("2025-06-24 14:36:25 startup packages configure"),
                      replay.Startup)
    conffile = replay.parse_line("2025-06-24 14:43:22 conffile /etc/ssh/ssh_config keep")
    assert (conffile.path, conffile.decision) == ("/etc/ssh/ssh_config", "keep")
    for line in BAD.splitlines() + ["", "   "]:
        assert replay.parse_line(line) is None, line


def test_replay_counts_are_exact(relay_core, log_file):
    lines = log_file.read_text(encoding="utf-8").splitlines()
    report = run(replay.replay(lines, repeat=3, path=str(log_file)))
    assert report.core == relay_core
    assert report.lines == 3 * 19          # 13 good + 6 bad; blank lines are skipped
    assert report.unparsed == 3 * 6
    assert report.events == 3 * 13
    assert report.stages == {"events": 39, "statuses": 18, "states": 18,
                             "actions": 12, "other": 9}
    assert report.states == {"half-configured": 6, "unpacked": 3, "installed": 3,
                             "half-installed": 3, "not-installed": 3}
    assert report.actions == {"upgrade": 3, "configure": 3, "install": 3, "purge": 3}
    assert report.other == {"Startup": 6, "Conffile": 3}
    assert report.batches >= 1
    assert report.dropped == 0 and report.errors == 0


def test_shipped_sample_parses_completely():
    assert os.path.exists(replay.SAMPLE_LOG)
    with open(replay.SAMPLE_LOG, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert 150 <= len(lines) <= 300
    assert all(replay.parse_line(line) is not None for line in lines)
    kinds = {type(replay.parse_line(line)).__name__ for line in lines}
    assert kinds == {"Status", "Action", "Startup", "Conffile"}


def test_default_path_is_a_readable_log():
    path = replay.default_path()
    assert path in (replay.DEFAULT_LOG, replay.SAMPLE_LOG)
    assert os.access(path, os.R_OK)


def test_command_line_prints_the_report(log_file, capsys):
    assert cli.main(["replay", str(log_file), "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "replay %s" % log_file in out
    assert "38 read, 26 events, 12 unparsed" in out
    assert "events 26 -> statuses 12, actions 8, other 6" in out
    assert "drops      0" in out
    assert "lines/s" in out


def test_command_line_on_the_sample(capsys):
    assert replay.main([replay.SAMPLE_LOG]) == 0
    out = capsys.readouterr().out
    assert "209 read, 209 events, 0 unparsed" in out


def test_command_line_errors(tmp_path, capsys):
    assert replay.main([str(tmp_path / "missing.log")]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        replay.main(["--repeat", "0"])
    assert exit_info.value.code == 2
    assert "--repeat" in capsys.readouterr().err


def test_progress_is_reported_on_long_runs(monkeypatch):
    monkeypatch.setattr(replay, "PROGRESS_EVERY", 0.0)
    calls = []
    lines = GOOD.splitlines() * 100     # 1300 lines: a few CHUNKs
    report = run(replay.replay(lines, progress=lambda done, total: calls.append((done, total))))
    assert report.events == 1300
    assert calls and all(total == 1300 for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
