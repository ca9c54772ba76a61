"""deploy/ files are valid: the Serve configs against Ray's schema and our config; the compose and
Kubernetes YAML parse and use images and ports the Dockerfiles define; the alert rules and the
Grafana dashboard are well formed (that the metrics they query exist: tests/api/test_metrics_scrape.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from rollout_service.config import ServerConfig
from rollout_service.serve.app import APP_NAME, ENGINE_DEPLOYMENT, SERVE_ENV, app_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def dockerfiles() -> dict[str, set[int]]:
    """image tag (from the '# image:' line) -> EXPOSEd ports, per Dockerfile."""
    out = {}
    for f in (DEPLOY / "docker").glob("Dockerfile.*"):
        text = f.read_text()
        tag = re.search(r"^# image: (\S+)$", text, re.M).group(1)
        out[tag] = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    return out


def check_serve_config(raw: dict) -> ServeDeploySchema:
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.name == APP_NAME and app.import_path == "rollout_service.serve.app:app_builder"
    unknown = set(app.args) - set(ServerConfig.model_fields)
    assert not unknown, f"args that are no ServerConfig field: {unknown}"
    assert {d.name for d in app.deployments} <= {ENGINE_DEPLOYMENT, "Ingress"}
    return schema


FILE_FIELDS = ("api_keys", "tls_cert", "tls_key", "tls_client_ca", "redis_password_file")


def config_from_args(args: dict, model: Path, tmp_path: Path) -> ServerConfig:
    """The ServerConfig a deploy file's args build, with its files (not here) replaced by stand-ins."""
    args = dict(args, model=model)
    for field in FILE_FIELDS:
        if field in args:
            stand_in = tmp_path / field
            stand_in.write_text("trainer:" + "k" * 32 + "\n")
            args[field] = stand_in
    return ServerConfig(**args)


def assert_secured(args: dict) -> None:
    """A network-facing deploy: keys, TLS and the Redis password are files, none inline."""
    assert args["host"] == "0.0.0.0" and "insecure" not in args
    assert {"api_keys", "tls_cert", "tls_key", "redis_password_file"} <= set(args)
    assert "@" not in args["redis_url"], "the Redis password belongs in redis_password_file"


def test_serve_yaml_validates_against_rays_schema_and_our_config(tiny_model, tmp_path):
    schema = check_serve_config(yaml.safe_load((DEPLOY / "serve.yaml").read_text()))
    args = schema.applications[0].args
    assert_secured(args)
    config = config_from_args(args, tiny_model, tmp_path)
    assert config.tls_cert is not None and config.api_keys is not None


def test_the_cli_builds_a_config_of_the_same_schema(tiny_model):
    config = ServerConfig(model=tiny_model, autoscale=(1, 3), redis_url="redis://r:6379/0")
    schema = check_serve_config({"proxy_location": "Disabled", "applications": [app_config(config)]})
    engines = schema.applications[0].deployments[0]
    assert engines.autoscaling_config["max_replicas"] == 3
    assert "replicas" not in schema.applications[0].args  # scaling stays out of the builder's args


def test_compose_uses_a_dockerfile_image_its_ports_and_redis():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    images = dockerfiles()
    service = compose["services"]["rollout"]
    assert service["image"] in images
    assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve().is_file()
    for mapping in service["ports"]:
        host, published, container = mapping.split(":")
        assert host == "127.0.0.1", f"{mapping}: published beyond this host's loopback"
        assert int(container) in images[service["image"]]
    assert "redis" in compose["services"]
    command = service["command"]
    flags = [c.removeprefix("--").replace("-", "_") for c in command if c.startswith("--")]
    assert set(flags) <= set(ServerConfig.model_fields), flags
    redis_url = command[command.index("--redis-url") + 1]
    assert redis_url.startswith("redis://redis:")


def test_compose_redis_has_a_password_from_a_secret_and_is_not_published():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    redis = compose["services"]["redis"]
    assert "ports" not in redis
    assert "requirepass" in " ".join(redis["entrypoint"]) and "/run/secrets/redis_password" in " ".join(redis["entrypoint"])
    assert redis.get("user") == "redis"
    rollout = compose["services"]["rollout"]
    command = rollout["command"]
    assert command[command.index("--redis-password-file") + 1] == "/run/secrets/redis_password"
    assert command[command.index("--api-keys") + 1] == "/run/secrets/rollout_api_keys"
    assert set(rollout["secrets"]) == {"redis_password", "rollout_api_keys"} == set(compose["secrets"])
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("./secrets/")  # deploy/secrets/, git-ignored
    assert "deploy/secrets/" in (DEPLOY.parent / ".gitignore").read_text()


def test_dockerfiles_expose_only_grpc_and_http_and_require_keys():
    for tag, ports in dockerfiles().items():
        assert ports == {50051, 8000}, f"{tag} exposes {ports}: Ray's GCS and dashboard ports stay inside"
    for f in (DEPLOY / "docker").glob("Dockerfile.*"):
        assert '"--api-keys"' in f.read_text() and "--insecure" not in f.read_text()


def test_kuberay_rayservice_has_a_valid_serve_config_autoscaling_probes_and_known_ports():
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    serve_config = check_serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    engines = next(d for d in serve_config.applications[0].deployments if d.name == ENGINE_DEPLOYMENT)
    assert engines.autoscaling_config["max_replicas"] > engines.autoscaling_config["min_replicas"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    images = dockerfiles()
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] in images
    for probe in (head["readinessProbe"], head["livenessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": 8000, "scheme": "HTTPS"}
    for group in cluster["workerGroupSpecs"]:
        assert group["template"]["spec"]["containers"][0]["image"] in images
    exposed = next(d for d in docs if d["kind"] == "Service")
    assert {p["targetPort"] for p in exposed["spec"]["ports"]} <= images[head["image"]]


def test_kuberay_takes_keys_tls_and_redis_password_from_secrets_and_fences_rays_ports(tiny_model, tmp_path):
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert_secured(args)
    config_from_args(args, tiny_model, tmp_path)
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    mounts = {m["mountPath"]: m["name"] for m in head["spec"]["containers"][0]["volumeMounts"]}
    secrets = {v["name"] for v in head["spec"]["volumes"] if "secret" in v}
    for field in ("api_keys", "tls_cert", "tls_key", "redis_password_file"):
        folder = str(Path(args[field]).parent)
        assert mounts.get(folder) in secrets, f"{field} ({args[field]}) is not mounted from a Secret"
    label = head["metadata"]["labels"]
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == label
    open_rule, own_pods, operator = policy["spec"]["ingress"]
    assert {p["port"] for p in open_rule["ports"]} == {50051, 8000} and "from" not in open_rule
    assert own_pods["from"] == [{"podSelector": {"matchLabels": label}}] and "ports" not in own_pods
    # KubeRay submits the Serve config through the dashboard: its head container keeps Ray's ports
    # (the head service is built from them), and the operator's namespace reaches only the dashboard.
    assert [p["port"] for p in operator["ports"]] == [8265] and "namespaceSelector" in operator["from"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert head_ports["dashboard"] == 8265 and head_ports["gcs"] == 6379
    exposed = next(d for d in docs if d["kind"] == "Service")
    assert label.items() <= exposed["spec"]["selector"].items()


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_install_the_package_and_run_the_cli(name):
    text = (DEPLOY / "docker" / name).read_text()
    assert "pip install" in text and "./clients/python" in text
    assert 'ENTRYPOINT ["rollout-service"]' in text


def ray_env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_kuberay_requires_rays_token_from_a_secret_on_every_ray_container():
    # Anyone who attaches to the cluster as a driver runs code as the service, past the API keys.
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    secret = cluster["authOptions"]["secretName"]
    assert cluster["authOptions"]["mode"] == "token"  # the operator submits serveConfigV2 with it
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = ray_env(container)
            assert env.get("RAY_AUTH_MODE") == "token", container["name"]
            assert env.get("RAY_AUTH_TOKEN") == {"secretKeyRef": {"name": secret, "key": "auth_token"}}, container["name"]
    assert f"kubectl create secret generic {secret} --from-literal=auth_token=" in (DEPLOY / "kuberay" / "rayservice.yaml").read_text()


def test_no_deploy_file_turns_rays_token_authentication_off():
    for f in DEPLOY.rglob("*"):
        if f.is_file() and f.suffix != ".md":  # the README names the value it refuses
            for value in re.findall(r"RAY_AUTH_MODE(?:\W+value:)?\W+(\w+)", f.read_text()):
                assert value == "token", f"{f.relative_to(DEPLOY)}: RAY_AUTH_MODE {value}"


def test_every_serve_config_raises_serves_grpc_message_cap_for_the_whole_application(tiny_model):
    """Generate streams from the ingress to the replicas over Serve's gRPC (4 MiB messages by
    default); the setting sits in the application's runtime_env, which a deployment's own
    ray_actor_options (the Ingress's, in the files) cannot drop."""
    service = next(d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()) if d["kind"] == "RayService")
    configs = [yaml.safe_load((DEPLOY / "serve.yaml").read_text()), yaml.safe_load(service["spec"]["serveConfigV2"]),
               {"applications": [app_config(ServerConfig(model=tiny_model))]}]
    for config in configs:
        env = config["applications"][0]["runtime_env"]["env_vars"]
        assert env == SERVE_ENV


def test_kuberay_keeps_the_weight_store_in_a_bucket_with_credentials_from_a_secret():
    """No pod shares a weights volume: the store is a bucket every Ray container reaches with the
    credentials of one Secret (pushes reach the replicas through Ray: serve/fanout.py)."""
    service = next(d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()) if d["kind"] == "RayService")
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert str(args["weights_dir"]).startswith("s3://")
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        assert not any("weights" in v["name"] for v in spec.get("volumes", [])), "a weights volume is mounted"
        for container in spec["containers"]:
            assert {"secretRef": {"name": "rollout-s3"}} in container.get("envFrom", []), container["name"]


def test_alert_rules_have_an_expression_a_severity_and_say_what_to_do():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "RolloutIngressDown", "RolloutNoReplicaServing", "RolloutPushFailing", "RolloutPushStuck", "RolloutReplicaBehind",
        "RolloutKVCacheFull"}
    for a in alerts:
        assert a["expr"].strip() and a["labels"]["severity"] in {"critical", "warning"}, a["alert"]
        assert a["annotations"]["summary"] and len(a["annotations"]["description"]) > 80, a["alert"]


def test_the_grafana_dashboard_queries_through_its_prometheus_variable_with_panels_in_place():
    dashboard = json.loads((DEPLOY / "grafana" / "rollout-service.json").read_text())
    assert [v["name"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"] == ["datasource"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for p in panels:
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
    cells = [(p["gridPos"]["y"], x) for p in panels for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])]
    assert len(cells) == len(set(cells)), "panels overlap"
