"""The Grafana dashboard, checked offline: Grafana's own JSON schema, and every query parsed as PromQL.

Grafana is in no registry these machines reach, so the dashboard is never loaded by a real Grafana
here. Its structure is checked against the dashboard schema of grafana/grafana-foundation-sdk, with
the two places where that schema is stricter than Grafana relaxed by name, and its queries by
promql-parser (Prometheus's grammar). tests/container/test_compose.py runs the same queries against
the compose stack's Prometheus; tests/test_prometheus.py checks that they return data.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import promql_parser
import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "cifar10.json"
# The schema lives beside the checkout (../shared/schemas, see its README); GRAFANA_DASHBOARD_SCHEMA overrides.
SCHEMA = Path(os.environ.get("GRAFANA_DASHBOARD_SCHEMA",
                             ROOT.parent / "shared" / "schemas" / "grafana-dashboard.jsonschema.json"))
# What Grafana puts in place of its variables. $__rate_interval is at least four scrape intervals;
# "All" of the model variable is its allValue.
RATE_INTERVAL = "1m"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target, rows' panels included."""
    def walk(panels):
        for panel in panels:
            yield from walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"]

    return list(walk((board or dashboard())["panels"]))


def fill_in(expr: str, board: dict | None = None) -> str:
    """The expression as Grafana sends it with the default selection: every variable replaced."""
    values = {"__rate_interval": RATE_INTERVAL}
    for variable in (board or dashboard())["templating"]["list"]:
        values[variable["name"]] = variable["allValue"]
    unknown = set(re.findall(r"\$(\w+)", expr)) - set(values)
    assert not unknown, f"variables the dashboard does not define: {sorted(unknown)} in {expr}"
    # Longest names first, so $model never eats the start of a longer name.
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${name}", values[name])
    return expr


# ----------------------------------------------------------------------------- schema
# The schema's two spots stricter than Grafana (../shared/schemas/README.md), each named and relaxed
# to what Grafana accepts there. Nothing else in the schema changes.
RELAXED = {
    # A field-config override: Grafana takes any JSON value as a matcher's options ("resident.*")
    # and as a property's value ("bytes", "right").
    ("MatcherConfig", "options"): {},
    ("DynamicConfigValue", "value"): {},
    # A templating variable's query: Grafana writes {"query": ..., "refId": ...} for Prometheus.
    ("VariableModel", "query"): {"oneOf": [{"type": "string"}, {"type": "object"}]},
}


def relaxed_schema() -> dict:
    if not SCHEMA.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"the Grafana dashboard schema is missing: {SCHEMA} (set GRAFANA_DASHBOARD_SCHEMA)")
        pytest.skip(f"the Grafana dashboard schema is not at {SCHEMA} (set GRAFANA_DASHBOARD_SCHEMA)")
    schema = copy.deepcopy(json.loads(SCHEMA.read_text()))
    for (definition, prop), replacement in RELAXED.items():
        properties = schema["definitions"][definition]["properties"]
        assert prop in properties, f"the schema changed: {definition}.{prop} is gone"
        properties[prop] = replacement
    return schema


def schema_errors(board: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(relaxed_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(board)]


def test_the_dashboard_validates_against_grafanas_schema():
    assert schema_errors(dashboard()) == []


def test_the_schema_check_finds_a_mistyped_panel():
    board = dashboard()
    broken = copy.deepcopy(board)
    broken["panels"][0]["gridPos"]["h"] = "8"
    del broken["panels"][1]["type"]
    errors = schema_errors(broken)
    assert any(e.startswith("panels/0") for e in errors), errors
    assert any(e.startswith("panels/1") for e in errors), errors


def test_a_relaxed_spot_still_checks_its_shape():
    broken = dashboard()
    broken["templating"]["list"][0]["query"] = 7
    assert any(e.startswith("templating/list/0/query") for e in schema_errors(broken))


# ----------------------------------------------------------------------------- PromQL
def test_the_dashboard_has_the_queries_the_panels_need():
    board = dashboard()
    assert len(queries(board)) >= 20
    titles = {p["title"] for p in board["panels"] if p["type"] != "row"}
    assert {title for title, _ in queries(board)} == titles  # every panel but a row queries something


@pytest.mark.parametrize(("title", "expr"), queries(), ids=[f"{i}-{t}" for i, (t, _) in enumerate(queries())])
def test_every_query_parses_as_promql(title, expr):
    parsed = promql_parser.parse(fill_in(expr))
    # A panel plots an instant vector (or a scalar); a range vector or a string is an error in Grafana.
    assert not isinstance(parsed, (promql_parser.MatrixSelector, promql_parser.SubqueryExpr,
                                   promql_parser.StringLiteral)), f"{title}: {expr}"


def test_the_parser_rejects_a_broken_query():
    expr = queries()[0][1]
    with pytest.raises(ValueError):
        promql_parser.parse(fill_in(expr).replace(")", "", 1))
    with pytest.raises(AssertionError, match="variables the dashboard does not define"):
        fill_in(expr.replace("$model", "$modle"))
