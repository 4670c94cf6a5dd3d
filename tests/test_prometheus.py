"""The shipped dashboard and alert rules, run by a real Prometheus against a real proxy.

A Prometheus (the machine's ``prometheus`` binary) scrapes a running proxy every second
with deploy/prometheus/prometheus.yml (only its target, intervals and rule path changed)
and loads deploy/prometheus/alerts.yml. The official OpenAI SDK drives a mixed load:
answers, streams, top-up replies and a provider that fails. Then every PromQL
expression of deploy/grafana/dashboards/paywall.json and of the alert rules goes through
Prometheus's HTTP API: each must be valid and return data, and the alerts that this load
should trip (errors) must be true while the others (target down, ledger errors) are not.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import ROOT, Proxy, mint_key, serving_proxy
from tests.upstream import Upstream, free_port

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "paywall.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
JOB = "paywall-proxy"
PAYWALL = "metered"
ROUNDS = 3
CHAT_ROUTE = '{route=~".*chat/completions"}'

# What Grafana puts in for its built-in variables; windows of a minute hold ~60 samples
# at this test's 1 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}

# The load below makes 5xx answers and provider errors a large share of the traffic,
# and opens a circuit, and nothing else goes wrong: which alert expressions must hold
# (ignoring their `for`).
EXPECTED_ALERTS = {
    "PaywallHighErrorRate": True,
    "PaywallUpstreamErrors": True,
    "PaywallTargetDown": False,
    "PaywallLedgerErrors": False,
    "PaywallHoldsPendingHigh": False,
    "PaywallHoldsExpiring": False,
    "PaywallCircuitOpen": True,
}

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="needs the prometheus binary (Debian: apt-get install prometheus)")


def settings(upstream: Upstream) -> str:
    # A per-request price and a grant of five of them: each user's fifth paid request
    # gets a top-up reply. `crash` answers 500.
    return f"""
[providers.mock]
kind = "mock"
chunk_delay_ms = 2
completion_tokens = 6

[providers.up]
kind = "openai"
base_url = "{upstream.url}"

[models.mock-1]
provider = "mock"
price = {{ per_request = "0.01", input_per_million = "0.15", output_per_million = "0.60" }}

[models.echo]
provider = "up"
price = {{ input_per_million = "0.15", output_per_million = "0.60" }}

[models.crash]
provider = "up"

# Routed: its first deployment is down, so each request falls back to the second,
# and the first one's circuit opens after five failures.
[providers.down]
kind = "openai"
base_url = "http://127.0.0.1:{free_port()}/v1"

[models.routed]
price = {{ input_per_million = "0.15", output_per_million = "0.60" }}
[[models.routed.deployments]]
provider = "down"
upstream = "echo"
[[models.routed.deployments]]
provider = "up"
upstream = "echo"
priority = 1

[paywalls.{PAYWALL}]
name = "Metered"
starter_grant = "0.05"
max_output_tokens = 64
"""


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = reply.json()
        assert body.get("status") == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def scrape_config(proxy: Proxy) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml pointed at the test's proxy, every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    assert [Path(f).name for f in config["rule_files"]] == [ALERTS.name]
    config["rule_files"] = [str(ALERTS)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert JOB in jobs, f"{PROMETHEUS_CONFIG} has no {JOB} job"
    jobs[JOB]["static_configs"] = [{"targets": [f"127.0.0.1:{proxy.port}"]}]
    config["scrape_configs"] = [jobs[JOB]]
    return config


@pytest.fixture(scope="module")
def proxy(upstream: Upstream, own_database_url: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    # A database of this module's own: pending and expired holds count the whole
    # ledger, and the alerts on them must see only this module's traffic.
    with serving_proxy(settings(upstream), own_database_url,
                       tmp_path_factory.mktemp("prometheus-proxy")) as running:
        yield running


@pytest.fixture(scope="module")
def prometheus(proxy: Proxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(proxy)))
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "config", str(config)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(server.url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, f"prometheus exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log.read_text()}"
            time.sleep(0.1)
        # Targets reach the scrapers a few seconds after start: wait for a first scrape.
        while not server.query(f'up{{job="{JOB}"}} == 1'):
            assert time.monotonic() < deadline, f"proxy never scraped:\n{log.read_text()}"
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def drive(proxy: Proxy, key: str) -> int:
    """One round of mixed traffic through the SDK; returns the chat requests made."""
    client = openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)
    messages: Any = [{"role": "user", "content": "How much is this?"}]
    made = 0
    for user in (f"u{n}-{uuid.uuid4().hex[:8]}" for n in range(3)):
        for model, stream in [("mock-1", False), ("mock-1", True), ("echo", False),
                              ("mock-1", True), ("mock-1", False), ("mock-1", True)]:
            if stream:
                chunks = list(client.chat.completions.create(
                    model=model, user=user, messages=messages, stream=True))
                assert chunks
            else:
                reply = client.chat.completions.create(model=model, user=user,
                                                       messages=messages)
                assert reply.choices[0].message.content
            made += 1
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="crash", user="u-crash", messages=messages)
        made += 1
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="routed", user="u-routed", messages=messages)
        assert raw.headers["x-upstream-deployment"] == "up"
        made += 1
    return made


@pytest.fixture(scope="module")
def scraped(proxy: Proxy, prometheus: Prometheus, own_database_url: str) -> Prometheus:
    """Prometheus after a few rounds of traffic, each seen by a scrape of its own, and
    one more scrape after the last, so every series has two samples or more."""
    key = mint_key(own_database_url, PAYWALL)
    sent = 0
    for _ in range(ROUNDS):
        sent += drive(proxy, key)
        time.sleep(1.2)  # at least one scrape between rounds: rates see counters move
    deadline = time.monotonic() + 20
    seen_at = None
    while True:
        done = prometheus.value(f"sum(paywall_requests_total{CHAT_ROUTE})")
        last = prometheus.value(f'max(timestamp(up{{job="{JOB}"}}))')
        if seen_at is None and done == sent:
            seen_at = last
        elif seen_at is not None and last is not None and last > seen_at:
            break
        assert time.monotonic() < deadline, (
            f"Prometheus saw {done} of {sent} chat requests:\n{prometheus.log.read_text()}")
        time.sleep(0.2)
    # The load is what the expectations below assume: answers, top-up replies, 5xx.
    answers = {(s["metric"]["outcome"], s["metric"]["status"]) for s in prometheus.query(
        f"sum by (outcome, status) (paywall_requests_total{CHAT_ROUTE})")}
    assert {("forward", "200"), ("top_up", "200"), ("forward", "500")} <= answers, answers
    return prometheus


# ---- finding the expressions ---------------------------------------------------------

def panels_of(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels_of(panel.get("panels", []))


def dashboard_expressions() -> list[tuple[str, str, str]]:
    """(panel title, legend, expression) for every query target, Grafana's variables
    filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = dict(GRAFANA_VARIABLES)
    for var in dashboard.get("templating", {}).get("list", []):
        assert var.get("includeAll") and var.get("allValue"), (
            f"variable {var['name']}: give it an allValue so the test can fill it in")
        values["${" + var["name"] + "}"] = values["$" + var["name"]] = var["allValue"]
    found = []
    for panel in panels_of(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(values, key=len, reverse=True):
                expr = expr.replace(name, values[name])
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            found.append((panel["title"], target.get("legendFormat", ""), expr))
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")


def split_comparison(expr: str) -> tuple[str, str, str] | None:
    """``a / b > 0.05`` → ``("a / b", ">", "0.05")``: the last comparison outside any
    brackets, braces or string; None when there is none."""
    depth, quote, found = 0, "", None
    i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and (m := _COMPARISON.match(expr, i)) and expr[i - 1:i] != "=":
            found = (i, m.group())
            i += len(m.group())
            continue
        i += 1
    if found is None:
        return None
    at, op = found
    return expr[:at].strip(), op, expr[at + len(op):].strip()


@pytest.mark.parametrize(("expr", "expected"), [
    ("up == 0", ("up", "==", "0")),
    ('sum(rate(x{a!~"b|c", s=~"5.."}[5m])) / sum(rate(x[5m])) > 0.05',
     ('sum(rate(x{a!~"b|c", s=~"5.."}[5m])) / sum(rate(x[5m]))', ">", "0.05")),
    ('histogram_quantile(0.99, sum by (le) (rate(h{r=">"}[5m]))) >= 1',
     ('histogram_quantile(0.99, sum by (le) (rate(h{r=">"}[5m])))', ">=", "1")),
    ("sum(x)", None),
])
def test_split_comparison(expr: str, expected: tuple[str, str, str] | None) -> None:
    assert split_comparison(expr) == expected


# ---- against Prometheus ----------------------------------------------------------------

def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def test_every_dashboard_query_returns_data(scraped: Prometheus) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    empty, no_number, unlabelled = [], [], []
    for title, legend, expr in expressions:
        result = scraped.query(expr)
        if not result:
            empty.append((title, expr))
        elif not finite(result):
            no_number.append((title, expr, result))
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        if any(shown - set(series["metric"]) for series in result):
            unlabelled.append((title, legend, expr))
    assert not empty, f"dashboard queries with no data: {empty}"
    assert not no_number, f"dashboard queries with only NaN/Inf: {no_number}"
    assert not unlabelled, f"legends naming labels the results lack: {unlabelled}"


def test_the_dashboard_variables_list_the_proxy(scraped: Prometheus, proxy: Proxy) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for var in dashboard["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
        assert m, f"variable {var['name']}: expected label_values(metric, label)"
        metric, label = m.groups()
        values = scraped.api(f"label/{label}/values", **{"match[]": metric})
        assert f"127.0.0.1:{proxy.port}" in values


def test_every_alert_expression_is_valid_and_has_data(scraped: Prometheus) -> None:
    rules = alert_rules()
    assert len(rules) >= 5
    names = {rule["alert"] for rule in rules}
    assert set(EXPECTED_ALERTS) <= names
    for rule in rules:
        expr = rule["expr"].strip()
        parts = split_comparison(expr)
        assert parts is not None, f"{rule['alert']}: expected a threshold (`expr > X`)"
        measure, _, threshold = parts
        float(threshold)  # a number, not a second vector
        assert finite(scraped.query(measure)), f"{rule['alert']}: no data for {measure}"
        fired = scraped.query(expr)  # valid either way; query() checks the status
        if rule["alert"] in EXPECTED_ALERTS:
            assert bool(fired) is EXPECTED_ALERTS[rule["alert"]], (
                rule["alert"], scraped.query(measure))


def test_rules_load_and_alerts_go_pending(scraped: Prometheus) -> None:
    rules = alert_rules()
    groups = scraped.api("rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in rules}
    for name, rule in loaded.items():
        assert rule["health"] in ("ok", "unknown"), (name, rule.get("lastError"))
    deadline = time.monotonic() + 10
    while True:  # rules are evaluated every second here
        alerts = {a["labels"]["alertname"]: a["state"] for a in scraped.api("alerts")["alerts"]}
        if all(alerts.get(n) in ("pending", "firing") for n, on in EXPECTED_ALERTS.items() if on):
            break
        assert time.monotonic() < deadline, f"alerts: {alerts}"
        time.sleep(0.2)
    assert not {n for n, on in EXPECTED_ALERTS.items() if not on} & set(alerts), alerts


def test_the_proxy_target_is_up(scraped: Prometheus, proxy: Proxy) -> None:
    targets = scraped.api("targets")["activeTargets"]
    ours = [t for t in targets if t["labels"]["job"] == JOB]
    assert [(t["labels"]["instance"], t["health"]) for t in ours] == [
        (f"127.0.0.1:{proxy.port}", "up")]
