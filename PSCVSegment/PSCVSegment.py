"""PSCV Segment: segment organs from a few clicks in 3D Slicer.

Module / Widget / Logic / Test, kept thin: the Logic collects what Slicer holds (voxel array, matrices,
control points) and hands it to the engine (`pscv`, in this folder) as plain data. Training runs in a
separate process (`pscv worker`, local or on a `pscv serve` machine) through `pscv.client.JobClient`;
Slicer's own process never imports torch for training.
"""

import logging
import os
import shutil
import time
from typing import Annotated, Optional

import ctk
import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
SETTINGS_KEY = "PSCVSegment"
BACKGROUND_COLOR = (0.6, 0.6, 0.6)

# Python packages the background process needs (import name, pip name); torch comes from the PyTorch
# extension and SimpleITK is Slicer's own: neither is ever pip-installed here.
WORKER_PACKAGES = [("numpy", "numpy"), ("scipy", "scipy")]


#
# PSCVSegment
#


class PSCVSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "PSCV Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["PSCVSegment contributors"]
        self.parent.helpText = """
Segment organs from a few clicks: a 2D U-Net is trained on this volume from your points with the
point-supervised contrastive variance (PSCV) method, in a background process, then segments the whole volume.
<ol>
<li>Pick the <b>input volume</b>.</li>
<li><b>Add class</b>: the first class is the background, then one per organ. Rename and recolor them in the table.</li>
<li>For each class, click <b>Place</b> and click points on it in a few slices (one point per class per slice is enough;
put background points too).</li>
<li>Press <b>Segment</b>. The button turns into <b>Cancel</b> while the network trains; the progress bar
shows the time left.</li>
<li>The result is a new segmentation (one segment per organ), ready for the Segment Editor. Export it with
<b>Export .seg.nrrd</b> or, for a volume loaded from DICOM, <b>Export DICOM-SEG</b>.</li>
</ol>
In <b>Model</b>, save the trained model, apply it to the next volume, or fine-tune it with that volume's points.
<b>Advanced</b>: device (auto, CUDA, CPU), number of iterations, a remote pscv server, or an existing Python
environment with torch and CUDA.
"""
        self.parent.acknowledgementText = """
PSCV method: Qing En and Yuhong Guo, "Annotation by Clicks: A Point-Supervised Contrastive Variance Method for
Medical Semantic Segmentation", BMVC 2024 (arXiv:2212.08774). The engine's defaults follow the paper's ACDC
recipe; ACDC: O. Bernard et al., "Deep Learning Techniques for Automatic MRI Cardiac Multi-Structures
Segmentation and Diagnosis: Is the Problem Solved?", IEEE Transactions on Medical Imaging 37(11), 2018.
Built with the 3D Slicer scripted module template; background processing follows SlicerMONAIAuto3DSeg and
SlicerTotalSegmentator.
"""


#
# PSCVSegmentParameterNode
#


@parameterNodeWrapper
class PSCVSegmentParameterNode:
    """The module's state saved with the scene.

    inputVolume - the volume to segment.
    classPointLists - one point list per class, in table order: the first is the background (label 0);
        a class's name and color are its point list's name and color.
    outputSegmentation - where the result goes; None creates a new segmentation.
    modelDirectory - a model folder to apply or fine-tune.
    device, iterations - training settings (iterations 0: the engine's budget for the device).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    classPointLists: list[vtkMRMLMarkupsFiducialNode]
    outputSegmentation: vtkMRMLSegmentationNode
    modelDirectory: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    iterations: Annotated[int, WithinRange(0, 200000)] = 0


class PSCVConnection:
    """Where jobs run: a remote server (URL, token) or a local worker process (python executable)."""

    def __init__(self, serverUrl="", token="", python=""):
        self.serverUrl = (serverUrl or "").strip()
        self.token = (token or "").strip()
        self.python = (python or "").strip()

    @property
    def remote(self):
        return bool(self.serverUrl)


class SegmentsExistError(RuntimeError):
    """The chosen segmentation already has segments the result would replace; pass replaceExisting=True."""

    def __init__(self, segmentationNode, names):
        self.names = list(names)
        super().__init__(f"Segmentation '{segmentationNode.GetName()}' already has segment(s) "
                         f"{', '.join(self.names)}; they would be replaced.")


class PSCVSegmentTask:
    """A submitted job and what is needed to import its result."""

    def __init__(self, kind, job, workDirectory, volumeNode, classes, segmentationNode, replaceExisting):
        self.kind = kind
        self.job = job
        self.workDirectory = workDirectory
        self.volumeNode = volumeNode
        self.classes = classes
        self.segmentationNode = segmentationNode
        self.replaceExisting = replaceExisting
        self.events = []
        self.startTime = time.time()

    @property
    def running(self):
        """Queued or running (not yet done, failed or cancelled)."""
        from pscv.jobs.folder import FINAL_STATES

        return self.job.state not in FINAL_STATES

    def errorMessage(self):
        for event in reversed(self.events):
            if event.get("event") == "error":
                return event.get("message") or "unknown error"
        return getattr(self.job, "message", None) or f"the job ended with state '{self.job.state}'"


#
# PSCVSegmentWidget
#


class PSCVSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._observedPointLists = []
        self._updatingTable = False
        self._pollTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PSCVSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = PSCVSegmentLogic()

        self.ui.outputSegmentationSelector.noneDisplay = "Create new segmentation"
        header = self.ui.classesTable.horizontalHeader()
        header.setSectionResizeMode(0, qt.QHeaderView.Stretch)
        for column in (1, 2, 3):
            header.setSectionResizeMode(column, qt.QHeaderView.ResizeToContents)
        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.hide()

        # Connection settings belong to this computer, not to the scene: kept in application settings.
        # The token is kept in memory only.
        connection = self.logic.connectionFromSettings()
        self.ui.remoteCheckBox.checked = connection.remote
        self.ui.serverUrlLineEdit.text = connection.serverUrl or self.logic.savedServerUrl()
        self.ui.pythonPathLineEdit.currentPath = connection.python

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.addClassButton.connect("clicked(bool)", self.onAddClass)
        self.ui.removeClassButton.connect("clicked(bool)", self.onRemoveClass)
        self.ui.classesTable.connect("cellChanged(int,int)", self.onClassCellChanged)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.exportSegNrrdButton.connect("clicked(bool)", self.onExportSegNrrd)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.applyModelButton.connect("clicked(bool)", self.onApplyModel)
        self.ui.finetuneModelButton.connect("clicked(bool)", self.onFinetuneModel)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.remoteCheckBox.connect("toggled(bool)", self.onConnectionChanged)
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onConnectionChanged)
        self.ui.pythonPathLineEdit.connect("currentPathChanged(QString)", self.onConnectionChanged)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(500)
        self._pollTimer.connect("timeout()", self.onPollJob)

        self.initializeParameterNode()

    def cleanup(self):
        if self._pollTimer:
            self._pollTimer.stop()
        if self._task and self._task.running:
            self._task.job.cancel()
        self._task = None
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self._task and self._task.running:
            self._task.job.cancel()
        self.setParameterNode(None)
        self._setPointListObservers([])

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[PSCVSegmentParameterNode]):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # The .ui gives each connected widget a "SlicerParameterName" property.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelDirectory
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        self.updateClassesTable()
        self.updateButtons()

    # Classes table -----------------------------------------------------------------------------------

    def _classNodes(self):
        if not self._parameterNode:
            return []
        return [node for node in self._parameterNode.classPointLists if node is not None]

    def _setPointListObservers(self, nodes):
        for node in self._observedPointLists:
            for event in self.logic.POINT_LIST_EVENTS:
                self.removeObserver(node, event, self.onPointListModified)
        for node in nodes:
            for event in self.logic.POINT_LIST_EVENTS:
                self.addObserver(node, event, self.onPointListModified)
        self._observedPointLists = list(nodes)

    def updateClassesTable(self):
        nodes = self._classNodes()
        shown = [node.GetID() for node in self._observedPointLists]
        if [node.GetID() for node in nodes] != shown or self.ui.classesTable.rowCount != len(nodes):
            self._rebuildClassesTable(nodes)
        else:
            self.onPointListModified()

    def _rebuildClassesTable(self, nodes):
        table = self.ui.classesTable
        self._updatingTable = True
        try:
            self._setPointListObservers(nodes)
            table.setRowCount(0)
            table.setRowCount(len(nodes))
            for row, node in enumerate(nodes):
                table.setItem(row, 0, qt.QTableWidgetItem(node.GetName()))
                colorButton = ctk.ctkColorPickerButton()
                colorButton.displayColorName = False
                colorButton.color = qt.QColor.fromRgbF(*self.logic.pointListColor(node))
                colorButton.connect("colorChanged(QColor)",
                                    lambda color, n=node: self.logic.setPointListColor(
                                        n, (color.redF(), color.greenF(), color.blueF())))
                table.setCellWidget(row, 1, colorButton)
                countItem = qt.QTableWidgetItem(str(self.logic.definedPointCount(node)))
                countItem.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
                table.setItem(row, 2, countItem)
                placeWidget = slicer.qSlicerMarkupsPlaceWidget()
                placeWidget.setMRMLScene(slicer.mrmlScene)
                placeWidget.buttonsVisible = False
                placeWidget.placeButton().show()
                placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
                placeWidget.setCurrentNode(node)
                table.setCellWidget(row, 3, placeWidget)
        finally:
            self._updatingTable = False

    def onPointListModified(self, caller=None, event=None):
        table = self.ui.classesTable
        self._updatingTable = True
        try:
            for row, node in enumerate(self._classNodes()):
                if row >= table.rowCount:
                    break
                nameItem, countItem = table.item(row, 0), table.item(row, 2)
                if nameItem and nameItem.text() != node.GetName():
                    nameItem.setText(node.GetName())
                if countItem:
                    countItem.setText(str(self.logic.definedPointCount(node)))
        finally:
            self._updatingTable = False
        self.updateButtons()

    def onClassCellChanged(self, row, column):
        if self._updatingTable or column != 0:
            return
        nodes = self._classNodes()
        name = self.ui.classesTable.item(row, 0).text().strip()
        if row < len(nodes) and name and name != nodes[row].GetName():
            nodes[row].SetName(name)

    def onAddClass(self):
        with slicer.util.tryWithErrorDisplay("Could not add a class.", waitCursor=True):
            names = [node.GetName() for node in self._classNodes()]
            newNames = self.logic.newClassNames(names)
            for name in newNames:
                node = self.logic.addClassPointList(name, len(self._classNodes()))
                self._parameterNode.classPointLists.append(node)

    def onRemoveClass(self):
        nodes = self._classNodes()
        row = self.ui.classesTable.currentRow()
        if row < 0 or row >= len(nodes):
            slicer.util.warningDisplay("Select the class to remove in the table first.")
            return
        node = nodes[row]
        count = self.logic.definedPointCount(node)
        if count and not slicer.util.confirmOkCancelDisplay(
                f"Remove class '{node.GetName()}' and delete its {count} point(s)?"):
            return
        self._parameterNode.classPointLists.remove(node)
        slicer.mrmlScene.RemoveNode(node)

    # Buttons ------------------------------------------------------------------------------------------

    def updateButtons(self):
        p = self._parameterNode
        running = self._task is not None
        volume = p.inputVolume if p else None
        problems = self.logic.segmentProblems(volume, self._classNodes()) if p else ["No parameter node."]
        if running:
            self.ui.segmentButton.text = "Cancel"
            self.ui.segmentButton.toolTip = "Stop the running job."
            self.ui.segmentButton.enabled = True
        else:
            self.ui.segmentButton.text = "Segment"
            self.ui.segmentButton.toolTip = "\n".join(problems) or "Train on this volume's points and segment it."
            self.ui.segmentButton.enabled = not problems
        segmentation = p.outputSegmentation if p else None
        hasSegments = bool(segmentation and segmentation.GetSegmentation().GetNumberOfSegments())
        self.ui.exportSegNrrdButton.enabled = hasSegments and not running
        self.ui.exportDicomSegButton.enabled = (hasSegments and not running
                                                and self.logic.dicomInstanceUids(volume) is not None)
        modelDirectory = p.modelDirectory if p else ""
        hasModel = bool(modelDirectory) and os.path.isdir(modelDirectory)
        self.ui.saveModelButton.enabled = bool(self.logic.lastModelDirectory) and not running
        self.ui.applyModelButton.enabled = hasModel and volume is not None and not running
        self.ui.finetuneModelButton.enabled = hasModel and not problems and not running
        for widget in (self.ui.addClassButton, self.ui.removeClassButton, self.ui.installDependenciesButton):
            widget.enabled = not running

    def connection(self):
        remote = self.ui.remoteCheckBox.checked
        return PSCVConnection(
            serverUrl=self.ui.serverUrlLineEdit.text if remote else "",
            token=self.ui.serverTokenLineEdit.text if remote else "",
            python=self.ui.pythonPathLineEdit.currentPath,
        )

    def onConnectionChanged(self, *args):
        self.logic.saveConnectionSettings(self.connection(), self.ui.serverUrlLineEdit.text)

    def onModelPathChanged(self, path):
        if self._parameterNode and self._parameterNode.modelDirectory != path:
            self._parameterNode.modelDirectory = path

    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay("Could not set up the Python packages.", waitCursor=True):
            if self.logic.setupPythonRequirements(self.connection(), askConfirmation=True):
                slicer.util.infoDisplay("The Python packages needed by the background process are installed.")

    # Jobs ---------------------------------------------------------------------------------------------

    def onSegmentButton(self):
        if self._task:
            self.ui.statusLabel.text = "Cancelling..."
            self._task.job.cancel()
            return
        self._start("segment")

    def onApplyModel(self):
        self._start("predict")

    def onFinetuneModel(self):
        self._start("finetune")

    def _start(self, kind):
        p = self._parameterNode
        nodes = self._classNodes() if kind != "predict" else None
        started = False
        with slicer.util.tryWithErrorDisplay("Could not start the job.", waitCursor=True):
            connection = self.connection()
            if not self.logic.setupPythonRequirements(connection, askConfirmation=True):
                return
            classes = self.logic.classesFromPointLists(nodes) if nodes is not None else None
            replaceExisting = False
            if p.outputSegmentation and classes is not None:
                existing = self.logic.segmentsToReplace(p.outputSegmentation, classes)
                if existing:
                    if not slicer.util.confirmOkCancelDisplay(
                            f"Segmentation '{p.outputSegmentation.GetName()}' already has segment(s) "
                            f"{', '.join(existing)}. Replace them with the new result?"):
                        return
                    replaceExisting = True
            settings = self.logic.jobSettings(p.device, p.iterations if kind == "segment" else None)
            self._task = self.logic.startTask(
                kind, p.inputVolume, nodes, classes=classes, segmentationNode=p.outputSegmentation,
                settings=settings, connection=connection,
                modelDirectory=p.modelDirectory if kind != "segment" else None,
                replaceExisting=replaceExisting)
            started = True
        if not started:
            return
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = "Starting..."
        self._pollTimer.start()
        self.updateButtons()

    def onPollJob(self):
        task = self._task
        if task is None:
            self._pollTimer.stop()
            return
        try:
            events = self.logic.pollTask(task)
        except Exception as error:  # a lost connection to the server, a crashed worker
            logging.exception("PSCVSegment: polling the job failed")
            events = [{"event": "error", "message": str(error)}]
            task.events.extend(events)
            task.job.cancel()
        for event in events:
            fraction, text = self.logic.describeEvent(event)
            if fraction is not None:
                self.ui.progressBar.value = int(round(1000 * fraction))
            if text:
                self.ui.statusLabel.text = text
        if not task.running or any(e.get("event") == "error" for e in events):
            self._pollTimer.stop()
            self._finish()

    def _finish(self):
        task, self._task = self._task, None
        self.ui.progressBar.hide()
        try:
            with slicer.util.tryWithErrorDisplay("The job failed.", waitCursor=True):
                try:
                    segmentationNode = self.logic.finishTask(task)
                except SegmentsExistError as error:
                    if not slicer.util.confirmOkCancelDisplay(f"{error} Replace them?"):
                        self.ui.statusLabel.text = "Result not imported."
                        return
                    segmentationNode = self.logic.finishTask(task, replaceExisting=True)
                if segmentationNode is None:
                    self.ui.statusLabel.text = "Cancelled."
                    return
                self._parameterNode.outputSegmentation = segmentationNode
                minutes = (time.time() - task.startTime) / 60
                self.ui.statusLabel.text = f"Done in {minutes:.1f} min: '{segmentationNode.GetName()}'."
        finally:
            self.updateButtons()

    # Export and models --------------------------------------------------------------------------------

    def onExportSegNrrd(self):
        segmentationNode = self._parameterNode.outputSegmentation
        path = qt.QFileDialog.getSaveFileName(
            None, "Export segmentation", f"{segmentationNode.GetName()}.seg.nrrd",
            "Slicer segmentation (*.seg.nrrd)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            self.logic.exportSegNrrd(segmentationNode, path)
            self.ui.statusLabel.text = f"Saved {path}"

    def onExportDicomSeg(self):
        p = self._parameterNode
        path = qt.QFileDialog.getSaveFileName(
            None, "Export DICOM-SEG", f"{p.outputSegmentation.GetName()}.dcm", "DICOM (*.dcm)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("DICOM-SEG export failed.", waitCursor=True):
            if not self.logic.setupDicomSegRequirements(askConfirmation=True):
                return
            self.logic.exportDicomSeg(p.outputSegmentation, p.inputVolume, path)
            self.ui.statusLabel.text = f"Saved {path}"

    def onSaveModel(self):
        directory = qt.QFileDialog.getExistingDirectory(None, "Save the model into an empty folder")
        if not directory:
            return
        with slicer.util.tryWithErrorDisplay("Could not save the model.", waitCursor=True):
            saved = self.logic.saveLastModel(directory)
            self.ui.modelPathLineEdit.currentPath = saved
            self.ui.statusLabel.text = f"Model saved in {saved}"


#
# PSCVSegmentLogic
#


class PSCVSegmentLogic(ScriptedLoadableModuleLogic):
    """Usable without the GUI, from Slicer's Python console:

        logic = slicer.util.getModuleLogic("PSCVSegment")  # or PSCVSegmentLogic()
        segmentation = logic.segment(volumeNode, [backgroundPoints, liverPoints, kidneyPoints],
                                     settings={"device": "auto"})  # iterations: the device's budget

    Each point list is one class, named after it; the first is the background.
    """

    POINT_LIST_EVENTS = (
        vtkMRMLMarkupsFiducialNode.PointPositionDefinedEvent,
        vtkMRMLMarkupsFiducialNode.PointRemovedEvent,
        vtk.vtkCommand.ModifiedEvent,
    )

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastModelDirectory = None

    def getParameterNode(self):
        return PSCVSegmentParameterNode(super().getParameterNode())

    # Engine helpers (plain data, tested without Slicer) ----------------------------------------------

    @staticmethod
    def describeEvent(event):
        from pscv.slicer_inputs import describe_event

        return describe_event(event)

    @staticmethod
    def jobSettings(device="auto", iterations=None, **extra):
        from pscv.slicer_inputs import job_settings

        return job_settings(device, iterations, **extra)

    # Classes and point lists --------------------------------------------------------------------------

    @staticmethod
    def newClassNames(existingNames):
        from pscv.slicer_inputs import new_class_names

        return new_class_names(existingNames)

    def addClassPointList(self, name, value):
        """A new point list for the class with label `value` (0: background), colored like the engine colors it."""
        from pscv.data.classes import DEFAULT_COLORS

        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        color = BACKGROUND_COLOR if value == 0 else [c / 255 for c in DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)]]
        self.setPointListColor(node, color)
        return node

    @staticmethod
    def pointListColor(node):
        displayNode = node.GetDisplayNode()
        return tuple(displayNode.GetSelectedColor()) if displayNode else BACKGROUND_COLOR

    @staticmethod
    def setPointListColor(node, color):
        displayNode = node.GetDisplayNode()
        if displayNode:
            displayNode.SetSelectedColor(*color)
            displayNode.SetColor(*color)

    @staticmethod
    def definedPointCount(node):
        return sum(node.GetNthControlPointPositionStatus(i) == node.PositionDefined
                   for i in range(node.GetNumberOfControlPoints()))

    def classesFromPointLists(self, pointListNodes):
        """`pscv.classes.ClassInfo` list from the point lists in table order (names, colors, values 0, 1, ...)."""
        from pscv.slicer_inputs import classes_from_names

        return classes_from_names([node.GetName() for node in pointListNodes],
                                  [self.pointListColor(node) for node in pointListNodes])

    def segmentProblems(self, volumeNode, pointListNodes):
        """What keeps Segment from running, as sentences for a tooltip (empty when ready)."""
        problems = []
        if volumeNode is None:
            problems.append("Select an input volume.")
        if len(pointListNodes) < 2:
            problems.append("Add classes: the background and at least one organ.")
        empty = [node.GetName() for node in pointListNodes if not self.definedPointCount(node)]
        if empty:
            problems.append(f"Place points on: {', '.join(empty)}.")
        return problems

    @staticmethod
    def pointListData(node):
        """The defined control points of a point list as `pscv.viewer.PointList` (world RAS)."""
        from pscv.slicer_inputs import PointList

        positions, labels = [], []
        for index in range(node.GetNumberOfControlPoints()):
            if node.GetNthControlPointPositionStatus(index) != node.PositionDefined:
                continue
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(index, position)
            positions.append(position)
            labels.append(node.GetNthControlPointLabel(index))
        return PointList(node.GetName(), np.array(positions, dtype=float).reshape(-1, 3), labels)

    # Geometry: Slicer collects the matrices, pscv.geometry does the arithmetic ------------------------

    @staticmethod
    def ijkToRasMatrix(volumeNode):
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    @staticmethod
    def worldToVolumeMatrix(volumeNode):
        """Inverse of the volume's parent transform (world RAS -> volume RAS), or None if not transformed."""
        transformNode = volumeNode.GetParentTransformNode()
        if transformNode is None:
            return None
        if not transformNode.IsTransformToWorldLinear():
            raise ValueError(f"Volume '{volumeNode.GetName()}' is under a non-linear transform: harden the "
                             "transform (Transforms module) or remove it before segmenting.")
        matrix = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformFromWorld(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    def pointsToVoxels(self, volumeNode, pointListNode):
        """Voxel indices [k, j, i] of the defined points of a point list (the numpy array order)."""
        from pscv.data.geometry import world_to_kji

        data = self.pointListData(pointListNode)
        rasToIjk = np.linalg.inv(self.ijkToRasMatrix(volumeNode))
        return world_to_kji(data.world_ras, rasToIjk, self.worldToVolumeMatrix(volumeNode))

    # Jobs ---------------------------------------------------------------------------------------------

    def prepareJob(self, directory, volumeNode, pointListNodes=None, classes=None):
        """Write the job inputs for the worker into `directory`; returns the file arguments of JobClient.submit.

        image.nrrd: the volume's voxels with its own geometry; points.mrk.json: each point list's defined
        points, taken from world RAS through the inverse parent transform to voxels, written in the
        image's LPS; classes.json: names, colors and label values in table order.
        """
        from pscv.slicer_inputs import write_job_inputs

        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError("Select a scalar volume (CT or MRI) as input.")
        array = slicer.util.arrayFromVolume(volumeNode)
        if array.ndim != 3:
            raise ValueError(f"Volume '{volumeNode.GetName()}' is not a 3-D scalar image (array shape {array.shape}).")
        if pointListNodes is not None and classes is None:
            classes = self.classesFromPointLists(pointListNodes)
        pointLists = [self.pointListData(node) for node in pointListNodes] if pointListNodes is not None else None
        return write_job_inputs(directory, array, self.ijkToRasMatrix(volumeNode), classes, pointLists,
                                self.worldToVolumeMatrix(volumeNode))

    def jobClient(self, connection=None):
        """`pscv.client.JobClient` for a remote server or a local worker (Slicer's Python or the chosen one)."""
        from pscv.jobs.client import JobClient

        connection = connection or self.connectionFromSettings()
        if connection.remote:
            return JobClient(server_url=connection.serverUrl, token=connection.token or None)
        return JobClient(python=connection.python or self.slicerPython())

    @staticmethod
    def slicerPython():
        python = shutil.which("PythonSlicer")
        if not python:
            raise RuntimeError("Slicer's Python (PythonSlicer) was not found; choose a Python environment in "
                               "Advanced.")
        return python

    def startTask(self, kind, volumeNode, pointListNodes=None, classes=None, segmentationNode=None,
                  settings=None, connection=None, modelDirectory=None, replaceExisting=False):
        """Write the inputs and submit a job: kind "segment" (train on the points, segment the volume),
        "predict" (apply `modelDirectory`) or "finetune" (train `modelDirectory` further on the points)."""
        if kind not in ("segment", "predict", "finetune"):
            raise ValueError(f"Unknown job kind '{kind}'.")
        if kind != "segment" and not (modelDirectory and os.path.isdir(modelDirectory)):
            raise ValueError("Choose a model folder first (Model section).")
        if kind != "predict" and not pointListNodes:
            raise ValueError("Add classes and place points first.")
        if pointListNodes is not None and classes is None:
            classes = self.classesFromPointLists(pointListNodes)
        if segmentationNode is not None and classes is not None and not replaceExisting:
            existing = self.segmentsToReplace(segmentationNode, classes)
            if existing:
                raise SegmentsExistError(segmentationNode, existing)
        workDirectory = slicer.util.tempDirectory("PSCVSegment-")
        inputs = self.prepareJob(os.path.join(workDirectory, "inputs"), volumeNode,
                                 pointListNodes if kind != "predict" else None, classes)
        submit = dict(inputs, settings=settings or self.jobSettings())
        if kind != "segment":
            submit["model"] = modelDirectory
        job = self.jobClient(connection).submit(kind, **submit)
        shutil.rmtree(os.path.dirname(inputs["image"]), ignore_errors=True)  # the job has its own copies now
        logging.info(f"PSCVSegment: submitted a {kind} job for '{volumeNode.GetName()}' ({workDirectory})")
        return PSCVSegmentTask(kind, job, workDirectory, volumeNode, classes, segmentationNode, replaceExisting)

    @staticmethod
    def pollTask(task):
        events = task.job.poll()
        task.events.extend(events)
        return events

    def waitTask(self, task, timeout=None):
        """Wait for the job while keeping the application responsive; then import the result."""
        while task.running:
            for event in self.pollTask(task):
                if event.get("event") == "progress":
                    logging.info(f"PSCVSegment: {self.describeEvent(event)[1]}")
            if timeout is not None and time.time() - task.startTime > timeout:
                task.job.cancel()
                raise TimeoutError(f"The job did not finish within {timeout} s and was cancelled.")
            slicer.app.processEvents()
            time.sleep(0.2)
        self.pollTask(task)
        return self.finishTask(task)

    def finishTask(self, task, replaceExisting=None):
        """Import the result of a finished job: the segmentation node, or None if the job was cancelled."""
        state = task.job.state
        failed = any(event.get("event") == "error" for event in task.events)
        if state == "cancelled" and not failed:
            return None
        if state != "done" or failed:
            raise RuntimeError(f"The {task.kind} job failed: {task.errorMessage()}")
        if task.kind in ("segment", "finetune"):
            self.lastModelDirectory = task.job.download("model", os.path.join(task.workDirectory, "model"))
        resultPath = task.job.download("segmentation", os.path.join(task.workDirectory, "result.seg.nrrd"))
        replace = task.replaceExisting if replaceExisting is None else replaceExisting
        segmentationNode = self.loadResult(resultPath, task.volumeNode, task.segmentationNode, task.classes, replace)
        task.segmentationNode = segmentationNode
        try:
            task.job.delete()  # results are copied out; a failed job's folder stays, for its worker.log
        except Exception as error:
            logging.warning(f"PSCVSegment: could not delete the finished job: {error}")
        return segmentationNode

    def segment(self, volumeNode, pointListNodes, segmentationNode=None, classes=None, settings=None, wait=True,
                replaceExisting=False, connection=None, timeout=None):
        """Train on the points of `volumeNode` and segment it; returns the segmentation node (or the task if
        not `wait`: then poll it with `pollTask` and import with `finishTask`)."""
        task = self.startTask("segment", volumeNode, pointListNodes, classes, segmentationNode, settings,
                              connection, replaceExisting=replaceExisting)
        return self.waitTask(task, timeout) if wait else task

    def applyModel(self, modelDirectory, volumeNode, segmentationNode=None, settings=None, wait=True,
                   replaceExisting=False, connection=None, timeout=None):
        task = self.startTask("predict", volumeNode, None, None, segmentationNode, settings, connection,
                              modelDirectory, replaceExisting)
        return self.waitTask(task, timeout) if wait else task

    def finetuneModel(self, modelDirectory, volumeNode, pointListNodes, segmentationNode=None, classes=None,
                      settings=None, wait=True, replaceExisting=False, connection=None, timeout=None):
        task = self.startTask("finetune", volumeNode, pointListNodes, classes, segmentationNode, settings,
                              connection, modelDirectory, replaceExisting)
        return self.waitTask(task, timeout) if wait else task

    # Results ------------------------------------------------------------------------------------------

    @staticmethod
    def segmentNames(segmentationNode):
        segmentation = segmentationNode.GetSegmentation()
        return [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]

    def segmentsToReplace(self, segmentationNode, classesOrNames):
        from pscv.slicer_inputs import segments_to_replace

        return segments_to_replace(self.segmentNames(segmentationNode), classesOrNames)

    def loadResult(self, resultPath, volumeNode, segmentationNode=None, classes=None, replaceExisting=False):
        """Import a result `.seg.nrrd` into `segmentationNode` (a new one if None) on the volume's geometry.

        Segments keep the names in the file; colors come from `classes` (matched by name) when given. An
        existing segment with a result's name is replaced only with `replaceExisting`, else
        `SegmentsExistError` is raised. The segmentation gets the volume's reference geometry and parent
        transform and sits in the volume's subject-hierarchy study (as DICOM-SEG export needs).
        """
        resultNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "PSCV result (temporary)")
        try:
            resultNode.AddDefaultStorageNode()
            storageNode = resultNode.GetStorageNode()
            storageNode.SetFileName(str(resultPath))
            if not storageNode.ReadData(resultNode):
                raise RuntimeError(f"Could not read the result file {resultPath}.")
            # The result has the volume's own geometry: put it under the volume's transform, like the target.
            resultNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            source = resultNode.GetSegmentation()
            backgroundNames = {c.name.lower() for c in classes or [] if c.value == 0} | {"background"}
            segmentIds = [source.GetNthSegmentID(index) for index in range(source.GetNumberOfSegments())]
            segmentIds = [i for i in segmentIds if source.GetSegment(i).GetName().lower() not in backgroundNames]
            names = [source.GetSegment(i).GetName() for i in segmentIds]

            if segmentationNode is None:
                segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", f"{volumeNode.GetName()} segmentation")
                segmentationNode.CreateDefaultDisplayNodes()
            else:
                existing = self.segmentsToReplace(segmentationNode, names)
                if existing and not replaceExisting:
                    raise SegmentsExistError(segmentationNode, existing)
                target = segmentationNode.GetSegmentation()
                for name in existing:
                    target.RemoveSegment(target.GetSegmentIdBySegmentName(name))

            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            segmentationNode.SetNodeReferenceID(segmentationNode.GetReferenceImageGeometryReferenceRole(),
                                                volumeNode.GetID())
            segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            colors = {c.name.lower(): [v / 255 for v in c.color] for c in classes or []}
            target = segmentationNode.GetSegmentation()
            for segmentId, name in zip(segmentIds, names):
                color = colors.get(name.lower(), source.GetSegment(segmentId).GetColor())
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(resultNode, segmentId, volumeNode)
                newId = target.AddEmptySegment("", name, color)
                slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, newId, volumeNode)
        finally:
            slicer.mrmlScene.RemoveNode(resultNode)

        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        studyItem = shNode.GetItemParent(shNode.GetItemByDataNode(volumeNode))
        shNode.SetItemParent(shNode.GetItemByDataNode(segmentationNode), studyItem)
        return segmentationNode

    @staticmethod
    def dicomInstanceUids(volumeNode):
        """The SOP instance UIDs of the DICOM files a volume was loaded from, or None if not from DICOM."""
        if volumeNode is None:
            return None
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        return uids or None

    @staticmethod
    def exportSegNrrd(segmentationNode, path):
        if not slicer.util.saveNode(segmentationNode, path):
            raise RuntimeError(f"Could not write {path}.")

    def exportDicomSeg(self, segmentationNode, volumeNode, path):
        """DICOM-SEG through the engine's writer (highdicom), referencing the volume's DICOM series."""
        from pscv.data.dicom_seg import write_dicom_seg
        from pscv.data.geometry import volume_from_ijk_to_ras
        from pscv.slicer_inputs import classes_from_names

        uids = self.dicomInstanceUids(volumeNode)
        if not uids:
            raise ValueError(f"Volume '{volumeNode.GetName()}' was not loaded from DICOM.")
        referenceDirectory = slicer.util.tempDirectory("PSCVSegment-dicom-")
        for uid in uids:
            sourceFile = slicer.dicomDatabase.fileForInstance(uid)
            if not sourceFile or not os.path.exists(sourceFile):
                raise RuntimeError(f"The DICOM file of instance {uid} is not in the DICOM database any more.")
            shutil.copy(sourceFile, os.path.join(referenceDirectory, f"{uid}.dcm"))
        segmentation = segmentationNode.GetSegmentation()
        segmentIds = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        classes = classes_from_names(["background"] + [segmentation.GetSegment(i).GetName() for i in segmentIds],
                                     [None] + [segmentation.GetSegment(i).GetColor() for i in segmentIds])
        array = slicer.util.arrayFromVolume(volumeNode)
        labelmap = np.zeros(array.shape, dtype=np.uint16)
        for value, segmentId in enumerate(segmentIds, start=1):
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            labelmap[mask > 0] = value
        volume = volume_from_ijk_to_ras(array, self.ijkToRasMatrix(volumeNode))
        try:
            write_dicom_seg(path, labelmap, volume, classes, referenceDirectory)
        finally:
            shutil.rmtree(referenceDirectory, ignore_errors=True)

    def saveLastModel(self, directory):
        if not self.lastModelDirectory or not os.path.isdir(self.lastModelDirectory):
            raise RuntimeError("No model yet: run Segment or Fine-tune first.")
        target = directory
        if os.path.isdir(target) and os.listdir(target):
            target = os.path.join(directory, "pscv-model")
            if os.path.exists(target):
                raise RuntimeError(f"{directory} is not empty and already has a pscv-model folder; choose an "
                                   "empty folder.")
        shutil.copytree(self.lastModelDirectory, target, dirs_exist_ok=True)
        return target

    # Dependencies and connection settings -------------------------------------------------------------

    @staticmethod
    def connectionFromSettings():
        settings = qt.QSettings()
        remote = slicer.util.toBool(settings.value(f"{SETTINGS_KEY}/useRemoteServer", False))
        url = settings.value(f"{SETTINGS_KEY}/serverUrl", "") or ""
        python = settings.value(f"{SETTINGS_KEY}/python", "") or ""
        return PSCVConnection(serverUrl=url if remote else "", python=python)

    @staticmethod
    def savedServerUrl():
        return qt.QSettings().value(f"{SETTINGS_KEY}/serverUrl", "") or ""

    @staticmethod
    def saveConnectionSettings(connection, serverUrl):
        settings = qt.QSettings()
        settings.setValue(f"{SETTINGS_KEY}/useRemoteServer", connection.remote)
        settings.setValue(f"{SETTINGS_KEY}/serverUrl", serverUrl or "")
        settings.setValue(f"{SETTINGS_KEY}/python", connection.python)

    @staticmethod
    def missingWorkerPackages():
        import importlib.util

        return [pipName for moduleName, pipName in WORKER_PACKAGES if importlib.util.find_spec(moduleName) is None]

    def setupPythonRequirements(self, connection=None, askConfirmation=True):
        """Make sure the background process can run; returns False if the user declined an installation.

        A remote server or a user-chosen Python environment brings its own packages. For Slicer's Python:
        torch through the PyTorch extension (PyTorchUtils), the other packages with pip after asking.
        Slicer's SimpleITK is never replaced. Torch is looked up without importing it into Slicer.
        """
        import importlib.util

        connection = connection or self.connectionFromSettings()
        if connection.remote:
            return True
        if connection.python:
            if not os.path.isfile(connection.python):
                raise ValueError(f"The Python environment '{connection.python}' does not exist; fix it in Advanced.")
            return True
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(
                    "PSCV Segment needs PyTorch: install the 'PyTorch' extension from the Extensions Manager and "
                    "restart Slicer, or choose a Python environment that has torch in Advanced.") from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=">=2.2") is None:
                    return False
        missing = self.missingWorkerPackages()
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    f"PSCV Segment needs these Python packages in Slicer's Python: {', '.join(missing)}. "
                    "Install them now with pip? This needs a network connection and may take a minute.",
                    "PSCV Segment: install Python packages"):
                return False
            slicer.util.pip_install(" ".join(missing))
            missing = self.missingWorkerPackages()
            if missing:
                raise RuntimeError(f"Installing {', '.join(missing)} failed; see the Python console for pip's output.")
        return True

    @staticmethod
    def setupDicomSegRequirements(askConfirmation=True):
        """highdicom, in a version that works with Slicer's own pydicom (pydicom itself is not upgraded)."""
        import importlib.metadata
        import importlib.util

        from pscv.slicer_inputs import highdicom_requirement

        if importlib.util.find_spec("highdicom") is not None:
            return True
        try:
            pydicomVersion = importlib.metadata.version("pydicom")
        except importlib.metadata.PackageNotFoundError:
            pydicomVersion = None
        requirement = highdicom_requirement(pydicomVersion)
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                f"DICOM-SEG export needs the Python package {requirement}. Install it now with pip?",
                "PSCV Segment: install highdicom"):
            return False
        slicer.util.pip_install(requirement)
        return importlib.util.find_spec("highdicom") is not None


#
# PSCVSegmentTest
#


class PSCVSegmentTest(ScriptedLoadableModuleTest):
    """Run from Slicer: Developer mode, then "Reload and Test" in this module, or
    `Slicer --testing --python-code "import PSCVSegment; PSCVSegment.PSCVSegmentTest().runTest()"`."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_points_land_on_voxels_under_a_transform()
        self.setUp()
        self.test_segment_two_organs()

    @staticmethod
    def _syntheticVolume(ijkToRas):
        """24 x 48 x 48 voxels [k, j, i]: noise, a bright ball (organ 1) and a brighter box (organ 2)."""
        rng = np.random.default_rng(0)
        k, j, i = np.mgrid[0:24, 0:48, 0:48]
        labels = np.zeros(k.shape, dtype=np.uint8)
        labels[(k - 12) ** 2 + (j - 16) ** 2 + (i - 16) ** 2 <= 8 ** 2] = 1
        labels[4:20, 26:40, 24:42] = 2
        image = rng.normal(0, 10, size=k.shape) + np.choose(labels, [0, 100, 200])
        volumeNode = slicer.util.addVolumeFromArray(image.astype(np.int16), ijkToRas, "PSCV synthetic")
        return volumeNode, labels

    @staticmethod
    def _pointList(name, kjiPoints, ijkToRas, localToWorld=None):
        from pscv.data.geometry import kji_to_world

        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        for position in kji_to_world(kjiPoints, ijkToRas, localToWorld):
            node.AddControlPointWorld(vtk.vtkVector3d(*position))
        return node

    def test_points_land_on_voxels_under_a_transform(self):
        from pscv.data.classes import read_classes
        from pscv.data.clicks import read_clicks
        from pscv.data.volumes import read_image

        self.delayDisplay("Points on an oblique, transformed volume")
        logic = PSCVSegmentLogic()
        angle = np.radians(25)
        ijkToRas = np.array([[0.0, -1.2 * np.sin(angle), 1.2 * np.cos(angle), 5.0],
                             [-0.9, 0.0, 0.0, -12.0],
                             [0.0, 1.2 * np.cos(angle), 1.2 * np.sin(angle), 30.0],
                             [0.0, 0.0, 0.0, 1.0]])
        volumeNode, labels = self._syntheticVolume(ijkToRas)
        localToWorld = np.array([[0.0, -1.0, 0.0, 10.0], [1.0, 0.0, 0.0, -4.0], [0.0, 0.0, 1.0, 2.5],
                                 [0.0, 0.0, 0.0, 1.0]])
        transformNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        transformNode.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(localToWorld))
        volumeNode.SetAndObserveTransformNodeID(transformNode.GetID())

        expected = {"background": [[2, 2, 2], [20, 45, 3]], "ball": [[12, 16, 16], [10, 15, 19]],
                    "box": [[5, 27, 25], [19, 39, 41]]}
        nodes = [self._pointList(name, kji, ijkToRas, localToWorld) for name, kji in expected.items()]
        for node, kji in zip(nodes, expected.values()):
            np.testing.assert_array_equal(logic.pointsToVoxels(volumeNode, node), kji)

        # The same voxels the script repository's way, with Slicer's own transform classes only.
        worldToVolume = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volumeNode.GetParentTransformNode(), worldToVolume)
        rasToIjk = vtk.vtkMatrix4x4()
        volumeNode.GetRASToIJKMatrix(rasToIjk)
        for node, kji in zip(nodes, expected.values()):
            for index, voxel in enumerate(kji):
                world = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(index, world)
                ijk = rasToIjk.MultiplyPoint(list(worldToVolume.TransformPoint(world)) + [1.0])
                self.assertEqual([int(round(c)) for c in ijk[:3]][::-1], voxel)

        directory = slicer.util.tempDirectory("PSCVSegmentTest-")
        inputs = logic.prepareJob(directory, volumeNode, nodes)
        volume = read_image(inputs["image"])
        classes = read_classes(inputs["classes"])
        clicks = read_clicks(inputs["points"], volume, classes)
        for info, kji in zip(classes, expected.values()):
            np.testing.assert_array_equal(clicks.kji[clicks.values == info.value], kji)
            self.assertTrue(all(labels[tuple(p)] == info.value for p in kji))
        np.testing.assert_array_equal(volume.array, slicer.util.arrayFromVolume(volumeNode))
        shutil.rmtree(directory, ignore_errors=True)
        self.delayDisplay("Points land on the right voxels")

    def test_segment_two_organs(self):
        self.delayDisplay("Segment a synthetic volume with two organs (short training)")
        logic = PSCVSegmentLogic()
        if not logic.setupPythonRequirements(askConfirmation=False):
            self.skipTest("Python packages for the background process are not installed")
        ijkToRas = np.diag([-1.0, -1.0, 2.0, 1.0])
        volumeNode, labels = self._syntheticVolume(ijkToRas)
        rng = np.random.default_rng(1)
        nodes = []
        for value, name in enumerate(["background", "ball", "box"]):
            points = []
            for k in range(1, 23, 2):  # three points per class on every other slice where the class is
                rows, cols = np.nonzero(labels[k] == value)
                for pick in rng.choice(len(rows), size=min(3, len(rows)), replace=False) if len(rows) else []:
                    points.append([k, rows[pick], cols[pick]])
            nodes.append(self._pointList(name, points, ijkToRas))
        settings = logic.jobSettings("auto", 300, image_size=64, batch_size=4)
        segmentationNode = logic.segment(volumeNode, nodes, settings=settings, timeout=1800)
        self.assertIsNotNone(segmentationNode)
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(sorted(logic.segmentNames(segmentationNode)), ["ball", "box"])
        for value, name in ((1, "ball"), (2, "box")):
            segmentId = segmentation.GetSegmentIdBySegmentName(name)
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode) > 0
            truth = labels == value
            dice = 2 * np.sum(mask & truth) / max(1, mask.sum() + truth.sum())
            self.delayDisplay(f"Dice of {name}: {dice:.3f}")
            # The engine alone, same data and settings, on a CPU: 0.77 (ball) and 0.91 (box). A wrong
            # geometry (flipped axes, transform, misplaced clicks) gives about 0.
            self.assertGreater(dice, 0.6)
        self.assertIsNotNone(logic.lastModelDirectory)
        self.delayDisplay("Segmentation test passed")
