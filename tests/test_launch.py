"""Launch recipes parse: every script under bash -n, every manifest as YAML with the expected kinds."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from conftest import ROOT

SCRIPTS = sorted((ROOT / "launch").glob("*.sh")) + [ROOT / "launch" / "slurm.sbatch"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ddptrain fit" in script.read_text() and "torchrun" in script.read_text()


def test_kubernetes_manifests():
    kinds = {}
    for path in sorted((ROOT / "launch" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.setdefault(path.name, []).append(doc["kind"])
    assert kinds["ddptrain-job.yaml"] == ["Service", "Job"]
    assert kinds["pytorchjob.yaml"] == ["PyTorchJob"]
    job = list(yaml.safe_load_all((ROOT / "launch/k8s/ddptrain-job.yaml").read_text()))[1]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert any(m["mountPath"] == "/runs" for m in container["volumeMounts"])
    assert job["spec"]["completionMode"] == "Indexed"


def test_slurm_recipe_handles_preemption():
    text = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=" in text and "--requeue" in text and "srun" in text
