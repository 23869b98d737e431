"""``cronfile center --log-runs``: one line per finished run in the center's own log, so a
newcomer running ``make demo`` sees the jobs run (a real center subprocess)."""

from __future__ import annotations

import re
from pathlib import Path

from centerlib import CenterProc, finished, wait_for

JOBS = """\
apiVersion: cronfile/v1
jobs:
  greet:
    trigger: {event: hello}
    command: ["echo", "hello"]
  boom:
    trigger: {event: hello}
    command: "exit 3"
"""


class LoggingCenter(CenterProc):
    def argv(self) -> list[str]:
        return [*super().argv(), "--log-runs"]


def test_every_finished_run_gives_one_log_line(tmp_path: Path) -> None:
    center = LoggingCenter(tmp_path, watch=False)
    center.write("jobs.yaml", JOBS)
    center.start()
    try:
        assert center.cli("trigger", "hello").returncode == 0
        runs = center.wait_runs(lambda rs: len(finished(rs)) == 2 and finished(rs), 10,
                                "both runs")
        ids = {r["job"]: r["run_id"] for r in runs}

        def run_lines() -> list[str]:
            return [line for line in center.log_text().splitlines()
                    if re.search(r" run \S+ on local: ", line)]

        text = "\n".join(wait_for(lambda: len(run_lines()) == 2 and run_lines(), 10,
                                  "a log line per run"))
        assert re.search(rf"INFO .*greet run {ids['greet']} on local: succeeded exit 0 "
                         r"in \d+\.\d\ds$", text, re.M), text
        assert re.search(rf"INFO .*boom run {ids['boom']} on local: failed exit 3 "
                         r"in \d+\.\d\ds$", text, re.M), text
        assert "\x1b[" not in center.log_text()  # no colour in a log file
    finally:
        center.stop()


def test_make_demo_passes_it() -> None:
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"cronfile center .*--log-runs", demo), demo
