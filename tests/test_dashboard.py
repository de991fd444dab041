"""The Grafana dashboard (deploy/grafana/offsite-owner.json) queries only metrics the daemon really exports.

The exported names come from the daemon's own OwnerMetrics, collected from a CollectorRegistry after one call of
each kind has gone through it, never from a list written down here.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from offsite.owner.audit import Call
from offsite.owner.metrics import REPRESENT_METHOD, OwnerMetrics
from offsite.owner.model_queue import ModelQueue
from offsite.owner.store import Store

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "offsite-owner.json"

# The sample names prometheus-client writes for each family type (a counter X is exposed as X_total)
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
# PromQL words that look like metric names: aggregations, functions (always followed by "("), and operators
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
MATCHERS = re.compile(r"\{[^{}]*\}")
RANGES = re.compile(r"\[[^\]]*\]")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
VARIABLE = re.compile(r"\$\{?\w+\}?")
NAME = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
NUMBER = re.compile(r"^\d")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values(...) query) reads."""
    text = VARIABLE.sub("", STRING.sub('""', expr))
    text = RANGES.sub("", MATCHERS.sub("", text))
    text = GROUPING.sub("", text)
    if text.lstrip().startswith("label_values("):  # label_values(METRIC, LABEL): the label is not a metric
        text = text.rsplit(",", 1)[0] if "," in text else text
    return {name for name in NAME.findall(text) if name not in KEYWORDS and not NUMBER.match(name)}


def exported_names() -> tuple[set[str], set[str]]:
    """(every sample name the daemon exposes, every metric family name) from a fed OwnerMetrics."""
    with tempfile.TemporaryDirectory() as root:
        store = Store(Path(root))
        try:
            store.add_tenant("alice")
            queue = ModelQueue(workers=1)
            metrics = OwnerMetrics(store, registry=CollectorRegistry(), model_queue=queue)
            metrics.offer({"uniform:1-2-1": 1234})
            job = queue.admit("alice")
            for method, streaming in ((REPRESENT_METHOD, True), ("/offsite.v1.ModelOwner/GetModelCard", False)):
                call = Call(method, "ipv4:127.0.0.1:1", request_streaming=streaming, response_streaming=streaming)
                call.tenant = "alice"
                metrics.started(call)
                metrics.received(call, SimpleNamespace(token_ids=[1, 2, 3]), 10)
                metrics.sent(call, SimpleNamespace(), 20)
                metrics.finished(call, grpc.StatusCode.OK)
            families = list(metrics.registry.collect())
            job.cancel()
        finally:
            store.close()
    samples = {sample.name for family in families for sample in family.samples}
    by_type = {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}
    assert samples <= by_type, f"prometheus-client named samples this test does not expect: {samples - by_type}"
    return samples | by_type, {family.name for family in families}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # panels inside a collapsed row
    return found


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) for every panel target and every query variable."""
    found = [
        (f"panel {panel['title']!r} target {target.get('refId')}", target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append((f"variable ${variable['name']}", query["query"] if isinstance(query, dict) else query))
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], set[str]]:
    return exported_names()


def test_the_name_extraction_reads_metrics_and_skips_labels_functions_and_variables() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket{job=~"$job", '
        'grpc_code!="OK"}[$__rate_interval]))) / (sum(rate(offsite_x_total[5m])) or vector(0))'
    )
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket", "offsite_x_total"}
    assert metric_names('label_values(offsite_tenants{job=~"$job"}, instance)') == {"offsite_tenants"}


def test_every_metric_the_dashboard_queries_is_one_the_daemon_exports(
    dashboard: dict[str, Any], exported: tuple[set[str], set[str]]
) -> None:
    samples, _ = exported
    for where, expr in expressions(dashboard):
        used = metric_names(expr)
        assert used, f"{where}: no metric name found in {expr!r}"
        unknown = used - samples
        assert not unknown, f"{where}: {sorted(unknown)} not exported by owner/metrics.py (it has {sorted(samples)})"


def test_every_metric_family_the_daemon_exports_has_a_panel(
    dashboard: dict[str, Any], exported: tuple[set[str], set[str]]
) -> None:
    _, families = exported
    used = {name for _, expr in expressions(dashboard) for name in metric_names(expr)}
    missing = {family for family in families if not any(re.match(rf"{family}(_\w+)?$", name) for name in used)}
    assert not missing, f"exported but on no panel: {sorted(missing)}"


def test_the_dashboard_is_importable_with_a_prometheus_datasource_variable(dashboard: dict[str, Any]) -> None:
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "__inputs" not in dashboard, "a datasource variable, not an import-time input: provisioning works too"
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 38  # Grafana 10
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the grid"
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), f"{panel['title']}: unbalanced ()"
            assert target["expr"].count("{") == target["expr"].count("}"), f"{panel['title']}: unbalanced {{}}"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}", variable["name"]
