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
CONFIG = str(ROOT / "launch" / "configs" / "default.toml")
RUN = "/runs/r"


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


def torchrun(cmd: list[str]):
    """A torchrun command line as torchrun itself parses it."""
    from torch.distributed.run import get_args_parser

    assert cmd[0] == "torchrun", cmd
    return get_args_parser().parse_args(cmd[1:])


def accelerate(cmd: list[str]):
    """An accelerate command line as `accelerate launch` itself parses it."""
    from accelerate.commands.launch import launch_command_parser

    assert cmd[:2] == ["accelerate", "launch"], cmd
    return launch_command_parser().parse_args(cmd[2:])


def training(launcher) -> object:
    """What `python -m sdfm.train` would run with the arguments a launcher passes it (sdfm's own parser:
    the preset is read, the overrides are applied)."""
    from sdfm.cli import parse

    assert launcher.module and launcher.training_script == "sdfm.train", launcher
    return parse(["train", *launcher.training_script_args])


def assert_trains_the_run(command, *overrides: tuple[str, object]) -> None:
    """The launched command resumes RUN from the preset CONFIG, with these config overrides."""
    assert (str(command.config), str(command.run_dir), command.resume) == (CONFIG, RUN, True)
    for key, value in overrides:
        section, name = key.split(".")
        assert getattr(getattr(command.cfg, section), name) == value, key


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


def test_k8s_manifest_runs_the_image_the_dockerfile_builds_through_its_entrypoint():
    """Both containers use the image that docker/Dockerfile.gpu is documented to build and keep its
    ENTRYPOINT (no `command`); the trainer's args, given to that entrypoint with the pod's
    environment, become a torchrun command that sdfm's own parser accepts; the worker runs sdfm worker."""
    import re

    from sdfm.cli import parse

    dockerfile = (ROOT / "docker/Dockerfile.gpu").read_text()
    tag = re.search(r"docker build -f docker/Dockerfile\.gpu -t (\S+) \.", dockerfile).group(1)
    assert 'ENTRYPOINT ["/work/docker/entrypoint.sh"]' in dockerfile and "WORKDIR /work" in dockerfile
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "launch/k8s/pytorchjob.yaml").read_text())}
    (train,) = docs["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    (worker,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    for container in (train, worker):
        assert container["image"].rpartition("/")[2] == tag, container["image"]
        assert "command" not in container  # the image's ENTRYPOINT runs
    env = {e["name"]: e["value"] for e in train["env"]}
    preset = ROOT / Path(env["SDFM_CONFIG"]).relative_to("/work")  # the image holds the repository at /work
    assert preset.is_file(), preset
    run = torchrun(dry_run(ENTRYPOINT, *train["args"], **(env | {"SDFM_CONFIG": str(preset)})))
    assert run.nproc_per_node == env["NPROC_PER_NODE"]
    command = training(run)
    assert (command.cfg.coupling.kind, command.cfg.potential.source) == ("semidiscrete", "worker")
    assert command.cfg.potential.spawn_worker is False and str(command.run_dir) == env["SDFM_RUN_DIR"]
    worker_env = {e["name"]: e["value"] for e in worker["env"]}
    shell = worker["args"][-1]
    assert worker["args"][:2] == ["bash", "-c"] and 'exec sdfm worker --run-dir "$SDFM_RUN_DIR"' in shell
    assert str(parse(["worker", "--run-dir", worker_env["SDFM_RUN_DIR"]]).run_dir) == env["SDFM_RUN_DIR"]


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
    from sdfm.cli import parse

    cmd = dry_run(RUN_TRAIN, "--train.steps", "5", SDFM_PYTHON="py")
    assert cmd[:3] == ["py", "-m", "sdfm.train"]
    assert_trains_the_run(parse(["train", *cmd[3:]]), ("train.steps", 5))


def test_torchrun_one_node():
    run = torchrun(dry_run(RUN_TRAIN, NPROC_PER_NODE="4"))
    assert (run.nproc_per_node, run.max_restarts, run.standalone, run.nnodes) == ("4", 0, True, "1")
    assert_trains_the_run(training(run))


def test_one_process_with_restarts_uses_torchrun():
    run = torchrun(dry_run(RUN_TRAIN, MAX_RESTARTS="3"))
    assert (run.nproc_per_node, run.max_restarts) == ("1", 3)


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
    run = torchrun(cmd)
    assert (run.nproc_per_node, run.nnodes, run.max_restarts, run.standalone) == ("8", "4", 2, False)
    assert (run.rdzv_backend, run.rdzv_endpoint, run.rdzv_id) == ("c10d", "node0:29400", "77")
    assert_trains_the_run(training(run), ("train.steps", 9), ("data.path", "a b"))


def test_torchrun_endpoint_from_master_addr_and_static_with_node_rank():
    c10d = torchrun(dry_run(RUN_TRAIN, NNODES="2", MASTER_ADDR="head", MASTER_PORT="1234"))
    assert (c10d.rdzv_backend, c10d.rdzv_endpoint) == ("c10d", "head:1234")
    static = torchrun(dry_run(RUN_TRAIN, NNODES="2", NODE_RANK="1", MASTER_ADDR="head"))
    assert (static.nnodes, static.node_rank, static.master_addr, static.master_port) == (
        "2",
        1,
        "head",
        29500,
    )
    assert static.rdzv_backend == "static" and static.max_restarts == 0


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
    run = torchrun(cmd)
    assert (run.nproc_per_node, run.max_restarts, run.nnodes) == ("8", 10, "1:4")
    assert (run.rdzv_backend, run.rdzv_endpoint) == ("c10d", "sdfm-train-worker-0:23456")
    assert_trains_the_run(training(run), ("train.steps", 3))


def test_accelerate_command_lines():
    one = accelerate(dry_run(RUN_TRAIN, SDFM_LAUNCHER="accelerate"))
    assert one.config_file == str(ROOT / "launch/accelerate/one-node.yaml")
    assert_trains_the_run(training(one))
    many = accelerate(
        dry_run(
            RUN_TRAIN,
            SDFM_LAUNCHER="accelerate",
            ACCELERATE_CONFIG="launch/accelerate/multi-node.yaml",
            NNODES="2",
            NPROC_PER_NODE="8",
            NODE_RANK="1",
            RDZV_ENDPOINT="head:29400",
        )
    )
    assert many.config_file == "launch/accelerate/multi-node.yaml"
    # accelerate counts processes over all machines: 2 nodes x 8.
    assert (many.num_machines, many.num_processes, many.machine_rank) == (2, 16, 1)
    assert (many.main_process_ip, many.main_process_port) == ("head", 29400)
    assert_trains_the_run(training(many))


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
