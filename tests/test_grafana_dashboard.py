"""The Grafana dashboard (deploy/grafana/) asks only for metrics the services export.

The exported names come from the services' own registries (services/common/metrics.py) rendered in the Prometheus
text format and parsed back: a counter family ``x`` is scraped as ``x_total``, a histogram as ``x_bucket``,
``x_sum`` and ``x_count``, and both also as ``x_created``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chiron.v1 import queue_pb2, types_pb2
from services.common.metrics import EngineMetrics, QueueMetrics, RouterMetrics, ScalerMetrics
from services.gateway.app import GatewayMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "chiron-dashboard.json"

_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
# PromQL words that are not metric names (aggregation modifiers, set and comparison operators, offsets).
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
             "inf", "nan"}


def exported_names() -> set[str]:
    """Every sample name the router, queue, scaler, engine and gateway export."""
    services = (RouterMetrics(), QueueMetrics(queue_pb2.QueueStats), ScalerMetrics(), EngineMetrics(types_pb2.EngineStats),
                GatewayMetrics())
    names = set()
    for m in services:
        for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
            names.update(fam.name + s for s in _SUFFIXES[fam.type])
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once string literals, label matchers, range and
    subquery durations, ``by``/``without``/``on``/``ignoring``/``group_*`` label lists, Grafana variables, function
    calls, keywords and numbers are taken out."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries: [5m], [$__rate_interval], [1h:5m]
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{[^}]*\}|\$\w+", " ", e)  # Grafana variables
    e = re.sub(r"\boffset\s+\S+", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group()
        if e[m.end():].lstrip().startswith("("):  # a function or an aggregation
            continue
        if word.lower() in _KEYWORDS or re.fullmatch(r"\d", e[m.start() - 1: m.start()] or " "):
            continue  # a keyword, or the exponent / unit of a number like 1e3
        names.add(word)
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every query of every panel (rows' nested panels and template variables too)."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            out.extend((p.get("title", ""), t["expr"]) for t in p.get("targets", ()) if t.get("expr"))
            walk(p.get("panels", ()))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", ()):
        if var.get("type") == "query":
            q = var.get("query")
            out.append((f"variable {var['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def test_the_extractor_finds_metric_names_and_nothing_else():
    assert metric_names('histogram_quantile(0.99, sum by (le, class) (rate(chiron_request_ttft_seconds_bucket'
                        '{class="interactive", outcome=~"ok|error"}[$__rate_interval])))') == {"chiron_request_ttft_seconds_bucket"}
    assert metric_names("sum(increase(a_total[1h:5m] offset 5m)) / on (job) group_left (x) b > bool 1e3") == {"a_total", "b"}
    assert metric_names('max without (instance) (up{job="x"}) unless ${datasource_var}') == {"up"}


def test_a_wrong_metric_name_is_caught():
    exported = exported_names()
    wrong = metric_names('sum by (class) (rate(chiron_request_total{outcome="ok"}[5m]))')  # "_requests_" misspelt
    assert wrong == {"chiron_request_total"} and not wrong <= exported
    assert metric_names("chiron_engine_max_batch_size_total") - exported == {"chiron_engine_max_batch_size_total"}


def test_every_dashboard_expression_names_exported_metrics():
    exported = exported_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    unknown = {(title, name) for title, expr in exprs for name in metric_names(expr) - exported}
    assert not unknown, f"the dashboard reads metrics no service exports: {sorted(unknown)}"
    for title, expr in exprs:
        assert metric_names(expr), f"panel {title!r}: no metric in {expr!r}"


@pytest.mark.parametrize("needed", [
    "chiron_slo_met_total", "chiron_requests_total", "chiron_request_ttft_seconds_bucket", "chiron_request_itl_seconds_bucket",
    "chiron_scaler_desired_instances", "chiron_scaler_running_instances", "chiron_queue_requests",
    "chiron_queue_estimated_wait_seconds", "chiron_engine_max_batch_size", "chiron_engine_kv_cache_usage_ratio",
    "chiron_engine_preemptions_total"])
def test_the_dashboard_shows_what_the_issue_asks_for(needed):
    """SLO attainment, TTFT/ITL percentiles, instances by role, queue by group, batch size per instance."""
    assert any(needed in metric_names(expr) for _, expr in dashboard_exprs())


def test_panels_use_the_datasource_variable_and_do_not_overlap():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    assert any(v["type"] == "datasource" and v["name"] == "datasource" for v in dash["templating"]["list"])
    cells = set()
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        area = {(g["x"] + i, g["y"] + j) for i in range(g["w"]) for j in range(g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
