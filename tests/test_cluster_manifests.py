"""The deployment files, checked without a cluster or a Docker engine (issue 13: findings 2-7, "manifests
checked in CI").

- Schemas: every KubeRay object in ``cluster/*.yaml`` against the CRDs of KubeRay v1.6.2 and v1.7.0 (vendored
  under ``tests/vendor/kuberay`` with their licence), strict about unknown fields like ``kubectl apply``'s
  server-side field validation; the core objects (CronJob, ServiceAccount, the generated ConfigMap) with
  ``kubernetes-validate`` (its bundled Kubernetes schemas: offline).
- Semantics the schemas cannot see, read from KubeRay's controller code: token auth on every cluster and the
  matching client settings; one config file for training and the CF refresh; model weights reachable from every
  pod; small submitter images; deletion rules that free the GPUs at once and keep RayJobs from piling up (the
  controller's own validation rules); one submission per CronJob tick; the operator's feature gates; the S3
  ServiceAccount.
- The Dockerfile: versions pinned once (cluster/constraints.txt) and consistent with setup.py, .ci/run, the base
  image and the manifests; dependencies installed before the source is copied; no swallowed flash-attn failure;
  a .dockerignore.
"""
from __future__ import annotations

import copy
import functools
import gzip
import importlib.metadata
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
VENDOR = REPO / "tests" / "vendor" / "kuberay"
KUBERAY_VERSIONS = ("v1.6.2", "v1.7.0")  # RayCronJob exists from v1.6.0
K8S_VERSIONS = ("1.30.0", "1.35.0")
CRD_FILES = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ----------------------------------------------------------------------------------------------- loading
def _documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=Loader):
            if doc:
                out.append((path.name, doc))
    return out


MANIFESTS = [(name, doc) for name, doc in _documents() if "kind" in doc]


def _of_kind(*kinds: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in MANIFESTS if doc["kind"] in kinds]


def _id(item) -> str:
    name, doc = item
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


def _cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) of every cluster the manifests create."""
    out = []
    for name, doc in _of_kind("RayCluster", "RayJob", "RayCronJob"):
        spec = {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
                "RayCronJob": lambda d: d["spec"]["jobTemplate"]["rayClusterSpec"]}[doc["kind"]](doc)
        out.append((_id((name, doc)), spec))
    return out


def _job_specs() -> list[tuple[str, dict]]:
    """(where, RayJobSpec) of every RayJob, including the template of a RayCronJob."""
    out = []
    for name, doc in _of_kind("RayJob", "RayCronJob"):
        out.append((_id((name, doc)), doc["spec"] if doc["kind"] == "RayJob" else doc["spec"]["jobTemplate"]))
    return out


def _pods(spec: dict) -> list[tuple[str, dict]]:
    """(group, pod spec) of the head and every worker group of a RayClusterSpec."""
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs") or []]
    return pods


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env") or []}


def _rayversion(spec: dict) -> tuple[int, ...]:
    return tuple(int(x) for x in spec["rayVersion"].split("."))


# ----------------------------------------------------------------------------------------------- schemas
def _strict(node):
    """The CRD schema with ``additionalProperties: false`` on every object that lists its properties and does not
    preserve unknown fields: the API server's strict field validation (kubectl's default) rejects unknown fields."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.lru_cache(maxsize=None)
def _crd_validator(version: str, kind: str):
    import jsonschema

    with gzip.open(VENDOR / version / f"ray.io_{CRD_FILES[kind]}.yaml.gz", "rt") as f:
        crd = yaml.load(f, Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(served["schema"]["openAPIV3Schema"]))


def _schema_errors(version: str, doc: dict) -> list[str]:
    errors = _crd_validator(version, doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_every_kuberay_kind_in_cluster_is_covered_by_a_vendored_crd():
    kinds = {doc["kind"] for _, doc in MANIFESTS if doc["apiVersion"].startswith("ray.io/")}
    assert kinds and kinds <= set(CRD_FILES)
    assert (VENDOR / "LICENSE").read_text().lstrip().startswith("Apache License")


@pytest.mark.parametrize("version", KUBERAY_VERSIONS)
@pytest.mark.parametrize("item", _of_kind("RayCluster", "RayJob", "RayCronJob"), ids=_id)
def test_kuberay_manifest_matches_the_crd(item, version):
    _, doc = item
    assert doc["apiVersion"] == "ray.io/v1"
    assert _schema_errors(version, doc) == []


def test_the_crd_check_rejects_unknown_fields_and_wrong_types():
    (_, job), *_ = _of_kind("RayJob")
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParms"] = {}
    wrong = copy.deepcopy(job)
    wrong["spec"]["backoffLimit"] = "two"
    rule = copy.deepcopy(job)
    rule["spec"].setdefault("deletionStrategy", {})["deletionRules"] = [{"policy": "DeleteEverything",
                                                                         "condition": {"ttlSeconds": 0}}]
    for bad in (typo, wrong, rule):
        assert _schema_errors(KUBERAY_VERSIONS[-1], bad) != []


def _generated_configmaps() -> dict[str, dict]:
    """The ConfigMaps cluster/README.md tells users to generate (``kubectl create configmap NAME
    --from-file=PATH ...``), built as kubectl builds them: key = file name, value = the file's text."""
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    out = {}
    for name, args in re.findall(r"kubectl create configmap ([a-z0-9.-]+)((?:\s+--from-file=\S+)+)", text):
        files = re.findall(r"--from-file=(\S+)", args)
        out[name] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                     "data": {pathlib.Path(f).name: (REPO / f).read_text() for f in files}}
    return out


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_core_kinds_pass_kubernetes_validate(k8s):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")
    core = [doc for _, doc in MANIFESTS if not doc["apiVersion"].startswith("ray.io/")]
    core += list(_generated_configmaps().values())
    assert {"CronJob", "ServiceAccount", "ConfigMap"} <= {doc["kind"] for doc in core}
    for doc in core:
        kubernetes_validate.validate(doc, k8s, strict=True)  # raises ValidationError naming the field
    bad = copy.deepcopy(next(doc for doc in core if doc["kind"] == "CronJob"))
    bad["spec"]["concurrencyPolicy"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, k8s, strict=True)


# ----------------------------------------------------------------------------------------- token auth
def _target_cluster(script: str) -> dict:
    """The RayCluster a ``ray job`` command addresses through its head Service ``<cluster>-head-svc``."""
    (host,) = set(re.findall(r"http://([a-z0-9-]+)-head-svc:8265", script))
    (cluster,) = [doc for _, doc in _of_kind("RayCluster") if doc["metadata"]["name"] == host]
    return cluster


def _submit_containers() -> list[tuple[str, dict, str]]:
    """(where, container, its script) of every container outside KubeRay that runs the Ray Jobs CLI."""
    out = []
    for name, doc in _of_kind("CronJob"):
        for c in doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
            script = " ".join(c.get("command", []) + c.get("args", []))
            if "ray job" in script:
                out.append((_id((name, doc)), c, script))
    return out


def test_token_auth_is_on_for_every_cluster():
    for where, spec in _cluster_specs():
        auth = spec.get("authOptions") or {}
        # KubeRay enables auth only for an explicit mode "token" (utils.IsAuthEnabled), from Ray 2.52 on.
        assert auth.get("mode") == "token", f"{where}: authOptions.mode must be 'token' (the Jobs API is open)"
        assert _rayversion(spec) >= (2, 52, 0), where
        for group, pod in _pods(spec):
            for c in pod["containers"]:
                # the operator injects RAY_AUTH_MODE / RAY_AUTH_TOKEN; a hand-written value would shadow them
                assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(_env(c)), f"{where} {group}"


def test_clients_outside_kuberay_send_the_clusters_token():
    containers = _submit_containers()
    assert containers
    for where, c, script in containers:
        env = _env(c)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: Ray 2.60 sends no token otherwise"
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == "auth_token", f"{where}: KubeRay's Secret key is auth_token"
        assert not ref.get("optional"), where
        cluster = _target_cluster(script)
        auth = cluster["spec"]["authOptions"]
        # the Secret the operator uses: authOptions.secretName, else one named after the cluster
        assert ref["name"] == auth.get("secretName", cluster["metadata"]["name"]), where


# ------------------------------------------------------------------- one config for training and refresh
def _entrypoints() -> list[tuple[str, list[str], dict]]:
    """(where, argv after ``python -m``, head pod spec where it runs) of every ckf_dist command the manifests
    run: RayJob and RayCronJob entrypoints, and the commands the CronJob submits to its RayCluster."""
    out = []
    for where, job in _job_specs():
        argv = shlex.split(job["entrypoint"])
        out.append((where, argv, job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]))
    for where, _, script in _submit_containers():
        for cmd in re.findall(r" -- (python -m ckf_dist\.[^;\n&|]+)", script.replace("\\\n", " ")):
            head = _target_cluster(script)["spec"]["headGroupSpec"]["template"]["spec"]
            out.append((where, shlex.split(cmd), head))
    return out


def _config_text(where: str, path: str, pod: dict) -> tuple[str, str]:
    """(source, YAML text) of the ``--config`` file: a ConfigMap mounted in the pod, or (a relative path) the
    copy of the repo's file that an image built from this repo would hold."""
    if not path.startswith("/"):
        return f"repo:{path}", (REPO / path).read_text()
    configmaps = {doc["metadata"]["name"]: doc for _, doc in _of_kind("ConfigMap")} | _generated_configmaps()
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for c in pod["containers"]:
        for m in c.get("volumeMounts") or []:
            mount = m["mountPath"].rstrip("/") + "/"
            if path.startswith(mount) and "configMap" in volumes.get(m["name"], {}):
                name = volumes[m["name"]]["configMap"]["name"]
                key = path[len(mount):]
                assert name in configmaps, f"{where}: ConfigMap {name} is defined nowhere (nor generated)"
                assert key in configmaps[name]["data"], f"{where}: ConfigMap {name} has no key {key}"
                return f"configmap:{name}/{key}", configmaps[name]["data"][key]
    raise AssertionError(f"{where}: --config {path} is not on any volume mounted in the pod that runs it")


def _run_configs(tmp_path, unresolved: list | None = None):
    """(where, module, config source, overrides, Config, head pod) of every entrypoint; an entrypoint whose
    ``--config`` cannot be found fails here, or is reported in ``unresolved`` when a list is given."""
    from ckf_dist.config import load_config

    runs = []
    for i, (where, argv, pod) in enumerate(_entrypoints()):
        assert argv[:2] == ["python", "-m"], (where, argv)
        args = argv[3:]
        assert "--config" in args, f"{where}: {argv}"
        path = args[args.index("--config") + 1]
        try:
            source, text = _config_text(where, path, pod)
        except AssertionError as exc:
            if unresolved is None:
                raise
            unresolved.append(str(exc))
            continue
        local = tmp_path / f"{i}.yaml"
        local.write_text(text)
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        runs.append((where, argv[2], source, overrides, load_config(["--config", str(local)] + overrides), pod))
    return runs


def test_training_and_the_cf_refresh_read_one_config_file(tmp_path):
    from ckf_dist.config import resolve_data_path, resolve_embeddings_path

    unresolved: list[str] = []
    runs = _run_configs(tmp_path, unresolved)
    # What the refresh publishes is what training reads (and its pickup accepts: same model and dimension).
    agreed = {(resolve_data_path(cfg), resolve_embeddings_path(cfg), cfg.cf.dim, cfg.cf.model, cfg.cf.loss)
              for *_, cfg, _ in runs}
    assert len(agreed) == 1, {where: (module, source, resolve_embeddings_path(cfg), cfg.cf.dim, cfg.cf.model)
                              for where, module, source, _, cfg, _ in runs}
    assert len({source for _, _, source, *_ in runs}) == 1  # literally one file
    for where, module, source, overrides, cfg, _ in runs:
        drift = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in ("data", "cf", "model")]
        assert drift == [], f"{where}: {module} overrides {drift}: set them in the shared config file instead"
    assert unresolved == []
    assert {"ckf_dist.train", "ckf_dist.cf_refresh"} <= {module for _, module, *_ in runs}


def test_model_and_raw_data_are_reachable_from_every_pod_that_reads_them(tmp_path):
    """model.path / data.raw_path: s3:// (fetched at start) or a volume mounted in every pod; the model cache of
    an s3:// model (``$CKF_MODEL_CACHE``) is a volume in every pod of a training cluster."""
    train = [r for r in _run_configs(tmp_path) if r[1] == "ckf_dist.train"]
    assert train
    # every cluster that can train: the RayJob's, and the long-lived one (`ray job submit` with the same config)
    gpu_clusters = [(where, spec) for where, spec in _cluster_specs() if _gpu_workers(spec)]
    assert gpu_clusters
    for _, _, _, _, cfg, _ in train:
        pods = [(f"{where} {group}", pod) for where, spec in gpu_clusters for group, pod in _pods(spec)]
        for key, path in (("model.path", cfg.model.path), ("data.raw_path", cfg.data.raw_path)):
            if path.startswith("s3://") or not path:
                continue
            for where, pod in pods:
                mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts") or []]
                assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), f"{where}: {key}={path}"
        if cfg.model.source != "tiny" and cfg.model.path.startswith("s3://"):
            for where, pod in pods:
                for c in pod["containers"]:
                    cache = cfg.model.cache_dir or _env(c).get("CKF_MODEL_CACHE", {}).get("value", "")
                    mounts = [m["mountPath"] for m in c.get("volumeMounts") or []]
                    assert cache in mounts, f"{where}: the model cache {cache!r} is not a volume"


# -------------------------------------------------------------------- submitters, deletion, schedules
SMALL_RAY_IMAGE = re.compile(r"rayproject/ray:(?P<version>\d+\.\d+\.\d+)(-py3\d+)?(-cpu)?")


def test_submitters_use_the_small_cpu_ray_image():
    for where, job in _job_specs():
        mode = job.get("submissionMode", "K8sJobMode")
        if mode == "HTTPMode":
            continue  # the operator submits itself: no pod
        assert mode == "K8sJobMode", where
        pod = (job.get("submitterPodTemplate") or {}).get("spec")
        assert pod, f"{where}: without submitterPodTemplate the submitter pulls the cluster's CUDA image"
        image = pod["containers"][0]["image"]
        m = SMALL_RAY_IMAGE.fullmatch(image)
        assert m and m["version"] == job["rayClusterSpec"]["rayVersion"], f"{where}: {image}"
    for where, c, script in _submit_containers():
        m = SMALL_RAY_IMAGE.fullmatch(c["image"])
        assert m and m["version"] == _target_cluster(script)["spec"]["rayVersion"], f"{where}: {c['image']}"


def _gpu_workers(spec: dict) -> bool:
    return any("nvidia.com/gpu" in (c.get("resources") or {}).get("requests", {})
               for _, pod in _pods(spec)[1:] for c in pod["containers"])


def test_deletion_rules_free_the_gpus_at_once_and_keep_rayjobs_from_piling_up():
    for where, job in _job_specs():
        rules = ((job.get("deletionStrategy") or {}).get("deletionRules")) or []
        assert rules, f"{where}: no deletionRules"
        # KubeRay's validateDeletionConfiguration: rules mode excludes both of these
        assert not job.get("shutdownAfterJobFinishes") and not job.get("ttlSecondsAfterFinished"), where
        by_condition: dict[tuple, dict[str, int]] = {}
        for rule in rules:
            cond = rule["condition"]
            keys = [k for k in ("jobStatus", "jobDeploymentStatus") if k in cond]
            assert len(keys) == 1, f"{where}: exactly one of jobStatus / jobDeploymentStatus: {rule}"
            ttls = by_condition.setdefault((keys[0], cond[keys[0]]), {})
            assert rule["policy"] not in ttls, f"{where}: duplicate {rule}"
            ttls[rule["policy"]] = cond.get("ttlSeconds", 0)
        for cond, ttls in by_condition.items():  # validateTTLConsistency: Workers <= Cluster <= Self
            order = [ttls[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in ttls]
            assert order == sorted(order), f"{where} {cond}: {ttls}"
        if _gpu_workers(job["rayClusterSpec"]):
            assert by_condition.get(("jobStatus", "SUCCEEDED"), {}).get("DeleteCluster") == 0, where
            failed = by_condition.get(("jobDeploymentStatus", "Failed"), {})  # also set when the job FAILED
            assert 0 in (failed.get("DeleteWorkers"), failed.get("DeleteCluster")), f"{where}: idle GPUs on failure"
    for name, doc in _of_kind("RayCronJob"):
        rules = doc["spec"]["jobTemplate"]["deletionStrategy"]["deletionRules"]
        selves = {next(iter(r["condition"].items())) for r in rules if r["policy"] == "DeleteSelf"}
        assert {("jobStatus", "SUCCEEDED"), ("jobDeploymentStatus", "Failed")} <= selves, _id((name, doc))
    for name, doc in _of_kind("CronJob"):
        spec = doc["spec"]
        assert spec["concurrencyPolicy"] == "Forbid"
        assert spec["jobTemplate"]["spec"].get("ttlSecondsAfterFinished") is not None, _id((name, doc))


def test_a_cronjob_retry_never_submits_a_second_job():
    """The submission id must be the same for every pod of one tick: the Job's name (``<cronjob>-<scheduled
    minute>``, from the downward API), never the clock."""
    containers = _submit_containers()
    assert containers
    for where, c, script in containers:
        assert "date" not in script, f"{where}: a time-based id differs between retries"
        (var,) = re.findall(r'--submission-id\s+"?\$\{?(\w+)', script)
        value = _env(c)[var]
        field = value["valueFrom"]["fieldRef"]["fieldPath"]
        assert field in ("metadata.labels['batch.kubernetes.io/job-name']", "metadata.labels['job-name']"), where
        assert "--no-wait" in script and "get_job_status" in script, where  # a refused duplicate is followed


def test_operator_values_enable_the_gates_the_manifests_need():
    values = yaml.safe_load((CLUSTER / "kuberay-operator-values.yaml").read_text())
    gates = values["featureGates"]
    assert isinstance(gates, list) and all(set(g) == {"name", "enabled"} for g in gates)  # the chart's shape
    for version in KUBERAY_VERSIONS:
        chart = yaml.safe_load((VENDOR / version / "kuberay-operator-values.yaml").read_text())
        known = {g["name"] for g in chart["featureGates"]}
        assert {g["name"] for g in gates} <= known, f"unknown to {version}: the operator would not start"
    enabled = {g["name"] for g in gates if g["enabled"] is True}
    if _of_kind("RayCronJob"):
        assert "RayCronJob" in enabled
    if any(job.get("deletionStrategy") for _, job in _job_specs()):
        assert "RayJobDeletionPolicy" in enabled
    docs = [REPO / "README.md", CLUSTER / "README.md"] + sorted(CLUSTER.glob("*.yaml"))
    assert not [p.name for p in docs if "featureGates.RayCronJob=" in p.read_text()], "the chart takes a list"


def test_every_pod_has_the_s3_service_account_and_it_is_defined():
    accounts = {doc["metadata"]["name"]: doc for _, doc in _of_kind("ServiceAccount")}
    used = set()
    for where, spec in _cluster_specs():
        for group, pod in _pods(spec):
            used.add(pod.get("serviceAccountName"))
            assert pod.get("serviceAccountName") in accounts, f"{where} {group}: {pod.get('serviceAccountName')}"
            for c in pod["containers"]:
                for src in c.get("envFrom") or []:
                    if "secretRef" in src:  # static keys are optional: IRSA alone must work
                        assert src["secretRef"].get("optional") is True, f"{where} {group}"
    for name in used:
        assert "eks.amazonaws.com/role-arn" in accounts[name]["metadata"].get("annotations", {})


def test_docs_do_not_promise_that_reapplying_resumes_a_finished_rayjob():
    docs = [REPO / "README.md", CLUSTER / "README.md"] + sorted(CLUSTER.glob("*.yaml"))
    for path in docs:
        text = re.sub(r"\s+", " ", path.read_text())
        assert not re.search(r"[Rr]e-?appl\w*.{0,60}?resumes", text), path.name


# -------------------------------------------------------------------------------------------- Dockerfile
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment line inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1]
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def _constraints() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (CLUSTER / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, eq, version = line.partition("==")
            assert eq and version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def _base_image() -> str:
    args, image = {}, None
    for word, rest in _dockerfile():
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
        if word == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m[1]], rest.split()[0])
            break
    return image


def test_dockerfile_base_image_matches_the_torch_wheel_and_the_manifests():
    image = _base_image()
    m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-cu(?P<cuda>\d+)", image)
    assert m, f"{image}: name the CUDA version (cuXYZ); -gpu aliases CUDA 12.1"
    pins = _constraints()
    assert m["ray"] == pins["ray"]
    assert {spec["rayVersion"] for _, spec in _cluster_specs()} == {pins["ray"]}
    runs = " ".join(rest for word, rest in _dockerfile() if word == "RUN")
    # the torch build is checked at build time against the base image's CUDA (cu130 <-> "13.0")
    (cuda,) = set(re.findall(r"torch\.version\.cuda == '(\d+\.\d+)'", runs))
    assert cuda.replace(".", "") == m["cuda"]
    (torch_version,) = set(re.findall(r"torch\.__version__\.split\('\+'\)\[0\] == '([^']+)'", runs))
    assert torch_version == pins["torch"]
    for index in re.findall(r"download\.pytorch\.org/whl/(cu\d+)", runs):  # an explicit wheel index must match
        assert index == f"cu{m['cuda']}"


def test_pins_cover_every_dependency_and_agree_with_setup_py_and_ci():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _constraints()
    reqs = [Requirement(r) for r in importlib.metadata.requires("ckf_dist")]
    needed = [r for r in reqs if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("gguf", "bench", "gpu"))]
    assert {canonicalize_name(r.name) for r in needed} >= {"torch", "ray", "deepspeed", "transformers"}
    for r in needed:
        name = canonicalize_name(r.name)
        assert name in pins, f"{r} is not pinned in cluster/constraints.txt"
        assert r.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {r}"
    # torch = the version CI installs (.ci/run) and the README's install lines name
    (ci_torch,) = set(re.findall(r"torch==([\d.]+)", (REPO / ".ci" / "run").read_text()))
    assert pins["torch"] == ci_torch
    assert set(re.findall(r"torch==([\d.]+)", (REPO / "README.md").read_text())) == {ci_torch}


def test_dependencies_are_installed_before_the_source_is_copied():
    steps = _dockerfile()
    copies = [(i, rest) for i, (word, rest) in enumerate(steps) if word in ("COPY", "ADD")]
    source = [i for i, rest in copies if re.search(r"(^|\s)(\.|\./|ckf_dist|kernels|setup\.py)(\s|$)", rest)]
    assert source, copies
    first_source = min(source)
    installs = [(i, rest) for i, (word, rest) in enumerate(steps) if word == "RUN" and "pip install" in rest]
    for i, rest in installs:
        for cmd in re.split(r"&&|;", rest):
            if "pip install" not in cmd:
                continue
            if i < first_source:  # dependency layers: pinned by the constraints file, which is copied alone
                assert "-c /tmp/ckf/constraints.txt" in cmd, cmd
            else:  # the project itself: no resolution, so a code edit never changes a dependency
                assert "--no-deps" in cmd and " -e " not in cmd and "--editable" not in cmd, cmd
    assert any(i < first_source for i, _ in installs) and any(i > first_source for i, _ in installs)
    for i, rest in copies:
        if i < first_source:
            assert rest.split()[-2] == "cluster/constraints.txt", rest  # nothing else before the installs
    assert "WORKDIR" not in {word for word, _ in steps[first_source:]}


def test_a_failed_flash_attn_build_fails_the_image():
    runs = [rest for word, rest in _dockerfile() if word == "RUN"]
    flash = [r for r in runs if re.search(r"pip install[^&;]*flash-attn", r)]
    assert flash
    for r in runs:
        assert not re.search(r"\|\|\s*(true|echo|:)", r), r  # nothing swallows a failed step
    assert all("import flash_attn" in r for r in flash)  # and it is checked importable


def test_the_final_requirement_check_of_the_image_passes_here():
    """The Dockerfile's last RUN checks the installed versions against setup.py: run that same Python here."""
    (last,) = [rest for word, rest in _dockerfile() if word == "RUN" and "--no-deps" in rest]
    (code,) = re.findall(r'python -c "([^"]+)"', last)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_dockerignore_keeps_the_build_context_small_but_complete():
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for junk in (".git", ".venv", "mutants", "build", "*.egg-info"):
        assert junk in ignore, junk
    for needed in ("ckf_dist", "kernels", "setup.py", "cluster", "configs"):
        assert needed not in ignore


# ------------------------------------------------------------ the CronJob's script against a real Ray
HEAD = r"""
import socket, sys
from ray._private.node import Node
from ray._private.parameter import RayParams

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# Every port chosen here: the defaults (e.g. the dashboard agent's 52365) may belong to another Ray on the machine.
params = RayParams(node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=int(sys.argv[1]), dashboard_agent_listen_port=free_port(),
                   metrics_agent_port=free_port(), runtime_env_agent_port=free_port(),
                   metrics_export_port=free_port(), gcs_server_port=free_port(), temp_dir=sys.argv[2])
node = Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)
print("ready", flush=True)
try:
    sys.stdin.read()
finally:
    node.kill_all_processes(check_alive=False, allow_graceful=True)
"""


@pytest.mark.integration
def test_cronjob_script_submits_once_per_tick_with_the_token(tmp_path):
    """The CronJob's own script (from the manifest; only the address and the refresh command replaced) against a
    local Ray head with token auth: the first pod of a tick submits and succeeds; a retry with the same Job name
    follows that job instead of submitting another; without RAY_AUTH_MODE=token the token is not sent (401)."""
    import json
    import os
    import socket
    import tempfile
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ((_, container, _),) = _submit_containers()
    script = container["args"][0].replace("http://ckf-head-svc:8265", f"http://127.0.0.1:{port}")
    real = "python -m ckf_dist.cf_refresh --config /etc/ckf/llama7b_8xa100_zero3.yaml"
    assert real in script
    script = script.replace(real, "python -c 'print(\"refresh ran\")'")
    token = "ckf-test-token-" + os.urandom(8).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([sys.executable, "-c", HEAD, str(port), ray_tmp], env=env, stdin=subprocess.PIPE,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while "ready" not in (tmp_path / "head.log").read_text().splitlines() and head.poll() is None:
            assert time.time() < deadline, (tmp_path / "head.log").read_text()
            time.sleep(0.5)
        assert head.poll() is None, (tmp_path / "head.log").read_text()
        tick = {**env, "SUBMISSION_ID": "ckf-cf-refresh-29380320"}  # what the downward API gives a tick's pods

        def pod(extra_env):
            return subprocess.run(["/bin/bash", "-c", script], env=extra_env, capture_output=True, text=True,
                                  timeout=300)

        def submitted() -> list[str]:
            code = ("import json, sys; from ray.job_submission import JobSubmissionClient; "
                    "print(json.dumps([j.submission_id for j in JobSubmissionClient(sys.argv[1]).list_jobs() "
                    "if j.submission_id]))")  # the head process itself is listed without one
            out = subprocess.run([sys.executable, "-c", code, f"http://127.0.0.1:{port}"], env=env,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout.strip().splitlines()[-1])

        # The tick's pods, as the Job controller retries them (backoffLimit): the first may fail while the
        # fresh head's job agent is still starting ("No available agent"): nothing is submitted then.
        for attempt in range(6):
            first = pod(tick)
            if first.returncode == 0:
                break
            assert submitted() == [], first.stdout + first.stderr
            time.sleep(5)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "submitted ckf-cf-refresh-29380320" in first.stdout and "refresh ran" in first.stdout
        assert "final status: SUCCEEDED" in first.stdout
        retry = pod(tick)  # e.g. the first pod was evicted after submitting
        assert retry.returncode == 0, retry.stdout + retry.stderr
        assert "following it" in retry.stdout and "final status: SUCCEEDED" in retry.stdout
        assert submitted() == ["ckf-cf-refresh-29380320"]
        # RAY_AUTH_TOKEN alone (the old manifest): Ray 2.60 does not send it, the cluster answers 401
        no_mode = pod({k: v for k, v in tick.items() if k != "RAY_AUTH_MODE"} | {"SUBMISSION_ID": "other-tick"})
        refused = no_mode.stdout + no_mode.stderr
        assert no_mode.returncode != 0 and "Unauthorized: Missing authentication token" in refused, refused
        assert submitted() == ["ckf-cf-refresh-29380320"]
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
