"""The learned policy's pick (`ml`): the inference process's tables, checked by a guard.

The worker receives versioned tables over ZeroMQ (workers/telemetry.py) and
installs each with `set_table`; `check` decides every stats tick whether the
table may route; `pick` routes by it and by the worker's own load curves
(workers/loadcurve.py).  Everything is local to the worker.
"""

from __future__ import annotations

from time import monotonic

import numpy as np

from workers.backend import Backend
from workers.classic import P2CEwma
from workers.explore import stale_backend
from workers.guard import CONTROL, LEARNED, Guard
from workers.loadcurve import ChunkedFit, Curve
from workers.patience import INF, Patience
from workers.probe import KneeProbe
from workers.rows import by_price, lower_bound, own_prior, table_view, weight_floor

FAIL_COST = 1.0  # seconds: what a failed request costs the pick, unless clients give up sooner
NO_ARM = -1  # a pick the guard does not judge (a retry)


class TableStrategy(P2CEwma):
    """Routes by expected latency (the `ml` strategy): the worker's load curves
    priced by the inference process's tables, checked by a guard.

    Each backend carries a `workers.loadcurve.Curve`, learned from this
    worker's answers: a service time per class and the number of requests the
    backend serves at once.  A table (`lb.core.messages.Table`) adds, per request
    class, the model's predicted latency and error probability of every
    backend, from what all workers saw.  A pick of class c:

    * takes the backend with the least expected cost of this request,

          ((1 - e) x (expected latency + externality) + e x fail_cost) x (failures + 1) ** 2,

      but no more than the larger of fail_cost and the cost before the
      factor (a backend is never priced past a sure failure)

      (its marginal cost): `e` is the priced error (the model's prediction
      shrunk towards what the backend did, as far as the model's record on
      the backend has earned it, inference/policy.py, read back from the
      table's cost over its latency, (1 - e) ** -8); the expected
      latency and the externality (the wait the request adds to the
      requests that queue behind it) are the load curve's
      (workers/loadcurve.py); `fail_cost` is what a failed request costs,
      the same for every class: FAIL_COST, or less once clients are seen to
      give up sooner; `failures` counts this worker's consecutive failures
      there (one failure: 4x, two: 9x; the table's error comes a tick
      later, and for a backend that refuses connections this is all the
      pick knows).  Without the cap, a backend failing 90% of its requests
      fast cost (0.9 s) x (failures + 1) ** 2, and on an overloaded fleet the
      healthy backend's queue grew until its answers came too late: more
      requests lost to the timeout than the failing backend would have lost.
      Until a table has priced errors (the first tables of a run say the
      inference process is warming up), and whenever no table may route
      (below), the priced error is this worker's own recent failure share
      there (`Backend.err`): one answer that succeeds between fast failures
      resets the count in a row, not the share.
      A class a backend has not answered yet (from this worker) is priced at
      the table's predicted latency, but no lower than the fleet's profile
      says (`weight_floor`, workers/rows.py: the class's typical service
      time, times how much dearer than typical the backend is on what it
      answered, times its configured weight factor).  A backend whose
      expected latency is past DEADLINE of how long clients wait
      (workers/patience.py: learned from the clients that gave up, never
      more than lb's upstream response timeout) is no candidate: the client will have gone before its answer.  When
      every backend is past it (an overload), the request is lost wherever
      it goes and goes to the backend with the longest expected latency, so
      that the others' queues stay short enough to answer in time.
      Backends are scanned in the order of their price when the table came
      (workers/rows.py `lower_bound`: the cost at the service time alone) and the scan stops at
      the first whose lower bound exceeds the best cost so far: a backend
      with a free slot among the cheapest ends the scan at once;
    * with probability `exploration` (`learning.exploration`, or the table's),
      first looks for a backend this worker has not heard from for STALE
      seconds and sends the request there instead (workers/explore.py); a
      backend with n failures in a row waits STALE x (n + 1) seconds, at
      most STALE x BACKOFF;
    * with `probe_share` > 0 (`capacity.explore`), lets a `KneeProbe`
      (workers/probe.py) take up to that share of the picks to hold a
      backend whose slot count is unmeasured at one request more than it,
      until its curve shows the knee.

    Without a usable table (`learned` False, `reason` says why: none yet,
    older than twice its publish interval because the inference process is
    late or down, or a table that says the model is not to be trusted) it
    routes by its curves alone: errors priced by its own failure share, classes not answered yet
    priced by `own_prior` (the class's typical cost and the backend's speed
    on what it answered; having answered nothing, the class's typical cost
    over its relative configured weight, or its peak EWMA over that weight
    while nobody has answered the class).
    It routes by P2C-EWMA only while the guard (workers/guard.py) finds the
    curves' picks worse than P2C-EWMA's (reason `guard`): a `guard_share` of
    the picks always goes by the other arm (P2C-EWMA while the curves route,
    the curves while the guard holds them off), and `arm` says which arm
    made the last pick, for the outcome to be credited to it.  P2C-EWMA sees
    no errors, so a control pick that lands on a backend whose last outcome
    from this worker was a failure is not sent: the control arm is charged
    the outcome the request would likely have had (an error with the
    probability `Backend.err`, the backend's recent failure share, else its
    peak EWMA) and the curves route the request, which no arm is credited
    with.  Nor is one sent to a backend whose peak EWMA (P2C-EWMA's own
    measure) is past `lost_after`: P2C-EWMA picks the better of two random
    backends, so with two slow ones in a small fleet it sends them a share
    of its picks however slow they are; the control arm is charged an
    error there.  Retries take the least expected cost among the backends not tried
    yet.
    """

    name = "ml"
    STALE = 1.0  # seconds without an answer before exploration looks at a backend
    BACKOFF = 10  # ... times (its failures in a row + 1), at most this many times
    DEADLINE = 0.75  # share of the clients' patience past which a request is taken as lost
    OWN_REFIT = 0.1  # seconds between refits of the curves when no table brings them
    FIT_CHUNK = 32  # backends whose curves are refitted per table

    def __init__(self, backends, *, class_names=("default",), guard_share: float = 0.0,
                 exploration: float = 0.0, probe_share: float = 0.0, deadline: float = INF,
                 **kw) -> None:
        super().__init__(backends, **kw)
        self.class_names = list(class_names)
        self.table = None
        self.learned = False  # the curves route, priced by the table (the guard's minority share aside)
        self.usable = False  # the table may price the picks (fresh, trusted)
        self.tripped = False  # the guard holds the curves off: P2C-EWMA routes
        self.reason = "no_table"
        self.guard = Guard(guard_share) if guard_share > 0 else None
        self.arm = NO_ARM  # which arm made the last pick (guard.LEARNED / CONTROL / NO_ARM)
        self.stale_after = 0.0
        # a table has priced errors (until then the worker prices them from its own answers)
        self.priced = False
        # share of picks that look for a backend not heard from lately: the
        # configured `learning.exploration` until a learned table says otherwise
        self.explore = exploration
        # capacity exploration (workers/probe.py): `capacity.explore` of the picks
        self.probe = KneeProbe(probe_share) if probe_share > 0 else None
        # how long clients wait, per class (workers/patience.py); `deadline`: lb's own upstream
        # response timeout
        self.patience = [Patience(deadline) for _ in self.class_names]
        # per class: expected seconds past which a request is lost
        self.lost_after = [self.DEADLINE * deadline] * len(self.class_names)
        n = len(self.class_names)
        for b in backends:
            if b.curve is None or len(b.curve.service) != n:  # (a rebuild over a new fleet keeps them)
                b.curve = Curve(n)
        self._curves = [b.curve for b in backends]
        self.clock = monotonic  # the clock answers are timed with (the simulator's is simulated)
        self._refit = ChunkedFit(self.FIT_CHUNK)  # the curves' refits, a chunk per table
        self._unknown = np.zeros(0)  # per backend: the price of its classes not answered yet
        self._factor = np.ones(0)  # per backend: the fleet's mean configured weight over its own
        # per local class: (backends by price, their prices, priced error by backend idx,
        # prior latency by backend idx)
        self._rows: list[tuple[list[Backend], list[float], list[float], list[float]]] = []
        self._own: list[tuple[list[Backend], list[float], list[float], list[float]]] = []
        self._cols_for: list[str] | None = None  # the table backend list `_cols` was built for
        self._cols: list[int] = []  # table column of each backend (by idx), -1 if absent
        self._barr: np.ndarray | None = None  # the backends as an object array (_objects)
        # per class: what a failed request costs (`fail_cost`), as of the last refresh: the
        # rows' lower bounds were built with it, so the pick reads it from here, not live
        self._fail: list[float] = []
        self.refresh()

    def set_table(self, table) -> None:
        self.table = table
        self.stale_after = table.ts + 2 * table.interval
        if len(table.cost):  # (a list, or a numpy array: lb.core.messages.decode_table_arrays)
            self.explore = table.exploration
            self.priced = True
        self._fit()
        self.refresh()

    def _fit(self) -> None:
        self._refit.step(self._curves, self.clock())

    def refresh(self) -> None:
        """Rebuild the per-class rows (new table, or backend availability changed).

        Runs once per table (every `learning.interval`) on the worker's event
        loop: column lookups are cached while the table's backend list stays the
        same, and the rows are built with numpy over all backends at once
        (bench/inference_bench.py measures it with the curves' refit).  The
        table's rows are built only from a table in learned mode, the worker's
        own rows only while no table may route."""
        backends = self.backends
        # a backend that has not answered yet is priced at its peak EWMA (the
        # default RTT) over its configured weight relative to the others: the
        # operator's weights steer traffic until answers replace them
        weight = np.array([b.weight for b in backends], dtype=np.float64)
        factor = self._factor = (weight[weight > 0].sum() or 1) / max(len(backends), 1) / np.maximum(weight, 1e-3)
        seen = np.array([b.curve.seen for b in backends], dtype=bool)
        self._unknown = np.array([b.ewma for b in backends], dtype=np.float64) * np.where(seen, 1.0, factor)
        table = self.table
        self._fail = [self.fail_cost(k) for k in range(len(self.class_names))]
        # every curve's service time per class, (backends, classes); 0 = no answer yet
        service = np.array([cv.service for cv in self._curves], dtype=np.float64).reshape(
            len(backends), len(self.class_names))
        if table is None or table.mode != "learned":
            self._rows = []  # (a table that may not route needs no rows: check() reads them only in learned mode)
        else:
            self._build_rows(table, service)
        if table is None or not self.usable:
            self._build_own(service)

    def fail_cost(self, cls: int) -> float:
        """Seconds a failed request of class `cls` costs against the latency of
        one that is answered: FAIL_COST, or the point past which its clients
        will have given up if that comes sooner (a request that fails costs
        no more than one that is lost)."""
        lost = self.lost_after[cls]
        return lost if lost < FAIL_COST else FAIL_COST

    def _objects(self) -> np.ndarray:
        """The backends as a numpy object array (rows take them by index in one
        C-level step); rebuilt if the list changed."""
        backends = self.backends
        arr = self._barr
        if arr is None or len(arr) != len(backends) or (len(arr) and arr[-1] is not backends[-1]):
            arr = self._barr = np.empty(len(backends), dtype=object)
            arr[:] = backends
        return arr

    def _build_own(self, service: np.ndarray) -> None:
        """The worker's own rows, for when no table may route: its curves alone,
        no priced error (the pick prices errors by the worker's own failure
        share).  A class a backend has not answered yet is priced by
        `own_prior`: its speed on the classes it has answered, at the class's
        cost where other backends answered it; a backend that has answered
        nothing, at the class's typical cost over its relative weight; a
        class nobody answered, as `_unknown`."""
        backends = self.backends
        unknown = self._unknown
        zeros = [0.0] * len(backends)
        if not backends:
            self._own = [([], [], zeros, []) for _ in self.class_names]
            return
        live = np.array([b.available for b in backends])
        svc = service.T  # (classes, backends)
        prior = own_prior(svc, unknown, self._factor)
        price = lower_bound(np.where(svc != 0.0, svc, prior), np.zeros_like(svc), self._fail, False)
        ordered, prices, n = by_price(self._objects(), price, np.broadcast_to(live, price.shape))
        pri = prior.tolist()
        self._own = [(ordered[k][:n[k]], prices[k][:n[k]], zeros, pri[k]) for k in range(len(n))]

    def _build_rows(self, table, service: np.ndarray) -> None:
        """Each class's row, vectorised over classes and backends at once
        (numpy): the candidates in price order (a stable sort: ties keep the
        backends' order), their prices, and every backend's priced error and prior.
        tests/unit/test_table_rows.py checks the rows against a per-backend rule."""
        backends = self.backends
        if table.backends != self._cols_for:
            col = {name: i for i, name in enumerate(table.backends)}
            self._cols = [col.get(b.name, -1) for b in backends]
            self._cols_for = table.backends
        if not backends:
            self._rows = [([], [], [], []) for _ in self.class_names]
            return
        # the table's column of each backend (by idx), -1 if absent or unavailable
        cols = np.array([c if b.available else -1 for b, c in zip(backends, self._cols)], dtype=np.int64)
        cand, prior, err = table_view(table, cols, self.class_names, self._unknown)
        svc = service.T
        unanswered = svc == 0.0
        if unanswered.any():  # a class not answered yet: its prior, no lower than the profile's floor
            prior = np.where(unanswered, np.maximum(prior, weight_floor(svc, self._factor)), prior)
            svc = np.where(unanswered, prior, svc)
        price = lower_bound(svc, err, self._fail, self.priced)
        ordered, prices, n = by_price(self._objects(), price, cand)
        errs = err.tolist()
        pri = prior.tolist()
        self._rows = [(ordered[k][:n[k]], prices[k][:n[k]], errs[k], pri[k]) for k in range(len(n))]

    def check(self, now: float) -> tuple[bool, str]:
        """Decide the mode from the table held at wall-clock `now` (every stats
        tick and every table)."""
        table = self.table
        if table is None:
            usable, reason = False, "no_table"
        elif now > self.stale_after:
            usable, reason = False, "stale"
        elif table.mode != "learned":
            usable, reason = False, table.reason or "inference_fallback"
        elif not any(r[0] for r in self._rows):
            usable, reason = False, "no_weights"
        else:
            usable, reason = True, ""
        if not usable and (self.usable or self.clock() - self._refit.last >= self.OWN_REFIT):
            # no table to bring the refits: the worker refits its curves and
            # rebuilds its own rows itself
            self.usable = False
            self._fit()
            self.refresh()
        self.usable = usable
        self.tripped = self.guard is not None and not self.guard.tick(now)
        learned = usable and not self.tripped
        if self.tripped:
            reason = "guard"
        self.learned = learned
        self.reason = reason
        return learned, reason

    def pick(self, exclude=(), cls=0):
        if exclude:  # a retry: the least expected cost among the backends not tried yet
            self.arm = NO_ARM
            return super().pick(exclude) if self.tripped else self._table_pick(cls, exclude)
        g = self.guard
        if g is not None:
            # the other arm takes the minority share: P2C-EWMA while the curves
            # route, the curves while the guard holds them off
            if (self.rng.random() < g.current) != self.tripped:
                b = super().pick(exclude)
                if b is not None and not self.tripped:
                    late = b.ewma > self.lost_after[cls]
                    if late or b.failures:
                        # P2C-EWMA would send this request to a backend whose last
                        # answer here failed, or whose peak EWMA is past the point
                        # where clients give up: the control arm is charged the
                        # outcome the request would likely have had there (lost, if
                        # late), and the curves route it
                        g.expect(CONTROL, 1.0 if late else b.err, b.ewma)
                        self.arm = NO_ARM
                        return self._table_pick(cls)
                self.arm = CONTROL
                return b
            self.arm = LEARNED
        return self._table_pick(cls)

    def abandoned(self, age: float, cls: int = 0) -> None:
        p = self.patience[cls]
        p.gave_up(age)
        self.lost_after[cls] = self.DEADLINE * p.deadline

    def _table_pick(self, cls: int, exclude=()):
        usable = self.usable
        own_err = not (usable and self.priced)  # errors priced by this worker's own failure share
        order, prices, priced, prior = (self._rows if usable else self._own)[cls]
        if not order:
            return super().pick(exclude)
        if self.explore and not exclude and self.rng.random() < self.explore:
            b = self._stale(order, cls)
            if b is not None:
                return b
        if self.probe is not None and not exclude:
            b = self.probe.steer(order, prices, self.clock())
            if b is not None:
                self.arm = NO_ARM  # a measurement, not the policy's choice: the guard does not judge it
                return b
        best = None
        best_cost = 0.0
        lost = None  # the backend with the longest expected latency past `lost_after`
        lost_at = 0.0
        limit = self.lost_after[cls]
        fail = self._fail[cls]
        now = self.clock()
        for b, price in zip(order, prices):
            if best is not None and price >= best_cost:
                break  # every backend from here on costs at least its price
            if not b.available or (exclude and b in exclude):
                continue
            i = b.idx
            cv = b.curve
            latency = cv.expected(cls, b.inflight, prior[i], now)
            if latency > limit:
                # the client will have given up before the answer: not a candidate
                if latency > lost_at:
                    lost, lost_at = b, latency
                continue
            e = b.err if own_err else priced[i]
            # answered: its latency and the wait it adds to the requests behind
            # it (`Curve.externality`, inline: one call less per backend scanned);
            # failed: a failure's cost
            k = cv.slots
            queued = b.inflight + 1 - k
            cost = latency + (cv.service[cls] or prior[i]) * cv.pace / k * queued if queued > 0 else latency
            if e:
                cost = (1.0 - e) * cost + e * fail
            if b.failures:
                # failures in a row raise the price, never past a sure failure's
                f = b.failures + 1
                capped = cost if cost > fail else fail
                cost *= f * f
                if cost > capped:
                    cost = capped
            if best is None or cost < best_cost:
                best, best_cost = b, cost
        if best is None:
            # every backend is past the deadline (an overload): the request is
            # lost anyway, and goes where the most is lost already, which keeps
            # the others' queues short enough to answer in time
            best = lost
        return best if best is not None else super().pick(exclude)

    def _stale(self, order, cls=0):
        """Exploration's backend (workers/explore.py), if any."""
        priors = [r[3] for r in (self._rows if self.usable else self._own)]
        return stale_backend(order, self.clock(), self.STALE, self.BACKOFF, cls, priors)
