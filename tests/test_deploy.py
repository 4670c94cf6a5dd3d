"""The files in deploy/ hold together: they parse, point at each other and at what the
proxy really serves. tests/test_prometheus.py runs the dashboard and alerts for real."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from proxy import settings as config
from tests.conftest import ROOT, Running
from tests.upstream import CHUNK_DELAY, CHUNKS, free_port

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
SETTINGS = DEPLOY / "paywall.toml"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "paywall.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
REPLICA_ENV = ("DATABASE_URL", "REDIS_URL", "PAYWALL_LINK_SECRET")


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def services() -> dict[str, Any]:
    found: dict[str, Any] = load(COMPOSE)["services"]
    return found


def image_of(service: dict[str, Any]) -> str:
    return str(service.get("image", "")).split(":")[0].rsplit("/", 1)[-1]


def replicas() -> dict[str, Any]:
    """The proxy services that serve (not the one-shot migration)."""
    return {name: s for name, s in services().items()
            if image_of(s) == "paywall-proxy" and "migrate" not in s.get("command", [])}


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → the file or folder of deploy/ bind-mounted there."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (COMPOSE.parent / source).resolve()
    return out


def k8s() -> dict[str, dict[str, Any]]:
    docs = [d for p in (DEPLOY / "k8s").glob("*.yaml") for d in yaml.safe_load_all(p.read_text())]
    return {d["kind"]: d for d in docs if d}


def settings_port() -> int:
    return config.load(SETTINGS, {"PAYWALL_LINK_SECRET": "x"}).server.port


def test_every_yaml_and_json_file_parses() -> None:
    files = yaml_files()
    assert len(files) >= 10, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path
    assert json.loads(DASHBOARD.read_text())["panels"]


def test_the_settings_file_passes_check_config() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYWALL_", "OPENAI_"))}
    cmd = [sys.executable, "-m", "proxy.cli", "check-config", "--config", str(SETTINGS)]
    ok = subprocess.run(cmd, env={**env, "PAYWALL_LINK_SECRET": "s" * 32},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{SETTINGS}: ok"), ok.stdout
    # Replicas must share the link secret: the file refuses to start without one.
    missing = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert "PAYWALL_LINK_SECRET is not set" in missing.stderr


def test_compose_runs_two_replicas_behind_a_balancer_with_their_services() -> None:
    all_services = services()
    images = {image_of(s) for s in all_services.values()}
    assert {"nginx", "postgres", "redis", "prometheus", "grafana"} <= images, images
    proxies = replicas()
    assert len(proxies) >= 2, list(proxies)
    migrate = [n for n, s in all_services.items()
               if image_of(s) == "paywall-proxy" and s.get("command") == ["migrate"]]
    assert len(migrate) == 1
    secrets = set()
    for name, proxy in proxies.items():
        env = proxy["environment"]
        assert all(env.get(k) for k in REPLICA_ENV), (name, env)
        secrets.add(env["PAYWALL_LINK_SECRET"])
        assert proxy["depends_on"][migrate[0]]["condition"] == "service_completed_successfully"
        assert mounts(proxy)[env["PAYWALL_CONFIG"]] == SETTINGS.resolve(), name
        assert env["DATABASE_URL"].split("@")[1].split(":")[0] in all_services
        assert env["REDIS_URL"].split("//")[1].split(":")[0] in all_services
        assert Path(ROOT / proxy["build"]["dockerfile"]).is_file()
    assert len(secrets) == 1, "every replica must sign links with the same secret"
    for name, service in all_services.items():
        for target, source in mounts(service).items():
            assert source.exists(), f"{name}: {source} (for {target}) is missing"


def test_the_balancer_and_prometheus_know_every_replica() -> None:
    port = settings_port()
    expected = {f"{name}:{port}" for name in replicas()}
    conf = NGINX_CONF.read_text()
    upstream = re.search(r"upstream \w+ \{(.*?)\}", conf, re.S)
    assert upstream
    assert set(re.findall(r"^\s*server\s+(\S+?)[\s;]", upstream.group(1), re.M)) == expected
    assert re.search(r"^\s*proxy_buffering off;", conf, re.M), "streams must not be buffered"
    lb = next(s for s in services().values() if image_of(s) == "nginx")
    assert mounts(lb)["/etc/nginx/nginx.conf"] == NGINX_CONF.resolve()
    scrape = load(PROMETHEUS_CONFIG)
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "paywall-proxy")
    assert {t for c in job["static_configs"] for t in c["targets"]} == expected
    assert scrape["rule_files"] == [ALERTS.name]
    prometheus = next(s for s in services().values() if image_of(s) == "prometheus")
    assert mounts(prometheus)["/etc/prometheus"] == PROMETHEUS_CONFIG.parent.resolve()


def test_grafana_is_provisioned_with_the_datasource_and_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = load(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"].split("//")[1].split(":")[0] in services()
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    uids |= {v["datasource"]["uid"] for v in dashboard["templating"]["list"]}
    assert uids == {source["uid"]}
    grafana = next(s for s in services().values() if image_of(s) == "grafana")
    (provider,) = load(provisioning / "dashboards" / "paywall.yml")["providers"]
    assert mounts(grafana)[provider["options"]["path"]] == DASHBOARD.parent.resolve()
    assert mounts(grafana)["/etc/grafana/provisioning"] == provisioning.resolve()
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(provider["options"]["path"]) and home.name == DASHBOARD.name


def test_k8s_manifests() -> None:
    kinds = k8s()
    deployment, pod = kinds["Deployment"], kinds["Deployment"]["spec"]["template"]
    assert deployment["spec"]["replicas"] >= 2
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings_port()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == settings_port()
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]
    secret_refs = [e["secretRef"]["name"] for e in container["envFrom"]]
    assert secret_refs
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts_at = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    configmap = kinds["ConfigMap"]
    (volume,) = [n for n, v in volumes.items() if "configMap" in v]
    assert volumes[volume]["configMap"]["name"] == configmap["metadata"]["name"]
    (key,) = configmap["data"]
    assert env["PAYWALL_CONFIG"] == f"{mounts_at[volume]}/{key}"
    assert configmap["data"][key] == SETTINGS.read_text(), "configmap.yaml: copy paywall.toml"

    service = kinds["Service"]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["ports"]} <= set(ports) | set(ports.values())
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    job = kinds["Job"]["spec"]["template"]["spec"]
    (migrate,) = job["containers"]
    assert migrate["args"] == ["migrate"] and migrate["image"] == container["image"]
    assert [e["secretRef"]["name"] for e in migrate["envFrom"]] == secret_refs
    assert job["securityContext"]["runAsNonRoot"] is True


def test_the_spool_outlives_the_container() -> None:
    """billing.spool_dir (what is owed to the ledger, on disk) is on a volume that
    survives the container's restart, shared by the compose replicas (each posts a dead
    one's journal), created in the image for the user the proxy runs as; not the
    read-only root, nor compose's tmpfs /tmp, which a restart empties."""
    spool = config.load(SETTINGS, {"PAYWALL_LINK_SECRET": "x"}).billing.spool_dir
    assert spool.startswith("/") and not spool.startswith("/tmp/"), spool
    declared = load(COMPOSE)["volumes"]
    named = set()
    for name, proxy in replicas().items():
        (volume,) = [v.split(":")[0] for v in proxy["volumes"] if v.split(":")[1] == spool]
        assert volume in declared and not volume.startswith((".", "/")), (name, volume)
        named.add(volume)
    assert len(named) == 1, "the replicas must share one spool volume"
    pod = k8s()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == spool]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume, volume
    assert not mount.get("readOnly")
    user = dict(dockerfile())["USER"].split(":")[0]
    made = [args for op, args in dockerfile() if op == "RUN" and spool in args.split()]
    assert made and re.search(rf"install -d -o {user} ", made[0]), made


def dockerfile() -> list[tuple[str, str]]:
    """deploy/Dockerfile as (instruction, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_dockerfile_builds_a_non_root_image_serving_on_the_settings_port() -> None:
    steps = dockerfile()
    last = {op: args for op, args in steps}
    assert last["USER"].split(":")[0] not in ("root", "0")
    assert ("EXPOSE", str(settings_port())) in steps
    assert "/healthz" in last["HEALTHCHECK"]
    argv = json.loads(last["ENTRYPOINT"]) + json.loads(last["CMD"])
    assert argv == ["paywall-proxy", "serve", "--host", "0.0.0.0"]
    ignored = [p for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p and not p.startswith("#")]
    copied = [source for op, args in steps if op == "COPY" for source in shlex.split(args)[:-1]]
    assert "proxy" in copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source.split("/")[0] not in ignored, f"{source} is in .dockerignore"
    # COPY keeps symlinks as they are: what they point at must be copied as well.
    for source in copied:
        for link in [p for p in (ROOT / source).rglob("*") if p.is_symlink()]:
            target = link.resolve().relative_to(ROOT)
            assert any(target.is_relative_to(c) for c in copied), f"{link} -> {target}"


def test_promtool_accepts_the_prometheus_files() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    for args in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(ALERTS)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


# ---- against the running proxy ---------------------------------------------------------

def expressions() -> list[tuple[str, str]]:
    """(legend format, expression) of every dashboard target and alert rule."""
    dashboard = json.loads(DASHBOARD.read_text())
    stack, found = list(dashboard["panels"]), []
    while stack:
        panel = stack.pop()
        stack += panel.get("panels", [])
        found += [(t.get("legendFormat", ""), t["expr"]) for t in panel.get("targets", [])]
    groups = load(ALERTS)["groups"]
    found += [("", r["expr"]) for g in groups for r in g["rules"]]
    return found


def exposition(running: Running) -> tuple[set[str], set[str]]:
    """Sample names and label names the proxy's /metrics shows after a priced request."""
    with openai.OpenAI(base_url=running.proxy.base_url, api_key=running.key,
                       max_retries=0) as client:
        reply = client.chat.completions.create(
            model="gpt-test", user="deploy-check", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        routed = client.chat.completions.create(  # a fallback: the routing metrics
            model="routed-echo", user="deploy-check", messages=[{"role": "user", "content": "hi"}])
    assert routed.choices[0].message.content
    text = httpx.get(running.proxy.url + "/metrics", timeout=10).text
    names, labels = set(), set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
            assert m, line
            names.add(m.group(1))
            labels |= set(re.findall(r"(\w+)=\"", m.group(2) or ""))
    return names, labels


def test_every_metric_and_label_the_dashboard_and_alerts_use_exists(running: Running) -> None:
    names, labels = exposition(running)
    labels |= {"job", "instance"}  # added by Prometheus at scrape time
    used_names, used_labels = set(), set()
    for legend, expr in expressions():
        used_names |= set(re.findall(r"\b(?:paywall|process)_\w+", expr))
        grouped = {x.strip() for g in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
                   for x in g.split(",")}
        matched = {m for sel in re.findall(r"\{([^}]*)\}", expr)
                   for m in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", sel)}
        used_labels |= grouped | matched
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        if grouped and shown:
            assert shown <= grouped, f"legend {legend!r} shows labels {expr} drops"
    assert len(used_names) >= 12
    assert used_names - names == set(), "not in /metrics"
    assert used_labels - labels == set(), "labels not in /metrics"


# ---- the balancer's nginx.conf, run in front of the running proxy ----------------------

@contextlib.contextmanager
def balancer(proxy_port: int) -> Iterator[str]:
    """deploy/nginx/nginx.conf with the replicas swapped for the test's proxy."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    if nginx is None:
        pytest.skip("nginx is not installed")
    root = Path(tempfile.mkdtemp(prefix="paywall-lb-"))
    root.chmod(0o755)
    port = free_port()
    conf = NGINX_CONF.read_text()
    replaced = [
        (r"server\s+proxy\d+:\d+", f"server 127.0.0.1:{proxy_port}"),
        (r"listen\s+\d+;", f"listen 127.0.0.1:{port};"),
        (r"worker_processes\s+\w+;", "worker_processes 1;"),
        (r"access_log\s+\S+", f"access_log {root / 'access.log'}"),
        (r"http\s*\{", "http {\n" + " ".join(f"{kind}_temp_path {root / kind};" for kind in
                                              ("client_body", "proxy", "fastcgi", "uwsgi",
                                               "scgi"))),
    ]
    for pattern, new in replaced:
        conf, n = re.subn(pattern, new, conf)
        assert n, f"nginx.conf no longer has {pattern}"
    (root / "nginx.conf").write_text(conf)
    main = f"daemon off; pid {root / 'nginx.pid'};"
    if os.geteuid() == 0:  # else workers drop to 'nobody', who cannot enter root's dirs
        main += (f" user {pwd.getpwuid(0).pw_name} {grp.getgrgid(os.getegid()).gr_name};")
    argv = [nginx, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", main]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    log = (root / "error.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, (
                (root / "error.log").read_text())
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def test_the_balancer_streams_unbuffered_and_hides_metrics(running: Running,
                                                         request: pytest.FixtureRequest
                                                         ) -> None:
    with balancer(running.proxy.port) as url:
        assert httpx.get(url + "/metrics", timeout=5).status_code == 404
        ready = httpx.get(url + "/readyz", headers={"X-Request-Id": "lb-check-1"}, timeout=5)
        assert ready.status_code == 200
        assert ready.headers["x-request-id"] == "lb-check-1"
        client = openai.OpenAI(base_url=url + "/v1", api_key=running.key, max_retries=0)
        request.addfinalizer(client.close)
        started = time.monotonic()
        arrivals = []
        for chunk in client.chat.completions.create(
                model="chunks", user="lb-check", stream=True,
                messages=[{"role": "user", "content": "stream"}]):
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic() - started)
        assert len(arrivals) == CHUNKS
        # Each chunk reaches the client when the provider sends it, not all at the end.
        assert arrivals[-1] - arrivals[0] >= (CHUNKS - 2) * CHUNK_DELAY, arrivals
