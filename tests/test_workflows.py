"""The GitHub workflows (.github/workflows/): valid against GitHub's workflow schema
(check-jsonschema's vendored copy), clean under zizmor's offline audits (pinned actions, no
template injection, no persisted credentials), and wired to what they promise: the CPU
workflow runs .ci/run, the GPU one scripts/gpu_check.sh and uploads its results."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed: it comes with the test extras (pip install '.[test]')")
    return found


def test_workflows_exist():
    assert [w.name for w in WORKFLOWS] == ["cpu.yml", "gpu.yml"]


def test_workflows_match_githubs_schema():
    out = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_workflows_pass_zizmor_offline():
    out = subprocess.run([_tool("zizmor"), "--offline", str(ROOT / ".github" / "workflows")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_workflows_run_the_project_scripts():
    cpu = (ROOT / ".github" / "workflows" / "cpu.yml").read_text()
    gpu = (ROOT / ".github" / "workflows" / "gpu.yml").read_text()
    assert "run: bash .ci/run" in cpu
    assert "bash scripts/gpu_check.sh" in gpu and "upload-artifact" in gpu and "self-hosted" in gpu
