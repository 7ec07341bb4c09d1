"""The multi-machine launch files in deploy/ agree with clickclip: the command is `clickclip train`,
its --set overrides load as a valid config, and the machines and GPUs they ask for are the ones
train.num_nodes and train.devices say (a launch that asks for 2 x 8 GPUs but tells Lightning
otherwise would hang at rendezvous)."""

import re
import shlex
from pathlib import Path

import yaml

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _train_settings(arguments: list[str]):
    overrides = [arguments[i + 1] for i, a in enumerate(arguments) if a == "--set"]
    return load_config(REPO / "configs" / "tiny.yaml", overrides).train


def test_the_slurm_script_asks_for_what_the_config_trains_on():
    text = (REPO / "deploy" / "slurm" / "train.sbatch").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    command = shlex.split(text[text.index("\nsrun ") + 1:].replace("\\\n", " ").splitlines()[0])
    assert command[:3] == ["srun", ".venv/bin/clickclip", "train"]
    train = _train_settings(command)
    assert train.strategy == "ddp"
    assert int(sbatch["nodes"]) == train.num_nodes
    assert int(sbatch["ntasks-per-node"]) == train.devices == int(sbatch["gres"].split(":")[-1])


def test_the_pytorchjob_asks_for_what_the_config_trains_on():
    job = yaml.safe_load((REPO / "deploy" / "kubernetes" / "pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    pods = sum(spec["replicas"] for spec in replicas.values())
    for spec in replicas.values():
        container = spec["template"]["spec"]["containers"][0]
        command = shlex.split(container["args"][0])
        assert command[:2] == ["exec", "torchrun"] and "--no-python" in command
        tail = command[command.index("--no-python") + 1:]
        assert tail[:2] == ["clickclip", "train"]
        train = _train_settings(tail)
        nproc = int(next(a.split("=")[1] for a in command if a.startswith("--nproc-per-node=")))
        assert train.strategy == "ddp" and train.num_nodes == pods
        assert train.devices == nproc == container["resources"]["limits"]["nvidia.com/gpu"]
        assert container["volumeMounts"][0]["mountPath"] == container["workingDir"]
