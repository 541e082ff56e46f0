"""Reference rows shared by the searches of one storage root: ``<storage>/_references/``.

A reference row (random-init encoder, raw pixels) depends on the seed, the data,
the model's geometry and the evaluation protocol, not on anything a search varies
in pre-training. Searches that share those (the tiny ablations all do) would each
spend minutes computing the same numbers, so the first computes them and the
others read them. Each row is one JSON file named by its kind, seed and a hash of
everything it depends on, including the source of the code that computes it: a
changed protocol or an upgraded mae-search computes its rows anew rather than
reading stale ones. Delete the folder (or pass ``--fresh-references``) to recompute.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mae_search
from mae_search.config import TrainConfig
from mae_search.storage import Location

REFERENCES_DIR = "_references"  # a search's name starts with a letter or digit: never a search folder

# What the evaluation settings hold that changes when and what is logged, not a reference row's numbers.
EVAL_SCHEDULE_FIELDS = {"every_epochs", "test_at", "grid_images"}

# The modules whose code computes a reference row (data, model initialisation, the evaluation protocol).
REFERENCE_CODE = ("mae/model.py", "data/load.py", "data/memory.py", "data/sources.py", "training/evaluate.py",
                  "training/finetune.py")


@functools.cache
def code_digest() -> str:
    """A hash of the source that computes a reference row, and of the torch version that runs it (read once
    per process: the code does not change under it)."""
    root = Path(mae_search.__file__).parent
    digest = hashlib.sha256(torch.__version__.encode())
    for name in REFERENCE_CODE:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()


def reference_inputs(cfg: TrainConfig, kind: str, gpu: bool) -> dict[str, Any]:
    """Everything a reference row of ``kind`` for ``cfg``'s seed depends on; ``gpu``: whether its task has
    a GPU (``device: auto`` runs on the one it is given; a GPU's float arithmetic differs in the last bits)."""
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and gpu) else "cpu"
    return {"kind": kind, "seed": cfg.seed, "device": device, "model": cfg.model.model_dump(mode="json"),
            "data": cfg.data.model_dump(mode="json"),
            "eval": cfg.eval.model_dump(mode="json", exclude=EVAL_SCHEDULE_FIELDS), "code": code_digest()}


@dataclass(frozen=True)
class StoredReference:
    metrics: dict[str, float]
    search: str  # the search that computed it
    computed_at: str


@dataclass(frozen=True)
class ReferenceStore:
    """The reference rows computed under one storage root, keyed by what they depend on; ``gpu``: whether
    the rows a search reads or writes run with a GPU."""

    storage: Location
    gpu: bool = False

    @property
    def root(self) -> Location:
        return self.storage / REFERENCES_DIR

    def file(self, cfg: TrainConfig, kind: str) -> Location:
        return self._file(reference_inputs(cfg, kind, self.gpu))

    def _file(self, inputs: dict[str, Any]) -> Location:
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / f"{inputs['kind']}-seed{inputs['seed']}-{digest}.json"

    def get(self, cfg: TrainConfig, kind: str) -> StoredReference | None:
        """The stored row for ``cfg``'s seed and ``kind``, or None; an unreadable file counts as missing."""
        inputs = reference_inputs(cfg, kind, self.gpu)
        try:
            stored = json.loads(self._file(inputs).read_text())
            if stored["inputs"] != json.loads(json.dumps(inputs)):  # a hash collision
                return None
            return StoredReference({k: float(v) for k, v in stored["metrics"].items()}, stored["search"],
                                   stored["computed_at"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, cfg: TrainConfig, kind: str, metrics: dict[str, float], search: str) -> None:
        inputs = reference_inputs(cfg, kind, self.gpu)
        self._file(inputs).write_text(json.dumps(  # written whole, parents created (Location.write_bytes)
            {"inputs": inputs, "metrics": metrics, "search": search,
             "computed_at": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2, sort_keys=True))
