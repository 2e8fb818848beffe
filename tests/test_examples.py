"""The examples run as written (``python examples/NAME.py``) and print exact counts."""

import os
import subprocess
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SRC = os.path.join(os.path.dirname(EXAMPLES), "src")

LOG = """\
2025-06-24 14:36:25 startup archives unpack
2025-06-24 14:36:25 upgrade libudev1:amd64 252.36-1~deb12u1 252.38-1~deb12u1
2025-06-24 14:36:25 status half-configured libudev1:amd64 252.36-1~deb12u1
2025-06-24 14:36:25 status unpacked libudev1:amd64 252.38-1~deb12u1
not a log line

2025-06-24 14:36:29 install perl-modules-5.36:all <none> 5.36.0-7+deb12u2
2025-06-24 14:36:29 status half-installed perl-modules-5.36:all 5.36.0-7+deb12u2
2025-06-24 14:36:30 configure perl-modules-5.36:all 5.36.0-7+deb12u2 <none>
2025-06-24 14:36:30 status installed perl-modules-5.36:all 5.36.0-7+deb12u2
"""


def run_example(name, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore::RuntimeWarning"    # "no Cython core" fallback
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_log_pipeline_example(tmp_path):
    log = tmp_path / "dpkg.log"
    log.write_text(LOG, encoding="utf-8")
    result = run_example("log_pipeline.py", str(log))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "events    8 (unparsed lines: 1)" in out
    assert "states    4 in 1 batches" in out
    assert "packages  upgrade 1, install 1" in out or "packages  install 1, upgrade 1" in out
    assert result.stderr == ""


def test_log_pipeline_example_default_path():
    result = run_example("log_pipeline.py")
    assert result.returncode == 0, result.stderr
    assert "(unparsed lines: " in result.stdout
