"""The k8s/ kustomizations: they render, every object validates against the Kubernetes
1.32 schemas, the serving pod is wired as documented, the gpu overlay asks for GPUs,
the multi-worker Job builds a correct TF_CONFIG, and every metric named in the
dashboard, the alerts and the adapter rule is one that ServingMetrics registers.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from serving import config, metrics
from training import bases, scenarios

from tests.deploy import (
    K8S,
    KUSTOMIZATIONS,
    container,
    container_env,
    find,
    kubectl,
    one,
    pod_spec,
    render,
)

KUBERNETES_VERSION = "1.32"
# Custom resources have no schema in kubernetes-validate: skipped by kind, on purpose.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "TFJob"}
OVERLAYS = ("overlays/cpu", "overlays/gpu")
PRESTOP_SECONDS = 5


# -- rendering and schema validation ---------------------------------------------------------

@pytest.mark.parametrize("relative", KUSTOMIZATIONS)
def test_kustomization_renders(relative):
    """`kubectl kustomize` renders it into named, typed objects."""
    objects = render(relative)
    assert objects, f"k8s/{relative} renders nothing"
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj


@pytest.mark.parametrize("relative", KUSTOMIZATIONS)
def test_objects_validate_strictly(relative):
    """Every built-in object validates (strict: unknown fields are errors); CRDs are skipped by kind."""
    skipped = set()
    for obj in render(relative):
        if obj["kind"] in CRD_KINDS:
            skipped.add(obj["kind"])
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"k8s/{relative}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} "
                        f"at {'/'.join(map(str, exc.path))}")
    expected = {"overlays/cpu": {"ServiceMonitor", "PrometheusRule"},
                "overlays/gpu": {"ServiceMonitor", "PrometheusRule"},
                "examples": {"TFJob"}}.get(relative, set())
    assert skipped == expected


def test_strict_validation_catches_a_typo():
    """The validator is live: a misspelt probe field and a bad quantity are refused."""
    deployment = one(render("overlays/cpu"), "Deployment", "graft")
    typo = copy.deepcopy(deployment)
    container(typo, "graft-serve")["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    bad = copy.deepcopy(deployment)
    container(bad, "graft-serve")["resources"]["limits"]["cpu"] = ["2"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_gpu_component_applies_to_the_jobs(tmp_path):
    """components/gpu, added to a Job kustomization as the docs say, gives its pods a GPU."""
    for relative in ("jobs/train", "jobs/multiworker"):
        overlay = tmp_path / relative.replace("/", "-")
        overlay.mkdir()
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            # kustomize takes only relative paths to other kustomizations.
            "resources": [os.path.relpath(K8S / relative, overlay)],
            "components": [os.path.relpath(K8S / "components/gpu", overlay)]}))
        result = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        objects = [o for o in yaml.safe_load_all(result.stdout) if o]
        job = one(objects, "Job")
        assert container(job, "graft-train")["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod_spec(job)["nodeSelector"]
        assert len(pod_spec(job)["containers"]) == 1, "the patch must not add containers"
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


# -- the serving stack -----------------------------------------------------------------------

def _serve_flags(spec: dict) -> dict[str, str]:
    flags = {}
    for arg in spec.get("args", []):
        name, _, value = arg.partition("=")
        flags[name] = value
    return flags


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_runs_serve_and_train_on_one_repository(overlay):
    """graft-serve and the graft-train sidecar mount the same model-repository PVC."""
    objects = render(overlay)
    deployment = one(objects, "Deployment", "graft")
    pod = pod_spec(deployment)
    assert [c["name"] for c in pod["containers"]] == ["graft-serve", "graft-train"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {}
    for name in ("graft-serve", "graft-train"):
        mount = next(m for m in container(deployment, name)["volumeMounts"] if m["mountPath"] == "/models")
        claims[name] = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claims["graft-serve"] == claims["graft-train"]
    pvc = one(objects, "PersistentVolumeClaim", claims["graft-serve"])
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "every replica and its sidecar share it"
    # The server only reads the repository; the sidecar publishes into it.
    serve_mount = next(m for m in container(deployment, "graft-serve")["volumeMounts"] if m["mountPath"] == "/models")
    assert serve_mount.get("readOnly") is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_flags_parse_and_rotate_grpc_connections(overlay):
    """graft-serve's own parser accepts every flag; gRPC connections age out so new replicas get traffic."""
    from serving.runtime.main import build_parser

    args = build_parser().parse_args(container(one(render(overlay), "Deployment", "graft"), "graft-serve")["args"])
    assert dict(args.grpc_channel_arguments)["grpc.max_connection_age_ms"] > 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_drain_and_resources(overlay):
    """Readiness /readyz, liveness /healthz, a startup probe, preStop, grace > drain, requests and limits."""
    deployment = one(render(overlay), "Deployment", "graft")
    serve = container(deployment, "graft-serve")
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert serve["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert serve[probe]["httpGet"]["port"] == "http"
    pre_stop = serve["lifecycle"]["preStop"]["exec"]["command"]
    assert Path(pre_stop[0]).name == "sleep" and float(pre_stop[1]) == PRESTOP_SECONDS
    drain = float(_serve_flags(serve)["--drain_seconds"])
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace > PRESTOP_SECONDS + drain, f"grace {grace}s must exceed preStop {PRESTOP_SECONDS}s + drain {drain}s"
    for spec in pod_spec(deployment)["containers"]:
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(spec["resources"][bound]), f"{spec['name']} lacks {bound}"
        assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod_spec(deployment)["securityContext"]["runAsNonRoot"] is True


def test_service_ports():
    """gRPC 8500 with appProtocol grpc and HTTP 8501, selecting the serving pods."""
    objects = render("overlays/cpu")
    service = one(objects, "Service", "graft")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert (ports["grpc"]["port"], ports["grpc"]["appProtocol"]) == (8500, "grpc")
    assert (ports["http"]["port"], ports["http"]["appProtocol"]) == (8501, "http")
    labels = pod_spec_labels(one(objects, "Deployment", "graft"))
    assert service["spec"]["selector"].items() <= labels.items()
    serve_ports = {p["name"] for p in container(one(objects, "Deployment", "graft"), "graft-serve")["ports"]}
    assert {p["targetPort"] for p in ports.values()} <= serve_ports


def pod_spec_labels(workload: dict) -> dict:
    """Labels of a workload's pod template."""
    return workload["spec"]["template"]["metadata"]["labels"]


def test_hpa_pdb_and_servicemonitor_target_the_deployment():
    """HPA on graft-serve's CPU, a PDB and a ServiceMonitor that all reach the serving pods."""
    objects = render("overlays/cpu")
    deployment = one(objects, "Deployment", "graft")
    labels = pod_spec_labels(deployment)
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "graft"}
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "ContainerResource"
    assert metric["containerResource"]["container"] == "graft-serve" and metric["containerResource"]["name"] == "cpu"
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be able to evict a pod"
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service", "graft")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_gpu_overlay_schedules_on_gpus():
    """gpu: nodeSelector, tolerations and nvidia.com/gpu limits on every serving and training pod (the
    console's promotions evaluate on its CPU); cpu: none of them."""
    gpu = render("overlays/gpu")
    for workload in find(gpu, "Deployment") + find(gpu, "CronJob"):
        pod = pod_spec(workload)
        if workload["metadata"]["name"] == "graft-console":
            assert "nodeSelector" not in pod and "tolerations" not in pod
            continue
        assert pod["nodeSelector"], workload["metadata"]["name"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        for spec in pod["containers"]:
            assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1, spec["name"]
            assert {"name": "TF_FORCE_GPU_ALLOW_GROWTH", "value": "true"} in spec["env"]
    hpa = one(gpu, "HorizontalPodAutoscaler")
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"ContainerResource", "Pods"}
    cpu = render("overlays/cpu")
    for workload in find(cpu, "Deployment") + find(cpu, "CronJob"):
        pod = pod_spec(workload)
        assert "nodeSelector" not in pod and "tolerations" not in pod
        assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in pod["containers"])


# -- configuration files in ConfigMaps ---------------------------------------------------------

def _mounted(objects: list[dict], workload: dict, name: str, path: str) -> str:
    spec = container(workload, name)
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    for mount in spec["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            config_map = one(objects, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
            return config_map["data"][path[len(prefix):]]
    raise AssertionError(f"{path} is not mounted into {name}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_files_parse_and_match_the_training_side(overlay):
    """models.config and batching parameters reach graft-serve and parse with its own readers;
    the model's base_path is where the retrain flow publishes."""
    objects = render(overlay)
    deployment = one(objects, "Deployment", "graft")
    flags = _serve_flags(container(deployment, "graft-serve"))
    models = config.parse_model_config(_mounted(objects, deployment, "graft-serve", flags["--model_config_file"]))
    params = config.parse_batching_parameters(
        _mounted(objects, deployment, "graft-serve", flags["--batching_parameters_file"]))
    env = container_env(container(deployment, "graft-train"), objects)
    assert [m.base_path for m in models] == [f"{env['GRAFT_REPO']}/{env['GRAFT_MODEL_NAME']}"]
    assert [m.name for m in models] == [env["GRAFT_MODEL_NAME"]]
    # The saturation alert assumes 256 rows of queue per pod.
    assert params.max_batch_size * params.max_enqueued_batches == 256
    threshold = float(re.search(r">\s*([\d.]+)", _alert(objects, "GraftBatchQueueSaturated")["expr"]).group(1))
    assert 0.5 * 256 < threshold < 256


def test_training_settings_are_known_to_graft_train():
    """The base and scenario in train.env are ones graft-train knows."""
    env = one(render("overlays/cpu"), "ConfigMap", "graft-train-env")["data"]
    bases.get_base(env["GRAFT_BASE"])
    scenarios.parse_scenario(env["GRAFT_SCENARIO"])


# -- training: CronJob, Job, Indexed Job -------------------------------------------------------

def _script_command(workload: dict) -> list[str]:
    return container(workload, "graft-train")["command"]


def test_retrain_script_is_valid_shell():
    """retrain.sh parses with POSIX sh (dash), the shell the training image runs it with."""
    script = one(render("overlays/cpu"), "ConfigMap", "graft-scripts")["data"]["retrain.sh"]
    result = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


def test_sidecar_claims_a_trigger_once_and_cleans_up(tmp_path):
    """retrain.sh watch, run for real with the real graft-train on a missing data folder:
    it claims the trigger, the failed fit leaves no staging debris and no version,
    and SIGTERM between runs exits 143 without re-queuing a finished trigger."""
    stack = render("overlays/cpu")
    deployment = one(stack, "Deployment", "graft")
    env = container_env(container(deployment, "graft-train"), stack)
    script = tmp_path / "retrain.sh"
    script.write_text(one(stack, "ConfigMap", "graft-scripts")["data"]["retrain.sh"])
    repo = tmp_path / "models"
    env.update({"GRAFT_REPO": str(repo), "GRAFT_TRAIN_DATA": str(tmp_path / "no-such-data"),
                "GRAFT_TRIGGER_DIR": str(repo / ".graft/triggers"), "GRAFT_TRIGGER_POLL_SECONDS": "1",
                "HOSTNAME": "pod-a", "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3",
                "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    triggers = repo / ".graft/triggers"
    triggers.mkdir(parents=True)
    (triggers / "retrain").touch()
    log = tmp_path / "retrain.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(["sh", str(script), "watch"], env=env, stderr=stderr)
    try:
        # The claim file exists from the atomic rename until the run ends: an empty
        # trigger directory means the run is over.
        deadline = time.monotonic() + 90
        while any(triggers.iterdir()) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert "fit failed" in log.read_text(), log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 143
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert sorted(p.name for p in triggers.iterdir()) == [], "the trigger was not consumed exactly once"
    assert list((repo / ".graft/staging").iterdir()) == [], "a failed run left its staging directory"
    assert not (repo / env["GRAFT_MODEL_NAME"]).exists(), "nothing may be published when fit fails"


def test_cronjob_and_jobs_retrain_then_promote():
    """The CronJob and the one-off Job run retrain.sh once under tini; a gate rejection fails fast."""
    cron = one(render("overlays/cpu"), "CronJob", "graft-retrain")
    job = one(render("jobs/train"), "Job")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    for spec in (cron["spec"]["jobTemplate"]["spec"], job["spec"]):
        command = spec["template"]["spec"]["containers"][0]["command"]
        assert Path(command[0]).name == "tini" and command[-2:] == ["/etc/graft/scripts/retrain.sh", "once"]
        (rule,) = spec["podFailurePolicy"]["rules"]
        assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [1]
    sidecar = one(render("overlays/cpu"), "Deployment", "graft")
    assert _script_command(sidecar)[-1] == "watch"


@pytest.mark.parametrize("relative", ("jobs/train", "jobs/multiworker"))
def test_jobs_use_the_serving_stacks_objects(relative):
    """Jobs rendered on their own refer to the stack's PVCs and ConfigMaps by their real names."""
    stack = render("overlays/cpu")
    namespace = one(stack, "Deployment", "graft")["metadata"]["namespace"]
    for job in find(render(relative), "Job"):
        assert job["metadata"]["namespace"] == namespace
        pod = pod_spec(job)
        for volume in pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                one(stack, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            if "configMap" in volume:
                one(stack, "ConfigMap", volume["configMap"]["name"])
        for source in container(job, "graft-train").get("envFrom", []):
            one(stack, "ConfigMap", source["configMapRef"]["name"])


def test_multiworker_job_builds_tf_config_from_its_index():
    """Indexed Job + headless Service; retrain.sh (run for real) lists every worker's DNS name."""
    objects = render("jobs/multiworker")
    job = one(objects, "Job", "graft-multiworker")
    service = one(objects, "Service")
    spec = job["spec"]
    pod = pod_spec(job)
    assert spec["completionMode"] == "Indexed"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod_spec_labels(job).items()
    stack = render("overlays/cpu")
    env = container_env(container(job, "graft-train"), stack)
    workers = int(env["GRAFT_WORKERS"])
    assert spec["completions"] == spec["parallelism"] == workers >= 2
    assert env["GRAFT_SERVICE"] == service["metadata"]["name"]
    ports = {p["containerPort"] for p in container(job, "graft-train")["ports"]}
    assert int(env["GRAFT_WORKER_PORT"]) in ports
    assert {p["port"] for p in service["spec"]["ports"]} == ports
    script = one(stack, "ConfigMap", "graft-scripts")["data"]["retrain.sh"]
    # An Indexed Job's pod host name is <job name>-<index>; the downward API gives the job name.
    env.update({"GRAFT_JOB_NAME": job["metadata"]["name"], "JOB_COMPLETION_INDEX": "1", "PATH": "/usr/bin:/bin"})
    result = subprocess.run(["sh", "-s", "tf-config"], input=script, env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    tf_config = json.loads(result.stdout)
    expected = [f"graft-multiworker-{i}.graft-multiworker:{env['GRAFT_WORKER_PORT']}" for i in range(workers)]
    assert tf_config == {"cluster": {"worker": expected}, "task": {"type": "worker", "index": 1}}


def test_tfjob_example():
    """The Kubeflow TFJob runs graft-train fit on workers in the operator's `tensorflow` container."""
    tfjob = one(render("examples"), "TFJob")
    worker = tfjob["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] >= 2
    spec = container(tfjob, "tensorflow")
    assert spec["args"][0] == "fit" and "--strategy=multiworker" in spec["args"]


# -- metric names: dashboard, alerts, adapter rule vs. ServingMetrics ----------------------------

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                 "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (functions, keywords, labels and durations left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)          # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)        # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, is_call = match.group(1), match.group(2)
        if not is_call and word not in _PROMQL_WORDS:
            names.add(word)
    return names


def test_promql_name_extraction():
    """The extractor keeps metric names and drops functions, labels, keywords and durations."""
    expr = ('sum by (model, code) (rate(graft_requests_total{code!="OK", model=~"$model"}[$__rate_interval]))'
            ' / ignoring (code) group_left sum by (model) (rate(graft_requests_total[5m])) > bool 1e3'
            ' or histogram_quantile(0.99, sum(rate(x_seconds_bucket{le="+Inf"}[5m])) by (le)) offset 5m')
    assert promql_metric_names(expr) == {"graft_requests_total", "x_seconds_bucket"}


def _registered_series_names() -> set[str]:
    registry = CollectorRegistry()
    # A device reader is injected so that the GPU family is reported on this CPU machine too.
    metrics.ServingMetrics(registry, device_memory=lambda: {"GPU:0": 1024})
    return series_names(registry.collect())


# The series a family exposes even before it has samples (a labelled metric with no children yet).
_SERIES_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                    "gaugehistogram": ("_bucket", "_gcount", "_gsum"), "summary": ("", "_count", "_sum", "_created"),
                    "info": ("_info",)}


def series_names(families) -> set[str]:
    """Every series name PromQL can select from these metric families."""
    names = set()
    for family in families:
        names.update(family.name + suffix for suffix in _SERIES_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def _alert(objects: list[dict], name: str) -> dict:
    rules = [r for g in one(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    return next(r for r in rules if r.get("alert") == name)


def _dashboard_queries() -> list[tuple[str, str]]:
    config_map = one(render("overlays/cpu"), "ConfigMap", "graft-dashboard")
    dashboard = json.loads(config_map["data"]["graft.json"])
    found: list[tuple[str, str]] = []

    def walk(node, where):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append((where, node["expr"]))
            for key, value in node.items():
                walk(value, f"{where}/{node.get('title', key)}" if key == "targets" else where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(dashboard["panels"], "panel")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"])
            assert match, f"variable {variable['name']}: unexpected query {variable['query']}"
            found.append((f"variable {variable['name']}", match.group(1)))
    return found


def _rule_queries() -> list[tuple[str, str]]:
    rule = one(render("overlays/cpu"), "PrometheusRule")
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"]]


def _adapter_rules() -> list[dict]:
    config_map = one(render("examples"), "ConfigMap", "prometheus-adapter")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def test_every_queried_metric_is_registered():
    """Each metric named in the dashboard, the alert rules and the adapter rule exists in ServingMetrics."""
    registered = _registered_series_names()
    recorded = {r["record"] for g in one(render("overlays/cpu"), "PrometheusRule")["spec"]["groups"]
                for r in g["rules"] if "record" in r}
    queries = _dashboard_queries() + _rule_queries()
    queries += [("adapter seriesQuery", rule["seriesQuery"]) for rule in _adapter_rules()]
    assert len(queries) > 20
    for where, expr in queries:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric name found in {expr!r}"
        unknown = names - registered - recorded
        assert not unknown, f"{where}: {sorted(unknown)} not registered by ServingMetrics"


def test_dashboard_covers_the_operations_view():
    """Request rate, error ratio, p50/p99 latency, batch size, queue depth and delay, versions, GPU memory."""
    queries = [expr for _, expr in _dashboard_queries()]
    used = set().union(*(promql_metric_names(e) for e in queries))
    assert {"graft_requests_total", "graft_request_latency_seconds_bucket", "graft_batch_size_bucket",
            "graft_batch_queue_depth", "graft_batch_queue_delay_seconds_bucket", "graft_model_version_state",
            "graft_device_memory_bytes"} <= used
    joined = "\n".join(queries)
    assert 'code!="OK"' in joined, "no error-ratio query"
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (model, le) (rate(graft_request_latency_seconds_bucket" in joined


def test_alerts_cover_the_failure_modes():
    """Error ratio, p99 latency, load failures, no AVAILABLE version and queue saturation each alert."""
    rules = {name.removeprefix("rule "): expr for name, expr in _rule_queries()}
    wanted = {
        "GraftHighErrorRatio": ("graft_requests_total", "code=~"),
        "GraftHighLatencyP99": ("graft_request_latency_seconds_bucket", "histogram_quantile(0.99"),
        "GraftModelLoadFailures": ("graft_model_load_failures_total", "increase("),
        "GraftNoAvailableVersion": ("graft_model_version_state", 'state="AVAILABLE"'),
        "GraftBatchQueueSaturated": ("graft_batch_queue_depth", ">"),
    }
    for alert, (metric, fragment) in wanted.items():
        assert alert in rules, f"missing alert {alert}"
        assert metric in promql_metric_names(rules[alert]) and fragment in rules[alert], alert


def test_adapter_rule_serves_the_hpa_metric():
    """The prometheus-adapter rule exposes exactly the metric name the gpu overlay's HPA asks for."""
    hpa = one(render("overlays/gpu"), "HorizontalPodAutoscaler")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    exposed = set()
    for rule in _adapter_rules():
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"]), "the HPA needs per-pod values"
        for series in promql_metric_names(rule["seriesQuery"]):
            pattern, template = rule["name"]["matches"], rule["name"].get("as", "")
            match = re.fullmatch(pattern, series)
            if match:
                # The adapter writes Go-style ${1}; Python's expand wants \g<1>.
                exposed.add(match.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", template)) if template else series)
    assert wanted and wanted <= exposed, (wanted, exposed)


def test_every_queried_metric_is_served_by_a_running_graft_serve(tmp_path, two_input_savedmodel):
    """The same names, read from /metrics of a real graft-serve after one batched request."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests import models
    from tests.serving.server import serving

    models.install_version(two_input_savedmodel, tmp_path / "two", 1)
    params = tmp_path / "batching.txt"
    params.write_text("max_batch_size { value: 4 }\nbatch_timeout_micros { value: 1000 }\n")
    with serving(model_name="two", model_base_path=str(tmp_path / "two"),
                 batching_parameters_file=str(params)) as (_, client):
        answer = client.http.post(f"{client.rest}/v1/models/two:predict",
                                  json={"instances": [{"x": [1.0, 2.0, 3.0], "tag": "a"}]}, timeout=30)
        assert answer.status_code == 200, answer.text
        text = client.http.get(f"{client.rest}/metrics", timeout=30).text
    served = series_names(text_string_to_metric_families(text))
    recorded = {r["record"] for g in one(render("overlays/cpu"), "PrometheusRule")["spec"]["groups"]
                for r in g["rules"] if "record" in r}
    queries = _dashboard_queries() + _rule_queries() + [("adapter", r["seriesQuery"]) for r in _adapter_rules()]
    for where, expr in queries:
        missing = promql_metric_names(expr) - served - recorded
        assert not missing, f"{where}: {sorted(missing)} not in the /metrics of a running graft-serve"


# -- graft-console -------------------------------------------------------------------------------

def _console_with_actions(tmp_path) -> list[dict]:
    overlay = tmp_path / "console-actions"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays/cpu", overlay)],
        "components": [os.path.relpath(K8S / "components/console-actions", overlay)]}))
    result = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [o for o in yaml.safe_load_all(result.stdout) if o]


def _console_mounts(deployment: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container(deployment, "graft-console")["volumeMounts"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_console_reads_the_repository_read_only_and_reaches_graft_serve(overlay):
    """The base console: the serving stack's repository PVC, read-only, no token; its Service selects it alone."""
    from console.main import build_parser

    objects = render(overlay)
    deployment = one(objects, "Deployment", "graft-console")
    args = build_parser().parse_args(container(deployment, "graft-console")["args"])
    assert args.auth_token_file is None and args.repo == "/models" and args.host == "0.0.0.0"
    assert args.serve_url == [f"http://graft:{one(objects, 'Service', 'graft')['spec']['ports'][1]['port']}"]
    mount = _console_mounts(deployment)["/models"]
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    serving_claim = next(v for v in pod_spec(one(objects, "Deployment", "graft"))["volumes"] if v["name"] == "models")
    assert volumes[mount["name"]]["persistentVolumeClaim"] == serving_claim["persistentVolumeClaim"]
    service = one(objects, "Service", "graft-console")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["port"] == args.port
    # The serving stack's selectors (PDB, ServiceMonitor, serving Service) never pick the console's pod.
    for kind, name in (("PodDisruptionBudget", None), ("ServiceMonitor", None)):
        assert not one(objects, kind, name)["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert not one(objects, "Service", "graft")["spec"]["selector"].items() <= labels.items()
    for probe in ("livenessProbe", "readinessProbe"):
        assert container(deployment, "graft-console")[probe]["httpGet"]["path"] == "/healthz"


def test_console_actions_component_mounts_the_token_secret_and_a_writable_repository(tmp_path):
    """components/console-actions: --auth_token_file from Secret graft-auth-token, held-out data, repository writable."""
    from console.main import build_parser

    objects = _console_with_actions(tmp_path)
    deployment = one(objects, "Deployment", "graft-console")
    args = build_parser().parse_args(container(deployment, "graft-console")["args"])
    mounts = _console_mounts(deployment)
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert mounts["/models"]["readOnly"] is False
    token_dir = os.path.dirname(args.auth_token_file)
    assert volumes[mounts[token_dir]["name"]]["secret"]["secretName"] == "graft-auth-token"
    assert mounts[token_dir]["readOnly"] is True
    data = next(path for path in mounts if args.eval_data.startswith(path.rstrip("/") + "/"))
    assert volumes[mounts[data]["name"]]["persistentVolumeClaim"]["claimName"] == "graft-data"
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
