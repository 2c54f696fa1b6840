"""Where jobs run and with what: the worker's Python and environment, and the packages it needs.

Rules (issue 11, bug 3): Slicer's own Python (``PythonSlicer``) runs with Slicer's environment, as it was
built to. Any other interpreter chosen in Advanced gets Slicer's *startup* environment
(``slicer.util.startupEnvironment()``: the environment Slicer was started with, without the launcher's
PYTHONHOME, PYTHONPATH and library paths), so it loads its own standard library and packages.

torch is never imported into Slicer's process to check it: its version comes from the installed
distribution's metadata. Nothing here imports qt or slicer.app; the callers pass what Slicer knows.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass

MINIMUM_TORCH = "2.2"  # pyproject.toml: torch>=2.2
# Python packages the worker needs in Slicer's Python (import name, pip name). torch comes from the PyTorch
# extension and SimpleITK is Slicer's own: neither is ever pip-installed by this module.
WORKER_PACKAGES = [("numpy", "numpy"), ("scipy", "scipy"), ("safetensors", "safetensors")]
SLICER_PYTHON_NAMES = ("pythonslicer", "pythonslicer.exe")


@dataclass
class Connection:
    """Where jobs run: a remote server (URL, token) or a local worker (a python executable; empty: Slicer's)."""

    serverUrl: str = ""
    token: str = ""
    python: str = ""

    def __post_init__(self):
        self.serverUrl = (self.serverUrl or "").strip()
        self.token = (self.token or "").strip()
        self.python = (self.python or "").strip()

    @property
    def remote(self) -> bool:
        return bool(self.serverUrl)


def parseVersion(text) -> tuple:
    """The leading numbers of a version string: "2.13.0+cpu" -> (2, 13, 0); "2.2.0rc1" -> (2, 2, 0)."""
    numbers = []
    for part in str(text).split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
        if match.end() != len(part):
            break
    return tuple(numbers)


def versionAtLeast(version, minimum) -> bool:
    have, need = parseVersion(version), parseVersion(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def installedVersion(distribution: str):
    """The installed version of a distribution, from its metadata (the package is not imported), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def torchProblem(version, minimum=MINIMUM_TORCH):
    """None when ``version`` of torch is usable, else a sentence saying what to do."""
    if version is None:
        return None  # not installed: the caller offers the installation
    if not versionAtLeast(version, minimum):
        return (f"PyTorch {version} is installed in Slicer's Python, but PSCV Segment needs torch >= {minimum}. "
                f"Open the 'PyTorch Utils' module and install torch with the version requirement '>={minimum}', "
                "then restart Slicer (a loaded torch cannot be replaced in a running Slicer).")
    return None


def missingPackages(findSpec=importlib.util.find_spec) -> list:
    """pip names of the worker's packages that Slicer's Python lacks (looked up, not imported)."""
    return [pipName for moduleName, pipName in WORKER_PACKAGES if findSpec(moduleName) is None]


def isSlicerPython(python, slicerPython=None) -> bool:
    """Whether ``python`` is Slicer's own launcher (empty: yes, the default)."""
    if not python:
        return True
    if slicerPython:
        try:
            if os.path.samefile(python, slicerPython):
                return True
        except OSError:
            pass
    return os.path.basename(str(python)).lower() in SLICER_PYTHON_NAMES


def workerBaseEnvironment(python, slicerPython=None, startupEnvironment=None):
    """The environment a local worker starts from (``JobClient(base_env=...)``): None (Slicer's own, inherited)
    for Slicer's Python, Slicer's startup environment for any other interpreter."""
    if isSlicerPython(python, slicerPython):
        return None
    if startupEnvironment is None:
        raise ValueError("a Python other than Slicer's needs Slicer's startup environment")
    return dict(startupEnvironment)


def connectionProblems(connection: Connection) -> list:
    """What is wrong with the connection settings themselves, as sentences (empty when fine)."""
    problems = []
    if connection.remote:
        if not re.match(r"^https?://[^/\s]+", connection.serverUrl):
            problems.append(f"The server URL '{connection.serverUrl}' must start with http:// or https://, e.g. "
                            "http://gpu-server:8000.")
    elif connection.python and not os.path.isfile(connection.python):
        problems.append(f"The Python environment '{connection.python}' does not exist; fix it in Advanced.")
    return problems


def requirementProblems(connection: Connection, torchVersion=None, findSpec=importlib.util.find_spec,
                        hasPyTorchExtension=True) -> list:
    """Why a local job cannot run now, as sentences (empty: ready). Installs nothing.

    A remote server or a chosen Python environment brings its own packages; Slicer's Python needs torch
    (from the PyTorch extension, at least MINIMUM_TORCH) and WORKER_PACKAGES.
    """
    problems = connectionProblems(connection)
    if connection.remote or connection.python:
        return problems
    if torchVersion is None:
        if hasPyTorchExtension:
            problems.append("PyTorch is not installed in Slicer's Python (Advanced > Check / install Python "
                            "packages installs it through the PyTorch extension).")
        else:
            problems.append("PSCV Segment needs PyTorch: install the 'PyTorch' extension from the Extensions "
                            "Manager and restart Slicer, or choose a Python environment that has torch in Advanced.")
    else:
        problem = torchProblem(torchVersion)
        if problem:
            problems.append(problem)
    missing = missingPackages(findSpec)
    if missing:
        problems.append(f"Slicer's Python lacks the package(s) {', '.join(missing)} (Advanced > Check / install "
                        "Python packages installs them after asking).")
    return problems


def jobClient(connection: Connection, slicerPython=None, startupEnvironment=None, jobsDirectory=None):
    """The engine's JobClient for ``connection``: remote, or a local worker with the right Python and environment."""
    from .engine import JobClient

    if connection.remote:
        return JobClient(server_url=connection.serverUrl, token=connection.token or None, jobs_dir=jobsDirectory)
    python = connection.python or slicerPython
    if not python:
        raise RuntimeError("Slicer's Python (PythonSlicer) was not found; choose a Python environment in Advanced.")
    baseEnvironment = workerBaseEnvironment(python, slicerPython, startupEnvironment)
    return JobClient(python=python, jobs_dir=jobsDirectory, base_env=baseEnvironment)
