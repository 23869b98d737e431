"""How fast is ``cronfile import crontab`` on 10,000 crontab lines?

Generates 100 crontabs of 100 entries each (the shapes Debian ships and users write:
system lines with a user column, variable lines, nicknames, named ranges, steps, ``\\%``,
CRON_TZ, MAILTO) into a temporary directory and prints, measured in the same run:

* ``cronfile import crontab --system ... --out DIR`` run as a subprocess (interpreter start
  included: what a user waits for), and the in-process :func:`import_crontabs`;
* the baseline: loading the same 10,000 jobs from the YAML the import wrote, with the
  loader ``validate`` uses (:func:`load_file`), and the ratio of the two.

Target: the import of 10,000 lines <= 2 s.

Run: ``.venv/bin/python bench/import_crontab.py [--files N] [--lines M]``.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cronfile.schedules.crontab import import_crontabs
from cronfile.schedules.loader import load_file

SCHEDULES = ["17 * * * *", "25 6 * * *", "47 6 * * 7", "52 6 1 * *", "5-55/10 * * * *",
             "59 23 * * *", "0 */12 * * *", "09,39 * * * *", "30 7-23 * * *", "30 3 * * 0",
             "@daily", "@hourly", "@weekly", "*/15 8-18 * * mon-fri", "0 6 1 jan,apr,jul,oct *",
             "45 23 1,15 * fri", "0 9 * * 1-5", "5 4 * * sun", "*/20 * * * *"]
COMMANDS = ["cd / && run-parts --report /etc/cron.{n}",
            "test -x /usr/sbin/anacron || {{ cd / && run-parts --report /etc/cron.{n}; }}",
            "command -v debian-sa1 > /dev/null && debian-sa1 1 {n}",
            "[ -x /usr/lib/php/sessionclean ] && if [ ! -d /run/systemd/system ]; then "
            "/usr/lib/php/sessionclean {n}; fi",
            "/usr/local/bin/backup-{n} --target s3://bucket/{n} >> /var/log/backup.log 2>&1",
            "date +\\%Y-\\%m-\\%d-{n} >> /var/log/dates.log"]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"]


def crontab(rng: random.Random, number: int, lines: int) -> str:
    out = [f"# generated crontab {number}", "SHELL=/bin/sh",
           "PATH=/usr/local/sbin:/usr/local/bin:/sbin:/bin:/usr/sbin:/usr/bin"]
    for i in range(lines):
        if i % 25 == 0:
            out.append(f"CRON_TZ={rng.choice(ZONES)}")
            out.append(f"MAILTO={'ops@example.com' if rng.random() < 0.5 else ''}")
        command = rng.choice(COMMANDS).format(n=f"{number}-{i}")
        out.append(f"{rng.choice(SCHEDULES)}\troot\t{command}")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--lines", type=int, default=100, help="entries per crontab")
    args = parser.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "cron.d").mkdir()
        texts = []
        for n in range(args.files):
            text = crontab(rng, n, args.lines)
            path = root / "cron.d" / f"tab{n:03d}"
            path.write_text(text)
            texts.append((str(path), text))
        total = args.files * args.lines

        start = time.perf_counter()
        result = import_crontabs(texts, system=True)
        in_process = time.perf_counter() - start
        assert result.jobs == total, result.jobs

        start = time.perf_counter()
        loaded = sum(len(load_file(name, text.encode()).jobs) for name, text in result.outputs.items())
        baseline = time.perf_counter() - start
        assert loaded == total, loaded

        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "cronfile", "import", "crontab", "--system",
                               *(p for p, _ in texts), "--out", str(root / "out")],
                              capture_output=True, text=True)
        cli = time.perf_counter() - start
        assert done.returncode == 0, done.stderr[-2000:]

    print(f"{total} crontab lines in {args.files} files")
    print(f"  import (in process)        {in_process:7.3f} s")
    print(f"  import (cronfile command)  {cli:7.3f} s   target <= 2 s: "
          f"{'ok' if cli <= 2 else 'MISSED'}")
    print(f"  baseline: load the {total} jobs from YAML {baseline:7.3f} s")
    print(f"  ratio import / YAML load   {in_process / baseline:7.2f}")
    return 0 if cli <= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
