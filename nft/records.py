"""Benchmark cells, their configs, and their records (one JSON file per cell).

A *cell* is (backdoored model, defense, clean-set size). Its config is a ``CellSpec``: enough to
rebuild everything (dataset and subset, architecture, attack, training, defense, clean set) with
no other input, so ``nft bench --rerun RECORD.json`` can reproduce it.

A results directory::

    records/<cell_id>.json     one per finished cell, written via temp file + fsync + rename
    models/<model_key>/        backdoored (or benign) run directories, shared by all defenses
    artifacts/<cell_id>/       masks and, for the cells a report's t-SNE uses, the purified model
    errors/<cell_id>.txt       the traceback of a failed cell (no record is written for it)

A record exists only if its cell finished, so a restarted bench skips exactly the finished cells.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields

from .errors import NFTError
from .io import atomic_write_json

SCHEMA = 1
BENIGN = "benign"  # the attack name of the no-attack row
NO_DEFENSE = "none"  # the defense name of the undefended model's cell

# Keys every record has (values may be None where a metric does not apply, e.g. ASR of Benign).
RECORD_KEYS = ("schema", "cell_id", "dataset", "model", "model_kwargs", "attack", "defense", "seed",
               "clean_per_class", "clean_images", "acc", "asr", "ra", "der", "before", "seconds", "peak_mb",
               "device", "threads", "history", "config", "defense_config", "model_key", "artifacts",
               "code_version", "created")


@dataclass
class ModelSpec:
    """Everything that determines a backdoored (or benign) model; its hash is the cache key."""

    dataset: str = "mnist10k"
    arch: str = "preactresnet18"
    arch_kwargs: dict = field(default_factory=dict)
    attack: str = BENIGN
    attack_kwargs: dict = field(default_factory=dict)  # beyond num_classes/image_shape/target/mode/seed
    target: int = 0
    label_mode: str = "all2one"
    poison_rate: float = 0.1
    seed: int = 0
    epochs: float = 8
    batch_size: int = 128
    lr: float = 0.1
    subset_train: int | None = None  # train on a fixed random subset of this many images (tests, quick runs)
    subset_test: int | None = None  # evaluate on a fixed random subset of the test set
    precision: str = "fp32"

    @property
    def key(self) -> str:
        return f"{_slug(self.attack)}-s{self.seed}-{digest(asdict(self))[:12]}"


@dataclass
class CellSpec:
    """A model plus one defense run on it with ``clean_per_class`` clean images per class."""

    model: ModelSpec
    defense: str = NO_DEFENSE  # 'none', 'nft', 'nft:paper', 'ft', ... (name[:variant])
    defense_set: dict = field(default_factory=dict)  # overrides of the defense's settings
    clean_per_class: int | None = 50
    clean_seed: int | None = None  # None: the model seed

    @property
    def cell_id(self) -> str:
        m = self.model
        n = "na" if self.defense == NO_DEFENSE else self.clean_per_class
        name = f"{m.dataset}-{m.arch}-{m.attack}-{self.defense}-n{n}-s{m.seed}"
        return f"{_slug(name)}-{digest(to_dict(self))[:10]}"

    @classmethod
    def from_dict(cls, d: dict) -> "CellSpec":
        d = dict(d)
        try:
            model = ModelSpec(**_known(ModelSpec, d.pop("model")))
            return cls(model=model, **_known(cls, d))
        except (KeyError, TypeError) as e:
            raise NFTError(f"not a bench cell config ({e})") from None


def to_dict(spec) -> dict:
    return asdict(spec)


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise NFTError(f"{cls.__name__} has no field(s) {unknown} (a record from a newer nft?)")
    return d


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s)


def parse_defense(spec: str) -> tuple[str, str | None]:
    """'nft:paper' -> ('nft', 'paper'); 'ft' -> ('ft', None)."""
    name, _, variant = spec.partition(":")
    return name.strip().lower(), (variant.strip() or None)


# ---------------------------------------------------------------------------------------------
# the results directory

def records_dir(root: str) -> str:
    return os.path.join(root, "records")


def record_path(root: str, cell_id: str) -> str:
    return os.path.join(records_dir(root), f"{cell_id}.json")


def has_record(root: str, cell_id: str) -> bool:
    return os.path.isfile(record_path(root, cell_id))


def write_record(root: str, record: dict) -> str:
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise NFTError(f"record lacks {missing}")
    path = record_path(root, record["cell_id"])
    atomic_write_json(record, path)
    return path


def read_record(path: str) -> dict:
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NFTError(f"{path} is not a readable record ({e})") from None
    if not isinstance(rec, dict) or "cell_id" not in rec:
        raise NFTError(f"{path} is not a bench record")
    return rec


def load_records(root: str, warn=True) -> list[dict]:
    """Every record under ``root/records`` (also accepts a ``records.jsonl`` file of records).

    Temporary files of an interrupted write are ignored; an unreadable record is skipped with a
    warning, as is a torn last line of a JSONL file. Records are sorted by cell id.
    """
    out: dict[str, dict] = {}
    rdir = records_dir(root)
    if os.path.isdir(rdir):
        for name in sorted(os.listdir(rdir)):
            if name.startswith(".") or not name.endswith(".json"):
                continue
            try:
                rec = read_record(os.path.join(rdir, name))
            except NFTError as e:
                if warn:
                    print(f"nft: warning: skipping {e}", file=sys.stderr)
                continue
            out[rec["cell_id"]] = rec
    jsonl = os.path.join(root, "records.jsonl")
    if os.path.isfile(jsonl):
        with open(jsonl) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    if warn:
                        print(f"nft: warning: skipping a torn line {i} of {jsonl}", file=sys.stderr)
                    continue
                out.setdefault(rec["cell_id"], rec)
    if not out and not os.path.isdir(rdir) and not os.path.isfile(jsonl):
        raise NFTError(f"{root} holds no records/ (is it a bench results directory?)")
    return [out[k] for k in sorted(out)]
