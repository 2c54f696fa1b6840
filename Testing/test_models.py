"""Models save with their metadata and model card, load without executing code, and refuse what does not fit."""

import json
import re

import pytest
import torch
from synthetic import CLASSES, two_organ_volume

from pscv import PSCVError, __version__
from pscv.data.classes import ClassInfo
from pscv.data.clicks import simulate_clicks
from pscv.data.dataset import Case
from pscv.learn.inference import predict_volume
from pscv.learn.models import load_model, save_model
from pscv.learn.training import TrainSettings, train


@pytest.fixture(scope="module")
def model_and_volume():
    torch.set_num_threads(2)
    volume, labels = two_organ_volume(slices=3, size=32)
    settings = TrainSettings(method="pce", iterations=3, image_size=32, batch_size=2, device="cpu",
                             widths=(8, 16, 32, 64, 128), normalization={"mode": "window", "low": 0, "high": 1000})
    return train([Case(volume, simulate_clicks(labels, 0))], CLASSES, settings), volume


def test_round_trip_keeps_weights_metadata_and_predictions(tmp_path, model_and_volume):
    model, volume = model_and_volume
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", classes=CLASSES)
    metadata = json.loads((tmp_path / "m" / "model.json").read_text())
    assert metadata["engine_version"] == __version__ and metadata["method"] == "pce"
    assert metadata["normalization"] == {"mode": "window", "low": 0, "high": 1000}
    assert metadata["network"]["image_size"] == 32 and metadata["network"]["num_classes"] == 3
    assert [c.name for c in loaded.classes] == ["background", "disk", "box"]
    assert (predict_volume(loaded, volume, "cpu") == predict_volume(model, volume, "cpu")).all()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors", "model_card.json"]
    card = json.loads((tmp_path / "m" / "model_card.json").read_text())
    # what ran: the default terms
    assert card["method"] == "pce + outside + absent classes + gated CRF + affinity + pseudo-labels"
    assert card["data"] == {"cases": 1, "slices": 3, "clicks": 9}
    assert card["validation"] is None and card["training"]["processes"] == 1


def test_a_model_without_a_card_still_loads(tmp_path, model_and_volume):
    save_model(model_and_volume[0], tmp_path / "m")
    (tmp_path / "m" / "model_card.json").unlink()  # as models written before cards existed
    assert load_model(tmp_path / "m", classes=CLASSES).metadata["method"] == "pce"


def test_other_classes_are_refused(tmp_path, model_and_volume):
    save_model(model_and_volume[0], tmp_path / "m")
    other = [ClassInfo("background", 0), ClassInfo("liver", 1), ClassInfo("box", 2)]
    with pytest.raises(PSCVError, match="trained for classes.*disk=1"):
        load_model(tmp_path / "m", classes=other)


def test_newer_engine_and_other_format_are_refused(tmp_path, model_and_volume):
    save_model(model_and_volume[0], tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    metadata = json.loads(path.read_text())
    path.write_text(json.dumps({**metadata, "engine_version": "99.0.0"}))
    with pytest.raises(PSCVError, match="newer than this pscv"):
        load_model(tmp_path / "m")
    path.write_text(json.dumps({**metadata, "format": "pscv-model/0"}))
    with pytest.raises(PSCVError, match="model format 'pscv-model/0'"):
        load_model(tmp_path / "m")


def test_damaged_files_are_refused_cleanly(tmp_path, model_and_volume):
    save_model(model_and_volume[0], tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(PSCVError, match="damaged or mismatched weights"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text("{not json")
    with pytest.raises(PSCVError, match="damaged model description"):
        load_model(tmp_path / "m")
    with pytest.raises(PSCVError, match="not a pscv model folder"):
        load_model(tmp_path)


def test_weights_of_another_network_shape_are_refused(tmp_path, model_and_volume):
    save_model(model_and_volume[0], tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    metadata = json.loads(path.read_text())
    metadata["network"]["widths"] = [16, 32, 64, 128, 256]
    path.write_text(json.dumps(metadata))
    with pytest.raises(PSCVError, match="mismatched weights"):
        load_model(tmp_path / "m")


def test_a_pickle_is_never_loaded(tmp_path, model_and_volume):
    save_model(model_and_volume[0], tmp_path / "m")
    torch.save(model_and_volume[0].network.state_dict(), tmp_path / "m" / "model.safetensors")  # a pickle
    with pytest.raises(PSCVError, match="damaged or mismatched weights"):
        load_model(tmp_path / "m")


DAMAGED = {  # change to model.json -> what the error says
    "missing classes": (lambda m: m.pop("classes"), "classes missing"),
    "missing network": (lambda m: m.pop("network"), "network missing"),
    "missing normalization": (lambda m: m.pop("normalization"), "normalization missing"),
    "negative num_classes": (lambda m: m["network"].update(num_classes=-3), "network num_classes: got -3"),
    "image_size 0": (lambda m: m["network"].update(image_size=0), "network: setting image_size: got 0"),
    "huge widths": (lambda m: m["network"].update(widths=[16384] * 5), "network: setting widths: got [16384"),
    "dropout of another length": (lambda m: m["network"].update(dropout=[0.1]), "a rate per width"),
    "network not an object": (lambda m: m.update(network=[1, 2]), "network must be an object"),
    "classes not a list": (lambda m: m.update(classes={"classes": 5}), "expected {\"classes\""),
    "unknown normalization": (lambda m: m["normalization"].update(mode="zscore"), "normalization: got"),
    "unknown method": (lambda m: m.update(method="magic"), "setting method: got 'magic'"),
    "bad setting": (lambda m: m["settings"].update(learning_rate=-1), "settings: setting learning_rate: got -1"),
}


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_a_damaged_model_description_names_what_is_wrong(tmp_path, model_and_volume, kind):
    save_model(model_and_volume[0], tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    metadata = json.loads(path.read_text())
    change, message = DAMAGED[kind]
    change(metadata)
    path.write_text(json.dumps(metadata))
    with pytest.raises(PSCVError, match=re.escape(message)):
        load_model(tmp_path / "m")


def test_a_model_too_large_for_the_memory_is_refused_before_it_is_built(tmp_path, model_and_volume, monkeypatch):
    from pscv.base import resources

    save_model(model_and_volume[0], tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a byte-order mark is no damage
    assert load_model(tmp_path / "m").image_size == 32
    monkeypatch.setattr(resources, "available_memory", lambda: 2**20)
    with pytest.raises(PSCVError, match="loading this model needs about 3.5 MiB of memory, more than the 1.0 MiB"):
        load_model(tmp_path / "m")

