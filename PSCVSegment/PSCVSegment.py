"""PSCV Segment: segment organs from a few clicks in 3D Slicer.

Module / Widget / Logic / Test, kept thin: the widget is Qt (table, buttons, timers, dialogs, shortcuts);
everything done to MRML nodes and to the background jobs is in the Qt-free layer ``PSCVSegmentLib``
(tested with slicer-core's real MRML classes), which uses the engine (``pscv``, in this folder) through
its public functions only. Training runs in a separate process (``pscv worker``, local, or on a ``pscv
serve`` machine); Slicer's own process never imports torch.
"""

import logging
import os
import shutil
import sys
import time
import unittest
from typing import Annotated, Optional

import ctk
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

from PSCVSegmentLib import (
    cohort,
    engine,
    environment,
    export,
    pointlists,
    results,
    sampledata,
    tasks,
    terminology,
)

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
SETTINGS_KEY = "PSCVSegment"
CLASS_SHORTCUTS = 9  # keys 1..9 select class row 1..9 and start placing its points

# Names other code may use (README's console example, scripts written for earlier versions).
SegmentsExistError = results.SegmentsExistError
PSCVConnection = environment.Connection


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
Segment organs from a few clicks: in a background process your points spread through the whole volume (a random
walker in the region around the organ points); a cohort of clicked volumes trains a 2D U-Net from the points alone
(point-supervised losses), which then segments the next volume.
<ol>
<li>Pick the <b>input volume</b> (or <b>Load sample data</b>).</li>
<li><b>Add class</b>: the first class is the background, then one per organ. Rename and recolor them in the table.</li>
<li>For each class, click <b>Place</b> (or press its number key, 1 for the first row) and click points on it in a
few slices (one point per class per slice is enough; put background points too).</li>
<li>Press <b>Segment</b>. The button turns into <b>Cancel</b> while the network trains; the progress bar
shows the time left, the <b>Log</b> what the worker reports.</li>
<li>The result is a new segmentation (one segment per organ), ready for the Segment Editor. Export it with
<b>Export .seg.nrrd</b> or, for a volume loaded from DICOM, <b>Export DICOM-SEG</b>; <b>Show 3D</b> shows surfaces.</li>
</ol>
In <b>Cohort</b>, collect volumes with their points in a dataset folder and train one model on them (on each
slice you click, click the background and every organ the slice shows: an organ without a point there is
learnt as absent from it); in
<b>Model</b>, save a trained model, apply it to the next volume, or fine-tune it with that volume's points.
<b>Advanced</b>: device (auto, CUDA, CPU), number of iterations, a remote pscv server, or an existing Python
environment with torch and CUDA.
"""
        self.parent.acknowledgementText = """
PSCV method: Qing En and Yuhong Guo, "Annotation by Clicks: A Point-Supervised Contrastive Variance Method for
Medical Semantic Segmentation", BMVC 2024 (arXiv:2212.08774); its loss is the engine's method pscv, and the
default recipe is the one measured best on ACDC and a second cardiac cohort (the project's BENCHMARKS.md).
ACDC: O. Bernard et al., "Deep Learning Techniques for Automatic MRI Cardiac Multi-Structures
Segmentation and Diagnosis: Is the Problem Solved?", IEEE Transactions on Medical Imaging 37(11), 2018.
Built with the 3D Slicer scripted module template; background processing follows SlicerMONAIAuto3DSeg and
SlicerTotalSegmentator.
"""
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The ACDC sample in the Sample Data module (category "PSCV Segment"): its button loads the volume and its
    class points and opens this module, ready to Segment."""
    try:
        import SampleData
    except ImportError:  # the Sample Data module is disabled: "Load sample data" in this module still works
        return
    problems = sampledata.sampleProblems(MODULE_DIR)
    if problems:
        logging.warning(f"PSCV Segment: the sample data is not registered: {'; '.join(problems)}")
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        **sampledata.registrationArguments(MODULE_DIR, customDownloader=downloadSample))


def downloadSample(source=None):
    """SampleData's button (customDownloader): fetch the sample through SampleData's cache (file: URIs), then
    load it into this module."""
    import SampleData

    if source is None:
        source = SampleData.SampleDataLogic().sourceForSampleName(sampledata.SAMPLE_NAME)
    sampleLogic = SampleData.SampleDataLogic()
    paths = [sampleLogic.downloadFileIntoCache(uri, name, checksum)
             for uri, name, checksum in zip(source.uris, source.fileNames, source.checksums)]
    slicer.util.selectModule("PSCVSegment")
    slicer.modules.PSCVSegmentWidget.loadSample(*paths)


#
# PSCVSegmentParameterNode
#


@parameterNodeWrapper
class PSCVSegmentParameterNode:
    """The module's state saved with the scene.

    inputVolume - the volume to segment.
    classPointLists - one point list per class, in table order: the first is the background (label 0);
        a class's name and color are its point list's name and color, its terminology an attribute.
    outputSegmentation - where the result goes; None creates a new segmentation.
    modelDirectory - a model folder to apply or fine-tune.
    datasetDirectory - the cohort's dataset folder.
    device, iterations - training settings (iterations 0: the engine's budget for the device).
    strokesSegmentation - painted segments (named after the classes) that count as clicks; None: none.
    suggestCount - how many places to suggest clicking next (0: none).
    keepModel - also train a network on the result; segmenting the same volume again refines it.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    classPointLists: list[vtkMRMLMarkupsFiducialNode]
    outputSegmentation: vtkMRMLSegmentationNode
    modelDirectory: str = ""
    datasetDirectory: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    iterations: Annotated[int, WithinRange(0, 200000)] = 0
    strokesSegmentation: vtkMRMLSegmentationNode
    suggestCount: Annotated[int, WithinRange(0, 100)] = 0
    keepModel: bool = False


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
        self._observedSegmentation = None
        self._updatingTable = False
        self._pollTimer = None
        self._shortcuts = []
        self._shownLog = None
        self._datasetSummary = None
        # The self-test replaces these, so that it never depends on this computer's settings or on a person.
        self.connectionOverride = None
        self.confirm = lambda text: slicer.util.confirmOkCancelDisplay(text, "PSCV Segment")
        self.askSavePath = lambda title, name, filters: qt.QFileDialog.getSaveFileName(None, title, name, filters)
        self.askDirectory = lambda title: qt.QFileDialog.getExistingDirectory(None, title)

    def onReload(self):
        """Reload the engine and PSCVSegmentLib too (Developer mode), not only this file."""
        for name in engine.modulesToReload(list(sys.modules)):
            del sys.modules[name]
        super().onReload()

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
        self.ui.logTextEdit.setMaximumBlockCount(5000)

        # Connection settings belong to this computer, not to the scene: kept in application settings.
        # The token is kept in memory only.
        connection = self.logic.connectionFromSettings()
        self.ui.remoteCheckBox.checked = connection.remote
        self.ui.serverUrlLineEdit.text = connection.serverUrl or self.logic.savedServerUrl()
        self.ui.pythonPathLineEdit.currentPath = connection.python

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.addClassButton.connect("clicked(bool)", self.onAddClass)
        self.ui.removeClassButton.connect("clicked(bool)", self.onRemoveClass)
        self.ui.terminologyButton.connect("clicked(bool)", self.onTerminology)
        self.ui.classesTable.connect("cellChanged(int,int)", self.onClassCellChanged)
        self.ui.classesTable.connect("itemSelectionChanged()", self.updateButtons)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.exportSegNrrdButton.connect("clicked(bool)", self.onExportSegNrrd)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.show3DButton.connect("toggled(bool)", self.onShow3D)
        self.ui.openLogFolderButton.connect("clicked(bool)", self.onOpenLogFolder)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.trainModelButton.connect("clicked(bool)", self.onTrainModel)
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", self.onDatasetPathChanged)
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

        mainWindow = slicer.util.mainWindow()
        for number in range(1, CLASS_SHORTCUTS + 1):
            shortcut = qt.QShortcut(qt.QKeySequence(str(number)), mainWindow or self.parent)
            shortcut.setEnabled(False)
            shortcut.connect("activated()", lambda row=number - 1: self.selectClass(row, place=True))
            self._shortcuts.append(shortcut)

        self.initializeParameterNode()

    def cleanup(self):
        if self._pollTimer:
            self._pollTimer.stop()
        if self._task is not None and not self._task.ended:
            self._task.cancel()
        self._task = None
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)
            shortcut.setParent(None)
        self._shortcuts = []
        if self.logic:
            self.logic.cleanup()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        for shortcut in self._shortcuts:
            shortcut.setEnabled(True)

    def exit(self):
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        # A running job is cancelled by its task (it watches the scene): its result is never imported elsewhere.
        self.setParameterNode(None)
        self._setPointListObservers([])
        self._observeSegmentation(None)

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
            self.ui.datasetPathLineEdit.currentPath = self._parameterNode.datasetDirectory
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        self._observeSegmentation(self._parameterNode.outputSegmentation if self._parameterNode else None)
        self.updateDatasetStatus()
        self.updateClassesTable()
        self.updateButtons()

    def _observeSegmentation(self, node):
        """Keep the export and Show 3D buttons in step with the output segmentation's segments."""
        if node is self._observedSegmentation:
            return
        for event in results.segmentationEvents():
            if self._observedSegmentation is not None:
                self.removeObserver(self._observedSegmentation, event, self.onSegmentationModified)
            if node is not None:
                self.addObserver(node, event, self.onSegmentationModified)
        self._observedSegmentation = node

    def onSegmentationModified(self, caller=None, event=None):
        self.updateButtons()

    # Classes table -----------------------------------------------------------------------------------

    def _classNodes(self):
        if not self._parameterNode:
            return []
        return [node for node in self._parameterNode.classPointLists if node is not None]

    def _setPointListObservers(self, nodes):
        for node in self._observedPointLists:
            for event in pointlists.pointListEvents():
                self.removeObserver(node, event, self.onPointListModified)
        for node in nodes:
            for event in pointlists.pointListEvents():
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
                colorButton.color = qt.QColor.fromRgbF(*pointlists.pointListColor(node))
                colorButton.connect("colorChanged(QColor)",
                                    lambda color, n=node: pointlists.setPointListColor(
                                        n, (color.redF(), color.greenF(), color.blueF())))
                table.setCellWidget(row, 1, colorButton)
                countItem = qt.QTableWidgetItem(str(pointlists.definedPointCount(node)))
                countItem.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
                table.setItem(row, 2, countItem)
                placeWidget = slicer.qSlicerMarkupsPlaceWidget()
                placeWidget.setMRMLScene(slicer.mrmlScene)
                placeWidget.buttonsVisible = False
                placeWidget.placeButton().show()
                placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
                placeWidget.setCurrentNode(node)
                table.setCellWidget(row, 3, placeWidget)
            self._refreshRows(nodes)
        finally:
            self._updatingTable = False

    def _refreshRows(self, nodes):
        """Names, counts, colours and terminology tooltips from the point lists (edited here or elsewhere)."""
        table = self.ui.classesTable
        for row, node in enumerate(nodes):
            if row >= table.rowCount:
                break
            nameItem, countItem = table.item(row, 0), table.item(row, 2)
            if nameItem:
                if nameItem.text() != node.GetName():
                    nameItem.setText(node.GetName())
                described = terminology.describe(pointlists.classTerminology(node))
                key = f"key {row + 1}: place points" if row < CLASS_SHORTCUTS else ""
                nameItem.setToolTip("; ".join(t for t in (f"terminology: {described}" if described else "", key) if t))
            if countItem:
                countItem.setText(str(pointlists.definedPointCount(node)))
            colorButton = table.cellWidget(row, 1)
            color = qt.QColor.fromRgbF(*pointlists.pointListColor(node))
            if colorButton is not None and colorButton.color.name() != color.name():
                wasBlocked = colorButton.blockSignals(True)
                colorButton.color = color
                colorButton.blockSignals(wasBlocked)

    def onPointListModified(self, caller=None, event=None):
        self._updatingTable = True
        try:
            self._refreshRows(self._classNodes())
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

    def selectClass(self, row, place=False):
        """Select class ``row`` in the table (keys 1..9) and, with ``place``, start placing its points."""
        nodes = self._classNodes()
        if not 0 <= row < len(nodes):
            return False
        self.ui.classesTable.selectRow(row)
        if place:
            pointlists.startPlacing(slicer.mrmlScene, nodes[row])
        return True

    def onAddClass(self):
        with slicer.util.tryWithErrorDisplay("Could not add a class.", waitCursor=True):
            for name in engine.new_class_names([node.GetName() for node in self._classNodes()]):
                node = pointlists.addClassPointList(slicer.mrmlScene, name, len(self._classNodes()))
                self._parameterNode.classPointLists.append(node)

    def onRemoveClass(self):
        nodes = self._classNodes()
        row = self.ui.classesTable.currentRow()
        if row < 0 or row >= len(nodes):
            slicer.util.warningDisplay("Select the class to remove in the table first.")
            return
        node = nodes[row]
        count = pointlists.definedPointCount(node)
        if count and not self.confirm(f"Remove class '{node.GetName()}' and delete its {count} point(s)?"):
            return
        self._parameterNode.classPointLists.remove(node)
        slicer.mrmlScene.RemoveNode(node)

    def onTerminology(self):
        """Slicer's terminology selector for the selected class (the same dialog as the Segment Editor's)."""
        nodes = self._classNodes()
        row = self.ui.classesTable.currentRow()
        if not 0 <= row < len(nodes):
            slicer.util.warningDisplay("Select a class in the table first.")
            return
        node = nodes[row]
        terminologiesLogic = slicer.modules.terminologies.logic()
        entry = slicer.vtkSlicerTerminologyEntry()
        current = pointlists.classTerminology(node) or terminology.serialize(None)
        terminologiesLogic.DeserializeTerminologyEntry(current, entry)
        if not slicer.qSlicerTerminologySelectorDialog.getTerminology(entry, slicer.util.mainWindow()):
            return
        pointlists.setClassTerminology(node, terminologiesLogic.SerializeTerminologyEntry(entry))
        self.onPointListModified()

    # Buttons ------------------------------------------------------------------------------------------

    def updateButtons(self, *args):
        p = self._parameterNode
        running = self._task is not None
        volume = p.inputVolume if p else None
        nodes = self._classNodes()
        problems = pointlists.segmentProblems(volume, nodes) if p else ["No parameter node."]
        if running:
            self.ui.segmentButton.text = "Cancel"
            self.ui.segmentButton.toolTip = "Stop the running job."
            self.ui.segmentButton.enabled = True
        else:
            self.ui.segmentButton.text = "Segment"
            self.ui.segmentButton.toolTip = "\n".join(problems) or "Segment this volume from its points (seconds)."
            self.ui.segmentButton.enabled = not problems
        segmentation = p.outputSegmentation if p else None
        hasSegments = bool(segmentation and segmentation.GetSegmentation().GetNumberOfSegments())
        self.ui.exportSegNrrdButton.enabled = hasSegments and not running
        self.ui.exportDicomSegButton.enabled = (hasSegments and not running
                                                and self.logic.dicomInstanceUids(volume) is not None)
        self.ui.show3DButton.enabled = hasSegments
        wasBlocked = self.ui.show3DButton.blockSignals(True)
        self.ui.show3DButton.checked = results.is3DShown(segmentation)
        self.ui.show3DButton.blockSignals(wasBlocked)
        modelDirectory = p.modelDirectory if p else ""
        hasModel = bool(modelDirectory) and os.path.isdir(modelDirectory)
        self.ui.saveModelButton.enabled = bool(self.logic.lastModelDirectory) and not running
        self.ui.applyModelButton.enabled = hasModel and volume is not None and not running
        self.ui.finetuneModelButton.enabled = hasModel and not problems and not running
        dataset = p.datasetDirectory if p else ""
        self.ui.addCaseButton.enabled = bool(dataset) and volume is not None and len(nodes) >= 2 and not running
        summary = self._datasetSummary  # read in updateDatasetStatus, not at every point placed
        self.ui.trainModelButton.enabled = bool(summary and summary["withPoints"]) and not running
        self.ui.terminologyButton.enabled = 0 <= self.ui.classesTable.currentRow() < len(nodes)
        for widget in (self.ui.addClassButton, self.ui.removeClassButton, self.ui.installDependenciesButton,
                       self.ui.loadSampleButton):
            widget.enabled = not running

    def updateDatasetStatus(self):
        dataset = self._parameterNode.datasetDirectory if self._parameterNode else ""
        try:
            summary = cohort.summary(dataset) if dataset and os.path.isdir(dataset) else None
        except Exception as error:  # a damaged classes.json: say so instead of failing every update
            summary = None
            logging.warning(f"PSCVSegment: dataset folder {dataset}: {error}")
        self._datasetSummary = summary
        if not dataset:
            text = "Choose a folder to collect volumes and their points in."
        elif summary is None:
            text = "A new dataset: add the first volume."
        else:
            text = (f"{summary['cases']} volume(s), {summary['withPoints']} with points; classes "
                    f"{', '.join(summary['classes'])}.")
        self.ui.datasetStatusLabel.text = text

    def connection(self):
        if self.connectionOverride is not None:
            return self.connectionOverride
        remote = self.ui.remoteCheckBox.checked
        return environment.Connection(
            serverUrl=self.ui.serverUrlLineEdit.text if remote else "",
            token=self.ui.serverTokenLineEdit.text if remote else "",
            python=self.ui.pythonPathLineEdit.currentPath,
        )

    def onConnectionChanged(self, *args):
        if self.connectionOverride is None:
            self.logic.saveConnectionSettings(self.connection(), self.ui.serverUrlLineEdit.text)

    def onModelPathChanged(self, path):
        if self._parameterNode and self._parameterNode.modelDirectory != path:
            self._parameterNode.modelDirectory = path

    def onDatasetPathChanged(self, path):
        if self._parameterNode and self._parameterNode.datasetDirectory != path:
            self._parameterNode.datasetDirectory = path

    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay("Could not set up the Python packages.", waitCursor=True):
            if self.logic.setupPythonRequirements(self.connection(), askConfirmation=True):
                slicer.util.infoDisplay("The Python packages needed by the background process are installed.")

    # Sample data ------------------------------------------------------------------------------------------

    def onLoadSample(self):
        with slicer.util.tryWithErrorDisplay("Could not load the sample data.", waitCursor=True):
            files = sampledata.sampleFiles(MODULE_DIR)
            self.loadSample(files["image"], files["points"], files["classes"])

    def loadSample(self, imagePath, pointsPath, classesPath):
        volumeNode, nodes = self.logic.loadSample(imagePath, pointsPath, classesPath)
        self.initializeParameterNode()
        p = self._parameterNode
        p.inputVolume = volumeNode
        p.classPointLists = list(nodes)
        p.outputSegmentation = None
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        self.ui.statusLabel.text = "Sample loaded: press Segment."

    # Jobs ---------------------------------------------------------------------------------------------

    def onSegmentButton(self):
        if self._task is not None:
            self.ui.statusLabel.text = "Cancelling..."
            self._task.cancel()
            return
        self._start("segment")

    def onApplyModel(self):
        self._start("predict")

    def onFinetuneModel(self):
        self._start("finetune")

    def onTrainModel(self):
        self._start("train")

    def _start(self, kind):
        p = self._parameterNode
        nodes = self._classNodes() if kind in ("segment", "finetune") else None
        started = None
        with slicer.util.tryWithErrorDisplay("Could not start the job.", waitCursor=True):
            connection = self.connection()
            if not self.logic.setupPythonRequirements(connection, askConfirmation=True):
                return
            classes = pointlists.classesFromPointLists(nodes) if nodes is not None else None
            replaceExisting = False
            if kind != "train" and p.outputSegmentation and classes is not None:
                existing = results.segmentsToReplace(p.outputSegmentation, classes)
                if existing:
                    if not self.confirm(f"Segmentation '{p.outputSegmentation.GetName()}' already has segment(s) "
                                        f"{', '.join(existing)}. Replace them with the new result?"):
                        return
                    replaceExisting = True
            iterations = p.iterations if kind in ("segment", "train", "finetune") else None
            settings = self.logic.jobSettings(p.device, iterations)
            interactive = self._interactiveOptions(settings) if kind == "segment" else {}
            started = self.logic.startTask(
                kind, p.inputVolume, nodes, classes=classes,
                segmentationNode=p.outputSegmentation if kind != "train" else None, settings=settings,
                connection=connection, modelDirectory=p.modelDirectory if kind in ("predict", "finetune") else None,
                replaceExisting=replaceExisting, datasetDirectory=p.datasetDirectory if kind == "train" else None,
                **interactive)
        if started is None:
            return
        self._task = started
        self._shownLog = None
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = "Starting..."
        self._pollTimer.start()
        self.updateButtons()

    def _interactiveOptions(self, settings):
        """A segment job's strokes, suggestions and model to refine, from the Segmentation section."""
        p = self._parameterNode
        strokes = p.strokesSegmentation
        if strokes is not None and strokes is p.outputSegmentation:
            raise ValueError("Choose strokes other than the output segmentation (paint them in a segmentation "
                             "of their own).")
        if p.keepModel:
            settings["train_model"] = True
        return {"strokesSegmentation": strokes, "suggest": p.suggestCount,
                "refineModel": self.logic.refinableModel(p.inputVolume) if p.keepModel else None}

    def onPollJob(self):
        task = self._task
        if task is None:
            self._pollTimer.stop()
            return
        for event in task.poll():
            fraction, text = tasks.describe(event)
            if fraction is not None:
                self.ui.progressBar.value = int(round(1000 * fraction))
            if text:
                self.ui.statusLabel.text = text
        self._showLog(task)
        if task.state == tasks.READY or task.ended:
            self._pollTimer.stop()
            self._finish()

    def _showLog(self, task):
        text = task.logText()
        if text != self._shownLog:
            self._shownLog = text
            self.ui.logTextEdit.setPlainText(text)
            scrollBar = self.ui.logTextEdit.verticalScrollBar()
            scrollBar.setValue(scrollBar.maximum)

    def _finish(self):
        task, self._task = self._task, None
        self.ui.progressBar.hide()
        try:
            if task.state == tasks.READY:
                with slicer.util.tryWithErrorDisplay("The result could not be imported.", waitCursor=True):
                    try:
                        node = task.finish()
                    except results.SegmentsExistError as error:
                        if not self.confirm(f"{error} Replace them?"):
                            task.discard("the result was not imported (its segments would have replaced others)")
                            self.ui.statusLabel.text = "Result not imported."
                            return
                        node = task.finish(replace=True)
                    except tasks.SceneClosedError as error:
                        self.ui.statusLabel.text = f"Not imported: {error}."
                        return
                    self._onFinished(task, node)
            elif task.state == tasks.CANCELLED:
                self.ui.statusLabel.text = ("Cancelled: the scene was closed." if task.orphaned else "Cancelled.")
            elif task.state == tasks.ORPHANED:
                self.ui.statusLabel.text = f"Not imported: {task.message}."
            elif task.state == tasks.FAILED:
                self.ui.statusLabel.text = f"Failed: {task.message}"
                self.ui.logCollapsibleButton.collapsed = False
                slicer.util.errorDisplay(f"The {task.kind} job failed: {task.message}\n\nThe Log section shows what "
                                         "the worker reported.", "PSCV Segment")
        finally:
            self.logic.taskEnded(task)
            self._showLog(task)
            self.updateButtons()

    def _onFinished(self, task, node):
        minutes = (time.time() - task.startTime) / 60
        if task.kind == "train":
            self._parameterNode.modelDirectory = task.modelDirectory or ""
            self.ui.modelPathLineEdit.currentPath = task.modelDirectory or ""
            self.ui.statusLabel.text = f"Model trained in {minutes:.1f} min: {task.modelDirectory}"
            return
        if node is not None:
            self._parameterNode.outputSegmentation = node
            self.ui.statusLabel.text = f"Done in {minutes:.1f} min: '{node.GetName()}'."

    # Export, 3D, log, cohort and models ----------------------------------------------------------------

    def onExportSegNrrd(self):
        segmentationNode = self._parameterNode.outputSegmentation
        path = self.askSavePath("Export segmentation", f"{segmentationNode.GetName()}.seg.nrrd",
                                "Slicer segmentation (*.seg.nrrd)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            export.exportSegNrrd(segmentationNode, str(path))
            self.ui.statusLabel.text = f"Saved {path}"

    def onExportDicomSeg(self):
        p = self._parameterNode
        path = self.askSavePath("Export DICOM-SEG", f"{p.outputSegmentation.GetName()}.dcm", "DICOM (*.dcm)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("DICOM-SEG export failed.", waitCursor=True):
            if not self.logic.setupDicomSegRequirements(askConfirmation=True):
                return
            warnings = self.logic.exportDicomSeg(p.outputSegmentation, p.inputVolume, str(path))
            self.ui.statusLabel.text = f"Saved {path}" + "".join(f" ({w})" for w in warnings)

    def onShow3D(self, show):
        segmentationNode = self._parameterNode.outputSegmentation if self._parameterNode else None
        if segmentationNode is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not show the segmentation in 3D.", waitCursor=True):
            results.show3D(segmentationNode, show)
        self.updateButtons()

    def onOpenLogFolder(self):
        os.makedirs(self.logic.logStore.directory, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self.logic.logStore.directory)))

    def onAddCase(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not add the volume to the dataset.", waitCursor=True):
            try:
                added = cohort.addCase(p.datasetDirectory, p.inputVolume, self._classNodes())
            except FileExistsError as error:
                if not self.confirm(f"{error} Replace it?"):
                    return
                added = cohort.addCase(p.datasetDirectory, p.inputVolume, self._classNodes(), overwrite=True)
            self.ui.statusLabel.text = f"Added '{added['case']}' to the dataset."
        self.updateDatasetStatus()
        self.updateButtons()

    def onSaveModel(self):
        directory = self.askDirectory("Save the model into an empty folder")
        if not directory:
            return
        with slicer.util.tryWithErrorDisplay("Could not save the model.", waitCursor=True):
            saved = self.logic.saveLastModel(str(directory))
            self.ui.modelPathLineEdit.currentPath = saved
            self.ui.statusLabel.text = f"Model saved in {saved}"


#
# PSCVSegmentLogic
#


class PSCVSegmentLogic(ScriptedLoadableModuleLogic):
    """Usable without the GUI, from Slicer's Python console:

        logic = slicer.util.getModuleLogic("PSCVSegment")  # or PSCVSegmentLogic()
        segmentation = logic.segment(volumeNode, [backgroundPoints, liverPoints, kidneyPoints],
                                     settings=logic.jobSettings("auto"))  # iterations: the device's budget

    Each point list is one class, named after it; the first is the background. What it does to MRML nodes
    and jobs is in PSCVSegmentLib; this class adds what needs Slicer's application: the scene, settings,
    dialogs, the DICOM database and package installation.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastModelDirectory = None
        self._lastModelTask = None
        self._lastModelVolumeID = None
        self.temporaryRoot = os.path.join(slicer.app.temporaryPath, "PSCVSegment")
        tasks.removeStaleWorkDirectories(self.temporaryRoot)
        self.logStore = tasks.LogStore(os.path.join(self.temporaryRoot, tasks.LOGS_FOLDER))

    def getParameterNode(self):
        return PSCVSegmentParameterNode(super().getParameterNode())

    def cleanup(self):
        """Remove the last model's temporary folder (Save model copies it out first)."""
        if self._lastModelTask is not None:
            self._lastModelTask.removeWorkDirectory()
            self._lastModelTask = None
        self.lastModelDirectory = None

    @staticmethod
    def jobSettings(device="auto", iterations=None, **extra):
        return engine.job_settings(device, iterations, **extra)

    @staticmethod
    def describeEvent(event):
        return tasks.describe(event)

    # Sample data ------------------------------------------------------------------------------------------

    def loadSample(self, imagePath, pointsPath, classesPath):
        """Load the sample volume and its class point lists; returns (volume node, point lists in class order)."""
        volumeNode = slicer.util.loadVolume(str(imagePath), {"name": sampledata.VOLUME_NODE_NAME})
        return volumeNode, sampledata.loadSample(slicer.mrmlScene, volumeNode, pointsPath, classesPath)

    # Jobs ---------------------------------------------------------------------------------------------

    def jobClient(self, connection=None):
        connection = connection or self.connectionFromSettings()
        slicerPython = shutil.which("PythonSlicer")
        startup = None
        if not connection.remote and not environment.isSlicerPython(connection.python, slicerPython):
            startup = slicer.util.startupEnvironment()  # bug 3: never Slicer's PYTHONHOME/PYTHONPATH
        return environment.jobClient(connection, slicerPython=slicerPython, startupEnvironment=startup,
                                     jobsDirectory=os.path.join(self.temporaryRoot, tasks.JOBS_FOLDER))

    def startTask(self, kind, volumeNode, pointListNodes=None, classes=None, segmentationNode=None,
                  settings=None, connection=None, modelDirectory=None, replaceExisting=False,
                  datasetDirectory=None, strokesSegmentation=None, suggest=0, refineModel=None):
        """Write the inputs and start a job in the background; returns the started ``tasks.Task`` (see
        ``tasks.createTask`` for the kinds: segment, predict, finetune, train)."""
        connection = connection or self.connectionFromSettings()
        problems = environment.connectionProblems(connection)
        if problems:
            raise ValueError(" ".join(problems))
        task = tasks.createTask(slicer.mrmlScene, kind, self.jobClient(connection), self.temporaryRoot,
                                volumeNode, pointListNodes, classes, segmentationNode, settings, modelDirectory,
                                replaceExisting, datasetDirectory, strokesSegmentation, suggest, refineModel)
        logging.info(f"PSCVSegment: starting: {task.description}")
        return task.start()

    def taskEnded(self, task):
        """Save the task's log; keep its model (if any) as the last model, releasing the previous one."""
        if task.ended or task.state == tasks.READY:
            try:
                self.logStore.save(task)
            except OSError as error:
                logging.warning(f"PSCVSegment: could not save the job's log: {error}")
        if task.state == tasks.FINISHED and task.kind in ("segment", "finetune") and task.modelDirectory:
            if self._lastModelTask is not None and self._lastModelTask is not task:
                self._lastModelTask.removeWorkDirectory()
            self._lastModelTask = task
            self.lastModelDirectory = task.modelDirectory
            self._lastModelVolumeID = task.volumeNode.GetID() if task.volumeNode is not None else None
        elif task.state != tasks.FINISHED or task.kind not in ("segment", "finetune"):
            if task is not self._lastModelTask:
                task.removeWorkDirectory()

    def refinableModel(self, volumeNode):
        """The model the last segment job kept for ``volumeNode`` (to refine), or None."""
        if (volumeNode is None or not self.lastModelDirectory or self._lastModelTask is None
                or self._lastModelTask.kind != "segment" or self._lastModelVolumeID != volumeNode.GetID()):
            return None
        return self.lastModelDirectory if os.path.isdir(self.lastModelDirectory) else None

    def waitTask(self, task, timeout=None):
        """Wait for a task while keeping Slicer responsive; then import its result (scripts and the self-test)."""
        while task.state not in (tasks.READY,) + tasks.ENDED:
            for event in task.poll():
                fraction, text = tasks.describe(event)
                if event.get("event") == "progress" and text:
                    logging.info(f"PSCVSegment: {text}")
            if timeout is not None and time.time() - task.startTime > timeout:
                task.cancel()
                task.wait(30)
                task.poll()
                self.taskEnded(task)
                raise TimeoutError(f"The {task.kind} job did not finish within {timeout} s and was cancelled.")
            slicer.app.processEvents()
            time.sleep(0.1)
        try:
            if task.state == tasks.READY:
                return task.finish()
            if task.state == tasks.CANCELLED:
                return None
            raise RuntimeError(f"The {task.kind} job {task.state}: {task.message}")
        finally:
            self.taskEnded(task)

    def segment(self, volumeNode, pointListNodes, segmentationNode=None, classes=None, settings=None, wait=True,
                replaceExisting=False, connection=None, timeout=None):
        """Segment ``volumeNode`` from its points; returns the segmentation node (or the started task if not
        ``wait``: then poll it, ``finish()`` it, and pass it to ``taskEnded``). Settings ``train_model`` (keep a
        network) and ``suggest`` (places to click next) as the engine's segment job takes them."""
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

    def trainModel(self, datasetDirectory, settings=None, wait=True, connection=None, timeout=None):
        """Train one model on a dataset folder; returns the model folder (beside the dataset)."""
        task = self.startTask("train", None, settings=settings, connection=connection,
                              datasetDirectory=datasetDirectory)
        if not wait:
            return task
        self.waitTask(task, timeout)
        return task.modelDirectory

    # Results and export ----------------------------------------------------------------------------------

    @staticmethod
    def dicomInstanceUids(volumeNode):
        """The SOP instance UIDs of the DICOM files a volume was loaded from, or None if not from DICOM."""
        if volumeNode is None:
            return None
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        return uids or None

    def exportDicomSeg(self, segmentationNode, volumeNode, path):
        """DICOM-SEG through the engine's writer (highdicom), referencing the volume's DICOM series."""
        uids = self.dicomInstanceUids(volumeNode) or []
        files = [slicer.dicomDatabase.fileForInstance(uid) for uid in uids]
        if any(not f for f in files):
            raise RuntimeError("Some DICOM files of the input series are not in the DICOM database any more.")
        return export.exportDicomSeg(slicer.mrmlScene, segmentationNode, volumeNode, str(path), files)

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
        return environment.Connection(serverUrl=url if remote else "", python=python)

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
    def _hasPyTorchExtension():
        import importlib.util

        return importlib.util.find_spec("PyTorchUtils") is not None

    def requirementProblems(self, connection=None):
        """Why a job cannot run with ``connection`` now (sentences; empty: ready); installs nothing, no torch import."""
        return environment.requirementProblems(connection or self.connectionFromSettings(),
                                               torchVersion=environment.installedVersion("torch"),
                                               hasPyTorchExtension=self._hasPyTorchExtension())

    def setupPythonRequirements(self, connection=None, askConfirmation=True):
        """Make sure the background process can run; returns False if the user declined an installation.

        A remote server or a chosen Python environment brings its own packages. For Slicer's Python: torch
        through the PyTorch extension (PyTorchUtils, at least environment.MINIMUM_TORCH), the other packages
        with pip, each after asking. Slicer's SimpleITK is never replaced; torch is not imported to check it.
        """
        connection = connection or self.connectionFromSettings()
        problems = environment.connectionProblems(connection)
        if problems:
            raise ValueError(" ".join(problems))
        if connection.remote or connection.python:
            return True
        torchVersion = environment.installedVersion("torch")
        problem = environment.torchProblem(torchVersion)
        if problem:
            raise RuntimeError(problem)
        if torchVersion is None:
            if not self._hasPyTorchExtension():
                raise RuntimeError(
                    "PSCV Segment needs PyTorch: install the 'PyTorch' extension from the Extensions Manager and "
                    "restart Slicer, or choose a Python environment that has torch in Advanced.")
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    "PSCV Segment needs PyTorch in Slicer's Python. Install it now through the PyTorch extension? "
                    "This downloads several hundred MB to 2 GB and may take minutes.", "PSCV Segment: install PyTorch"):
                return False
            import PyTorchUtils

            # installTorch imports torch into this process once it is installed (PyTorchUtils' own doing).
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=f">={environment.MINIMUM_TORCH}") is None:
                return False
        missing = environment.missingPackages()
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    f"PSCV Segment needs these Python packages in Slicer's Python: {', '.join(missing)}. "
                    "Install them now with pip? This needs a network connection and may take a minute.",
                    "PSCV Segment: install Python packages"):
                return False
            slicer.util.pip_install(" ".join(missing))
            missing = environment.missingPackages()
            if missing:
                raise RuntimeError(f"Installing {', '.join(missing)} failed; see the Python console for pip's output.")
        return True

    @staticmethod
    def setupDicomSegRequirements(askConfirmation=True):
        """highdicom, in a version that works with Slicer's own pydicom (pydicom itself is not upgraded)."""
        import importlib.util

        if importlib.util.find_spec("highdicom") is not None:
            return True
        requirement = engine.highdicom_requirement(environment.installedVersion("pydicom"))
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
    `Slicer --testing --python-code "import PSCVSegment; PSCVSegment.PSCVSegmentTest().runTest()"`.

    Isolated from this computer: jobs run in a local worker with Slicer's own Python (never the remote
    server or the Python environment saved in the application settings, which are not read or written), and
    nothing is installed: without torch or the worker's packages the training tests are skipped, saying why.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_points_land_on_voxels_under_a_transform, self.test_segment_two_organs,
                     self.test_widget_path):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:
                self.delayDisplay(f"Skipped {test.__name__}: {reason}")

    # Helpers --------------------------------------------------------------------------------------------

    @staticmethod
    def testConnection():
        return environment.Connection()  # Slicer's own Python, a local worker

    def requireWorker(self, logic):
        problems = logic.requirementProblems(self.testConnection())
        if problems:
            self.skipTest(" ".join(problems))

    @staticmethod
    def _syntheticVolume(ijkToRas):
        """24 x 48 x 48 voxels [k, j, i]: noise, a bright ball (organ 1) and a brighter box (organ 2)."""
        import numpy as np

        rng = np.random.default_rng(0)
        k, j, i = np.mgrid[0:24, 0:48, 0:48]
        labels = np.zeros(k.shape, dtype=np.uint8)
        labels[(k - 12) ** 2 + (j - 16) ** 2 + (i - 16) ** 2 <= 8 ** 2] = 1
        labels[4:20, 26:40, 24:42] = 2
        image = rng.normal(0, 10, size=k.shape) + np.choose(labels, [0, 100, 200])
        volumeNode = slicer.util.addVolumeFromArray(image.astype(np.int16), ijkToRas, "PSCV synthetic")
        return volumeNode, labels

    @staticmethod
    def _clickVoxels(labels, rng, perClass=3):
        """Three voxels per class on every other slice where the class is: {class value: [[k, j, i], ...]}."""
        import numpy as np

        clicks = {}
        for value in (0, 1, 2):
            for k in range(1, labels.shape[0] - 1, 2):
                rows, cols = np.nonzero(labels[k] == value)
                for pick in rng.choice(len(rows), size=min(perClass, len(rows)), replace=False) if len(rows) else []:
                    clicks.setdefault(value, []).append([k, rows[pick], cols[pick]])
        return clicks

    @staticmethod
    def _placePoints(node, kjiPoints, ijkToRas, localToWorld=None):
        for position in engine.kji_to_world(kjiPoints, ijkToRas, localToWorld):
            node.AddControlPointWorld(vtk.vtkVector3d(*position))

    @staticmethod
    def _dice(mask, truth):
        import numpy as np

        return 2 * np.sum(mask & truth) / max(1, mask.sum() + truth.sum())

    def _mask(self, segmentationNode, name, volumeNode):
        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(name)
        return export.segmentMask(slicer.mrmlScene, segmentationNode, segmentId, volumeNode)

    # Tests ----------------------------------------------------------------------------------------------

    def test_points_land_on_voxels_under_a_transform(self):
        import numpy as np

        self.delayDisplay("Points on an oblique, transformed volume")
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
        nodes = []
        for value, (name, kji) in enumerate(expected.items()):
            node = pointlists.addClassPointList(slicer.mrmlScene, name, value)
            self._placePoints(node, kji, ijkToRas, localToWorld)
            nodes.append(node)
        for node, kji in zip(nodes, expected.values()):
            np.testing.assert_array_equal(pointlists.pointsToVoxels(volumeNode, node), kji)

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
        self.delayDisplay("Points land on the right voxels")

    def test_segment_two_organs(self):
        """The Logic's scripting path (README's console example) on a synthetic volume."""
        import numpy as np

        self.delayDisplay("Segment a synthetic volume with two organs (short training)")
        logic = PSCVSegmentLogic()
        self.requireWorker(logic)
        ijkToRas = np.diag([-1.0, -1.0, 2.0, 1.0])
        volumeNode, labels = self._syntheticVolume(ijkToRas)
        clicks = self._clickVoxels(labels, np.random.default_rng(1))
        nodes = []
        for value, name in enumerate(["background", "ball", "box"]):
            node = pointlists.addClassPointList(slicer.mrmlScene, name, value)
            self._placePoints(node, clicks[value], ijkToRas)
            nodes.append(node)
        settings = logic.jobSettings("auto", 300, image_size=64, batch_size=4, train_model=True)
        segmentationNode = logic.segment(volumeNode, nodes, settings=settings, connection=self.testConnection(),
                                         timeout=1800)
        self.assertIsNotNone(segmentationNode)
        self.assertEqual(sorted(results.segmentNames(segmentationNode)), ["ball", "box"])
        for value, name in ((1, "ball"), (2, "box")):
            dice = self._dice(self._mask(segmentationNode, name, volumeNode), labels == value)
            self.delayDisplay(f"Dice of {name}: {dice:.3f}")
            # The engine alone, same data and settings, on a CPU: 0.77 (ball) and 0.91 (box). A wrong
            # geometry (flipped axes, transform, misplaced clicks) gives about 0.
            self.assertGreater(dice, 0.6)
        self.assertIsNotNone(logic.lastModelDirectory)
        logic.cleanup()
        self.delayDisplay("Segmentation test passed")

    def test_widget_path(self):
        """The GUI as a user drives it: add classes, place points, Segment (the poll timer runs the job to the
        end), both exports, Save model, Apply, Fine-tune, Cancel, and Segment into a segmentation whose
        segments are replaced after confirming, while a segment of the user's own survives."""
        import tempfile

        self.delayDisplay("The module's widget, as a user drives it")
        self.requireWorker(PSCVSegmentLogic())
        slicer.util.selectModule("PSCVSegment")
        widget = slicer.modules.PSCVSegmentWidget
        widget.connectionOverride = self.testConnection()  # never the settings of this computer
        self.confirmations, self.savePaths = [], []
        widget.confirm = lambda text: self.confirmations.append(text) or True
        self.outputFolder = tempfile.mkdtemp(prefix="PSCVSegmentTest-")
        widget.askSavePath = lambda title, name, filters: self._savePath(name)
        widget.askDirectory = lambda title: os.path.join(self.outputFolder, "saved-model")
        try:
            self._widgetClassesAndPoints(widget)
            segmentationNode = self._widgetSegmentAndExport(widget)
            self._widgetModels(widget, segmentationNode)
            self._widgetCancel(widget)
            self._widgetReplace(widget, segmentationNode)
            self.delayDisplay("Widget path passed")
        finally:
            if widget._task is not None:
                widget._task.cancel()
            widget.connectionOverride = None
            shutil.rmtree(self.outputFolder, ignore_errors=True)

    def _savePath(self, name):
        self.savePaths.append(os.path.join(self.outputFolder, name))
        return self.savePaths[-1]

    def _widgetClassesAndPoints(self, widget):
        import numpy as np

        self.ijkToRas = np.diag([1.0, 1.0, 2.0, 1.0])
        volumeNode, labels = self._syntheticVolume(self.ijkToRas)
        widget.initializeParameterNode()
        p = widget._parameterNode
        p.inputVolume = volumeNode
        p.iterations = 60
        p.keepModel = True  # for Save model, Apply and Fine-tune below
        p.suggestCount = 2
        self.assertFalse(widget.ui.segmentButton.enabled)
        widget.ui.addClassButton.click()  # background and organ 1
        widget.ui.addClassButton.click()  # organ 2
        nodes = widget._classNodes()
        self.assertEqual([n.GetName() for n in nodes], ["background", "organ 1", "organ 2"])
        widget.ui.classesTable.item(1, 0).setText("ball")  # rename in the table
        widget.ui.classesTable.item(2, 0).setText("box")
        self.assertEqual([n.GetName() for n in nodes], ["background", "ball", "box"])
        self.assertTrue(widget.selectClass(1, place=True))  # what key "2" does
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        self.assertEqual(interaction.GetCurrentInteractionMode(), interaction.Place)
        interaction.SwitchToViewTransformMode()
        clicks = self._clickVoxels(labels, np.random.default_rng(2))
        for value, node in enumerate(nodes):
            self._placePoints(node, clicks[value], self.ijkToRas)
        self.assertEqual(widget.ui.classesTable.item(1, 2).text(), str(len(clicks[1])))
        self.assertTrue(widget.ui.segmentButton.enabled, widget.ui.segmentButton.toolTip)
        return volumeNode, labels

    def _widgetSegmentAndExport(self, widget):
        p = widget._parameterNode
        widget.ui.segmentButton.click()
        self.assertEqual(widget.ui.segmentButton.text, "Cancel")
        self._waitForWidget(widget)  # the poll timer follows the job to its end and imports the result
        segmentationNode = p.outputSegmentation
        self.assertIsNotNone(segmentationNode, widget.ui.statusLabel.text)
        self.assertEqual(results.segmentNames(segmentationNode), ["ball", "box"])
        self.assertIn("Training", widget.ui.logTextEdit.toPlainText())  # the kept model
        suggestions = slicer.util.getFirstNodeByName("PSCV suggested points")
        self.assertEqual(suggestions.GetNumberOfControlPoints(), 2)
        self.assertTrue(widget.ui.exportSegNrrdButton.enabled)
        widget.ui.exportSegNrrdButton.click()
        self.assertTrue(os.path.isfile(self.savePaths[-1]), self.savePaths)
        # DICOM-SEG needs a volume from the DICOM database (pytest covers the writer on a real series): its
        # button must stay off for this one.
        self.assertFalse(widget.ui.exportDicomSegButton.enabled)
        widget.ui.show3DButton.click()
        self.assertTrue(results.is3DShown(segmentationNode))
        return segmentationNode

    def _widgetModels(self, widget, segmentationNode):
        p = widget._parameterNode
        widget.ui.saveModelButton.click()
        saved = os.path.join(self.outputFolder, "saved-model")
        self.assertTrue(os.path.isfile(os.path.join(saved, "model.json")))
        self.assertEqual(p.modelDirectory, saved)
        p.outputSegmentation = None
        widget.ui.applyModelButton.click()
        self._waitForWidget(widget)
        applied = p.outputSegmentation
        self.assertIsNotNone(applied)
        self.assertIsNot(applied, segmentationNode)
        widget.ui.finetuneModelButton.click()  # into the applied segmentation: replaces after asking
        self._waitForWidget(widget)
        self.assertTrue(any("Replace" in text for text in self.confirmations))
        self.assertEqual(sorted(results.segmentNames(applied)), ["ball", "box"])

    def _widgetCancel(self, widget):
        p = widget._parameterNode
        count = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        p.outputSegmentation = None
        p.iterations = 100000
        widget.ui.segmentButton.click()
        self._waitForWidget(widget, until=lambda: widget._task is None or any(
            e.get("stage") == "train" for e in widget._task.events))
        widget.ui.segmentButton.click()  # Cancel
        self._waitForWidget(widget)
        self.assertIn("Cancelled", widget.ui.statusLabel.text)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), count)

    def _widgetReplace(self, widget, segmentationNode):
        p = widget._parameterNode
        p.iterations = 60
        p.outputSegmentation = segmentationNode
        own = segmentationNode.GetSegmentation().AddEmptySegment("", "my lesion")
        self.confirmations.clear()
        widget.ui.segmentButton.click()
        self.assertTrue(self.confirmations and "Replace" in self.confirmations[0])
        self._waitForWidget(widget)
        self.assertEqual(results.segmentNames(segmentationNode), ["my lesion", "ball", "box"])
        self.assertIsNotNone(segmentationNode.GetSegmentation().GetSegment(own))
        jobsFolder = os.path.join(widget.logic.temporaryRoot, tasks.JOBS_FOLDER)
        self.assertEqual(os.listdir(jobsFolder) if os.path.isdir(jobsFolder) else [], [])  # job folders removed

    def _waitForWidget(self, widget, until=None, timeout=1800):
        """Let the poll timer run (events processed) until the job is over, or ``until()`` holds."""
        deadline = time.time() + timeout
        while (widget._task is not None) if until is None else not until():
            self.assertLess(time.time(), deadline, "the job did not finish in time")
            slicer.app.processEvents()
            time.sleep(0.05)
