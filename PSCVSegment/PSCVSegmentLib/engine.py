"""The engine (``pscv``) as the module uses it: every engine name the module needs, imported here only.

The engine ships inside this module's folder (``<module folder>/pscv``), which 3D Slicer puts on
``sys.path`` together with the folders of every other scripted module. Another extension, or a ``pip install
pscv`` into Slicer's Python, could therefore provide a different ``pscv`` that Python finds first. Job
folders, settings and results must come from the engine this module was built with, so importing this file
checks where ``pscv`` came from and refuses another one with a message that names both places.
"""

from __future__ import annotations

from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]


class EngineClashError(ImportError):
    """The ``pscv`` that Python imported is not the one shipped in this module's folder."""


def check_engine_location(package_file, module_dir=MODULE_DIR) -> Path:
    """The folder of the imported ``pscv`` package; EngineClashError unless it lies inside ``module_dir``."""
    package_dir = Path(package_file).resolve().parent
    module_dir = Path(module_dir).resolve()
    if module_dir not in package_dir.parents:
        raise EngineClashError(
            f"PSCV Segment: Python imported the package 'pscv' from {package_dir}, but this module needs its own "
            f"engine, {module_dir / 'pscv'}. Another extension or a 'pip install pscv' in Slicer's Python provides "
            "a package of the same name: uninstall it (slicer.util.pip_uninstall('pscv')) or remove that "
            "extension, then restart Slicer.")
    return package_dir


import pscv  # noqa: E402

ENGINE_DIR = check_engine_location(pscv.__file__)

# The engine's public names the module uses. When the engine's layout changes, only this block changes.
from pscv import PSCVError, __version__  # noqa: E402,F401
from pscv.data.classes import DEFAULT_COLORS, ClassInfo, parse_classes, read_classes, write_classes  # noqa: E402,F401
from pscv.data.dataset import read_dataset  # noqa: E402,F401
from pscv.data.dicom_seg import write_dicom_seg  # noqa: E402,F401
from pscv.data.geometry import kji_to_world, volume_from_ijk_to_ras, world_to_kji  # noqa: E402,F401
from pscv.data.segmentations import DEFAULT_TERMINOLOGY  # noqa: E402,F401
from pscv.data.volumes import read_image  # noqa: E402,F401
from pscv.jobs.client import JobClient, ServiceUnreachable  # noqa: E402,F401
from pscv.jobs.folder import DEFAULT_OUTPUTS, FINAL_STATES, KINDS, LOG_FILE, OPTIONAL_INPUTS  # noqa: E402,F401
from pscv.slicer_inputs import (  # noqa: E402,F401
    DEVICES,
    PointList,
    classes_from_names,
    describe_event,
    format_duration,
    highdicom_requirement,
    job_settings,
    new_class_names,
    segments_to_replace,
    write_job_inputs,
)

RELOADED_PACKAGES = ("PSCVSegmentLib", "pscv")


def modulesToReload(moduleNames) -> list:
    """The loaded modules of this layer and of the engine, for the module's Reload (Developer mode) to drop
    from ``sys.modules`` so that editing them takes effect without restarting Slicer."""
    return [name for name in moduleNames
            if name in RELOADED_PACKAGES or name.startswith(tuple(f"{package}." for package in RELOADED_PACKAGES))]
