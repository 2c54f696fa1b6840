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
