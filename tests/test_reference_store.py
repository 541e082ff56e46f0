"""Reference rows stored under the storage root and read by the next search that shares their inputs."""

import json

import pytest

from mae_search.search.reference_store import REFERENCES_DIR, ReferenceStore
from mae_search.storage import Location
from tests.conftest import micro_config

ROW = {"linear_probe_acc": 0.31, "knn_acc": 0.22, "finetune_acc": 0.4}


@pytest.fixture
def store(tmp_path) -> ReferenceStore:
    return ReferenceStore(Location.of(tmp_path / "results"))


def test_a_stored_row_is_read_back_for_the_same_inputs(store, tmp_path):
    cfg = micro_config(seed=3)
    store.put(cfg, "random_init", ROW, "first-search")
    got = store.get(cfg, "random_init")
    assert got is not None and got.metrics == ROW and got.search == "first-search"
    [file] = (tmp_path / "results" / REFERENCES_DIR).iterdir()
    assert file.name.startswith("random_init-seed3-")
    assert json.loads(file.read_text())["inputs"]["seed"] == 3  # what it was computed from, readable


@pytest.mark.parametrize("change", [
    {"epochs": 9}, {"masking.mask_ratio": 0.5}, {"optim.blr": 1e-4}, {"batch_size": 16},
    {"eval.every_epochs": 3}, {"eval.grid_images": 2}, {"eval.test_at": "every_eval"},
])
def test_what_only_pretraining_or_logging_varies_shares_the_row(store, change):
    store.put(micro_config(), "raw_pixels", ROW, "first-search")
    assert store.get(micro_config(**change), "raw_pixels").metrics == ROW


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"model.embed_dim": 48}, {"model.decoder_depth": 2}, {"data.num_train": 256},
    {"data.val_split": 0.3}, {"eval.probe.epochs": 3}, {"eval.knn_k": 5}, {"eval.finetune.epochs": 2},
])
def test_what_a_reference_row_depends_on_keys_it(store, change):
    store.put(micro_config(), "random_init", ROW, "first-search")
    assert store.get(micro_config(**change), "random_init") is None
    assert store.get(micro_config(), "raw_pixels") is None  # the other kind neither


def test_the_device_it_runs_on_keys_it(tmp_path):
    """``device: auto`` runs where the task is placed: a row computed on a GPU is not read for a CPU run."""
    cpu, gpu = ReferenceStore(Location.of(tmp_path)), ReferenceStore(Location.of(tmp_path), gpu=True)
    cpu.put(micro_config(), "random_init", ROW, "first-search")
    assert cpu.get(micro_config(device="cpu"), "random_init").metrics == ROW  # auto on a CPU is cpu
    assert gpu.get(micro_config(), "random_init") is None
    assert gpu.get(micro_config(device="cuda"), "random_init") is None


def test_changed_evaluation_code_computes_the_row_again(store, monkeypatch):
    store.put(micro_config(), "random_init", ROW, "first-search")
    monkeypatch.setattr("mae_search.search.reference_store.code_digest", lambda: "another version of the code")
    assert store.get(micro_config(), "random_init") is None


def test_a_damaged_file_counts_as_missing(store):
    cfg = micro_config()
    store.put(cfg, "random_init", ROW, "first-search")
    store.file(cfg, "random_init").write_text('{"inputs": ')
    assert store.get(cfg, "random_init") is None
