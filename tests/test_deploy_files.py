"""deploy/ files are valid: the Serve configs against Ray's schema and our config; the compose and
Kubernetes YAML parse and use images and ports the Dockerfiles define."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from rollout_service.config import ServerConfig
from rollout_service.serve.app import APP_NAME, ENGINE_DEPLOYMENT, app_config

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


def test_serve_yaml_validates_against_rays_schema_and_our_config():
    schema = check_serve_config(yaml.safe_load((DEPLOY / "serve.yaml").read_text()))
    args = schema.applications[0].args
    for field, value in args.items():  # each value passes its field's validation (model: not here)
        if field != "model":
            ServerConfig.__pydantic_validator__.validate_assignment(ServerConfig.model_construct(), field, value)


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
        assert int(mapping.split(":")[1]) in images[service["image"]]
    assert "redis" in compose["services"]
    command = service["command"]
    flags = [c.removeprefix("--").replace("-", "_") for c in command if c.startswith("--")]
    assert set(flags) <= set(ServerConfig.model_fields), flags
    redis_url = command[command.index("--redis-url") + 1]
    assert redis_url.startswith("redis://redis:")


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
    assert {p["containerPort"] for p in head["ports"]} <= images[head["image"]]
    assert head["readinessProbe"]["httpGet"]["port"] == 8000 and head["livenessProbe"]["grpc"]["port"] == 50051
    for group in cluster["workerGroupSpecs"]:
        assert group["template"]["spec"]["containers"][0]["image"] in images
    exposed = next(d for d in docs if d["kind"] == "Service")
    assert {p["targetPort"] for p in exposed["spec"]["ports"]} <= images[head["image"]]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_install_the_package_and_run_the_cli(name):
    text = (DEPLOY / "docker" / name).read_text()
    assert "pip install" in text and "./clients/python" in text
    assert 'ENTRYPOINT ["rollout-service"]' in text
