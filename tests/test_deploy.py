"""The deployment files: Dockerfile, docker-compose.yml and deploy/.

No image is built and no container started here (that needs a Docker daemon). What is checked: compose accepts the
file and wires the three services together as the other files expect; promtool accepts the Prometheus config and
the dashboard's PromQL; the dashboard only queries metrics a live server exports, with the panels issue 4 asks for;
the entrypoint runs the right command (exec'd, so SIGTERM reaches the server); the healthcheck command tells a
healthy server from a draining or dead one; and the Dockerfile only copies paths that exist.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
from functools import cache
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_process import InProcessServer

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "deploy" / "docker-entrypoint.sh"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "attnserve.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
SERVICES = {"attnserve", "prometheus", "grafana"}
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
# Variables compose interpolates; cleared so the caller's environment cannot change what the tests see.
COMPOSE_VARS = ("MODEL", "MODEL_DIR", "PORT", "PROMETHEUS_PORT", "GRAFANA_PORT", "ATTNSERVE_API_KEY_FILE",
                "COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES")


# --- docker compose -------------------------------------------------------------------------------------------------

@cache
def compose_cli() -> tuple[str, ...] | None:
    """`docker compose` (v2) if the plugin works, else `docker-compose` (v1) if installed, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return ("docker", "compose")
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    return None


def run_compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` (the Docker CLI's compose plugin) nor `docker-compose` is installed")
    base = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARS}
    result = subprocess.run([*cli, "-f", str(COMPOSE_FILE), *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**base, **(env or {})})
    assert result.returncode == 0, f"{' '.join(cli)} {' '.join(args)} failed:\n{result.stderr}"
    return result


def compose_config(env: dict[str, str] | None = None) -> dict:
    """The file as compose resolves it (variables interpolated, relative paths made absolute)."""
    if compose_cli() == ("docker", "compose"):
        return json.loads(run_compose("config", "--format", "json", env=env).stdout)
    text = run_compose("config", env=env).stdout  # docker-compose v1 prints YAML only
    yaml = pytest.importorskip("yaml", reason="docker-compose v1 prints YAML, and PyYAML is not installed")
    return yaml.safe_load(text)


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read only) of each volume, from either the short ("a:b:ro") or the long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            out.append((source, target, "ro" in (mode[0].split(",") if mode else [])))
        else:
            out.append((v["source"], v["target"], bool(v.get("read_only"))))
    return out


def ports(service: dict) -> set[tuple[int, int]]:
    """(published, container) port pairs."""
    out = set()
    for p in service.get("ports", []):
        if isinstance(p, str):
            published, target = p.rsplit(":", 2)[-2:]
            out.add((int(published), int(target)))
        else:
            out.add((int(p["published"]), int(p["target"])))
    return out


def depends_on(service: dict) -> set[str]:
    deps = service.get("depends_on", [])
    return set(deps)  # a list of names, or a mapping keyed by name


def test_compose_file_validates():
    run_compose("config", "-q")
    assert set(run_compose("config", "--services").stdout.split()) == SERVICES


def test_compose_services_are_wired_together():
    services = compose_config()["services"]
    assert set(services) == SERVICES

    app = services["attnserve"]
    build = app["build"]
    assert Path(build["context"] if isinstance(build, dict) else build) == REPO
    assert ports(app) == {(8000, 8000)}
    assert (str(REPO / "models"), "/models", True) in mounts(app)
    assert app["restart"] == "unless-stopped"
    # Longer than the server's drain (--shutdown-timeout, 10 s by default), or docker kills it mid-drain.
    assert app["stop_grace_period"] == "30s"
    assert app["healthcheck"]["test"] == ["CMD", *dockerfile_healthcheck()]

    prom = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prom["image"])  # a pinned version
    assert (str(PROMETHEUS_CONFIG), "/etc/prometheus/prometheus.yml", True) in mounts(prom)
    assert ports(prom) == {(9090, 9090)}
    assert depends_on(prom) == {"attnserve"}

    grafana = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    assert ports(grafana) == {(3000, 3000)}
    assert depends_on(grafana) == {"prometheus"}
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_compose_variables_override_ports_model_and_key(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("sk-test\n")
    env = {"PORT": "18000", "PROMETHEUS_PORT": "19090", "GRAFANA_PORT": "13000", "MODEL_DIR": str(tmp_path),
           "MODEL": "/models/Qwen3-0.6B", "ATTNSERVE_API_KEY_FILE": str(key_file)}
    services = compose_config(env)["services"]
    app = services["attnserve"]
    assert ports(app) == {(18000, 8000)}  # only the host side moves; Prometheus still scrapes :8000
    assert (str(tmp_path), "/models", True) in mounts(app)
    assert app["environment"]["MODEL"] == "/models/Qwen3-0.6B"
    # One key file: the server reads it (entrypoint) and Prometheus sends it (its credentials_file).
    assert (str(key_file), "/run/attnserve/api_key", True) in mounts(app)
    assert (str(key_file), "/etc/prometheus/api_key", True) in mounts(services["prometheus"])
    assert ports(services["prometheus"]) == {(19090, 9090)}
    assert ports(services["grafana"]) == {(13000, 3000)}


def test_default_key_file_is_empty_and_is_the_prometheus_credentials_file():
    """Without ATTNSERVE_API_KEY_FILE, compose mounts the repo's empty file: no key on either side."""
    assert (PROMETHEUS_CONFIG.parent / "api_key").read_text() == ""
    assert "credentials_file: api_key" in PROMETHEUS_CONFIG.read_text()


# --- Prometheus -----------------------------------------------------------------------------------------------------

def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run([promtool(), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_compose_service():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # The compose service name and the port the entrypoint always listens on, whatever PORT publishes.
    assert job["static_configs"] == [{"targets": ["attnserve:8000"]}]
    assert "--port 8000" in ENTRYPOINT.read_text()


# --- Grafana dashboard ----------------------------------------------------------------------------------------------

def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_exprs(dashboard: dict) -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}


def variable_queries(dashboard: dict) -> list[str]:
    out = []
    for var in dashboard["templating"]["list"]:
        query = var["query"]
        out.append(query["query"] if isinstance(query, dict) else query)
    return out


def all_exprs(dashboard: dict) -> list[str]:
    return [e for exprs in panel_exprs(dashboard).values() for e in exprs] + variable_queries(dashboard)


@pytest.fixture(scope="module")
def exported_metric_names(make_ckpt) -> set[str]:
    """Sample names a live server exports after a success and a failure (labelled series appear on first use)."""
    with InProcessServer(make_ckpt("llama"), served_model_name="deploy-model", max_model_len=256,
                         num_kv_blocks=64) as server, server.client() as c:
        ok = c.post("/v1/completions", json={"model": "deploy-model", "prompt": "hi", "max_tokens": 3})
        bad = c.post("/v1/completions", json={"model": "deploy-model", "prompt": "hi", "max_tokens": -1})
        assert (ok.status_code, bad.status_code) == (200, 400)
        server.wait_idle()
        text = c.get("/metrics").text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_dashboard_only_queries_exported_metrics(exported_metric_names):
    used = {name for expr in all_exprs(load_dashboard()) for name in re.findall(r"\battnserve_\w+", expr)}
    assert used, "no attnserve_ metric in the dashboard"
    assert used <= exported_metric_names, f"not exported by the server: {sorted(used - exported_metric_names)}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every panel query, as recording rules (Grafana's variables replaced by values of their kind;
    the variable's label_values() is Grafana's, not PromQL)."""
    exprs = [e.replace("$__rate_interval", "1m").replace("$model_name", ".*")
             for es in panel_exprs(load_dashboard()).values() for e in es]
    rules = tmp_path / "rules.yml"
    rules.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}))  # JSON is YAML
    result = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_has_the_required_panels():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "attnserve" and dashboard["title"] == "attnserve"
    panels = {p["title"]: p for p in dashboard["panels"]}
    exprs = panel_exprs(dashboard)

    def panel_querying(*metrics: str) -> dict:
        found = [t for t, es in exprs.items() if all(any(m in e for e in es) for m in metrics)]
        assert found, f"no panel queries {metrics}"
        return panels[found[0]]

    def unit(p: dict) -> str:
        return p["fieldConfig"]["defaults"]["unit"]

    assert unit(panel_querying("rate(attnserve_request_success_total")) == "reqps"
    assert "finished_reason" in " ".join(exprs[panel_querying("attnserve_request_success_total")["title"]])
    errors = panel_querying("attnserve_request_failure_total", "attnserve_http_requests_total")
    assert any('status=~"4..|5.."' in e for e in exprs[errors["title"]]) and unit(errors) == "reqps"
    for histogram in ("attnserve_time_to_first_token_seconds", "attnserve_inter_token_latency_seconds",
                      "attnserve_e2e_request_latency_seconds"):
        p = panel_querying(f"{histogram}_bucket")
        quantiles = sorted(float(q) for e in exprs[p["title"]] for q in re.findall(r"histogram_quantile\(([\d.]+),", e))
        assert quantiles == [0.5, 0.9, 0.99], (p["title"], quantiles)
        assert all("sum by (le)" in e for e in exprs[p["title"]]) and unit(p) == "s"
    throughput = panel_querying("rate(attnserve_prompt_tokens_total", "rate(attnserve_generation_tokens_total")
    assert "tokens/s" in unit(throughput)
    panel_querying("attnserve_num_requests_running", "attnserve_num_requests_waiting")
    kv = panel_querying("attnserve_kv_cache_usage_perc")
    assert unit(kv) == "percentunit" and kv["fieldConfig"]["defaults"]["max"] == 1
    panel_querying("rate(attnserve_num_preemptions_total")


def test_dashboard_filters_every_query_on_the_model_variable():
    dashboard = load_dashboard()
    [var] = dashboard["templating"]["list"]
    assert var["name"] == "model_name" and var["datasource"] == DATASOURCE
    assert variable_queries(dashboard) == ["label_values(attnserve_engine_info, model_name)"]
    for panel in dashboard["panels"]:
        assert panel["datasource"] == DATASOURCE
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE
            # Every selector of an attnserve_ metric filters on the variable.
            selectors = re.findall(r"attnserve_\w+(\{[^}]*\})?", target["expr"])
            assert selectors and all('model_name=~"$model_name"' in s for s in selectors), target["expr"]


# --- Grafana provisioning -------------------------------------------------------------------------------------------

def provisioning(kind: str) -> dict:
    yaml = pytest.importorskip("yaml")
    [path] = sorted((PROVISIONING / kind).glob("*.yaml"))
    return yaml.safe_load(path.read_text())


def test_provisioned_datasource_is_the_one_the_dashboard_uses():
    [source] = provisioning("datasources")["datasources"]
    assert {"type": source["type"], "uid": source["uid"]} == DATASOURCE
    assert source["url"] == "http://prometheus:9090"  # the compose service and Prometheus' own port


def test_provisioned_dashboard_path_is_mounted_by_compose():
    [provider] = provisioning("dashboards")["providers"]
    path = provider["options"]["path"]
    grafana = compose_config()["services"]["grafana"]
    mounted = {target: Path(source) for source, target, _ in mounts(grafana)}
    assert mounted["/etc/grafana/provisioning"] == PROVISIONING
    assert (mounted[path] / "attnserve.json").is_file()  # the directory the provider reads holds the dashboard
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{path}/attnserve.json"


# --- Dockerfile and entrypoint --------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def dockerfile_healthcheck() -> list[str]:
    [args] = [a for name, a in dockerfile_instructions() if name == "HEALTHCHECK"]
    return json.loads(args.split(" CMD ", 1)[1])


def dockerfile_home() -> str:
    [home] = [m for name, a in dockerfile_instructions() if name == "ENV" for m in re.findall(r"\bHOME=(\S+)", a)]
    return home


def test_dockerfile_copies_only_existing_paths_and_every_package():
    instructions = dockerfile_instructions()
    assert ("ARG", "BASE_IMAGE=python:3.11-slim") in instructions
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in instructions
    ignored = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    copied = []
    for name, a in instructions:
        if name == "COPY":
            *sources, _ = [w for w in a.split() if not w.startswith("--")]
            copied += [s.rstrip("/") for s in sources]
    for source in copied:  # a missing source fails the build
        assert (REPO / source).exists(), source
        assert source.split("/")[0] not in ignored, f"{source} is excluded by .dockerignore"
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"]
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()
                and any(re.fullmatch(pat.replace("*", ".*"), p.name) for pat in patterns)}
    assert packages and packages <= set(copied), f"packages not copied: {packages - set(copied)}"


def test_dockerfile_installs_the_runtime_dependencies_only_and_imports_the_server():
    """The image installs the project as `make serve` does (no extras: they are not what runs), apart from torch,
    whose build it picks by index; and the build imports the whole server, so an undeclared import fails there."""
    installs = [a for n, a in dockerfile_instructions() if n == "RUN" and "pip install" in a]
    targets = [re.sub(r"\s*(&&|;).*", "", cmd).split() for a in installs for cmd in a.split("pip install")[1:]]
    # Flags and their shell-variable values ($pin, "$TORCH_INDEX_URL") are not packages.
    targets = [[w for w in words if not w.lstrip('"').startswith(("-", "$"))] for words in targets]
    assert ["."] in targets, targets
    assert all(words in (["."], ["torch"], ["pip"]) for words in targets), f"installs beyond the runtime list: {targets}"
    check = next(a for n, a in dockerfile_instructions() if n == "RUN" and "default_model_dir()" in a)
    assert "import server.serve" in check


def test_dockerfile_runs_as_a_user_and_ships_the_demo_model():
    instructions = dockerfile_instructions()
    names = [n for n, _ in instructions]
    users = [a for n, a in instructions if n == "USER"]
    assert users and users[-1] not in ("root", "0")
    # The checkpoint is copied in, the engine is pointed at it, and the build checks that it finds it.
    [copy] = [a.split() for n, a in instructions if n == "COPY" and a.startswith("models/demo")]
    assert (f"ATTNSERVE_DEMO_MODEL={copy[-1].rstrip('/')}") in [a for n, a in instructions if n == "ENV"]
    check = next(i for i, (n, a) in enumerate(instructions) if n == "RUN" and "default_model_dir()" in a)
    assert names.index("USER") < check
    assert dockerfile_home() == f"/home/{users[-1]}"
    assert ("EXPOSE", "8000") in instructions
    [entrypoint] = [json.loads(a) for n, a in instructions if n == "ENTRYPOINT"]
    assert any(n == "COPY" and a.split()[-1] == entrypoint[0] and "deploy/docker-entrypoint.sh" in a
               for n, a in instructions)


@pytest.fixture
def fake_attnserve(tmp_path) -> Path:
    """A directory with an `attnserve` that prints its pid and its arguments, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "attnserve"
    fake.write_text('#!/bin/sh\necho "pid=$$"\nfor a in "$@"; do printf \'arg=%s\\n\' "$a"; done\n')
    fake.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("model", [None, "", "/models/My Model"])
def test_entrypoint_execs_the_server_with_model_and_extra_flags(fake_attnserve, model):
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR, "deploy/docker-entrypoint.sh must be executable"
    env = {"PATH": f"{fake_attnserve}:/usr/bin:/bin", **({} if model is None else {"MODEL": model})}
    proc = subprocess.Popen([str(ENTRYPOINT), "--max-model-len", "4096"], stdout=subprocess.PIPE, text=True, env=env)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    lines = out.splitlines()
    # exec: the server is the process docker started (PID 1 in the container), so it gets SIGTERM and drains.
    assert lines[0] == f"pid={proc.pid}"
    expected = ["serve", "--host", "0.0.0.0", "--port", "8000"] + (["--model", model] if model else []) + \
        ["--max-model-len", "4096"]
    assert [ln.removeprefix("arg=") for ln in lines[1:]] == expected


def test_entrypoint_reads_the_api_key_file(tmp_path):
    """The key file sets ATTNSERVE_API_KEY for the server; an explicit ATTNSERVE_API_KEY wins; an empty file sets
    nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "attnserve").write_text('#!/bin/sh\nprintf "key=%s" "${ATTNSERVE_API_KEY:-}"\n')
    (bin_dir / "attnserve").chmod(0o755)
    key = tmp_path / "key"

    def key_seen(content: str, env_key: str | None = None) -> str:
        key.write_text(content)
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ATTNSERVE_API_KEY_PATH": str(key),
               **({} if env_key is None else {"ATTNSERVE_API_KEY": env_key})}
        return subprocess.run([str(ENTRYPOINT)], capture_output=True, text=True, env=env, timeout=30).stdout

    assert key_seen("from-file\n") == "key=from-file"
    assert key_seen("from-file", env_key="from-env") == "key=from-env"
    assert key_seen("") == "key="


class _Unavailable(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # what /health answers while the server drains or after the engine died
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_command_tells_healthy_from_unhealthy(make_ckpt):
    argv = dockerfile_healthcheck()
    assert argv[0] == "python" and argv[1] == "-c" and "http://127.0.0.1:8000/health" in argv[2]

    def check(host_port: str) -> int:
        code = argv[2].replace("127.0.0.1:8000", host_port)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode

    with InProcessServer(make_ckpt("llama"), max_model_len=128, num_kv_blocks=16) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert check(server.url.removeprefix("http://")) == 0

    unavailable = http.server.HTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=unavailable.serve_forever, daemon=True).start()
    try:
        assert check(f"127.0.0.1:{unavailable.server_address[1]}") != 0
    finally:
        unavailable.shutdown()
        unavailable.server_close()

    with socket.socket() as s:  # a port nothing listens on: the server is down
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert check(f"127.0.0.1:{closed}") != 0
