"""Cluster launch files and Docker images, checked without a cluster, a GPU or a Docker engine.

Linters (hadolint, shellcheck, both from the dev extra), YAML sanity of the Kubernetes manifest and the
accelerate configs, the exact command lines launch/run_train.sh builds (SDFM_DRY_RUN=1) for each
launcher, the Slurm requeue trap driven by stub Slurm commands, and one real training run started
through launch/run_train.sh and resumed by the same command.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN_TRAIN = ROOT / "launch" / "run_train.sh"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
SCRIPTS = sorted([*ROOT.glob("launch/**/*.sh"), *ROOT.glob("launch/**/*.sbatch"), *ROOT.glob("docker/*.sh")])
DOCKERFILES = sorted(ROOT.glob("docker/Dockerfile.*"))
CONFIG = "/cfg/default.toml"
RUN = "/runs/r"
TRAIN = ["-m", "sdfm.train", "--config", CONFIG, "--run-dir", RUN, "--resume"]


def tool(name: str) -> str:
    """A linter of the dev extra: beside this interpreter (the venv) or on PATH."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it comes with the dev extra: pip install -e '.[dev]'")
    return found


def launcher_env(**env: str) -> dict[str, str]:
    """A clean environment: no RANK / PET_* / SLURM_* leaking in from the machine running the tests."""
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return {**base, "SDFM_CONFIG": CONFIG, "SDFM_RUN_DIR": RUN, "SDFM_DRY_RUN": "1", **env}


def dry_run(script: Path, *args: str, **env: str) -> list[str]:
    out = subprocess.run(
        ["bash", str(script), *args], env=launcher_env(**env), capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


# ------------------------------------------------------------------------------------------- linters


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    out = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfiles_use_the_entrypoint():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.gpu"}
    for p in DOCKERFILES:
        assert 'ENTRYPOINT ["/work/docker/entrypoint.sh"]' in p.read_text(), p.name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run(
        [tool("shellcheck"), "--shell=bash", "-x", str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


# ------------------------------------------------------------------------------------ YAML configs


def test_k8s_manifest():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "launch/k8s/pytorchjob.yaml").read_text())}
    assert set(docs) == {"PersistentVolumeClaim", "PyTorchJob", "Deployment"}
    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # trainers and the worker mount it together

    job = docs["PyTorchJob"]["spec"]
    elastic = job["elasticPolicy"]
    worker = job["pytorchReplicaSpecs"]["Worker"]
    assert elastic["rdzvBackend"] == "c10d" and elastic["maxRestarts"] > 0
    assert elastic["minReplicas"] <= worker["replicas"] <= elastic["maxReplicas"]
    pod = worker["template"]["spec"]
    (train,) = pod["containers"]
    # The operator derives the rendezvous endpoint from this container and port name.
    assert train["name"] == "pytorch"
    assert [p["name"] for p in train["ports"]] == ["pytorchjob-port"]
    env = {e["name"]: e["value"] for e in train["env"]}
    assert int(train["resources"]["limits"]["nvidia.com/gpu"]) == int(env["NPROC_PER_NODE"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in train["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    runs_mount = next(p for p, n in mounts.items() if "persistentVolumeClaim" in volumes[n])
    assert volumes[mounts[runs_mount]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert env["SDFM_RUN_DIR"].startswith(runs_mount + "/")
    args = " ".join(train["args"])
    assert "--potential.source worker" in args and "--potential.spawn_worker False" in args
    assert pod["securityContext"]["runAsNonRoot"] is True

    dep = docs["Deployment"]["spec"]
    assert dep["replicas"] == 1 and dep["strategy"]["type"] == "Recreate"  # one writer of RUN/potential
    wpod = dep["template"]["spec"]
    (wc,) = wpod["containers"]
    assert "sdfm worker" in wc["args"][-1]
    assert {e["name"]: e["value"] for e in wc["env"]}["SDFM_RUN_DIR"] == env["SDFM_RUN_DIR"]
    wclaims = [v["persistentVolumeClaim"]["claimName"] for v in wpod["volumes"]]
    assert wclaims == [claim["metadata"]["name"]]
    assert {m["mountPath"] for m in wc["volumeMounts"]} == {runs_mount}


@pytest.mark.parametrize("name", ["one-node", "multi-node", "cpu-2proc"])
def test_accelerate_configs(name):
    cfg = yaml.safe_load((ROOT / f"launch/accelerate/{name}.yaml").read_text())
    # MULTI_GPU is accelerate's torchrun launcher (MULTI_CPU starts several processes only via mpirun).
    assert cfg["compute_environment"] == "LOCAL_MACHINE" and cfg["distributed_type"] == "MULTI_GPU"
    assert cfg["num_processes"] >= 2 and cfg["num_processes"] % cfg["num_machines"] == 0
    if name == "multi-node":
        assert cfg["num_machines"] > 1 and cfg["rdzv_backend"] == "c10d" and cfg["main_process_port"] > 0
    else:
        assert cfg["num_machines"] == 1 and cfg["main_process_port"] == 0  # 0: a free port
    if name == "cpu-2proc":
        assert cfg["num_processes"] == 2


# ------------------------------------------------------------------------- launch command lines


def test_one_process_is_plain_python():
    assert dry_run(RUN_TRAIN, "--train.steps", "5", SDFM_PYTHON="py") == ["py", *TRAIN, "--train.steps", "5"]


def test_torchrun_one_node():
    cmd = dry_run(RUN_TRAIN, NPROC_PER_NODE="4")
    assert cmd == ["torchrun", "--nproc_per_node=4", "--max_restarts=0", "--standalone", "--nnodes=1", *TRAIN]


def test_one_process_with_restarts_uses_torchrun():
    cmd = dry_run(RUN_TRAIN, MAX_RESTARTS="3")
    assert cmd[:3] == ["torchrun", "--nproc_per_node=1", "--max_restarts=3"]


def test_torchrun_many_nodes_c10d():
    cmd = dry_run(
        RUN_TRAIN,
        "--train.steps",
        "9",
        "--data.path",
        "a b",
        NNODES="4",
        NPROC_PER_NODE="8",
        RDZV_ENDPOINT="node0:29400",
        RDZV_ID="77",
        MAX_RESTARTS="2",
    )
    assert cmd == [
        "torchrun",
        "--nproc_per_node=8",
        "--max_restarts=2",
        "--nnodes=4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29400",
        "--rdzv_id=77",
        *TRAIN,
        "--train.steps",
        "9",
        "--data.path",
        "a b",
    ]


def test_torchrun_endpoint_from_master_addr_and_static_with_node_rank():
    c10d = dry_run(RUN_TRAIN, NNODES="2", MASTER_ADDR="head", MASTER_PORT="1234")
    assert "--rdzv_endpoint=head:1234" in c10d
    static = dry_run(RUN_TRAIN, NNODES="2", NODE_RANK="1", MASTER_ADDR="head")
    assert static[:7] == [
        "torchrun",
        "--nproc_per_node=1",
        "--max_restarts=0",
        "--nnodes=2",
        "--node_rank=1",
        "--master_addr=head",
        "--master_port=29500",
    ]


def test_kubeflow_elastic_variables():
    """The training operator's PET_* variables fill what the job spec does not set."""
    cmd = dry_run(
        ENTRYPOINT,
        "--train.steps",
        "3",
        NPROC_PER_NODE="8",
        PET_NNODES="1:4",
        PET_RDZV_ENDPOINT="sdfm-train-worker-0:23456",
        PET_MAX_RESTARTS="10",
    )
    assert cmd[:6] == [
        "torchrun",
        "--nproc_per_node=8",
        "--max_restarts=10",
        "--nnodes=1:4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=sdfm-train-worker-0:23456",
    ]
    assert cmd[-len(TRAIN) - 2 :] == [*TRAIN, "--train.steps", "3"]


def test_accelerate_command_lines():
    one = dry_run(RUN_TRAIN, SDFM_LAUNCHER="accelerate")
    assert one == [
        "accelerate",
        "launch",
        "--config_file",
        str(ROOT / "launch/accelerate/one-node.yaml"),
        *TRAIN,
    ]
    many = dry_run(
        RUN_TRAIN,
        SDFM_LAUNCHER="accelerate",
        ACCELERATE_CONFIG="launch/accelerate/multi-node.yaml",
        NNODES="2",
        NPROC_PER_NODE="8",
        NODE_RANK="1",
        RDZV_ENDPOINT="head:29400",
    )
    assert many == [
        "accelerate",
        "launch",
        "--config_file",
        "launch/accelerate/multi-node.yaml",
        "--num_machines",
        "2",
        "--num_processes",
        "16",
        "--machine_rank",
        "1",
        "--main_process_ip",
        "head",
        "--main_process_port",
        "29400",
        *TRAIN,
    ]


@pytest.mark.parametrize(
    "env",
    [{"NNODES": "2"}, {"SDFM_LAUNCHER": "mpirun"}, {"SDFM_LAUNCHER": "accelerate", "NPROC_PER_NODE": "gpu"}],
)
def test_bad_launch_settings_are_refused(env):
    out = subprocess.run(["bash", str(RUN_TRAIN)], env=launcher_env(**env), capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: "), out.stderr


def test_entrypoint_runs_other_commands():
    out = subprocess.run(
        ["bash", str(ENTRYPOINT), "echo", "worker"], env=launcher_env(), capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout == "worker\n"


# ---------------------------------------------------------------------------------------- Slurm

STUBS = {
    # scontrol: the node list of the allocation, and the requeue (logged).
    "scontrol": """if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a1\\ngpu-a2\\n'; else echo "scontrol $*" >> "$LOG"; fi""",
    # srun: logs the command run_train.sh would exec (dry run), then stands for a running step.
    "srun": """trap 'echo "step got TERM" >> "$LOG"; exit 0' TERM
echo $$ > "$LOG.srun-pid"
shift  # --kill-on-bad-exit=1
"$@" >> "$LOG"
while :; do sleep 0.05; done""",
    # scancel: Slurm would signal every process of the job steps; here that is the srun stub.
    "scancel": """echo "scancel $*" >> "$LOG"; kill -TERM "$(cat "$LOG.srun-pid")\"""",
}


def test_sbatch_requeue_trap(tmp_path):
    """USR1 before the time limit: SIGTERM to the steps, wait for them, requeue, exit 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    env = launcher_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        LOG=str(log),
        SDFM_ROOT=str(ROOT),
        SDFM_VENV=str(tmp_path / "no-venv"),
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_JOB_ID="123456",
        SLURM_JOB_NODELIST="gpu-a[1-2]",
        SLURM_NNODES="2",
        SLURM_GPUS_PER_NODE="h100:8",
    )
    job = subprocess.Popen(
        ["bash", str(SBATCH), "--train.steps", "7"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 20
        while not (log.is_file() and "torchrun" in log.read_text()):
            assert time.time() < deadline and job.poll() is None, "the step never started"
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=20) == 0
    finally:
        job.kill()
    lines = log.read_text().splitlines()
    cmd = shlex.split(lines[0])
    assert cmd[:7] == [
        "torchrun",
        "--nproc_per_node=8",
        "--max_restarts=0",
        "--nnodes=2",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=gpu-a1:{20000 + 123456 % 20000}",
        "--rdzv_id=123456",
    ]
    assert cmd[-2:] == ["--train.steps", "7"] and "--resume" in cmd
    assert lines[1:] == ["scancel --signal=TERM 123456", "step got TERM", "scontrol requeue 123456"]


# ------------------------------------------------------------------------------- one real run


@pytest.mark.slow
def test_run_train_trains_and_resumes(tmp_path):
    """The launcher's command starts a run in an empty folder and, run again, continues it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "PET_"))}
    env.update(
        SDFM_CONFIG=str(ROOT / "launch/configs/default.toml"),
        SDFM_RUN_DIR=str(tmp_path / "run"),
        SDFM_PYTHON=sys.executable,
        NPROC_PER_NODE="1",
        OMP_NUM_THREADS="1",
    )
    for steps in (20, 30):
        out = subprocess.run(
            ["bash", str(RUN_TRAIN), "--train.steps", str(steps), "--train.eval_at_end", "False"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert (tmp_path / f"run/checkpoints/step-{steps:08d}").is_dir(), out.stdout[-2000:]
    assert "steps 20->30" in out.stdout + out.stderr
