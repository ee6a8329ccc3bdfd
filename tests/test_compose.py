"""compose/docker-compose.yml, checked without Docker: pinned images, healthchecks, one consistent set of
ports and host paths across compose, Prometheus, Grafana and the gateway's settings, and Triton's flags
accepted by a real tritonserver 2.51."""
from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
GPU_COMPOSE_FILE = COMPOSE_DIR / "docker-compose.gpu.yml"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus" / "prometheus.yml"
DATASOURCES = sorted((COMPOSE_DIR / "grafana" / "provisioning" / "datasources").glob("*.yml"))
DASHBOARD_PROVIDERS = sorted((COMPOSE_DIR / "grafana" / "provisioning" / "dashboards").glob("*.yml"))

SERVICES = {"triton", "gateway", "jaeger", "prometheus", "alertmanager", "grafana"}
# Ports the off-the-shelf images listen on without a flag saying so (their documented defaults).
JAEGER_PORTS = {"ui": 16686, "otlp_grpc": 4317, "otlp_http": 4318, "admin": 14269}
IMAGE_DEFAULT_PORTS = {"jaeger": set(JAEGER_PORTS.values()), "prometheus": {9090}, "alertmanager": {9093},
                       "grafana": {3000}}
URL = re.compile(r"(?:(?P<scheme>[a-z]+)://)?(?P<host>[a-zA-Z0-9_.-]+):(?P<port>\d+)(?P<path>/[^\s'\"]*)?")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def flag(command: list[str], name: str) -> str | None:
    """The value of `--name=value` (or `--name value`) in a command list."""
    for index, part in enumerate(command):
        if part.startswith(f"--{name}="):
            return part.split("=", 1)[1]
        if part == f"--{name}" and index + 1 < len(command):
            return command[index + 1]
    return None


def flags(command: list[str], name: str) -> list[str]:
    return [part.split("=", 1)[1] for part in command if part.startswith(f"--{name}=")]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def listening_ports(name: str, service: dict) -> set[int]:
    """The ports a service's process listens on, from its own command line or environment."""
    command = service.get("command") or []
    if name == "triton":
        return {int(flag(command, port)) for port in ("http-port", "grpc-port", "metrics-port")}
    if name == "gateway":
        settings = environment(service)
        return {int(settings["GATEWAY_PORT"])} | ({int(settings["GATEWAY_METRICS_PORT"])}
                                                  if settings.get("GATEWAY_METRICS_PORT") else set())
    if name in ("prometheus", "alertmanager"):
        address = flag(command, "web.listen-address")
        return {int(address.rsplit(":", 1)[1])} if address else IMAGE_DEFAULT_PORTS[name]
    if name == "grafana":
        return {int(environment(service).get("GF_SERVER_HTTP_PORT", 3000))}
    return IMAGE_DEFAULT_PORTS[name]


def declared_ports(service: dict) -> set[int]:
    """Container-side ports in `expose` and `ports`."""
    ports = {int(port) for port in service.get("expose", [])}
    for mapping in service.get("ports", []):
        ports.add(int(str(mapping).rsplit(":", 1)[1].split("/")[0]))
    return ports


def parse_url(text: str) -> tuple[str, int, str]:
    match = URL.search(text)
    assert match, f"no host:port in {text!r}"
    return match["host"], int(match["port"]), match["path"] or ""


def dockerfile_bases(dockerfile: Path) -> list[str]:
    return [line.split()[1] for line in dockerfile.read_text().splitlines() if line.upper().startswith("FROM ")]


def assert_pinned(reference: str, where: str) -> None:
    if "@sha256:" in reference:
        return
    name, _, tag = reference.rpartition(":")
    assert name and "/" not in tag, f"{where}: image {reference!r} has no tag"
    assert tag != "latest" and re.search(r"\d", tag), f"{where}: image {reference!r} is not pinned to a version"


# ------------------------------------------------------------------ structure
def test_the_stack_has_its_six_services(services):
    assert set(services) == SERVICES


def test_every_image_is_pinned(services):
    for name, service in services.items():
        if "build" in service:
            dockerfile = ROOT / "compose" / service["build"]["context"] / service["build"]["dockerfile"]
            dockerfile = dockerfile.resolve()
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            for base in dockerfile_bases(dockerfile):
                assert_pinned(base, f"{name} ({dockerfile.name})")
        else:
            assert_pinned(service["image"], name)
        if "image" in service:
            assert_pinned(service["image"], name)


def test_dockerfiles_copy_only_what_exists_and_have_their_own_ignore_file(services):
    for name, service in services.items():
        if "build" not in service:
            continue
        context = (COMPOSE_DIR / service["build"]["context"]).resolve()
        dockerfile = (context / service["build"]["dockerfile"]).resolve()
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
        assert ignore.is_file(), f"{name}: without {ignore.name} the whole repository (.venv too) is sent to Docker"
        kept = {line.strip().lstrip("!") for line in ignore.read_text().splitlines() if line.startswith("!")}
        for line in dockerfile.read_text().splitlines():
            parts = line.split()
            if not parts or parts[0].upper() != "COPY" or any(part.startswith("--from") for part in parts):
                continue
            for source in parts[1:-1]:
                assert (context / source).exists(), f"{name}: COPY {source} does not exist"
                assert source.rstrip("/") in kept, f"{name}: COPY {source} is excluded by {ignore.name}"


def test_triton_image_is_release_24_10_which_is_triton_2_51():
    assert dockerfile_bases(COMPOSE_DIR / "triton.Dockerfile") == ["nvcr.io/nvidia/tritonserver:24.10-py3"]


def test_triton_image_has_cupy_for_the_models_that_keep_their_inputs_on_the_gpu():
    repository = COMPOSE_DIR.parent / "model_repository"
    on_gpu = [config.parent.name for config in sorted(repository.glob("*/config.pbtxt"))
              if re.search(r'key: "FORCE_CPU_ONLY_INPUT_TENSORS", value: \{ string_value: "no" \}', config.read_text())]
    assert on_gpu == ["postprocess"]
    dockerfile = (COMPOSE_DIR / "triton.Dockerfile").read_text()
    # CUDA 12 in release 24.10, so CuPy's CUDA 12 build; imported at build time so a broken wheel fails the build
    assert '"cupy-cuda12x>=13,<14"' in dockerfile and "import cupy," in dockerfile


def test_the_gateway_image_installs_no_model_tooling():
    """ONNX, ONNX Runtime, h5py and the pip tritonserver (nvidia-pytriton, hundreds of MB) are the `models`
    extra: the gateway image, which installs the package with its `gateway` extra only, gets none of them."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    required = setup["options"]["install_requires"]
    for tooling in ("onnx", "onnxruntime", "h5py", "nvidia-pytriton"):
        assert not re.search(rf"^\s*{re.escape(tooling)}\b", required, re.MULTILINE), tooling
        assert re.search(rf"^\s*{re.escape(tooling)}\b", setup["options.extras_require"]["models"], re.MULTILINE)
    installs = re.findall(r"pip install (\S+)", (COMPOSE_DIR / "gateway.Dockerfile").read_text())
    assert installs == ['".[gateway]"']


def test_models_accelerated_by_tensorrt_build_their_engines_before_ready_and_keep_them(compose):
    """Warm-up at batch 1 and at max_batch_size, so the engine covers every batch before the first request; the
    engine cache path lives on a volume, so a re-created container does not build again."""
    from ensemble.triton.config import load_config

    repository = COMPOSE_DIR.parent / "model_repository"
    accelerated = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = load_config(path)
        for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
            if accelerator.name == "tensorrt":
                accelerated[config.name] = (config, accelerator.parameters["trt_engine_cache_path"])
    assert set(accelerated) == {"face_detector", "mask_classifier"}
    mounts = [volume.split(":") for volume in compose["services"]["triton"]["volumes"]]
    for name, (config, cache_path) in accelerated.items():
        assert sorted(warmup.batch_size for warmup in config.model_warmup) == [1, config.max_batch_size], name
        assert all(set(warmup.inputs) == {tensor.name for tensor in config.input} for warmup in config.model_warmup)
        assert any(cache_path.startswith(target + "/") and source in compose["volumes"]
                   for source, target, *_ in mounts), f"{name}: {cache_path} is not on a named volume"


def test_every_service_has_a_healthcheck_on_a_port_it_listens_on(services):
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name} healthcheck lacks {key}"
        test = " ".join(check["test"]) if isinstance(check["test"], list) else check["test"]
        host, port, _ = parse_url(test)
        assert host == "localhost", f"{name}: a healthcheck probes the container itself"
        assert port in listening_ports(name, service), f"{name}: healthcheck port {port} is not listened on"


def test_declared_ports_are_ports_the_services_listen_on(services):
    for name, service in services.items():
        extra = declared_ports(service) - listening_ports(name, service)
        assert not extra, f"{name} exposes or publishes {extra}, which nothing in it listens on"


def test_published_ports_are_loopback_only(services):
    for name, service in services.items():
        for mapping in service.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{name} publishes {mapping} on every interface"


def test_triton_gets_a_gpu_only_from_the_gpu_file(services):
    """The main file runs on any Docker host (a GPU reservation fails where there is no NVIDIA runtime); the GPU
    file adds one and nothing else."""
    assert "deploy" not in services["triton"]
    gpu = yaml.safe_load(GPU_COMPOSE_FILE.read_text())
    assert set(gpu) == {"services"} and set(gpu["services"]) == {"triton"}
    devices = gpu["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] and device["driver"] == "nvidia" for device in devices)


def test_the_images_built_here_are_never_pulled(services):
    for name, service in services.items():
        if "build" in service:
            assert service.get("pull_policy") == "build", name


def test_the_tensorrt_cache_folder_exists_in_the_triton_image(services):
    """ONNX Runtime's TensorRT provider creates the cache folder's last component only."""
    caches = {Path(value).parent.as_posix() for value in _trt_cache_paths()}
    assert caches == {"/tmp/trt_cache"}
    assert "RUN mkdir -p /tmp/trt_cache" in (COMPOSE_DIR / "triton.Dockerfile").read_text()
    assert any(volume.endswith(":/tmp/trt_cache") for volume in services["triton"]["volumes"])


def _trt_cache_paths() -> list[str]:
    return re.findall(r'key: "trt_engine_cache_path", value: "([^"]+)"',
                      "".join(path.read_text() for path in (ROOT / "model_repository").glob("*/config.pbtxt")))


def test_triton_mounts_the_canonical_repository_read_only(services):
    triton = services["triton"]
    mounts = {volume.split(":")[1]: volume for volume in triton["volumes"]}
    model_repository = flag(triton["command"], "model-repository")
    assert model_repository in mounts, "--model-repository is not the mounted repository"
    source, _, mode = mounts[model_repository].split(":")
    assert (COMPOSE_DIR / source).resolve() == ROOT / "model_repository" and mode == "ro"


def test_every_bind_mounted_host_path_exists(compose, services):
    named = set(compose.get("volumes", {}) or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source in named:
                continue
            assert source.startswith("."), f"{name}: {source} is neither relative nor a named volume"
            assert (COMPOSE_DIR / source).exists(), f"{name}: host path {source} does not exist"
        build = service.get("build")
        if build:
            assert (COMPOSE_DIR / build["context"]).is_dir()


def container_path_exists(service: dict, container_path: str) -> bool:
    """Whether `container_path` lies under a bind mount of `service` whose host side has that file."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith(".") and (container_path == target or container_path.startswith(target + "/")):
            return (COMPOSE_DIR / source / Path(container_path).relative_to(target)).exists()
    return False


def test_config_files_named_on_command_lines_are_mounted(services):
    assert container_path_exists(services["prometheus"], flag(services["prometheus"]["command"], "config.file"))
    assert container_path_exists(services["alertmanager"], flag(services["alertmanager"]["command"], "config.file"))
    grafana = services["grafana"]
    assert container_path_exists(grafana, "/etc/grafana/provisioning/datasources")
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert container_path_exists(grafana, home)
    for provider_file in DASHBOARD_PROVIDERS:
        for provider in yaml.safe_load(provider_file.read_text())["providers"]:
            assert container_path_exists(grafana, provider["options"]["path"]), provider


def test_prometheus_rule_files_are_inside_the_mounted_config_folder():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for pattern in config["rule_files"]:
        assert not pattern.startswith("/") and list(PROMETHEUS_CONFIG.parent.glob(pattern)), pattern


# ------------------------------------------------------------------ one set of ports
def test_gateway_reaches_triton_on_triton_s_grpc_and_metrics_ports(services):
    env = environment(services["gateway"])
    triton_command = services["triton"]["command"]
    host, port, _ = parse_url(env["GATEWAY_TRITON_URL"])
    assert (host, port) == ("triton", int(flag(triton_command, "grpc-port")))
    host, port, path = parse_url(env["GATEWAY_TRITON_METRICS_URL"])
    assert (host, port, path) == ("triton", int(flag(triton_command, "metrics-port")), "/metrics")


def test_a_gateway_using_shared_memory_shares_triton_s_ipc_namespace(services):
    """Pixels via /dev/shm only work if the gateway sees Triton's /dev/shm: compose must join the namespaces."""
    from gateway.settings import Settings

    settings = Settings.from_env(environment(services["gateway"]))
    if settings.triton_shared_memory == "system":
        assert services["triton"].get("ipc") == "shareable"
        assert services["gateway"].get("ipc") == "service:triton"
        assert "triton" in services["gateway"]["depends_on"]


def test_traces_go_to_jaeger_s_otlp_http_receiver(services):
    gateway = environment(services["gateway"])
    assert gateway["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert parse_url(gateway["OTEL_EXPORTER_OTLP_ENDPOINT"])[:2] == ("jaeger", JAEGER_PORTS["otlp_http"])
    trace = dict(item.split("=", 1) for item in flags(services["triton"]["command"], "trace-config"))
    assert trace["mode"] == "opentelemetry" and trace["rate"] == "0"
    assert parse_url(trace["opentelemetry,url"]) == ("jaeger", JAEGER_PORTS["otlp_http"], "/v1/traces")


def test_prometheus_scrapes_the_gateway_and_not_triton(services):
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: [target for static in job.get("static_configs", []) for target in static["targets"]]
            for job in config["scrape_configs"]}
    metrics_port = int(environment(services["gateway"])["GATEWAY_METRICS_PORT"])  # not the API port's threads
    assert jobs["gateway"] == [f"gateway:{metrics_port}"]
    for job, targets in jobs.items():
        for target in targets:
            host, port, _ = parse_url(target)
            assert host != "triton", f"job {job} scrapes Triton directly: every nv_* family would be duplicated"
            if host in services:
                assert port in listening_ports(host, services[host]), f"job {job}: {target} is not listened on"
    alertmanagers = [target for entry in config["alerting"]["alertmanagers"]
                     for static in entry["static_configs"] for target in static["targets"]]
    assert alertmanagers == [f"alertmanager:{min(listening_ports('alertmanager', services['alertmanager']))}"]


def test_grafana_datasources_point_at_the_services(services):
    expected = {"prometheus": ("prometheus", 9090), "jaeger": ("jaeger", JAEGER_PORTS["ui"]),
                "alertmanager": ("alertmanager", 9093)}
    found = {}
    for path in DATASOURCES:
        for source in yaml.safe_load(path.read_text())["datasources"]:
            host, port, _ = parse_url(source["url"])
            assert host in services and port in listening_ports(host, services[host]), source["url"]
            found[source["type"]] = (host, port)
            for destination in source.get("jsonData", {}).get("exemplarTraceIdDestinations", []):
                assert destination["datasourceUid"] == "jaeger"
    assert found == expected


def test_the_gateway_runs_its_gunicorn_config_and_app_factory(services):
    command = services["gateway"]["command"]
    assert command[0] == "gunicorn" and command[-1] == "gateway:create_app()"
    config = command[command.index("-c") + 1]
    assert (ROOT / config).is_file(), f"{config} is not in the repository (the image copies gateway/ to /app)"
    assert re.search(r"^def create_app\(", (ROOT / "gateway" / "__init__.py").read_text(), re.M)
    assert services["gateway"]["depends_on"]["triton"]["condition"] == "service_started"


# ------------------------------------------------------------------ Triton accepts the flags
@pytest.mark.triton
def test_a_real_tritonserver_accepts_the_compose_flags(tmp_path, services):
    """tritonserver 2.51 (the pip build) starts with exactly compose's flags, and reports the trace settings."""
    from ensemble.triton.launcher import TritonServer

    skipped = ("--model-repository", "--http-port", "--grpc-port", "--metrics-port")  # set by the launcher
    arguments = [part.replace("jaeger:4318", "127.0.0.1:9") for part in services["triton"]["command"][1:]
                 if not part.startswith(skipped)]
    assert any(part.startswith("--trace-config") for part in arguments)
    (tmp_path / "models").mkdir()
    with TritonServer(tmp_path / "models", extra_args=arguments, ready_timeout=60) as server:
        with urllib.request.urlopen(server.http_url + "/v2/trace/setting", timeout=5) as response:
            trace = json.loads(response.read())
        with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
            metrics = response.read().decode()
    assert trace["trace_mode"] == "opentelemetry" and trace["trace_rate"] == "0"
    assert trace["trace_level"] == ["TIMESTAMPS"]
    assert urllib.parse.urlsplit("//" + trace["url"]).path == "/v1/traces"
    assert "nv_cpu_utilization" in metrics
