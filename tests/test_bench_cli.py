"""Smoke tests of ``python -m pipedream bench`` at tiny sizes.

They check what the runner prints and writes and that each workload really
delivers what it claims; they never judge speed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipedream
from pipedream import _backend, bench
from pipedream.__main__ import main as cli_main

SRC = str(Path(pipedream.__file__).resolve().parent.parent)
FIGURES = {"n", "seconds", "msgs_per_s", "deliveries", "deliveries_per_s", "drops", "ratio"}


def run_cli(*args, timeout=60):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "pipedream", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_quick_run_prints_the_table_and_writes_every_figure(tmp_path):
    path = tmp_path / "bench.json"
    done = run_cli("bench", "--quick", "--json", str(path))
    assert done.returncode == 0, done.stderr

    out = done.stdout
    header = next(line for line in out.splitlines() if line.startswith("workload")).split()
    assert header == ["workload", "system", "msgs/s", "deliveries/s", "ratio", "drops"]
    for text in ("W1 K=8", "W1b K=64", "W2", "W3", "W4", "W5", "C1 K=8", "asyncio.Queue",
                 "queue.Queue", "call_soon_threadsafe", "python reliable", "targets",
                 "memory"):
        assert text in out
    assert "[1/" in done.stderr          # progress goes to stderr

    report = json.loads(path.read_text())
    assert {"machine", "python_version", "core", "workloads", "memory", "targets"} <= set(report)
    assert report["core"] == _backend.core_name
    for name, workload in report["workloads"].items():
        assert {"cython", "python"} <= set(workload["systems"]), name
        for system, figures in workload["systems"].items():
            assert "unavailable" in figures or FIGURES <= set(figures), (name, system)
    # The stdlib baselines never depend on pipedream features: always measured.
    for name, system in (("W1 K=8", "asyncio.Queue"), ("W2", "asyncio.Queue+Future"),
                         ("W5", "queue.Queue"), ("W5", "call_soon_threadsafe")):
        assert "msgs_per_s" in report["workloads"][name]["systems"][system]
    assert report["workloads"]["W1 K=8"]["systems"]["asyncio.Queue"]["ratio"] == 1.0
    for target in report["targets"]:
        assert {"target", "goal", "measured", "met"} <= set(target)
    if "cython" in report["cores_unavailable"]:
        assert "cython core unavailable" in out

    # Every system of every workload delivers what the workload promises.
    for name, workload in report["workloads"].items():
        for system, figures in workload["systems"].items():
            if "unavailable" in figures:
                continue
            expected = figures["n"] * DELIVERIES_PER_MESSAGE[name]
            assert figures["deliveries"] + figures["drops"] == expected, (name, system)


DELIVERIES_PER_MESSAGE = {
    "W1 K=1": 1, "W1 K=8": 8, "W1 K=64": 64, "W1b K=1": 1, "W1b K=8": 8, "W1b K=64": 64,
    "W2": 1, "W3": 0.5, "W4": 0.5, "W5": 1, "C1 K=8": 8,
}


def quick_report(tmp_path, only):
    path = tmp_path / "only.json"
    assert bench.main(["--quick", "--only", only, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_only_selects_groups(tmp_path, capsys):
    saved = _backend.core
    report = quick_report(tmp_path, "W3,W2")
    assert _backend.core is saved       # the core swap is undone
    assert set(report["workloads"]) == {"W2", "W3"}
    assert report["memory"] == {}
    assert set(report["workloads"]["W3"]["systems"]) == {"cython", "python", "asyncio.Queue"}


def test_only_accepts_full_names_and_memory(tmp_path, capsys):
    report = quick_report(tmp_path, "w1b k=8,MEM")
    assert set(report["workloads"]) == {"W1b K=8"}
    assert set(report["memory"]) == {"cython", "python"}
    python = report["memory"]["python"]
    assert python["bytes_per_buffered_message"] > 0
    assert set(python["idle_relay_bytes"]) == {"16", "65536"}


def test_bad_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--only", "W9"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "W9" in err and "W1b" in err
    with pytest.raises(SystemExit):
        bench.main(["--repeat", "0"])


def test_a_failing_system_is_reported_and_the_others_go_on():
    async def broken(values):
        raise NotImplementedError("not yet")

    async def fine(values):
        return len(values), 0

    workload = bench.Workload("T", "T", 100, "test", [
        bench.System("broken", broken), bench.System("fine", fine),
        bench.System("no core", fine, core="cython")], "fine")
    cores, missing = {}, {"cython": "ImportError: not built"}
    systems = bench.measure_workload(workload, 100, 2, cores, missing)
    assert systems["broken"] == {"unavailable": "NotImplementedError: not yet"}
    assert systems["no core"] == {"unavailable": "cython core unavailable"}
    assert systems["fine"]["deliveries"] == 100 and systems["fine"]["ratio"] == 1.0
    assert len(systems["fine"]["runs_s"]) == 2


def test_command_dispatch(capsys):
    assert cli_main([]) == 2
    assert "bench" in capsys.readouterr().out
    assert cli_main(["--help"]) == 0
    assert cli_main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err
