"""Static checks of the Kubernetes deployment files in cluster/ and of docs/cluster.md.

* Shape: every RayCluster / RayJob in cluster/*.yaml validates against the `v1` openAPIV3Schema of the KubeRay
  v1.7.0 CRDs in ../shared/kuberay-crds (jsonschema, Draft 7). On top of plain JSON Schema the checks model what
  a real API server adds: int32/int64 ranges (`format`), unknown fields (kubectl's default strict field validation),
  duplicate keys, and `x-kubernetes-list-type: map|set` uniqueness (e.g. two env vars with one name).
* Operator: a subset of KubeRay's own spec validation (token auth needs rayVersion >= 2.52, autoscaler v2 wants
  restartPolicy Never/unset, ttlSecondsAfterFinished needs shutdownAfterJobFinishes, runtimeEnvYAML must parse, ...).
* Security: the dashboard/Jobs API is never exposed (no LoadBalancer/NodePort head Service, no Ingress), token auth
  is on for every Ray container, RAY_AUTH_TOKEN / HF_TOKEN (and anything else secret-named) only via secretKeyRef,
  and no token-looking literal anywhere in cluster/ or docs/cluster.md.
* Entry points: every `python -m rayjobs.X` in the manifests and the docs names a module of the fixed list.
* Negative tests: broken copies built in memory must fail the same checks, so these tests can fail.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import re
import shlex
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema  # the dev extra: pip install -e ".[dev]"
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Beside the clone in this project's workspace; anywhere else with CHARACTER_KUBERAY_CRDS.
CRD_DIR = Path(os.environ.get("CHARACTER_KUBERAY_CRDS") or REPO.parent / "shared" / "kuberay-crds")
CLUSTER_DIR = REPO / "cluster"
DOCS = REPO / "docs" / "cluster.md"
DOCKERFILE = CLUSTER_DIR / "Dockerfile"

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
RAYJOBS_MODULES = {"pipeline", "synthesize", "respond", "rank", "train_pm", "train_ppo", "train_dpo", "evaluate",
                   "report"}
CLI_COMMANDS = {"run"} | RAYJOBS_MODULES | {m.replace("_", "-") for m in RAYJOBS_MODULES}
KNOWN_CONFIGS = {"configs/cluster.yaml", "configs/tiny.yaml"}
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47}  # KubeRay: 63 - len("-serve-svc"), minus 6 for RayJob suffix
EXPOSED_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
AUTH_SECRET_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName

# Env var names that hold credentials: they may only come from a Secret.
SECRET_ENV_NAMES = {"RAY_AUTH_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "REDIS_PASSWORD"}
SECRET_ENV_PATTERN = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)$")

TOKEN_PATTERNS = {
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\."),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "long hex string": re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32,}(?![0-9a-fA-F])"),
}
_GENERIC_SECRET = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_=-]{32,}(?![A-Za-z0-9+/_=-])")

# Fields of ObjectMeta a manifest may set (the CRD leaves top-level `metadata` as a bare object).
OBJECT_META_FIELDS = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences"}


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
class DuplicateKeyError(yaml.YAMLError):
    pass


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (strict field validation rejects them too)."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise DuplicateKeyError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_docs(text: str) -> list[Any]:
    return [doc for doc in yaml.load_all(text, Loader=StrictLoader) if doc is not None]


@functools.cache
def crd_schema(kind: str) -> dict:
    path = CRD_DIR / CRD_FILES[kind]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind, path
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version.get("served") is True, f"{path}: v1 is not served"
    return version["schema"]["openAPIV3Schema"]


def manifest_files() -> list[Path]:
    return sorted(CLUSTER_DIR.glob("*.yaml")) + sorted(CLUSTER_DIR.glob("*.yml"))


def all_docs() -> list[tuple[Path, int, Any]]:
    return [(path, i, doc) for path in manifest_files() for i, doc in enumerate(load_yaml_docs(path.read_text()))]


def ray_docs() -> list[tuple[Path, int, dict]]:
    return [(p, i, d) for p, i, d in all_docs() if isinstance(d, dict) and d.get("kind") in CRD_FILES]


def _doc_id(item: tuple[Path, int, dict]) -> str:
    path, index, doc = item
    return f"{path.name}#{index}:{doc.get('kind')}"


RAY_DOCS = ray_docs() if CLUSTER_DIR.is_dir() else []

def kuberay_version() -> str:
    """The KubeRay release the manifests in cluster/ name as validated against ("... v1.7.0 CRDs")."""
    versions = {m for path in manifest_files() for m in re.findall(r"(v\d+\.\d+\.\d+) CRDs", path.read_text())}
    assert len(versions) == 1, f"cluster/ must name one KubeRay CRD version, found {sorted(versions) or 'none'}"
    return versions.pop()


def require_crds() -> None:
    """The CRD-schema checks skip where the CRDs are missing, saying where they come from; with
    CHARACTER_REQUIRE_CRDS=1 (CI sets it) they fail instead, so no run passes without them unnoticed."""
    if all((CRD_DIR / name).is_file() for name in CRD_FILES.values()):
        return
    version = kuberay_version()
    base = f"https://raw.githubusercontent.com/ray-project/kuberay/{version}/ray-operator/config/crd/bases"
    message = (f"KubeRay CRDs not found at {CRD_DIR}: they are KubeRay {version}'s release manifests "
               f"({', '.join(f'{base}/{name}' for name in sorted(CRD_FILES.values()))}); put them there, or set "
               f"CHARACTER_KUBERAY_CRDS to their folder")
    if os.environ.get("CHARACTER_REQUIRE_CRDS") == "1":
        pytest.fail(message + " (CHARACTER_REQUIRE_CRDS=1: they may not be skipped)")
    pytest.skip(message)


@pytest.fixture
def crds() -> None:
    require_crds()


needs_crds = pytest.mark.usefixtures("crds")


# --------------------------------------------------------------------------------------------------------------
# Schema validation (jsonschema + what the API server adds)
# --------------------------------------------------------------------------------------------------------------
def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()

    def int_range(bits: int) -> Callable[[Any], bool]:
        def check(value: Any) -> bool:
            if isinstance(value, bool) or not isinstance(value, int):
                return True  # `type` reports non-integers
            return -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)

        return check

    checker.checks("int32")(int_range(32))
    checker.checks("int64")(int_range(64))
    return checker


@functools.cache
def validator(kind: str) -> jsonschema.protocols.Validator:
    # OpenAPI v3 schemas in CRDs are a JSON Schema subset; `x-kubernetes-*` keywords are unknown to jsonschema and
    # therefore ignored (annotations). int-or-string fields carry `anyOf` and no `type`; `pattern` only applies to
    # strings, so quantities such as `cpu: 8` and `memory: 32Gi` both pass while `cpu: 0.5` (a float) fails.
    return jsonschema.Draft7Validator(crd_schema(kind), format_checker=_format_checker())


def _unknown_fields(instance: Any, schema: dict, path: str) -> Iterator[str]:
    """Fields the schema does not declare: pruned silently by old clients, rejected by `kubectl apply` (strict)."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(instance, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            if props is not None and key in props:
                yield from _unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from _unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and extra is not True:
                yield f"{path}.{key}: unknown field"
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            yield from _unknown_fields(item, schema["items"], f"{path}[{i}]")


def _list_uniqueness(instance: Any, schema: dict, path: str) -> Iterator[str]:
    """`x-kubernetes-list-type: map` keys and `set` items must be unique (e.g. env var names, container ports)."""
    if not isinstance(schema, dict):
        return
    if isinstance(instance, list):
        item_schema = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            props = item_schema.get("properties", {})
            seen = Counter(
                tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
                for item in instance
                if isinstance(item, dict)
            )
            for key, count in seen.items():
                if count > 1:
                    yield f"{path}: duplicate entry for {dict(zip(keys, key, strict=True))}"
        elif list_type == "set":
            reprs = Counter(repr(item) for item in instance)
            for item, count in reprs.items():
                if count > 1:
                    yield f"{path}: duplicate set item {item}"
        for i, item in enumerate(instance):
            yield from _list_uniqueness(item, item_schema, f"{path}[{i}]")
    elif isinstance(instance, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield from _list_uniqueness(value, sub, f"{path}.{key}")


def schema_errors(doc: dict) -> list[str]:
    """Everything a KubeRay v1.7.0 API server would reject for the manifest's shape."""
    kind = doc.get("kind")
    if kind not in CRD_FILES:
        return [f"kind {kind!r} is not one of {sorted(CRD_FILES)}"]
    errors = []
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    for err in validator(kind).iter_errors(doc):
        where = "/".join(str(p) for p in err.absolute_path) or "<root>"
        errors.append(f"{where}: {err.message}")
    schema = crd_schema(kind)
    errors.extend(_unknown_fields(doc, schema, kind))
    errors.extend(_list_uniqueness(doc, schema, kind))
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict):
        errors.append("metadata must be a mapping")
    else:
        errors.extend(f"metadata.{k}: unknown field" for k in sorted(set(meta) - OBJECT_META_FIELDS))
        name = meta.get("name", "")
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", str(name)):
            errors.append(f"metadata.name {name!r} is not a DNS-1035 label")
        if len(str(name)) > MAX_NAME_LENGTH[kind]:
            errors.append(f"metadata.name {name!r} is longer than {MAX_NAME_LENGTH[kind]} characters")
    return errors


# --------------------------------------------------------------------------------------------------------------
# Walking a manifest
# --------------------------------------------------------------------------------------------------------------
def cluster_spec(doc: dict) -> dict | None:
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        return spec
    return spec.get("rayClusterSpec")


def ray_pod_templates(spec: dict) -> Iterator[tuple[str, dict]]:
    """(group name, pod template) for the head and every worker group."""
    yield "head", (spec.get("headGroupSpec") or {}).get("template") or {}
    for group in spec.get("workerGroupSpecs") or []:
        yield str(group.get("groupName")), group.get("template") or {}


def ray_containers(spec: dict) -> Iterator[tuple[str, dict]]:
    """The Ray container (index 0, as KubeRay assumes) of every group."""
    for group, template in ray_pod_templates(spec):
        containers = (template.get("spec") or {}).get("containers") or []
        if containers:
            yield group, containers[0]


def all_containers(doc: dict) -> Iterator[tuple[str, dict]]:
    """Every container-like thing whose env ends up in a pod: Ray, sidecars, init containers, submitter, autoscaler."""
    spec = cluster_spec(doc)
    if spec:
        for group, template in ray_pod_templates(spec):
            pod = template.get("spec") or {}
            for field in ("initContainers", "containers", "ephemeralContainers"):
                for c in pod.get(field) or []:
                    yield f"{group}/{c.get('name')}", c
        if spec.get("autoscalerOptions"):
            yield "autoscaler", spec["autoscalerOptions"]
    submitter = (doc.get("spec") or {}).get("submitterPodTemplate")
    if doc.get("kind") == "RayJob" and submitter:
        for c in (submitter.get("spec") or {}).get("containers") or []:
            yield f"submitter/{c.get('name')}", c


def env_of(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or [] if isinstance(e, dict)}


def is_secret_name(name: str) -> bool:
    return name in SECRET_ENV_NAMES or bool(SECRET_ENV_PATTERN.search(name or ""))


# --------------------------------------------------------------------------------------------------------------
# Operator-level checks (subset of KubeRay's ValidateRayClusterSpec / ValidateRayJobSpec) and sanity
# --------------------------------------------------------------------------------------------------------------
def _version_tuple(text: str) -> tuple[int, ...] | None:
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    return tuple(int(g or 0) for g in match.groups()) if match else None


def auth_enabled_natively(spec: dict) -> bool:
    auth = spec.get("authOptions")
    return isinstance(auth, dict) and auth.get("mode", "token") == "token"  # KubeRay: mode defaults to token


def operator_errors(doc: dict) -> list[str]:
    errors: list[str] = []
    spec = cluster_spec(doc)
    if doc.get("kind") == "RayJob":
        job = doc.get("spec") or {}
        if spec is None and not job.get("clusterSelector"):
            errors.append("RayJob needs rayClusterSpec or clusterSelector")
        if not job.get("shutdownAfterJobFinishes") and job.get("ttlSecondsAfterFinished", 0) > 0:
            errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if job.get("suspend") and not job.get("shutdownAfterJobFinishes"):
            errors.append("suspend needs shutdownAfterJobFinishes: true")
        if job.get("activeDeadlineSeconds") is not None and job["activeDeadlineSeconds"] <= 0:
            errors.append("activeDeadlineSeconds must be positive")
        for field in ("backoffLimit",):
            if job.get(field) is not None and job[field] < 0:
                errors.append(f"{field} must be >= 0")
        if (job.get("submitterConfig") or {}).get("backoffLimit", 0) < 0:
            errors.append("submitterConfig.backoffLimit must be >= 0")
        sidecar = job.get("submissionMode") == "SidecarMode"
        if sidecar and (job.get("submitterPodTemplate") or job.get("submitterConfig")):
            errors.append("SidecarMode supports neither submitterPodTemplate nor submitterConfig")
        if not str(job.get("entrypoint", "")).strip():
            errors.append("RayJob without entrypoint")
        try:
            runtime_env = yaml.safe_load(job.get("runtimeEnvYAML") or "") or {}
            if not isinstance(runtime_env, dict):
                errors.append("runtimeEnvYAML must be a mapping")
        except yaml.YAMLError as exc:
            errors.append(f"runtimeEnvYAML is not valid YAML: {exc}")
    if not spec:
        return errors

    head = spec.get("headGroupSpec") or {}
    if not ((head.get("template") or {}).get("spec") or {}).get("containers"):
        errors.append("headGroupSpec needs at least one container")
    groups = spec.get("workerGroupSpecs") or []
    for name, count in Counter(g.get("groupName") for g in groups).items():
        if count > 1:
            errors.append(f"worker group name {name!r} used {count} times")
    for group in [head, *groups]:
        label = group.get("groupName", "head")
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            errors.append(f"{label}: resources set in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{label}: use the top-level labels field, not rayStartParams['labels']")
    for group in groups:
        label = group.get("groupName")
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            errors.append(f"worker group {label}: needs at least one container")
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", lo)
        if all(isinstance(v, int) for v in (lo, hi, replicas)) and not lo <= replicas <= hi:
            errors.append(f"worker group {label}: needs minReplicas <= replicas <= maxReplicas "
                          f"({lo}, {replicas}, {hi})")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    head_env = env_of(next(iter(ray_containers(spec)), ("", {}))[1])
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2" or (
        head_env.get("RAY_enable_autoscaler_v2", {}).get("value") in ("1", "true")
    )
    if autoscaling and v2:
        for group, template in ray_pod_templates(spec):
            policy = (template.get("spec") or {}).get("restartPolicy")
            if policy not in (None, "", "Never"):
                errors.append(f"{group}: restartPolicy must be Never or unset with autoscaler v2, got {policy!r}")
    if auth_enabled_natively(spec):
        version = _version_tuple(spec.get("rayVersion", ""))
        if version is None:
            errors.append("authOptions token mode needs rayVersion")
        elif version < MIN_RAY_FOR_TOKEN_AUTH:
            errors.append(f"authOptions token mode needs rayVersion >= 2.52.0, got {spec.get('rayVersion')}")
    return errors


# --------------------------------------------------------------------------------------------------------------
# Security checks
# --------------------------------------------------------------------------------------------------------------
def _secret_ref(entry: dict) -> dict | None:
    return ((entry.get("valueFrom") or {}) or {}).get("secretKeyRef")


def security_problems(doc: dict) -> list[str]:
    problems: list[str] = []
    spec = cluster_spec(doc)
    if spec:
        head = spec.get("headGroupSpec") or {}
        if head.get("serviceType") in EXPOSED_SERVICE_TYPES:
            problems.append(f"headGroupSpec.serviceType is {head['serviceType']}: the dashboard would be exposed")
        head_svc_type = ((head.get("headService") or {}).get("spec") or {}).get("type")
        if head_svc_type in EXPOSED_SERVICE_TYPES:
            problems.append(f"headGroupSpec.headService.spec.type is {head_svc_type}")
        if head.get("enableIngress"):
            problems.append("headGroupSpec.enableIngress is true: the dashboard would be exposed")
        for key, value in (spec.get("headServiceAnnotations") or {}).items():
            if "load-balancer" in key or "loadbalancer" in key.lower():
                problems.append(f"headServiceAnnotations {key}={value} asks for a load balancer")

        native = auth_enabled_natively(spec)
        auth = spec.get("authOptions") or {}
        if auth.get("enableK8sTokenAuth") and doc.get("kind") == "RayJob":
            problems.append("authOptions.enableK8sTokenAuth is unsupported for RayJob")
        native_secret = auth.get("secretName") if native else None
        for group, container in ray_containers(spec):
            env = env_of(container)
            mode = env.get("RAY_AUTH_MODE")
            if mode is not None and mode.get("value") != "token":
                problems.append(f"{group}: RAY_AUTH_MODE is {mode.get('value')!r}, not 'token'")
            if not native and (mode is None or "RAY_AUTH_TOKEN" not in env):
                problems.append(f"{group}: token authentication is off "
                                "(no authOptions, no RAY_AUTH_MODE/RAY_AUTH_TOKEN)")
        # One token for the whole cluster: explicit env and the operator-injected env (autoscaler, init containers)
        # must read the same Secret key.
        refs = {
            (ref.get("name"), ref.get("key"))
            for _, container in ray_containers(spec)
            if (ref := _secret_ref(env_of(container).get("RAY_AUTH_TOKEN", {})))
        }
        if native_secret:
            refs.add((native_secret, AUTH_SECRET_KEY))
        if len(refs) > 1:
            problems.append(f"RAY_AUTH_TOKEN comes from different Secrets/keys: {sorted(refs)}")

    for where, container in all_containers(doc):
        for entry in container.get("env") or []:
            name = entry.get("name", "")
            if not is_secret_name(name):
                continue
            ref = _secret_ref(entry)
            if "value" in entry:
                problems.append(f"{where}: {name} has a literal value (use valueFrom.secretKeyRef)")
            elif ref is None:
                problems.append(f"{where}: {name} does not come from a Secret (valueFrom.secretKeyRef)")
            elif name == "RAY_AUTH_TOKEN" and ref.get("optional"):
                problems.append(f"{where}: RAY_AUTH_TOKEN secretKeyRef is optional; a missing Secret must fail closed")
            if ref is not None and ref.get("name") in ("", None):
                problems.append(f"{where}: {name} secretKeyRef names no Secret")

    if doc.get("kind") == "RayJob":
        job = doc.get("spec") or {}
        try:
            runtime_env = yaml.safe_load(job.get("runtimeEnvYAML") or "") or {}
        except yaml.YAMLError:
            runtime_env = {}
        if isinstance(runtime_env, dict):
            for name in (runtime_env.get("env_vars") or {}):
                if is_secret_name(name):
                    problems.append(f"runtimeEnvYAML.env_vars.{name}: secrets must not travel in the runtime env")
            for field in ("working_dir", "py_modules"):
                value = runtime_env.get(field)
                for uri in [value] if isinstance(value, str) else value or []:
                    if re.search(r"://[^/@\s]+@", str(uri)):
                        problems.append(f"runtimeEnvYAML.{field}: credentials embedded in URI {uri!r}")
    return problems


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(c / len(text) * math.log2(c / len(text)) for c in counts.values())


def token_like_strings(text: str) -> list[str]:
    """Literal credentials: known token formats, long hex, or long high-entropy base64-ish runs."""
    found = [f"{label}: {m.group(0)[:12]}..." for label, rx in TOKEN_PATTERNS.items() for m in rx.finditer(text)]
    for match in _GENERIC_SECRET.finditer(text):
        word = match.group(0)
        classes = sum(bool(re.search(rx, word)) for rx in (r"[a-z]", r"[A-Z]", r"[0-9]"))
        if classes >= 3 and _entropy(word) > 4.0:
            found.append(f"high-entropy string: {word[:12]}...")
    return found


def rayjobs_modules_named(text: str) -> set[str]:
    """Modules named as `python -m rayjobs.X` or, more loosely, as `rayjobs.X` anywhere in the text."""
    strict = re.findall(r"python3?\s+-m\s+rayjobs\.([A-Za-z_][A-Za-z0-9_.]*)", text)
    loose = re.findall(r"(?<![\w/.])rayjobs\.([A-Za-z_][A-Za-z0-9_]*)", text)
    return set(strict) | set(loose)


def character_commands_named(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w/.-])character\s+([a-z][a-z_-]*)\s+--config", text))


def dockerfile_problems(text: str) -> list[str]:
    problems = []
    joined = re.sub(r"\\\n", " ", text)  # line continuations
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    users = [ln.split(None, 1)[1].strip() for ln in lines if ln.upper().startswith("USER ")]
    if not users:
        problems.append("no USER instruction: the image would run as root")
    elif users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"final USER is {users[-1]}")
    for ln in lines:
        instruction, _, rest = ln.partition(" ")
        instruction = instruction.upper()
        if instruction not in ("ARG", "ENV"):
            continue
        words = shlex.split(rest, comments=False)
        if instruction == "ENV" and words and not any("=" in w for w in words):
            names = [words[0]]  # legacy form: ENV NAME value
        else:
            names = [w.split("=", 1)[0] for w in words if instruction == "ARG" or "=" in w]
        for name in names:
            if is_secret_name(name.upper()):
                problems.append(f"{instruction} {name}: secrets must not be baked into the image")
    base_lines = [ln for ln in lines if ln.upper().startswith(("FROM ", "ARG "))]
    if not any(re.search(r"cu\d+|cuda", ln, re.IGNORECASE) for ln in base_lines):
        problems.append("base image is not a CUDA image")
    if not re.search(r"pip install[^\n]*-e\s+[\"']?\.\[gpu\]", text):
        problems.append('the package is not installed with pip install -e ".[gpu]"')
    if any("constraints-cpu" in ln for ln in lines):
        problems.append("the GPU image must not use constraints-cpu.txt")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Tests: the real files
# --------------------------------------------------------------------------------------------------------------
@needs_crds
@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_crd_schema_is_a_valid_json_schema(kind):
    schema = crd_schema(kind)
    jsonschema.Draft7Validator.check_schema(schema)
    assert "spec" in schema["properties"]


def test_cluster_dir_holds_a_raycluster_and_a_rayjob_and_nothing_exposing():
    kinds = Counter(doc.get("kind") for _, _, doc in all_docs())
    assert kinds["RayCluster"] >= 1 and kinds["RayJob"] >= 1, kinds
    assert not kinds.get("Ingress"), "no Ingress in cluster/"
    for path, index, doc in all_docs():
        if doc.get("kind") == "Service":
            assert (doc.get("spec") or {}).get("type", "ClusterIP") not in EXPOSED_SERVICE_TYPES, f"{path.name}#{index}"


@needs_crds
@pytest.mark.parametrize("item", RAY_DOCS, ids=_doc_id)
def test_manifest_validates_against_kuberay_crd(item):
    _, _, doc = item
    assert schema_errors(doc) == []


@pytest.mark.parametrize("item", RAY_DOCS, ids=_doc_id)
def test_manifest_passes_operator_checks(item):
    _, _, doc = item
    assert operator_errors(doc) == []


@pytest.mark.parametrize("item", RAY_DOCS, ids=_doc_id)
def test_manifest_security(item):
    _, _, doc = item
    assert security_problems(doc) == []
    spec = cluster_spec(doc)
    assert spec is not None, "every RayJob here brings its own cluster"
    # Secure by construction, not only by default: both the native field and the explicit env are present.
    assert auth_enabled_natively(spec) and spec["authOptions"].get("secretName")
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for group, container in ray_containers(spec):
        env = env_of(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", group
        assert _secret_ref(env["RAY_AUTH_TOKEN"])["key"] == AUTH_SECRET_KEY, group
        assert _secret_ref(env["HF_TOKEN"]) is not None, group


@pytest.mark.parametrize("path", manifest_files() + [DOCKERFILE, DOCS], ids=lambda p: p.name)
def test_no_token_like_literals(path):
    if not path.exists():
        pytest.fail(f"{path} is missing")
    assert token_like_strings(path.read_text()) == []


def test_secret_templates_hold_only_placeholders():
    secrets = [(p, doc) for p, _, doc in all_docs() if doc.get("kind") == "Secret"]
    assert secrets, "cluster/secrets.example.yaml should template the Secrets"
    for path, doc in secrets:
        assert "data" not in doc, f"{path.name}: use stringData placeholders, never base64 data"
        for key, value in (doc.get("stringData") or {}).items():
            assert "REPLACE" in str(value) and str(value).startswith("<"), f"{path.name}: {key} is not a placeholder"
        assert "kubectl create secret generic" in path.read_text()


def test_secret_names_match_the_manifests():
    provided = {
        (doc["metadata"]["name"], key)
        for _, _, doc in all_docs()
        if doc.get("kind") == "Secret"
        for key in (doc.get("stringData") or {})
    }
    referenced = set()
    for _, _, doc in RAY_DOCS:
        for _, container in all_containers(doc):
            for entry in container.get("env") or []:
                if ref := _secret_ref(entry):
                    referenced.add((ref["name"], ref["key"]))
        spec = cluster_spec(doc)
        if spec and auth_enabled_natively(spec) and spec["authOptions"].get("secretName"):
            referenced.add((spec["authOptions"]["secretName"], AUTH_SECRET_KEY))
    assert referenced <= provided, f"Secrets referenced but not templated: {sorted(referenced - provided)}"


def _only(kind: str) -> dict:
    docs = [doc for _, _, doc in RAY_DOCS if doc["kind"] == kind]
    assert len(docs) == 1, f"expected one {kind}"
    return docs[0]


def _check_cluster_layout(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec.get("autoscalerOptions"), "autoscalerOptions"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"cpu", "gpu"} <= set(groups)
    for name, group in groups.items():
        for field in ("minReplicas", "maxReplicas", "replicas"):
            assert isinstance(group.get(field), int), f"{name}.{field}"
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert str(gpu["limits"]["nvidia.com/gpu"]) == "1"
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in cpu.get("limits", {})
    for group, container in ray_containers(spec):
        res = container.get("resources") or {}
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(bound) or {}), f"{group}: {bound}"
    for group, template in ray_pod_templates(spec):
        pod_sec = template["spec"].get("securityContext") or {}
        assert pod_sec.get("runAsNonRoot") is True, group


def test_raycluster_layout():
    _check_cluster_layout(_only("RayCluster")["spec"])


def test_rayjob_layout():
    job = _only("RayJob")["spec"]
    assert job["entrypoint"].split() == ["python", "-m", "rayjobs.pipeline", "--config", "configs/cluster.yaml"]
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job.get("ttlSecondsAfterFinished"), int)
    assert isinstance((job.get("submitterConfig") or {}).get("backoffLimit"), int)
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env.get("working_dir") or runtime_env.get("pip") or runtime_env.get("env_vars")
    _check_cluster_layout(job["rayClusterSpec"])


def test_dockerfile():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def _texts_naming_entry_points() -> list[tuple[str, str]]:
    paths = manifest_files() + [DOCKERFILE, DOCS]
    return [(p.name, p.read_text()) for p in paths if p.exists()]


def test_entry_points_exist_in_the_fixed_list():
    named = {}
    for name, text in _texts_naming_entry_points():
        for module in rayjobs_modules_named(text):
            named.setdefault(module, set()).add(name)
        for command in character_commands_named(text):
            assert command in CLI_COMMANDS, f"{name}: unknown CLI command 'character {command}'"
        for config in re.findall(r"--config[ =](configs/[A-Za-z0-9_./-]+)", text):
            config = config.rstrip(".")
            assert config in KNOWN_CONFIGS, f"{name}: unknown config {config}"
    unknown = {m: files for m, files in named.items() if m not in RAYJOBS_MODULES}
    assert not unknown, f"python -m rayjobs.X names outside {sorted(RAYJOBS_MODULES)}: {unknown}"
    assert "pipeline" in named, "the pipeline entry point is named somewhere"


def test_docs_cover_deployment_and_security():
    text = DOCS.read_text()
    for needle in (
        "kubectl create secret generic",
        "kubectl apply -f cluster/raycluster.yaml",
        "kubectl apply -f cluster/rayjob.yaml",
        "kubectl port-forward",
        "ray job submit --address http://127.0.0.1:8265",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_MODE=token",
        "ray start --head",
        "ShadowRay",
        "GPU-hours",
    ):
        assert needle in text, needle
    # The dashboard is reached only through a local port-forward, never bound to all interfaces.
    for line in text.splitlines():
        if "port-forward" in line:
            assert "0.0.0.0" not in line, line
    assert not re.search(r"serviceType:\s*(LoadBalancer|NodePort)", text)


# --------------------------------------------------------------------------------------------------------------
# Tests: broken copies must fail
# --------------------------------------------------------------------------------------------------------------
def _head(spec):
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker(spec, group="gpu"):
    (g,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == group]
    return g


def _set_env(container, name, **entry):
    container["env"] = [e for e in container.get("env", []) if e["name"] != name] + [{"name": name, **entry}]


def _drop_env(container, name):
    container["env"] = [e for e in container.get("env", []) if e["name"] != name]


# (name, check that must fail, mutation of the cluster spec)
CLUSTER_MUTATIONS: list[tuple[str, str, Callable[[dict], None]]] = [
    ("replicas-as-word", "schema", lambda s: _worker(s).__setitem__("replicas", "two")),
    ("minReplicas-as-string", "schema", lambda s: _worker(s, "cpu").__setitem__("minReplicas", "1")),
    ("maxReplicas-over-int32", "schema", lambda s: _worker(s).__setitem__("maxReplicas", 2**31)),
    ("rayStartParams-int-value", "schema", lambda s: s["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0)),
    ("unknown-field", "schema", lambda s: s["headGroupSpec"].__setitem__("serviceTyp", "ClusterIP")),
    ("auth-mode-not-in-enum", "schema", lambda s: s["authOptions"].__setitem__("mode", "tokens")),
    ("container-without-name", "schema", lambda s: _head(s).pop("name")),
    ("cpu-quantity-as-float", "schema", lambda s: _head(s)["resources"]["limits"].__setitem__("cpu", 0.5)),
    ("duplicate-env-name", "schema", lambda s: _head(s)["env"].append({"name": "RAY_AUTH_MODE", "value": "token"})),
    ("dashboard-loadbalancer", "security", lambda s: s["headGroupSpec"].__setitem__("serviceType", "LoadBalancer")),
    ("dashboard-nodeport", "security", lambda s: s["headGroupSpec"].__setitem__("serviceType", "NodePort")),
    ("head-service-nodeport", "security",
     lambda s: s["headGroupSpec"].__setitem__("headService", {"spec": {"type": "NodePort"}})),
    ("ingress-enabled", "security", lambda s: s["headGroupSpec"].__setitem__("enableIngress", True)),
    ("ray-token-literal", "security", lambda s: _set_env(_head(s), "RAY_AUTH_TOKEN", value="not-a-secret-ref")),
    ("hf-token-literal", "security",
     lambda s: _set_env(_worker(s)["template"]["spec"]["containers"][0], "HF_TOKEN", value="placeholder")),
    ("hf-token-from-configmap", "security",
     lambda s: _set_env(_head(s), "HF_TOKEN", valueFrom={"configMapKeyRef": {"name": "cm", "key": "hf"}})),
    ("other-secret-literal", "security", lambda s: _set_env(_head(s), "AWS_SECRET_ACCESS_KEY", value="x")),
    ("ray-token-optional", "security",
     lambda s: _set_env(_head(s), "RAY_AUTH_TOKEN",
                        valueFrom={"secretKeyRef": {"name": "character-ray-auth", "key": "auth_token",
                                                    "optional": True}})),
    ("auth-off-on-a-worker", "security",
     lambda s: (s.pop("authOptions"), _drop_env(_worker(s)["template"]["spec"]["containers"][0], "RAY_AUTH_MODE"))),
    ("auth-mode-disabled", "security",
     lambda s: (s["authOptions"].__setitem__("mode", "disabled"),
                [_drop_env(c, "RAY_AUTH_MODE") for _, c in ray_containers(s)])),
    ("auth-env-disabled", "security", lambda s: _set_env(_head(s), "RAY_AUTH_MODE", value="disabled")),
    ("auth-secret-mismatch", "security", lambda s: s["authOptions"].__setitem__("secretName", "another-secret")),
    ("ray-too-old-for-auth", "operator", lambda s: s.__setitem__("rayVersion", "2.50.0")),
    ("replicas-above-max", "operator", lambda s: _worker(s).__setitem__("replicas", 99)),
    ("duplicate-group-name", "operator", lambda s: s["workerGroupSpecs"].append(copy.deepcopy(_worker(s)))),
    ("restart-always-with-autoscaler-v2", "operator",
     lambda s: _worker(s)["template"]["spec"].__setitem__("restartPolicy", "Always")),
    ("resources-twice", "operator",
     lambda s: (_worker(s)["rayStartParams"].__setitem__("num-gpus", "1"),
                _worker(s).__setitem__("resources", {"GPU": "1"}))),
]

JOB_MUTATIONS: list[tuple[str, str, Callable[[dict], None]]] = [
    ("ttl-without-shutdown", "operator", lambda j: j.__setitem__("shutdownAfterJobFinishes", False)),
    ("runtime-env-not-yaml", "operator", lambda j: j.__setitem__("runtimeEnvYAML", "working_dir: [unclosed")),
    ("negative-deadline", "operator", lambda j: j.__setitem__("activeDeadlineSeconds", -1)),
    ("backoff-as-string", "schema", lambda j: j["submitterConfig"].__setitem__("backoffLimit", "2")),
    ("unknown-job-field", "schema", lambda j: j.__setitem__("shutdownAfterJobFinish", True)),
    ("secret-in-runtime-env", "security",
     lambda j: j.__setitem__("runtimeEnvYAML", "env_vars:\n  HF_TOKEN: placeholder\n")),
    ("credentials-in-working-dir-uri", "security",
     lambda j: j.__setitem__("runtimeEnvYAML", "working_dir: https://user:pat@example.com/repo.zip\n")),
    ("submitter-token-literal", "security",
     lambda j: _set_env(j["submitterPodTemplate"]["spec"]["containers"][0], "RAY_AUTH_TOKEN", value="x")),
    ("k8s-token-auth-on-rayjob", "security",
     lambda j: j["rayClusterSpec"]["authOptions"].__setitem__("enableK8sTokenAuth", True)),
]

CHECKS: dict[str, Callable[[dict], list[str]]] = {
    "schema": schema_errors,
    "operator": operator_errors,
    "security": security_problems,
}


def _mutation_cases():
    for _, _, doc in RAY_DOCS:
        for name, check, mutate in CLUSTER_MUTATIONS:
            yield pytest.param(doc, check, mutate, "cluster", id=f"{doc['kind']}-{name}")
        if doc["kind"] == "RayJob":
            for name, check, mutate in JOB_MUTATIONS:
                yield pytest.param(doc, check, mutate, "job", id=f"RayJob-{name}")


@pytest.mark.parametrize("doc,check,mutate,target", list(_mutation_cases()))
def test_broken_copy_is_caught(doc, check, mutate, target):
    if check == "schema":
        require_crds()
    assert CHECKS[check](doc) == [], "the original must pass before a broken copy means anything"
    broken = copy.deepcopy(doc)
    mutate(cluster_spec(broken) if target == "cluster" else broken["spec"])
    problems = CHECKS[check](broken)
    assert problems, f"{check} check missed the broken copy"


def test_missing_crds_skip_naming_their_source_and_fail_where_required(monkeypatch, tmp_path):
    monkeypatch.setitem(globals(), "CRD_DIR", tmp_path / "no-crds")
    monkeypatch.delenv("CHARACTER_REQUIRE_CRDS", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"KubeRay v1\.7\.0's release manifests .*/v1\.7\.0/ray-operator/"
                                                     r"config/crd/bases/ray\.io_rayclusters\.yaml"):
        require_crds()
    monkeypatch.setenv("CHARACTER_REQUIRE_CRDS", "1")
    with pytest.raises(pytest.fail.Exception, match="may not be skipped"):
        require_crds()


@needs_crds
def test_schema_errors_are_specific():
    doc = copy.deepcopy(_only("RayCluster"))
    _worker(doc["spec"])["replicas"] = "two"
    errors = schema_errors(doc)
    assert any("replicas" in e and "'two' is not of type 'integer'" in e for e in errors), errors


def test_module_check_catches_unknown_entry_points():
    text = "ray job submit -- python -m rayjobs.trainppo --config configs/cluster.yaml"
    assert rayjobs_modules_named(text) - RAYJOBS_MODULES == {"trainppo"}
    assert rayjobs_modules_named("python -m rayjobs.train_ppo --config x") <= RAYJOBS_MODULES
    assert character_commands_named("character fly --config configs/tiny.yaml") == {"fly"}


def test_token_scan_catches_literals():
    fake_hex = "0123456789abcdef" * 4
    fake_hf = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
    assert token_like_strings(f"auth_token: {fake_hex}")
    assert token_like_strings(f"value: {fake_hf}")
    assert token_like_strings("value: Zm9vYmFyQmF6UXV4MTIzNDU2Nzg5MGFiY2RlZkdISUpL")
    assert not token_like_strings("image: ghcr.io/your-org/character:0.1.0-ray2.60.0-cu128")
    assert not token_like_strings('auth_token: "<REPLACE-with-output-of: openssl rand -hex 32>"')


def test_duplicate_keys_are_rejected():
    with pytest.raises(DuplicateKeyError):
        load_yaml_docs("spec:\n  replicas: 1\n  replicas: 2\n")


def test_dockerfile_check_catches_root_and_baked_secrets():
    good = DOCKERFILE.read_text()
    assert dockerfile_problems(good.replace("USER 1000:100", "USER root"))
    assert dockerfile_problems(good + "\nARG HF_TOKEN\n")
    assert dockerfile_problems(good + "\nENV RAY_AUTH_TOKEN=abc\n")
