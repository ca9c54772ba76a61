"""pytest plugin writing RELIABILITY.md (`make reliability`): every test marked
`@pytest.mark.reliability(kind)` that ran, under its kind (fault, fuzz, load): what it does (its
docstring, or its name), its outcome and time, and the figures it recorded with pytest's
`record_property` (cases run, time to recover, calls failed, ...). The marker is declared in
pyproject.toml, so the tests run the same without this plugin.

    pytest -p tests.reliability --reliability-report RELIABILITY.md tests/...
"""

from __future__ import annotations

import collections
import datetime
import inspect
import os
import platform
import subprocess
from pathlib import Path

import pytest


KINDS = {
    "fault": "Faults: processes killed and restarted, replicas failing, Redis lost, the store's disk full or read-only",
    "fuzz": "Fuzzing: generated requests, pushes and bodies against the checks and a running server",
    "load": "Load: concurrent trainers and evaluators against a running server",
}


def pytest_addoption(parser):
    parser.addoption("--reliability-report", default=None, help="write the reliability report (markdown) here")


def pytest_configure(config):
    path = config.getoption("--reliability-report", default=None)
    if path:
        config.pluginmanager.register(Report(Path(path), config.invocation_params.args), "reliability-report")


class Report:
    def __init__(self, path: Path, args):
        self.path = path
        self.args = " ".join(str(a) for a in args)
        self.rows: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        row = self.rows.get(report.nodeid)
        if row is None:
            return
        if report.when == "call" or report.outcome != "passed":
            row["outcome"] = report.outcome if report.when == "call" else f"{report.outcome} ({report.when})"
        if report.when == "call":
            row["seconds"] = report.duration
        row["figures"] = list(report.user_properties)  # the teardown's has those a fixture recorded last

    def pytest_collection_modifyitems(self, items):
        for item in items:
            marker = item.get_closest_marker("reliability")
            if marker is not None:
                if not marker.args or marker.args[0] not in KINDS:
                    raise pytest.UsageError(f"{item.nodeid}: mark it reliability(kind), kind one of {', '.join(KINDS)}")
                doc = inspect.getdoc(getattr(item, "function", None)) or ""
                what = " ".join(doc.split("\n\n")[0].split()) or item.name.removeprefix("test_").replace("_", " ")
                self.rows[item.nodeid] = {"kind": marker.args[0], "what": what, "outcome": "not run", "figures": []}

    def pytest_sessionfinish(self, session):
        self.path.write_text(self.render())

    def render(self) -> str:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        outcomes = collections.Counter(r["outcome"].split(" ")[0] for r in self.rows.values())
        lines = [
            "# Reliability",
            "",
            f"Written by `make reliability` (`pytest {self.args}`) on {datetime.date.today()}, commit "
            f"{commit or 'unknown'}, {_cpu()}. Do not edit by hand.",
            "",
            "Results: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items())) + ". A test that "
            "checks that nothing committed was lost (the versions and outputs served afterwards are the committed "
            "ones) says so in its figures (`data lost`).",
        ]
        for kind, title in KINDS.items():
            rows = [(nodeid, r) for nodeid, r in self.rows.items() if r["kind"] == kind]
            if not rows:
                continue
            lines += ["", f"## {title}", "", "| test | what it does | result | figures |", "|---|---|---|---|"]
            for nodeid, r in rows:
                figures = "; ".join(f"{k}: {_fmt(v)}" for k, v in r["figures"]) or "-"
                result = r["outcome"] + (f", {r['seconds']:.1f} s" if "seconds" in r else "")
                lines.append(f"| `{nodeid}` | {_cell(r['what'])} | {result} | {_cell(figures)} |")
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {len(os.sched_getaffinity(0))} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()
