"""The cluster files: ray_cluster.yaml, infra/ (Dockerfile, KubeRay RayJob, MLflow server) and the profiles.

No Docker, Kubernetes or AWS here: the YAML is parsed and checked for what would break a run - the
Ray launcher config against Ray's own schema, GPU counts that match the paper profile, the RayJob's
entrypoint and GPU requests, the MLflow server's database / S3 / port and the profile's address of
it - and every profile is loaded for each stage with its datasets resolved in the registry.
"""

from __future__ import annotations

import copy
import os
import subprocess
import fnmatch
import itertools
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from xsam.data.registry import load_registry
from xsam.train.config import load_profile

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
PROFILES = sorted((REPO / "xsam" / "profiles").glob("*.yaml"))
STAGES = ("s1", "s2", "s3")
YAML_FILES = [REPO / "ray_cluster.yaml", *sorted(INFRA.rglob("*.yaml")), *PROFILES]


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def kind(path: Path, name: str) -> list[dict]:
    return [d for d in docs(path) if d.get("kind") == name]


def paper() -> dict:
    return yaml.safe_load((REPO / "xsam" / "profiles" / "paper.yaml").read_text())


def dockerfile_args() -> dict[str, str]:
    text = (INFRA / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


# -- every YAML parses --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path):
    assert docs(path), f"{path} holds no YAML document"


def test_infra_files_exist():
    for rel in ("ray_cluster.yaml", "infra/Dockerfile", "infra/README.md", "infra/kuberay/rayjob.yaml",
                "infra/mlflow/deployment.yaml", "infra/mlflow/postgres.yaml", "infra/mlflow/README.md",
                "xsam/profiles/single-node-8gpu.yaml"):
        assert (REPO / rel).is_file(), rel


# -- ray_cluster.yaml -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_ray_cluster_passes_rays_own_schema(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))  # fills the AWS defaults, then the JSON schema


def test_ray_cluster_has_a_cpu_head_and_8_gpu_workers_for_the_paper_profile(cluster):
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["cache_stopped_nodes"] is False
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "no GPU work may be scheduled on the head"
    assert head["resources"].get("CPU", 0) > 0, "the head keeps CPUs for conversion tasks"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "a GPU worker node type"
    gpu = next(iter(gpu_types.values()))
    assert gpu["resources"]["GPU"] == 8
    assert gpu["node_config"]["InstanceType"] in ("p4de.24xlarge", "p4d.24xlarge")
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 2
    assert cluster["max_workers"] >= gpu["max_workers"]
    prof = paper()
    assert gpu["max_workers"] * gpu["resources"]["GPU"] >= prof["num_workers"], "not enough GPUs for paper"
    assert gpu["resources"]["CPU"] >= 8 * prof["cpus_per_worker"], "8 workers' CPUs must fit on one node"
    options = " ".join(gpu["docker"]["worker_run_options"])
    assert "--gpus" in options and "--shm-size" in options and ":/weights" in options


def test_ray_cluster_start_commands_and_image(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    env = " ".join(cluster["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=http" in env and "AWS_REGION=" in env
    assert cluster["docker"]["image"] == rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"][
        "spec"]["containers"][0]["image"], "ray_cluster.yaml and the RayJob run the same image"


# -- KubeRay RayJob -------------------------------------------------------------------------------------

def rayjob(name: str = "rayjob.yaml") -> dict:
    (job,) = kind(INFRA / "kuberay" / name, "RayJob")
    return job


def profile(name: str) -> dict:
    return yaml.safe_load((REPO / "xsam" / "profiles" / f"{name}.yaml").read_text())


RAYJOBS = {"rayjob.yaml": "paper", "rayjob-single-node.yaml": "single-node-8gpu"}  # file -> its profile


def test_rayjob_runs_the_full_workflow_and_cleans_up():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "pipelines/full_run.py"]
    assert argv[argv.index("--profile") + 1] == "paper"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    # runtimeEnvYAML is itself YAML; the working dir is where the image holds the project
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/opt/xsam"
    assert "WORKDIR /opt/xsam" in (INFRA / "Dockerfile").read_text()
    assert spec["rayClusterSpec"]["rayVersion"] == dockerfile_args()["RAY_VERSION"]


def test_rayjob_worker_group_has_2_pods_of_8_gpus():
    cluster_spec = rayjob()["spec"]["rayClusterSpec"]
    (group,) = cluster_spec["workerGroupSpecs"]
    assert group["replicas"] == 2 and group["minReplicas"] <= 2 <= group["maxReplicas"]
    (worker,) = containers(group["template"])
    for section in ("requests", "limits"):
        assert int(worker["resources"][section]["nvidia.com/gpu"]) == 8
    assert group["replicas"] * 8 == paper()["num_workers"]
    head = containers(cluster_spec["headGroupSpec"]["template"])[0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    # rayStartParams is map[string]string in the CRD: a bare number or bool there is rejected
    for params in (cluster_spec["headGroupSpec"]["rayStartParams"], group["rayStartParams"]):
        assert all(isinstance(v, str) for v in params.values()), params


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_pods_mount_weights_shm_and_get_credentials_from_a_secret(name):
    cluster_spec = rayjob(name)["spec"]["rayClusterSpec"]
    templates = [cluster_spec["headGroupSpec"]["template"], cluster_spec["workerGroupSpecs"][0]["template"]]
    for template in templates:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (c,) = containers(template)
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "persistentVolumeClaim" in volumes[mounts["/weights"]]
        assert any("secretRef" in e for e in c.get("envFrom", [])), "AWS credentials from a Secret"
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["MLFLOW_TRACKING_URI"] == profile(RAYJOBS[name])["mlflow_uri"]
        assert "DS_ACCELERATOR" not in env, "GPU pods: DeepSpeed picks CUDA itself"
    for path in profile(RAYJOBS[name])["weights"].values():
        assert path.startswith("/weights/"), "the paper profile's weights live on the /weights volume"
    pvcs = kind(INFRA / "kuberay" / "volumes.yaml", "PersistentVolumeClaim")
    claims = {d["metadata"]["name"] for d in pvcs}
    used = {v["persistentVolumeClaim"]["claimName"] for t in templates for v in t["spec"]["volumes"]
            if "persistentVolumeClaim" in v}
    assert used <= claims, "every claim the RayJob mounts is defined in infra/kuberay/volumes.yaml"


def test_single_node_rayjob_is_the_recommended_start_and_otherwise_the_paper_job():
    single, multi = rayjob("rayjob-single-node.yaml"), rayjob("rayjob.yaml")
    argv = shlex.split(single["spec"]["entrypoint"])
    assert argv[:2] == ["python", "pipelines/full_run.py"]
    assert argv[argv.index("--profile") + 1] == "single-node-8gpu"
    multi_argv = shlex.split(multi["spec"]["entrypoint"])
    assert argv[argv.index("--workdir") + 1] != multi_argv[multi_argv.index("--workdir") + 1], "own step records"
    assert single["metadata"]["name"] != multi["metadata"]["name"]
    spec, ref = single["spec"]["rayClusterSpec"], multi["spec"]["rayClusterSpec"]
    (group,) = spec["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    (worker,) = containers(group["template"])
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) * group["replicas"] == profile(
        "single-node-8gpu")["num_workers"]
    assert spec["headGroupSpec"] == ref["headGroupSpec"], "the same head as the paper job"
    (ref_worker,) = containers(ref["workerGroupSpecs"][0]["template"])
    efa_env = {"FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "FI_EFA_FORK_SAFE", "NCCL_DEBUG"}
    assert {**worker, "env": None, "resources": None} == {**ref_worker, "env": None, "resources": None}
    assert worker["env"] == [e for e in ref_worker["env"] if e["name"] not in efa_env], "no EFA on one node"
    assert all("efa" not in k for section in worker["resources"].values() for k in section)
    for path in (REPO / "ray_cluster.yaml", *(INFRA / "kuberay" / name for name in RAYJOBS)):
        assert "RECOMMENDED START" in path.read_text(), path
    readme = (INFRA / "README.md").read_text()
    assert "**Start with `single-node-8gpu`.**" in readme
    assert readme.index("rayjob-single-node.yaml") < readme.index("kuberay/rayjob.yaml"), "listed first"


# -- multi-node interconnect: EFA, the NCCL plugin, the NCCL environment ---------------------------------

EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1"}
GPU_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def docker_env(options: list[str]) -> dict[str, str]:
    """The `--env K=V` / `-e K=V` of docker run options."""
    out = {}
    for opt in options:
        argv = shlex.split(opt, comments=True)
        for flag, value in itertools.pairwise(argv):
            if flag in ("--env", "-e"):
                key, _, val = value.partition("=")
                out[key] = val
    return out


def gpu_node_type(cluster: dict) -> dict:
    (gpu,) = [t for t in cluster["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    return gpu


def test_ray_cluster_gpu_nodes_get_the_4_efa_interfaces_of_a_p4de(cluster):
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces

    gpu = gpu_node_type(cluster)
    node = gpu["node_config"]
    assert node["InstanceType"] == "p4de.24xlarge"
    nics = node["NetworkInterfaces"]
    assert [n["NetworkCardIndex"] for n in nics] == [0, 1, 2, 3], "one EFA per network card"
    assert [n["DeviceIndex"] for n in nics] == [0, 1, 1, 1], "AWS: the primary at 0, the others at 1"
    assert all(n["InterfaceType"] == "efa" for n in nics)
    assert len({n["SubnetId"] for n in nics}) == 1 and all(n["Groups"] for n in nics)
    assert node["Placement"]["GroupName"], "EFA between nodes needs a cluster placement group"
    resolved = _configure_subnets_and_groups_from_network_interfaces(node)  # Ray's own check of this layout
    assert resolved["SubnetIds"] == [nics[0]["SubnetId"]] * 4
    head = cluster["available_node_types"][cluster["head_node_type"]]["node_config"]
    assert head["SecurityGroupIds"] == nics[0]["Groups"], "head and GPU nodes share the self-admitting group"
    provider = cluster["provider"]
    assert "," not in provider["availability_zone"], "EFA and the placement group: one zone"
    assert provider["use_internal_ips"] is True, "several interfaces: the GPU nodes get no public IPv4"
    options = gpu["docker"]["worker_run_options"]
    devices = {o.split("=", 1)[1] for o in options if o.startswith("--device=")}
    assert devices == {f"/dev/infiniband/uverbs{i}" for i in range(4)}
    assert "--ulimit memlock=-1" in cluster["docker"]["run_options"], "EFA registers (locks) memory"


def test_nccl_environment_reaches_the_gpu_workers_and_only_them(cluster):
    # Ray cluster launcher: on the GPU containers (raylet -> every worker process inherits it), not the head
    gpu_env = docker_env(gpu_node_type(cluster)["docker"]["worker_run_options"])
    assert {**EFA_ENV, **GPU_ENV}.items() <= gpu_env.items()
    common = docker_env(cluster["docker"]["run_options"] + cluster["docker"].get("head_run_options", []))
    assert not set(EFA_ENV) & set(common), "the CPU head has no EFA"
    # KubeRay: the 2-node job's GPU pods, with the EFA devices requested
    spec = rayjob()["spec"]["rayClusterSpec"]
    (worker,) = containers(spec["workerGroupSpecs"][0]["template"])
    pod_env = {e["name"]: e.get("value") for e in worker["env"]}
    assert {**EFA_ENV, **GPU_ENV}.items() <= pod_env.items()
    assert {k: v for k, v in pod_env.items() if k.startswith(("FI_", "NCCL_"))} == {
        k: v for k, v in gpu_env.items() if k.startswith(("FI_", "NCCL_"))}, "both cluster files agree"
    for section in ("requests", "limits"):
        assert int(worker["resources"][section]["vpc.amazonaws.com/efa"]) == 4
    (head,) = containers(spec["headGroupSpec"]["template"])
    assert not {e["name"] for e in head["env"]} & set(EFA_ENV)


def test_dockerfile_has_efa_user_space_and_the_nccl_plugin():
    text = (INFRA / "Dockerfile").read_text()
    args = dockerfile_args()
    assert args["EFA_INSTALLER_VERSION"] and args["AWS_OFI_NCCL_VERSION"]
    install = re.search(r"efa_installer\.sh ([^\n&]*)", text).group(1).split()
    assert {"-y", "--skip-kmod", "--no-verify"} <= set(install), "user space only: the host has the driver"
    configure = re.search(r"\./configure ((?:[^\n]*\\\n)*[^\n]*)", text).group(1)
    assert "--with-libfabric=/opt/amazon/efa" in configure and "--with-cuda=" in configure
    prefix = re.search(r"--prefix=(\S+)", configure).group(1)
    (ld_path,) = re.findall(r"LD_LIBRARY_PATH=(\S+)", text)
    assert f"{prefix}/lib" in ld_path.split(":") and "/opt/amazon/efa/lib" in ld_path.split(":")
    image_wide = re.search(r"^\s*(ENV|ARG)\b[^\n]*\bFI_PROVIDER", text, re.MULTILINE)
    assert not image_wide, "FI_PROVIDER is set per GPU node, not image-wide"


# -- MLflow server --------------------------------------------------------------------------------------

def mlflow_container() -> dict:
    (deployment,) = kind(INFRA / "mlflow" / "deployment.yaml", "Deployment")
    (c,) = containers(deployment["spec"]["template"])
    return c


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_mlflow_server_uses_postgres_s3_and_port_5000():
    c = mlflow_container()
    argv = c["command"] + c["args"]
    assert argv[:2] == ["mlflow", "server"]
    assert option(argv, "--backend-store-uri").startswith("postgresql://")
    assert option(argv, "--artifacts-destination").startswith("s3://")
    assert option(argv, "--host") == "0.0.0.0" and option(argv, "--port") == "5000"
    assert [p["containerPort"] for p in c["ports"]] == [5000]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    # every $(VAR) Kubernetes expands in the arguments is defined in the container's env
    env = {e["name"] for e in c["env"]}
    assert set(re.findall(r"\$\((\w+)\)", " ".join(argv))) <= env


def test_mlflow_service_is_where_the_profiles_log_and_accepts_that_host():
    (service,) = kind(INFRA / "mlflow" / "deployment.yaml", "Service")
    uri = urlparse(paper()["mlflow_uri"])
    name, namespace = uri.hostname.split(".")[:2]
    assert (service["metadata"]["name"], service["metadata"]["namespace"]) == (name, namespace)
    assert uri.port in [p["port"] for p in service["spec"]["ports"]]
    # the server's host-header check (MLflow's fnmatch rule) admits the profile's host and a port-forward
    c = mlflow_container()
    allowed = [h.strip() for h in option(c["command"] + c["args"], "--allowed-hosts").split(",")]
    for host in (uri.netloc, "localhost:5000", "127.0.0.1:5000"):
        assert any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed), host


def test_postgres_matches_the_mlflow_database_uri():
    path = INFRA / "mlflow" / "postgres.yaml"
    (statefulset,), (service,) = kind(path, "StatefulSet"), kind(path, "Service")
    assert statefulset["spec"]["volumeClaimTemplates"], "the database keeps its data on a volume"
    (pg,) = containers(statefulset["spec"]["template"])
    pg_env = {e["name"]: e for e in pg["env"]}
    c = mlflow_container()
    env = {e["name"]: e for e in c["env"]}
    db_uri = urlparse(option(c["command"] + c["args"], "--backend-store-uri"))
    assert db_uri.path.lstrip("/") == pg_env["POSTGRES_DB"]["value"]
    assert db_uri.port == service["spec"]["ports"][0]["port"] == 5432
    assert env["MLFLOW_DB_HOST"]["value"].split(".")[0] == service["metadata"]["name"]
    secret = pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert env["MLFLOW_DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret


# -- Dockerfile -----------------------------------------------------------------------------------------

def test_dockerfile_installs_the_pinned_torch_and_the_project():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        pytest.skip("tomllib needs Python 3.11")
    text = (INFRA / "Dockerfile").read_text()
    args = dockerfile_args()
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == ("2.14.1", "0.29.1")
    assert "torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION}" in text
    assert args["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    # the CUDA of the base image and of the torch build agree (major version)
    base_cuda = re.search(r"nvidia/cuda:(\d+)\.", args["CUDA_IMAGE"]).group(1)
    assert args["TORCH_INDEX"].rsplit("/cu", 1)[1].startswith(base_cuda)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    from packaging.requirements import Requirement
    from packaging.version import Version

    # the image's pinned builds satisfy the ranges, and so do newer patch releases of them
    for name in ("torch", "torchvision"):
        (req,) = [Requirement(d) for d in deps if Requirement(d).name == name]
        pinned = Version(args[f"{name.upper()}_VERSION"])
        assert req.specifier.contains(str(pinned))
        assert req.specifier.contains(f"{pinned.major}.{pinned.minor}.{pinned.micro + 1}"), f"{name}: patches allowed"
    makefile = (REPO / "Makefile").read_text()
    assert f"torch=={args['TORCH_VERSION']} torchvision=={args['TORCHVISION_VERSION']}" in makefile
    (ray_req,) = [Requirement(d) for d in deps if d.startswith("ray")]
    assert ray_req.specifier.contains(args["RAY_VERSION"])
    assert re.search(r"pip install [^\n]*\\\n[^\n]*ray\[default", text), "Ray with its dashboard / job server"
    assert re.search(r"-e /opt/xsam|pip install[^\n]* \.(\s|$)", text), "the project is installed"
    for src in ("xsam", "pipelines", "datasets_registry", "pyproject.toml"):
        assert re.search(rf"^COPY {src}\b", text, re.MULTILINE), f"the image needs {src}"


def test_dockerfile_runtime_setup():
    text = (INFRA / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "runs as a non-root user"
    assert "openjdk" in text, "Java for METEOR"
    assert re.search(r"HF_HUB_OFFLINE=1", text) and "TORCH_EXTENSIONS_DIR=" in text
    lines = re.MULTILINE
    assert not re.search(r"^\s*(ENV|ARG)\b.*DS_ACCELERATOR", text, lines), "GPU image: DS_ACCELERATOR unset"
    assert not re.search(r"^ENTRYPOINT", text, lines), "Ray's launcher and KubeRay run their own commands"
    weights = re.search(r"^(COPY|ADD)\b.*(\.pth|\.safetensors|\.bin|weights)", text, lines)
    assert not weights, "no weights baked in"
    assert "python3.11" in text


# -- profiles -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registries(tmp_path_factory) -> dict[str, dict]:
    from xsam.data.fixtures import generate

    real, problems = load_registry(REPO / "datasets_registry")
    assert not problems, problems
    fx = tmp_path_factory.mktemp("fixtures")
    generate(fx)
    fixtures, problems = load_registry(fx / "registry")
    assert not problems, problems
    return {"real": real, "fixtures": fixtures}


def test_profiles_present():
    names = {p.stem for p in PROFILES}
    assert {"local", "paper", "single-node-8gpu"} <= names


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_loads_every_stage_with_registered_training_splits(profile, registries):
    for stage in STAGES:
        cfg = load_profile(profile, stage)  # unknown keys raise here
        assert cfg.datasets, f"{profile.stem}: {stage} trains on nothing"
        for item in cfg.datasets:
            name, _, split = item.partition("/")
            registry = registries["fixtures" if name.startswith("fixture_") else "real"]
            assert name in registry, f"{profile.stem}: {stage}: {name!r} is not a registry entry"
            entry = registry[name]
            assert split in entry.splits, f"{profile.stem}: {stage}: {name} has no split {split!r}"
            where = f"{profile.stem}: {stage}: {item}"
            assert entry.split_spec(split).role == "train", f"{where} is an eval split"
            assert stage in entry.stages, f"{where}: the registry entry's stages are {entry.stages}"
        if cfg.use_gpu:
            assert cfg.bf16 and cfg.num_workers % 8 == 0, "GPU profiles fill whole 8-GPU nodes"


def test_single_node_profile_is_the_paper_recipe_on_8_gpus():
    single = yaml.safe_load((REPO / "xsam" / "profiles" / "single-node-8gpu.yaml").read_text())
    ref = paper()
    assert single["num_workers"] == 8 and ref["num_workers"] == 16
    assert single["weights"] == ref["weights"] and single["preset"] == ref["preset"]
    assert single["output"] != ref["output"], "its own runs prefix: a stage must not resume a paper run"
    for stage in STAGES:
        a, b = single["stages"][stage], ref["stages"][stage]
        assert a["datasets"] == b["datasets"]
        assert a["batch_per_rank"] == b["batch_per_rank"], "the per-GPU batch of the paper is kept"
        for key in ("lr", "weight_decay", "grad_clip", "schedule", "epochs"):
            assert a[key] == b[key], (stage, key)


@pytest.mark.parametrize("name", ["paper", "single-node-8gpu"])
def test_gpu_profiles_give_each_deepspeed_setting_a_reason(name):
    lines = [ln for ln in (REPO / "xsam" / "profiles" / f"{name}.yaml").read_text().splitlines()
             if ln.startswith("ds_")]
    assert {ln.split(":")[0] for ln in lines} >= {"ds_overlap_comm", "ds_contiguous_gradients", "ds_comm_dtype",
                                                 "ds_reduce_bucket_size", "ds_allgather_bucket_size",
                                                 "ds_grad_accum_dtype"}
    for ln in lines:
        assert len(ln.partition("#")[2].strip()) > 20, f"{name}.yaml: no reason given for {ln!r}"
    assert isinstance(profile(name)["ds_reduce_bucket_size"], int), "an int (YAML reads 2e8 as a string)"


# -- closed by default: token auth, the dashboard's address, who may connect -----------------------------

PORTS = (8265, 10001, 6379)  # job API / dashboard, Ray client, GCS
TOKEN_SECRET = "xsam-ray-token"


def walk(node):
    """Every dict and list inside a parsed YAML document."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def shell_words(command: str) -> list[str]:
    return shlex.split(command.replace(";", " ; ").replace("(", " ( ").replace(")", " ) "))


def test_ray_cluster_nodes_run_with_token_auth_from_a_file_fetched_from_ssm(cluster):
    env = docker_env(cluster["docker"]["run_options"])  # every node: head and GPU workers
    assert env["RAY_AUTH_MODE"] == "token"
    assert "RAY_AUTH_TOKEN" not in env, "the token itself is never in the cluster file"
    token_path = Path(env["RAY_AUTH_TOKEN_PATH"])
    mounts = [shlex.split(o)[1].split(":") for o in cluster["docker"]["run_options"] if o.startswith("-v ")]
    (host_dir,) = [m[0] for m in mounts if m[1] == str(token_path.parent)]
    assert [m[2] for m in mounts if m[1] == str(token_path.parent)] == ["ro"], "mounted read-only"
    host_file = f"{host_dir}/{token_path.name}"
    head_type = cluster["available_node_types"][cluster["head_node_type"]]
    for where, cmds in (("head", head_type.get("initialization_commands", cluster["initialization_commands"])),
                        ("gpu", gpu_node_type(cluster)["initialization_commands"])):
        (fetch,) = [shell_words(c) for c in cmds if host_file in c]
        assert fetch[fetch.index(">") + 1] == host_file, where
        assert fetch[fetch.index("aws"):fetch.index("aws") + 3] == ["aws", "ssm", "get-parameter"], where
        assert "--with-decryption" in fetch and ["umask", "077"] == fetch[fetch.index("umask"):][:2], where
    for cmd in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE" not in cmd, "one mode for every node, from the container environment"


def test_ray_cluster_dashboard_listens_on_the_heads_private_ip(cluster):
    (start,) = [c for c in cluster["head_start_ray_commands"] if "ray start --head" in c]
    words = shell_words(start)
    (host,) = [w.split("=", 1)[1] for w in words if w.startswith("--dashboard-host")]
    assert host == "$HEAD_PRIVATE_IP", host
    assigned = re.search(r"HEAD_PRIVATE_IP=\$\(curl [^)]*http://169\.254\.169\.254/latest/meta-data/local-ipv4\)",
                         start)
    assert assigned, "the private IP comes from the instance metadata (IMDSv2)"
    assert start.index("HEAD_PRIVATE_IP=") < start.index("ray start"), "assigned before ray start"
    assert "X-aws-ec2-metadata-token:" in start, "IMDSv2: a session token, not the v1 GET"


def test_ray_cluster_security_groups_open_no_ray_port_to_the_internet(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]["node_config"]
    assert head["SecurityGroupIds"], "a group of our own: Ray creates none"
    for node in walk(cluster):
        for perm in node.get("IpPermissions", []) if isinstance(node, dict) else []:
            ranges = [r.get("CidrIp") for r in perm.get("IpRanges", [])] + [
                r.get("CidrIpv6") for r in perm.get("Ipv6Ranges", [])]
            if {"0.0.0.0/0", "::/0"} & set(ranges):
                low, high = perm.get("FromPort", 0), perm.get("ToPort", 65535)
                assert perm.get("IpProtocol") not in ("-1", "tcp") or not any(low <= p <= high for p in PORTS), perm
    text = (REPO / "ray_cluster.yaml").read_text()
    assert "--dashboard-host=0.0.0.0" not in text


def matches(selector: dict | None, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels + matchExpressions In / NotIn / Exists)."""
    if selector is None:
        return False
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        op, key = e["operator"], e["key"]
        ok &= {"In": lambda: labels.get(key) in e["values"], "NotIn": lambda: labels.get(key) not in e["values"],
               "Exists": lambda: key in labels, "DoesNotExist": lambda: key not in labels}[op]()
    return ok


def admitted(policies: list[dict], target: dict, source: dict, source_ns: str, port: int) -> bool:
    """Whether NetworkPolicy lets a pod (labels `source`, namespace `source_ns`) open `port` on `target`."""
    selecting = [p for p in policies if matches(p["spec"]["podSelector"], target)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for policy in selecting:
        own_ns = policy["metadata"]["namespace"]
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
                continue
            for peer in rule.get("from", [{}]) or [{}]:
                ns_ok = (source_ns == own_ns if "namespaceSelector" not in peer
                         else matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source_ns}))
                pod_ok = "podSelector" not in peer or matches(peer["podSelector"], source)
                if ns_ok and pod_ok:
                    return True
    return False


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_cluster_is_closed_by_default(name):
    job = rayjob(name)
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    head_group, (worker_group,) = spec["headGroupSpec"], spec["workerGroupSpecs"]
    assert head_group.get("serviceType", "ClusterIP") == "ClusterIP" and not head_group.get("enableIngress")
    for node in walk(job):
        if isinstance(node, dict) and node.get("name") == "RAY_AUTH_MODE":
            assert node.get("value") == "token", "no container opts out of token auth"
    for group in (head_group, worker_group):
        pod = group["template"]["spec"]
        assert not pod.get("hostNetwork"), "0.0.0.0 in the pod = the pod IP + loopback, nothing of the node"
        assert not any("hostPort" in p for c in pod["containers"] for p in c.get("ports", []))
    # KubeRay's own probes and kubectl port-forward use the pod's loopback; the pod IP is private
    assert head_group["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    # who may connect: the policies, applied to the labels KubeRay gives these pods
    policies = kind(INFRA / "kuberay" / "networkpolicy.yaml", "NetworkPolicy")
    assert {p["metadata"]["namespace"] for p in policies} == {job["metadata"]["namespace"]}
    head = {**head_group["template"]["metadata"]["labels"], "ray.io/node-type": "head", "ray.io/is-ray-node": "yes"}
    worker = {**worker_group["template"]["metadata"]["labels"], "ray.io/node-type": "worker",
              "ray.io/is-ray-node": "yes"}
    submitter = {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": job["metadata"]["name"],
                 "batch.kubernetes.io/job-name": job["metadata"]["name"]}
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    stranger = {"app": "anything-else"}
    ns = job["metadata"]["namespace"]
    for port in PORTS:
        assert admitted(policies, head, worker, ns, port), f"workers reach the head's {port}"
        assert not admitted(policies, head, stranger, ns, port), f"another pod of the namespace: {port}"
        assert not admitted(policies, head, stranger, "default", port), f"a pod elsewhere: {port}"
        assert not admitted(policies, head, submitter, "default", port), "the submitter of another namespace"
        assert admitted(policies, head, submitter, ns, port) == (port == 8265), f"submitter: 8265 only ({port})"
        assert admitted(policies, head, operator, "kuberay-system", port) == (port == 8265), "operator"
        assert not admitted(policies, worker, stranger, ns, port)
    assert admitted(policies, worker, head, ns, 6379) and admitted(policies, worker, worker, ns, 12345)
    header = (INFRA / "kuberay" / name).read_text()
    assert f"create secret generic {TOKEN_SECRET}" in header and "--from-literal=auth_token=" in header
    assert "kubectl apply -f infra/kuberay/networkpolicy.yaml" in header


def test_guide_reaches_the_job_api_through_a_tunnel_with_the_token():
    readme = (INFRA / "README.md").read_text()
    assert "ssh -N -L 8265:" in readme and "kubectl -n xsam port-forward" in readme
    assert "RAY_AUTH_TOKEN" in readme and "RAY_AUTH_MODE=token" in readme
    assert f"create secret generic {TOKEN_SECRET}" in readme and "networkpolicy.yaml" in readme
    assert "0.0.0.0/0" not in readme.replace("no `0.0.0.0/0`", ""), "never tells to open a port to everyone"


# -- the token authentication the cluster files set, on a real local head --------------------------------

@pytest.mark.integration
def test_token_auth_closes_the_job_api_and_the_test_head_stops_alone(tmp_path):
    """RAY_AUTH_MODE=token with the token in a file (RAY_AUTH_TOKEN_PATH, as ray_cluster.yaml's nodes get
    it) refuses the job API without the token and admits `ray job` with RAY_AUTH_TOKEN (infra/README.md's
    client side). Stopping the head ends its own processes only: a process `ray stop` would kill (its
    command line names default_worker.py) lives on."""
    import secrets
    import urllib.error
    import urllib.request

    import psutil
    from helpers import RAY_CLI, ray_head

    token = secrets.token_hex(32)
    token_file = tmp_path / "ray-auth-token"
    token_file.write_text(token + "\n")  # as `aws ssm get-parameter --output text` writes it
    token_file.chmod(0o600)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    neighbour = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "default_worker.py"])
    try:
        with ray_head({**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}, 1) as head:
            tree = [p.pid for p in psutil.Process(head.proc.pid).children(recursive=True)]
            assert len(tree) >= 3, "gcs_server, raylet, dashboard at least"
            for headers in ({}, {"Authorization": f"Bearer {secrets.token_hex(32)}"}):  # none, a wrong one
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(urllib.request.Request(f"{head.dashboard}/api/jobs/", headers=headers),
                                           timeout=30)
                assert refused.value.code in (401, 403), headers
            client = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
            listed = subprocess.run([RAY_CLI, "job", "list", "--address", head.dashboard], env=client,
                                    capture_output=True, text=True, timeout=120)
            assert listed.returncode == 0, listed.stderr[-2000:]
        assert head.proc.poll() is not None
        assert not [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert not any(head.temp_dir in " ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"]))
        assert neighbour.poll() is None, "a process ray stop would have ended is untouched"
    finally:
        neighbour.kill()
        neighbour.wait()
