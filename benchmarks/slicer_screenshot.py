"""Render the catalog screenshot (Resources/Screenshots/PSCVSegment-sample.png) from a real run of the
module's own code path, without the Slicer GUI (3D Slicer cannot run here):

the ACDC sample is loaded as the module's "Load sample data" loads it (PSCVSegmentLib.sampledata into a
slicer-core scene), segmented by a local ``pscv worker`` through PSCVSegmentLib.tasks (the module's job
path), imported into a segmentation node (PSCVSegmentLib.results), made into closed surfaces by Slicer's
own conversion (Show 3D), and drawn with matplotlib: slices with the clicks and the segments, the
surfaces, and the Dice against the shipped label map. The caption says what it is: not a picture of
Slicer's window.

    .venv/bin/python benchmarks/slicer_screenshot.py [--device cpu|cuda|auto] [--out PATH]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "PSCVSegment"
sys.path.insert(0, str(MODULE_DIR))
sys.path.insert(0, str(ROOT / "Testing"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(ROOT / "Resources" / "Screenshots" / "PSCVSegment-sample.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import vtk
    from slicer_scene import SlicerScene
    from vtk.util import numpy_support

    from pscv.data import geometry
    from pscv.data.volumes import read_image
    from PSCVSegmentLib import engine, environment, export, pointlists, results, sampledata, tasks, volumes

    files = sampledata.sampleFiles(MODULE_DIR)
    app = SlicerScene()
    image = read_image(files["image"])
    ijk_to_ras = geometry.ijk_to_ras_matrix(image.spacing, image.origin, image.direction)
    volume = app.addVolume(image.array, ijk_to_ras, sampledata.VOLUME_NODE_NAME, study="ACDC")
    nodes = sampledata.loadSample(app.scene, volume, files["points"], files["classes"])

    root = Path(tempfile.mkdtemp(prefix="pscv-screenshot-"))
    work = tasks.newWorkDirectory(root, "segment")
    submit = dict(volumes.writeJobInputs(os.path.join(work, "inputs"), volume, nodes),
                  settings=engine.job_settings(args.device))
    client = environment.jobClient(environment.Connection(python=sys.executable), startupEnvironment=dict(os.environ),
                                   jobsDirectory=root / tasks.JOBS_FOLDER)
    task = tasks.Task("segment", client, submit, work, scene=app.scene, volumeNode=volume,
                      classes=pointlists.classesFromPointLists(nodes), description="screenshot").start()
    started = time.time()
    while task.state not in (tasks.READY,) + tasks.ENDED:
        task.poll()
        time.sleep(0.5)
    device = next((e.get("device") for e in reversed(task.events) if e.get("device")), args.device)
    if task.state != tasks.READY:
        sys.exit(f"the job {task.state}: {task.message}\n{task.logText()}")
    segmentation = task.finish()
    seconds = time.time() - started
    results.show3D(segmentation)

    label_file = ROOT / "Testing" / "Data" / "acdc" / "patient002_frame01_label.nrrd"
    truth = read_image(label_file).array if label_file.is_file() else None
    names = results.segmentNames(segmentation)
    masks = {name: export.segmentMask(app.scene, segmentation,
                                      segmentation.GetSegmentation().GetSegmentIdBySegmentName(name), volume)
             for name in names}
    colors = {name: segmentation.GetSegmentation().GetSegment(
        segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)).GetColor() for name in names}
    dice = {}
    if truth is not None:
        for value, name in enumerate(names, start=1):
            t = truth == value
            dice[name] = 2 * np.sum(masks[name] & t) / max(1, masks[name].sum() + t.sum())

    figure = plt.figure(figsize=(12, 4.6), dpi=100)
    slices = [3, 5, 7]
    lo, hi = np.percentile(image.array, [0.5, 99.5])
    clicks = {node.GetName(): pointlists.pointsToVoxels(volume, node) for node in nodes}
    point_colors = {node.GetName(): pointlists.pointListColor(node) for node in nodes}
    for column, k in enumerate(slices):
        axis = figure.add_axes([0.005 + column * 0.2, 0.1, 0.195, 0.78])
        axis.imshow(np.clip((image.array[k] - lo) / (hi - lo), 0, 1), cmap="gray")
        overlay = np.zeros(image.array[k].shape + (4,))
        for name in names:
            overlay[masks[name][k]] = (*colors[name], 0.45)
        axis.imshow(overlay)
        for name in names:
            axis.contour(masks[name][k], levels=[0.5], colors=[colors[name]], linewidths=1.2)
        for name, kji in clicks.items():
            on_slice = kji[kji[:, 0] == k]
            axis.plot(on_slice[:, 2], on_slice[:, 1], "o", ms=6, mfc=point_colors[name], mec="white", mew=1)
        axis.set_title(f"slice {k}", fontsize=10)
        axis.axis("off")
    axis3d = figure.add_axes([0.61, 0.06, 0.38, 0.86], projection="3d")
    everything = []
    for name in names:
        surface = vtk.vtkPolyData()
        segmentation.GetClosedSurfaceRepresentation(segmentation.GetSegmentation().GetSegmentIdBySegmentName(name),
                                                    surface)
        if not surface.GetNumberOfPoints():
            continue
        points = numpy_support.vtk_to_numpy(surface.GetPoints().GetData())
        polys = numpy_support.vtk_to_numpy(surface.GetPolys().GetData()).reshape(-1, 4)[:, 1:]
        axis3d.plot_trisurf(points[:, 0], points[:, 1], points[:, 2], triangles=polys, color=colors[name],
                            linewidth=0, alpha=0.9, shade=True)
        everything.append(points)
    if everything:
        axis3d.set_box_aspect(np.ptp(np.vstack(everything), axis=0))
    axis3d.view_init(elev=25, azim=-60)
    axis3d.axis("off")
    scores = ", ".join(f"{name} {dice[name]:.2f}" for name in names) if dice else ""
    figure.suptitle(
        f"PSCV Segment on the ACDC sample: {sum(len(v) for v in clicks.values())} clicks "
        f"({', '.join(f'{n} {len(v)}' for n, v in clicks.items())}) -> segments in {seconds:.0f} s on {device}"
        f" ({os.cpu_count()} cores, load {os.getloadavg()[0]:.0f})"
        + (f"; Dice {scores}" if scores else ""), fontsize=10)
    figure.text(0.5, 0.015, "Rendered with matplotlib from a real run of the module's job and MRML code "
                "(PSCVSegmentLib on slicer-core); not a picture of 3D Slicer's window.", ha="center", fontsize=8,
                color="0.35")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out)
    print(f"wrote {args.out} ({seconds:.0f} s on {device}; Dice {scores})")


if __name__ == "__main__":
    main()
