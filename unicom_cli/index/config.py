"""What a build is asked for (BuildConfig), what it decided before any work (BuildPlan) and what it
produced (BuildSummary): shared by the planning, filling and finishing steps of a build."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from unicom_cli.index.choose import Choice
from unicom_cli.index.source import FeatureSource
from unicom_cli.index.store import Index
from unicom_cli.index.tune import Tuning


@dataclass
class BuildConfig:
    """Everything ``unicom index`` needs to build (or extend) an index from feature files."""

    features: list[Path]  # embed outputs (.npy + .ids.txt + .json) or shard folders (manifest.json), in row order
    output: Path  # the index folder
    index: str = "auto"  # auto|flat|hnsw|ivf|ivfpq|<faiss factory string>
    max_memory: int | None = None  # bytes; None: half the RAM
    target_recall: float = 0.95  # recall@10 against exact search the tuning aims for
    normalize: bool = True  # L2-normalise rows whose .json says they are not (cosine)
    overwrite: bool = False
    add: bool = False  # extend the index at ``output`` instead of building a new one
    device: str = "cpu"  # cuda: faiss-gpu trains the coarse quantizer where installed
    seed: int = 0
    held_out: int = 1000  # queries drawn from the collection to measure recall
    chunk_rows: int = 65536  # rows read and added per step (memory bound; shards align to it)
    on_disk: bool = False  # IVF lists in index.ivfdata (OnDiskInvertedLists), memory-mapped
    progress: bool = True


@dataclass
class BuildSummary:
    """What a build produced, for the CLI's summary and the benchmark."""

    output: Path
    count: int
    added: int
    dim: int
    choice: Choice
    tuning: Tuning
    seconds: float
    index_bytes: int
    meta: dict = field(default_factory=dict)



@dataclass
class BuildPlan:
    """What a build works on, decided before any work (every rank decides the same)."""

    sources: list[FeatureSource]
    fields: dict
    existing: Index | None
    choice: Choice
    max_memory: int
    on_disk: bool = False  # inverted lists in index.ivfdata (asked for, or the extended index has them)

    @property
    def dim(self) -> int:
        return self.sources[0].dim

    @property
    def added(self) -> int:
        return sum(s.count for s in self.sources)

    @property
    def base(self) -> int:
        return len(self.existing) if self.existing is not None else 0

