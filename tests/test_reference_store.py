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


def test_a_search_reads_what_is_stored_and_computes_the_rest_or_everything_when_fresh(tmp_path, monkeypatch):
    """run_references: stored rows are read, the missing ones computed (and stored for the next search);
    fresh computes every row. The computing (Ray tasks) is replaced by a recorder here; the searches in
    tests/test_search_e2e.py run it for real."""
    import mae_search.search.run as run
    from mae_search.search.results import read_results
    from mae_search.search.search_dir import SearchDir
    from mae_search.search.space import parse_search_space

    space = parse_search_space({"name": "s", "base": micro_config().model_dump(mode="json"), "dimensions": {},
                                "metric": "loss", "mode": "min", "seeds": [0, 1], "scheduler": {"type": "none"}},
                               "space")
    computed: list[tuple[int, str]] = []

    def compute(space, todo, configs, check_interrupt, poll_s):
        computed.extend(todo)
        return {(seed, kind): {"linear_probe_acc": 0.1 * seed + (0.05 if kind == "raw_pixels" else 0.0)}
                for seed, kind in todo}

    monkeypatch.setattr(run, "compute_references", compute)
    store = ReferenceStore(Location.of(tmp_path / "results"))
    store.put(space.base.with_overrides({"seed": 1}), "random_init", {"linear_probe_acc": 0.77}, "earlier")
    said: list[str] = []
    assert run.run_references(space, SearchDir.of(tmp_path / "results", "s"), notify=said.append) == 4
    assert sorted(computed) == [(0, "random_init"), (0, "raw_pixels"), (1, "raw_pixels")]
    assert said and "1 of 4 read from" in said[0] and "computed by earlier" in said[0]
    refs = read_results(tmp_path / "results" / "s", with_references=True).set_index(["seed", "reference"])
    assert refs.loc[(1, "random_init"), "linear_probe_acc"] == 0.77  # the stored row, not recomputed
    assert store.get(space.base.with_overrides({"seed": 0}), "raw_pixels").metrics == {"linear_probe_acc": 0.05}
    computed.clear()
    run.run_references(space, SearchDir.of(tmp_path / "results", "fresh"), fresh=True, notify=said.append)
    assert len(computed) == 4  # --fresh-references: nothing read
