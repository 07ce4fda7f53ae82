"""Time left in a `character run`: the work estimate of each stage (character/execution/work.py, in vLLM token
passes), calibrated on the run itself. Each stage also pays a fixed start-up (engine actors or a Ray Train worker
group). After every finished stage, the seconds per token pass measured over the stages done so far turn the work
left into an estimate; stages skipped as complete count as no work. Also the progress line of a streamed stage
and the table of a run's stages."""
from __future__ import annotations

import sys
import time

STARTUP_S = 30.0  # start-up per stage on a 2-core box (import vllm + engine, or Ray Train workers + DeepSpeed)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


class RunProgress:
    """Prints, before each stage, the time so far and an estimate of the time left."""

    def __init__(self, stages: list[str], work: dict[str, float]):
        self.stages, self.work = stages, work
        self.start = time.monotonic()
        self.done_work = self.done_seconds = 0.0
        self.stage_start = self.start

    def begin(self, index: int) -> str:
        self.stage_start = time.monotonic()
        name = self.stages[index]
        line = f"[run] stage {index + 1}/{len(self.stages)} {name}: {_clock(self.stage_start - self.start)} so far"
        left = self.estimate_left(index)
        return line + (f"; about {_clock(left)} left (estimate)" if left is not None else "")

    def end(self, index: int, skipped: bool) -> None:
        if skipped:
            self.work[self.stages[index]] = 0.0
            return
        self.done_work += self.work[self.stages[index]]
        self.done_seconds += max(0.0, time.monotonic() - self.stage_start - STARTUP_S)

    def estimate_left(self, index: int) -> float | None:
        """Seconds for stages index.. at the rate measured so far; None before any stage has done work."""
        if self.done_work <= 0:
            return None
        rate = self.done_seconds / self.done_work
        rest = self.stages[index:]
        return sum(self.work[s] * rate + (STARTUP_S if self.work[s] else 0.0) for s in rest)


class ProgressLine:
    """done/total, rate and time left of one long loop on the driver: a live tqdm bar on a terminal; in a log
    (stdout not a terminal: a Ray job, CI) one line at each tenth of the total, with tqdm's own formatting.
    tqdm alone cannot do the second: without a terminal it rewrites one line with carriage returns."""

    FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} UNITS [{elapsed} elapsed, {remaining} left, {rate_fmt}]"

    def __init__(self, desc: str, total: int | None, unit: str = "rows", interactive: bool | None = None,
                 file=None):
        from tqdm.auto import tqdm

        self.desc, self.total, self.unit, self.n = desc, total, unit, 0
        self.file = file or sys.stdout
        self.interactive = self.file.isatty() if interactive is None else interactive
        self.start, self.printed = time.monotonic(), 0
        self.bar = tqdm(total=total, desc=desc, unit=unit.rstrip("s") or "it", file=self.file) \
            if self.interactive else None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if self.total:
            tenth = min(10, int(10 * self.n / self.total))
            if tenth > self.printed:
                self.printed = tenth
                self._print()
        elif time.monotonic() - self.start > 60 * (self.printed + 1):  # unknown total: about once a minute
            self.printed += 1
            self._print()

    def _print(self) -> None:
        from tqdm import tqdm

        line = tqdm.format_meter(self.n, self.total, time.monotonic() - self.start, prefix=self.desc,
                                 unit=self.unit.rstrip("s") or "it",  # rates per row, counts in rows
                                 bar_format=self.FORMAT.replace("UNITS", self.unit) if self.total else None)
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.total is None and self.n:
            self._print()

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stage_table(rows: list[dict]) -> str:
    """The table `character run` ends with: one line per stage (stage, rows in, rows out, seconds, done/skipped)."""
    head = ("stage", "rows in", "rows out", "seconds", "status")
    body = [(r["stage"], *(("-", "-", "-") if r["skipped"] else (str(r["rows_in"]), str(r["rows_out"]),
                                                                  f"{r['seconds']:.1f}")),
             "skipped (complete)" if r["skipped"] else "done") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) if i in (0, 4) else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))).rstrip()
             for line in (head, *body)]
    return "\n".join(lines)
