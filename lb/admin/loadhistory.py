"""The instance's request rate, one value per minute, kept for the load forecast.

Fed once a second with the cumulative request count (the admin's counters,
monotonic across worker and admin restarts); each full minute appends that
minute's mean rate.  Kept in `load-history.json` in the runtime directory
(written atomically once a minute and when the admin stops), so it survives
admin restarts, and lb restarts when `runtime_dir` is configured.  Bounded to
MAX_MINUTES; a gap (lb stopped) longer than MAX_GAP minutes starts the
series again, shorter ones are filled by interpolation.  A file that cannot be
read or parsed is replaced, with a log line, never a crash.
"""

from __future__ import annotations

import json
import os
import time

from lb.core import log

FILE = "load-history.json"
MAX_MINUTES = 14 * 1440  # two weeks
MAX_GAP = 30  # minutes


class LoadHistory:
    def __init__(self, runtime_dir: str | None) -> None:
        self.path = os.path.join(runtime_dir, FILE) if runtime_dir else None
        self.start = 0  # the first minute (Unix time // 60) of `rates`
        self.rates: list[float] = []
        self._minute = -1  # the minute being counted
        self._count_at = 0.0  # the request counter when it began
        self.dirty = False

    # -- the series ----------------------------------------------------------------

    def observe(self, now: float, requests: int) -> None:
        minute = int(now // 60)
        if self._minute < 0 or requests < self._count_at:
            self._minute, self._count_at = minute, requests  # the first reading (or a reset counter)
            return
        if minute == self._minute:
            return
        if minute == self._minute + 1:  # a whole minute was counted
            self.append(self._minute, (requests - self._count_at) / 60.0)
        self._minute, self._count_at = minute, requests

    def append(self, minute: int, rate: float) -> None:
        if not self.rates:
            self.start, self.rates = minute, [rate]
        else:
            end = self.start + len(self.rates)
            if minute < end:
                return  # already have it (clock stepped back)
            gap = minute - end
            if gap > MAX_GAP:
                self.start, self.rates = minute, [rate]  # too long a gap: a new series
            else:
                last = self.rates[-1]
                self.rates += [last + (rate - last) * (i + 1) / (gap + 1) for i in range(gap)]
                self.rates.append(rate)
        if len(self.rates) > MAX_MINUTES:
            cut = len(self.rates) - MAX_MINUTES
            self.start += cut
            del self.rates[:cut]
        self.dirty = True

    def series(self) -> list[float]:
        return list(self.rates)

    # -- the file -------------------------------------------------------------------

    def load(self) -> None:
        if self.path is None or not os.path.exists(self.path):
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            start, rates = int(data["start"]), [float(r) for r in data["rates"]]
            if data.get("version") != 1 or any(r < 0 or r != r for r in rates):
                raise ValueError("unexpected content")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.log("load_history_replaced", path=self.path, error=f"{type(exc).__name__}: {exc}")
            self.start, self.rates = 0, []
            self.dirty = True
            self.save()
            return
        self.start, self.rates = start, rates[-MAX_MINUTES:]
        self.start += len(rates) - len(self.rates)
        log.log("load_history_loaded", minutes=len(self.rates))

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "start": self.start, "rates": [round(r, 3) for r in self.rates],
                           "saved": time.time()}, f)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError as exc:
            log.log("load_history_not_saved", path=self.path, error=str(exc))
