"""`/metrics`: Prometheus exposition of the aggregated state.

A custom collector builds every family at scrape time from what the admin
process holds (no metric objects are updated per message), registered on a
private registry.  Counters come from cumulative worker counters summed over
every worker pid ever heard, so they never go backwards across restarts.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from lb.core.messages import LATENCY_BOUNDS

from .state import AdminState
from .stats import STATUS_CLASSES, TLS_FAILED

WORKER_COUNTER_HELP = {
    "accepted": ("lb_connections_accepted", "Client connections accepted."),
    "requests": ("lb_requests", "Client requests received (every request head, lb-answered ones included)."),
    "rejected": ("lb_rejected", "Requests answered 4xx by lb itself (malformed or over a limit)."),
    "timeouts": ("lb_client_timeouts", "Client-side timeouts (408 or connection closed)."),
    "no_backend": ("lb_no_backend", "Requests answered 503 because nothing was routable."),
    "shed": ("lb_shed", "Requests answered 503 by a protection limit (load shedding, circuit breaking)."),
    "limited": ("lb_limited", "Requests answered 429 by the per-client rate limit."),
    "abandoned": ("lb_client_abandoned",
                  "Requests whose client closed its connection while waiting for the backend's answer."),
    "proxy_errors": ("lb_proxy_protocol_errors",
                     "Connections closed for a missing or malformed PROXY protocol header."),
}


class AdminCollector(Collector):
    def __init__(self, state: AdminState) -> None:
        self.s = state

    def collect(self):  # noqa: C901 - one flat list of families
        s = self.s
        totals = s.agg.totals()
        g = s.agg.gauges()
        names = s.backend_names()

        # -- per backend, from the workers' counters ---------------------------------
        req = CounterMetricFamily("lb_backend_requests", "Requests dispatched to a backend (retries included).",
                                  labels=["backend"])
        resp = CounterMetricFamily("lb_backend_responses",
                                   "Upstream outcomes by status class (code=none: failed without a response).",
                                   labels=["backend", "code"])
        cls_resp = CounterMetricFamily("lb_backend_class_requests",
                                       "Upstream outcomes (response heads and failures) by request class.",
                                       labels=["backend", "class"])
        cls_err = CounterMetricFamily("lb_backend_class_errors",
                                      "Upstream 5xx heads and failures without a response, by request class.",
                                      labels=["backend", "class"])
        conn_err = CounterMetricFamily("lb_backend_connect_errors", "Failed connects to a backend.",
                                       labels=["backend"])
        tmo = CounterMetricFamily("lb_backend_timeouts", "Upstream timeouts (connect or response).",
                                  labels=["backend"])
        retries = CounterMetricFamily("lb_backend_retries", "Requests retried after failing on this backend.",
                                      labels=["backend"])
        resets = CounterMetricFamily("lb_backend_resets", "Upstream connections reset by the backend.",
                                     labels=["backend"])
        ejections = CounterMetricFamily("lb_backend_ejections",
                                        "Passive outlier ejections of a backend (summed over workers).",
                                        labels=["backend"])
        overflows = CounterMetricFamily("lb_backend_overflows",
                                        "Requests turned away by a backend's circuit breaker.",
                                        labels=["backend"])
        lat = HistogramMetricFamily("lb_upstream_latency_seconds",
                                    "Time from sending the request to the upstream response head.",
                                    labels=["backend", "class"])
        for n in names:
            b = totals.backends.get(n)
            if b is None:
                continue
            req.add_metric([n], b.requests)
            for code, v in zip(STATUS_CLASSES, b.responses):
                resp.add_metric([n, code], v)
            for c, v in b.class_responses.items():
                cls_resp.add_metric([n, c], v)
            for c, v in b.class_errors.items():
                cls_err.add_metric([n, c], v)
            conn_err.add_metric([n], b.connect_errors)
            tmo.add_metric([n], b.timeouts)
            retries.add_metric([n], b.retries)
            resets.add_metric([n], b.resets)
            ejections.add_metric([n], b.ejections)
            overflows.add_metric([n], b.overflows)
            for c, h in b.class_latency.items():
                cum, buckets = 0, []
                for bound, count in zip(LATENCY_BOUNDS, h):
                    cum += count
                    buckets.append((_le(bound), cum))
                buckets.append(("+Inf", sum(h)))
                lat.add_metric([n, c], buckets, b.class_latency_sum.get(c, 0.0))
        yield from (req, resp, cls_resp, cls_err, conn_err, tmo, retries, resets, ejections,
                    overflows, lat)

        # -- per backend, gauges and operator state -------------------------------------
        inflight = GaugeMetricFamily("lb_backend_inflight", "Requests in flight to a backend.", labels=["backend"])
        idle = GaugeMetricFamily("lb_backend_idle_connections", "Idle pooled upstream connections.",
                                 labels=["backend"])
        ewma = GaugeMetricFamily("lb_backend_ewma_seconds", "Peak-EWMA latency, mean over workers.",
                                 labels=["backend"])
        up = GaugeMetricFamily("lb_backend_up", "1 unless the backend fails its health checks.", labels=["backend"])
        drained = GaugeMetricFamily("lb_backend_drained", "1 when an operator drained the backend.",
                                    labels=["backend"])
        routable = GaugeMetricFamily("lb_backend_routable", "1 when the backend can receive new requests.",
                                     labels=["backend"])
        cweight = GaugeMetricFamily("lb_backend_config_weight", "Weight from the configuration.",
                                    labels=["backend"])
        tweight = GaugeMetricFamily("lb_backend_table_weight",
                                    "Share of a request class the routing table gives the backend.",
                                    labels=["backend", "class"])
        unavail = GaugeMetricFamily("lb_backend_unavailable_workers",
                                    "Workers not routing to the backend (drained, down or ejected).",
                                    labels=["backend"])
        ramp = GaugeMetricFamily("lb_backend_slow_start_ramp",
                                 "Slow start: share of picks a returning backend keeps (1 = full), lowest over workers.",
                                 labels=["backend"])
        routable_set = set(s.routable())
        ml = s.strategy() == "ml"
        cfgw = s.config_weights()
        for n in names:
            inflight.add_metric([n], g.inflight.get(n, 0))
            idle.add_metric([n], g.idle.get(n, 0))
            if n in g.ewma:
                ewma.add_metric([n], g.ewma[n])
            up.add_metric([n], 0 if n in s.control.down else 1)
            drained.add_metric([n], 1 if n in s.control.drained else 0)
            routable.add_metric([n], 1 if n in routable_set else 0)
            cweight.add_metric([n], cfgw.get(n, 0))
            unavail.add_metric([n], g.unavailable.get(n, 0))
            ramp.add_metric([n], g.ramp.get(n, 1.0))
            if ml:  # the learned table's shares only when it is what routes
                for c, w in s.table_weight(n).items():
                    tweight.add_metric([n, c], w)
        yield from (inflight, idle, ewma, up, drained, routable, cweight, tweight, unavail, ramp)
        yield GaugeMetricFamily("lb_panic_workers", "Workers in panic mode (too few healthy backends).",
                                value=g.panic)

        # -- instance-wide counters from the workers ------------------------------------------
        for key, (name, doc) in WORKER_COUNTER_HELP.items():
            yield CounterMetricFamily(name, doc, value=totals.workers.get(key, 0))
        if s.cfg.tls.listen:
            yield from self._tls(totals)
        yield from self._load()
        yield GaugeMetricFamily("lb_client_connections", "Client connections open.", value=g.connections)
        yield GaugeMetricFamily("lb_workers_reporting", "Workers whose stats arrived in the last 2 s.",
                                value=g.workers)
        yield CounterMetricFamily("lb_admin_stats_messages", "Stats messages received by the admin process.",
                                  value=s.agg.messages)
        yield CounterMetricFamily("lb_admin_bad_messages", "Messages the admin process could not decode.",
                                  value=s.agg.bad)

        # -- supervisor ----------------------------------------------------------------------------
        st = s.status()
        if st is not None:
            yield GaugeMetricFamily("lb_workers_expected", "Worker processes the supervisor runs.",
                                    value=st.workers_expected)
            yield GaugeMetricFamily("lb_workers_ready", "Worker processes accepting connections.",
                                    value=st.workers_ready)
            yield CounterMetricFamily("lb_worker_restarts", "Workers replaced after dying.",
                                      value=st.worker_restarts)
            reloads = CounterMetricFamily("lb_reloads", "Config reloads by result.", labels=["result"])
            reloads.add_metric(["ok"], st.reloads)
            reloads.add_metric(["failed"], st.reloads_failed)
            yield reloads
            yield GaugeMetricFamily("lb_config_generation", "Generation of the running config.",
                                    value=st.generation)
            yield GaugeMetricFamily("lb_inference_up", "1 when the inference process runs.",
                                    value=1 if st.inference_up else 0)
            yield CounterMetricFamily("lb_inference_restarts", "Inference process restarts.",
                                      value=st.inference_restarts)
            yield GaugeMetricFamily("lb_supervisor_status_age_seconds", "Age of the last supervisor status.",
                                    value=max(0.0, time.time() - st.ts))

        # -- the fleet and discovery ----------------------------------------------------------------
        by_source: dict[str, int] = {"config": 0, "dns": 0, "etcd": 0, "api": 0}
        for fb in s.fleet.backends():
            by_source[fb.source] = by_source.get(fb.source, 0) + 1
        fleet = GaugeMetricFamily("lb_fleet_backends", "Backends in the fleet, by where they came from.",
                                  labels=["source"])
        for source, n in by_source.items():
            fleet.add_metric([source], n)
        yield fleet
        if s.member is not None:
            yield GaugeMetricFamily("lb_fleet_connected", "1 while this member's etcd session is up.",
                                    value=1 if s.member.connected else 0)
            yield GaugeMetricFamily("lb_fleet_members", "Members of the fleet registered in etcd.",
                                    value=len(s.member.members))
            yield CounterMetricFamily("lb_fleet_disconnects", "etcd sessions lost by this member.",
                                      value=s.member.disconnects)
            yield GaugeMetricFamily("lb_fleet_invalid_backends", "Backends in etcd skipped for a bad value.",
                                    value=len(s.member.invalid))
            yield GaugeMetricFamily("lb_fleet_leader",
                                    "1 while this member leads the fleet (trains and publishes its model).",
                                    value=1 if s.member.share.leads else 0)
            yield CounterMetricFamily("lb_fleet_models_published", "Model versions this member published.",
                                      value=s.member.share.published)
        if s.discovery is not None and s.discovery.lookups:
            lookups = CounterMetricFamily("lb_discovery_lookups",
                                          "DNS discovery look-ups by entry and result (ok, error, empty).",
                                          labels=["backend", "result"])
            for (entry, result), n in sorted(s.discovery.lookups.items()):
                lookups.add_metric([entry, result], n)
            yield lookups

        # -- policy ---------------------------------------------------------------------------------
        strategy = s.strategy()
        info = InfoMetricFamily("lb_strategy", "The routing strategy in force.")
        info.add_metric([], {"strategy": strategy, "config_strategy": s.config_strategy(),
                             "pinned": "true" if s.control.pinned else "false"})
        yield info
        if strategy != "ml":
            # A classic strategy has no learned mode, table or model: nothing to
            # report (lb_strategy_info says which strategy routes).
            return
        modes = GaugeMetricFamily("lb_policy_mode",
                                  "Live workers per policy mode (learned or fallback) and fallback reason.",
                                  labels=["mode", "reason"])
        per_mode: dict[tuple[str, str], int] = {}
        for (_strategy, mode, reason), count in g.modes.items():
            if mode:
                per_mode[(mode, reason)] = per_mode.get((mode, reason), 0) + count
        if strategy == "ml" and not per_mode:
            per_mode[s.mode()] = 0  # nothing reported yet: the expected mode, no workers
        for (mode, reason), count in sorted(per_mode.items()):
            modes.add_metric([mode, reason], count)
        yield modes
        learned = 1.0 if s.mode()[0] == "learned" else 0.0
        yield GaugeMetricFamily("lb_policy_learned",
                                "1 when the ml strategy routes by the learned table, 0 when it is in fallback "
                                "(absent under a classic strategy).", value=learned)
        t = s.table
        if t is not None:
            model = InfoMetricFamily("lb_model", "The model behind the current routing table.")
            model.add_metric([], {"version": t.model_version, "mode": t.mode, "reason": t.reason})
            yield model
            yield GaugeMetricFamily("lb_table_seq", "Sequence number of the latest routing table.", value=t.seq)
            yield GaugeMetricFamily("lb_table_age_seconds", "Age of the latest routing table.",
                                    value=max(0.0, time.time() - t.ts))
            yield GaugeMetricFamily("lb_table_interval_seconds", "Publish interval of the routing tables.",
                                    value=t.interval)
            if t.prediction_error >= 0:
                yield GaugeMetricFamily("lb_prediction_error", "Online prediction error of the model "
                                        "(mean |ln(observed/predicted)|).", value=t.prediction_error)
            yield GaugeMetricFamily("lb_inference_tick_seconds", "Time the last scoring tick took.",
                                    value=t.tick_seconds)
            if t.error_weight:
                ew = GaugeMetricFamily("lb_model_error_weight",
                                       "Weight of the model's error predictions in a backend's priced error "
                                       "(0: its own record prices it; 1: the model's prediction).",
                                       labels=["backend"])
                for name, w in zip(t.backends, t.error_weight):
                    ew.add_metric([name], w)
                yield ew
        if g.table_age_max >= 0:
            yield GaugeMetricFamily("lb_worker_table_age_seconds_max",
                                    "Oldest routing table a live worker routes with.", value=g.table_age_max)


    def _load(self):
        cap = self.s.capacity
        view = cap.view()
        fleet = view["fleet"]
        yield GaugeMetricFamily("lb_fleet_load_rps", "Requests per second over the last 10 s.",
                                value=fleet["load_rps"])
        for key, name, doc in (("capacity_rps", "lb_fleet_capacity_rps",
                                "Request rate the routable backends take within the p99 objective."),
                               ("headroom", "lb_fleet_headroom", "Fleet capacity / load - 1."),
                               ("recommended_backends", "lb_fleet_recommended_backends",
                                "Routable backends the forecast needs, with the configured headroom.")):
            if fleet[key] is not None:
                yield GaugeMetricFamily(name, doc, value=fleet[key])
        per = GaugeMetricFamily("lb_backend_capacity_rps", "A backend's request rate within the p99 objective "
                                "(known=false: a lower bound, not seen under enough load).",
                                labels=["backend", "known"])
        for name, b in view["backends"].items():
            per.add_metric([name, "true" if b["known"] else "false"], b["capacity_rps"])
        yield per
        points = cap.latest.points
        if points:
            for name, attr, doc in (("lb_fleet_load_forecast_rps", "rps", "Forecast request rate"),
                                    ("lb_fleet_load_forecast_low_rps", "low", "Low end of its 95% interval"),
                                    ("lb_fleet_load_forecast_high_rps", "high", "High end of its 95% interval")):
                fam = GaugeMetricFamily(name, f"{doc}, minutes ahead (lb/forecast.py).", labels=["minutes"])
                for p in points:
                    fam.add_metric([str(p.minutes)], getattr(p, attr))
                yield fam

    def _tls(self, totals):
        yield CounterMetricFamily("lb_tls_handshakes", "TLS handshakes completed on the HTTPS listener.",
                                  value=totals.workers.get("tls_handshakes", 0))
        failed = CounterMetricFamily("lb_tls_handshake_failures",
                                     "TLS handshakes that failed on the HTTPS listener, by reason "
                                     "(OpenSSL's, lower case; timeout; client_closed).", labels=["reason"])
        for key, n in sorted(totals.workers.items()):
            if key.startswith(TLS_FAILED):
                failed.add_metric([key[len(TLS_FAILED):]], n)
        yield failed
        expiry = GaugeMetricFamily("lb_tls_certificate_expiry_seconds",
                                   "When a certificate the HTTPS listener serves expires (Unix time).",
                                   labels=["cert", "names"])
        for info in self.s.certificates():
            expiry.add_metric([info.path, ",".join(info.names)], info.not_after)
        yield expiry


def _le(bound: float) -> str:
    return repr(float(bound))


class Exporter:
    def __init__(self, state: AdminState) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AdminCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
