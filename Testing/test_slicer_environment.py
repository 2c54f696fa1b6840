"""Engine behaviour the 3D Slicer module relies on for its background worker (issue 11, bug 3 and cancel):

- a worker started for a Python that is not Slicer's own gets a complete environment the client chose
  (Slicer's startup environment), not Slicer's own PYTHONHOME / PYTHONPATH / library paths merged back in;
- cancel on Windows without psutil ends the whole process tree (PythonSlicer.exe is a launcher whose child
  python-real.exe holds the GPU), with taskkill /T.
"""

import os
import sys
import types

import pytest

from pscv.jobs import client, processes
from PSCVSegmentLib import environment


def test_base_env_replaces_this_process_environment(monkeypatch):
    monkeypatch.setenv("PYTHONHOME", "/slicer/lib/Python")
    monkeypatch.setenv("PSCV_ONLY_IN_SLICER", "1")
    startup = {"PATH": "/usr/bin", "HOME": "/home/user"}
    job_client = client.JobClient(python="/envs/torch/bin/python", base_env=startup)
    assert job_client.env == startup
    environment = processes.worker_environment(job_client.env)
    assert "PYTHONHOME" not in environment and "PSCV_ONLY_IN_SLICER" not in environment
    assert environment["PYTHONPATH"].split(os.pathsep)[0] == os.path.dirname(os.path.dirname(
        os.path.dirname(client.__file__)))  # the folder holding pscv
    assert environment["PYTHONUNBUFFERED"] == "1" and environment["PATH"] == "/usr/bin"


def test_extra_env_is_added_to_the_base_or_to_this_process(monkeypatch):
    monkeypatch.setenv("PSCV_MARK", "here")
    assert client.JobClient(base_env={"A": "1"}, env={"CUDA_VISIBLE_DEVICES": "-1"}).env == {
        "A": "1", "CUDA_VISIBLE_DEVICES": "-1"}
    merged = client.JobClient(env={"CUDA_VISIBLE_DEVICES": "-1"}).env
    assert merged["PSCV_MARK"] == "here" and merged["CUDA_VISIBLE_DEVICES"] == "-1"
    assert client.JobClient().env is None  # the worker inherits this process's environment


def test_cancel_on_windows_without_psutil_kills_the_tree(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    monkeypatch.setattr(processes.os, "name", "nt")
    monkeypatch.setattr(processes.subprocess, "run", lambda command, **kwargs: calls.append(command))
    killed = []
    monkeypatch.setattr(processes.os, "kill", lambda pid, sig: killed.append(pid))
    processes.signal_tree(4242, None)
    assert calls == [["taskkill", "/PID", "4242", "/T", "/F"]]
    assert killed == []  # not TerminateProcess on the launcher alone


def test_cancel_on_windows_falls_back_to_terminate_without_taskkill(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(processes.os, "name", "nt")

    def no_taskkill(command, **kwargs):
        raise FileNotFoundError("taskkill")

    monkeypatch.setattr(processes.subprocess, "run", no_taskkill)
    killed = []
    monkeypatch.setattr(processes.os, "kill", lambda pid, sig: killed.append(pid))
    processes.signal_tree(4242, None)
    assert killed == [4242]


def test_psutil_is_still_preferred(monkeypatch):
    killed = []

    class Process:
        def __init__(self, pid):
            self.pid = pid

        def children(self, recursive):
            return [Process(7)]

        def kill(self):
            killed.append(self.pid)

    fake = types.SimpleNamespace(Process=Process, NoSuchProcess=LookupError)
    monkeypatch.setitem(sys.modules, "psutil", fake)
    monkeypatch.setattr(processes.os, "name", "nt")
    monkeypatch.setattr(processes.subprocess, "run", lambda *a, **k: pytest.fail("taskkill not needed"))
    processes.signal_tree(5, None)
    assert killed == [7, 5]


# --- PSCVSegmentLib.environment: which Python, which environment, which packages (no Slicer needed) ----------

MODULE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "PSCVSegment")


@pytest.mark.parametrize("version, minimum, ok", [
    ("2.13.0+cpu", "2.2", True), ("2.2.0", "2.2", True), ("2.1.2", "2.2", False), ("2.2.0rc1", "2.2", True),
    ("10.0", "2.2", True), ("2", "2.2", False), ("2.10.1+cu121", "2.9", True)])
def test_version_comparison(version, minimum, ok):
    assert environment.versionAtLeast(version, minimum) is ok


def test_torch_problem_names_the_fix():
    assert environment.torchProblem(None) is None and environment.torchProblem("2.13.0") is None
    problem = environment.torchProblem("2.0.1")
    assert "2.0.1" in problem and ">=2.2" in problem and "PyTorch Utils" in problem and "restart" in problem


def test_slicer_python_keeps_slicers_environment_others_get_the_startup_one(tmp_path):
    startup = {"PATH": "/usr/bin"}
    assert environment.workerBaseEnvironment("", None, startup) is None
    assert environment.workerBaseEnvironment("/opt/Slicer/bin/PythonSlicer", None, startup) is None
    assert environment.workerBaseEnvironment(r"C:\Slicer 5.8\bin\PythonSlicer.exe".replace("\\", "/"), None,
                                             startup) is None
    assert environment.workerBaseEnvironment("/envs/torch/bin/python", "/opt/Slicer/bin/PythonSlicer",
                                             startup) == startup
    link = tmp_path / "py"
    target = tmp_path / "PythonSlicer-real-name"
    target.write_text("")
    link.symlink_to(target)
    assert environment.isSlicerPython(str(link), str(target))  # the same file under another name
    with pytest.raises(ValueError):
        environment.workerBaseEnvironment("/envs/torch/bin/python", None, None)


def test_job_client_for_each_connection(tmp_path):
    remote = environment.jobClient(environment.Connection(serverUrl=" http://gpu:8000/ ", token="t"))
    assert remote.remote and remote.server_url == "http://gpu:8000" and remote.token == "t"
    slicer_own = environment.jobClient(environment.Connection(), slicerPython="/opt/Slicer/bin/PythonSlicer",
                                       jobsDirectory=tmp_path)
    assert slicer_own.python.endswith("PythonSlicer") and slicer_own.env is None
    external = environment.jobClient(environment.Connection(python="/envs/torch/bin/python"),
                                     slicerPython="/opt/Slicer/bin/PythonSlicer",
                                     startupEnvironment={"PATH": "/usr/bin"}, jobsDirectory=tmp_path)
    assert external.env == {"PATH": "/usr/bin"}
    with pytest.raises(RuntimeError, match="PythonSlicer"):
        environment.jobClient(environment.Connection())


def test_requirement_problems_install_nothing_and_say_what_is_missing(tmp_path):
    def nothing(name):
        return None

    local = environment.Connection()
    problems = environment.requirementProblems(local, torchVersion=None, findSpec=nothing)
    assert "PyTorch is not installed" in problems[0] and "numpy, scipy, safetensors" in problems[1]
    assert "Extensions Manager" in environment.requirementProblems(local, None, hasPyTorchExtension=False)[0]
    assert environment.requirementProblems(local, "2.13.0", findSpec=lambda name: object()) == []
    assert "torch >= 2.2" in environment.requirementProblems(local, "2.1.0", findSpec=lambda name: object())[0]
    assert environment.requirementProblems(environment.Connection(serverUrl="http://gpu:8000"), None, nothing) == []
    assert "does not exist" in environment.requirementProblems(
        environment.Connection(python=str(tmp_path / "nope")), None, nothing)[0]
    assert "http://" in environment.requirementProblems(environment.Connection(serverUrl="gpu:8000"), None)[0]


def test_the_worker_packages_are_the_engines_runtime_imports():
    """Every third-party package the worker imports (besides torch, SimpleITK and the optional DICOM/server
    packages) is in WORKER_PACKAGES: safetensors was missing, so a model could not be saved in Slicer's Python."""
    import ast
    from pathlib import Path

    engine_dir = Path(MODULE_DIR) / "pscv"
    # Everything the worker may import: the engine without its research code, the service and the CLI.
    paths = [path for path in engine_dir.rglob("*.py")
             if "research" not in path.parts and path.name not in ("server.py", "cli.py")]
    imported = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"torch", "SimpleITK", "highdicom", "pydicom", "psutil",
                                                            "pscv", "__future__"}
    assert third_party <= {module for module, _ in environment.WORKER_PACKAGES}, third_party
