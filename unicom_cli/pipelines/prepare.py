"""The GLDv2 preparation job (``unicom prepare-gldv2``): train_clean.csv -> labels -> shuffled
.lst -> resumable, reproducible .rec/.idx (the check of a finished output: prepare_verify).

Outputs in OUT/: ``train.lst`` (im2rec list: ``index<TAB>label<TAB>path`` with the path relative
to the images folder, so ``im2rec OUT/train.lst IMAGES/`` reads it too), ``train.rec`` and
``train.idx`` (MXNet RecordIO, see :mod:`unicom_cli.data.recordio`), ``labels.csv``
(``landmark_id,label,count``) and ``report.json``.

What happens to bad inputs: images missing on disk are dropped *before* labels are assigned
(labels stay contiguous over what exists); images that cannot be read or decoded are dropped while
encoding and the records after them are renumbered, so the .lst, the .idx and the record ids are
always 0..N-1 in file order. Their landmark keeps its label (labels.csv shows the lower count,
possibly 0). Both kinds are listed with their reason in report.json.

Work in progress lives in ``OUT/.train.partial/`` (the plan, the partial .rec/.idx and a
checkpoint); a killed run started again with the same settings truncates the files to the last
checkpoint and continues, giving the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from unicom_cli.data import reencode
from unicom_cli.data.gldv2 import image_relpath, read_train_csv
from unicom_cli.data.images import DEFAULT_MAX_PIXELS
from unicom_cli.data.recordio import RecordWriter
from unicom_cli.errors import BadImage, DatasetLayout, InputError, OutputExists, UsageError
from unicom_cli.utils.console import info, progress_bar
from unicom_cli.utils.cpu import usable_cores
from unicom_cli.utils.files import disk_errors, output_lock, write_json_atomic, write_text_atomic

PREFIX = "train"
PARTIAL_DIR = ".train.partial"
STATE_VERSION = 1
CHECKPOINT_SECONDS = 5.0
BATCH = 8  # images per worker task


@dataclass
class PrepareConfig:
    """Settings of one preparation run (see ``unicom prepare-gldv2 --help``)."""

    csv: Path
    images: Path | None = None  # default: train/ beside the CSV
    out: Path | None = None  # default: the CSV's folder
    resize: int = 672  # shorter side; 0 keeps the size
    quality: int = 100
    pass_through: bool = False  # store the original bytes (checked to decode)
    workers: int | None = None  # default: all cores; 0 or 1 encodes in this process
    seed: int = 0
    limit: int | None = None  # only the first N images of the CSV
    min_images_per_class: int = 1
    overwrite: bool = False
    progress: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # bigger images are skipped unread, as in embed


@dataclass
class PrepareResult:
    """What a run produced; ``report`` is the content of report.json."""

    out: Path
    records: int
    classes: int
    skipped: int
    resumed_from: int
    seconds: float
    images_per_s: float
    report: dict = field(repr=False, default_factory=dict)


def plan_images(cfg: PrepareConfig, images: Path) -> tuple[list[tuple[int, str]], list[str], dict]:
    """The shuffled list of (label, relative path), the landmark id of each label, and counts.

    Order of operations: --limit (first N images of the CSV), drop missing files,
    --min-images-per-class, labels by first appearance, seeded shuffle.
    """
    rows = read_train_csv(cfg.csv)
    listed = [(row.landmark_id, image_relpath(i)) for row in rows for i in row.image_ids]
    csv_images = len(listed)
    if cfg.limit is not None:
        listed = listed[:cfg.limit]
    present, missing = [], []
    with progress_bar(len(listed), "checking files", enabled=cfg.progress) as bar:
        for n, (landmark, rel) in enumerate(listed, 1):
            (present if os.path.isfile(images / rel) else missing).append((landmark, rel))
            if n % 4096 == 0 or n == len(listed):
                bar.update(completed=n)
    per_class = Counter(landmark for landmark, _ in present)
    kept = [(lm, rel) for lm, rel in present if per_class[lm] >= cfg.min_images_per_class]
    label_of: dict[str, int] = {}
    for landmark, _ in kept:
        label_of.setdefault(landmark, len(label_of))
    entries = [(label_of[lm], rel) for lm, rel in kept]
    random.Random(cfg.seed).shuffle(entries)
    counts = {
        "csv_landmarks": len(rows), "csv_images": csv_images, "after_limit": len(listed),
        "missing": len(missing), "dropped_min_images": len(present) - len(kept),
        "classes_dropped_min_images": sum(1 for c in per_class.values() if c < cfg.min_images_per_class),
        "planned": len(entries), "classes": len(label_of),
    }
    skipped = [{"path": rel, "reason": "missing"} for _, rel in missing]
    return entries, list(label_of), {"counts": counts, "skipped": skipped}


# ----------------------------------------------------------------------------- encoding workers


@dataclass(frozen=True)
class _Encoder:
    """Reads and encodes one batch of images (called from worker threads)."""

    images: str
    resize: int
    quality: int
    pass_through: bool
    max_pixels: int | None

    def __call__(self, rels: list[str]) -> list[tuple[bytes | None, str | None]]:
        return [self.one(rel) for rel in rels]

    def one(self, rel: str) -> tuple[bytes | None, str | None]:
        """(payload, None) or (None, reason it was skipped)."""
        try:
            with open(os.path.join(self.images, rel), "rb") as f:
                data = f.read()
            if self.pass_through:
                reencode.check_decodable(data, self.max_pixels)
                return data, None
            return reencode.reencode(data, self.resize, self.quality, self.max_pixels), None
        except BadImage as exc:
            return None, str(exc)
        except OSError as exc:
            return None, f"unreadable: {exc.strerror or exc}"
        except Exception as exc:  # a decoder error we did not foresee must not stop 1.5 M images
            return None, f"{type(exc).__name__}: {exc}"


def _check_batch(payloads: list[bytes]) -> list[str | None]:
    problems = []
    for data in payloads:
        try:
            reencode.check_decodable(data)
            problems.append(None)
        except BadImage as exc:
            problems.append(str(exc))
    return problems


def _ordered_map(fn, batches, workers: int):
    """Yield ``fn(batch)`` items in order, computed by ``workers`` threads (in this one if <= 1).

    Threads, not processes: OpenCV releases the GIL while it decodes, resizes and encodes, which
    is nearly all the work, so threads use every core without pickling megabytes of pixels
    between processes (processes cost ~15 % more CPU per image here). A bounded window of batches
    is in flight, so results never pile up in memory.
    """
    reencode.single_threaded()
    if workers <= 1:
        for batch in batches:
            yield from fn(batch)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="unicom-encode")
    try:
        todo = iter(batches)
        pending = deque(pool.submit(fn, batch) for batch in islice(todo, 4 * workers))
        while pending:
            results = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _batches(items, size: int = BATCH):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- the run


def _settings(cfg: PrepareConfig, images: Path) -> dict:
    """What the output bytes depend on; a resumed run must match it exactly."""
    stat = cfg.csv.stat()
    return {"csv": str(cfg.csv.resolve()), "csv_size": stat.st_size, "csv_mtime_ns": stat.st_mtime_ns,
            "images": str(images.resolve()), "resize": cfg.resize, "quality": cfg.quality,
            "pass_through": cfg.pass_through, "seed": cfg.seed, "limit": cfg.limit,
            "min_images_per_class": cfg.min_images_per_class}


def _write_json(path: Path, obj: object) -> None:
    write_json_atomic(path, obj, indent=1)


def default_workers() -> int:
    """All cores this process may use."""
    return usable_cores()


def prepare_gldv2(cfg: PrepareConfig) -> PrepareResult:
    """Build OUT/train.{lst,rec,idx}, labels.csv and report.json from GLDv2's train_clean.csv.
    """
    t0 = time.perf_counter()
    cfg.csv = Path(cfg.csv)
    images = Path(cfg.images) if cfg.images else cfg.csv.parent / "train"
    out = Path(cfg.out) if cfg.out else cfg.csv.parent
    if not cfg.csv.is_file():
        raise InputError(f"{cfg.csv}: not found; pass GLDv2's train_clean.csv (header "
                         f"landmark_id,images), from the GLDv2 train set download")
    if not images.is_dir():
        raise DatasetLayout(f"images folder {images} not found: GLDv2 keeps them in train/ beside "
                            f"{cfg.csv.name} (train/0/0/0/000...jpg); pass --images DIR")
    if cfg.resize < 0 or not 1 <= cfg.quality <= 100:
        raise UsageError("--resize must be >= 0 and --quality between 1 and 100")
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: is a file; give the output folder")
    with disk_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        with output_lock(out / PREFIX):
            return _prepare(cfg, images, out, t0)


def _prepare(cfg: PrepareConfig, images: Path, out: Path, t0: float) -> PrepareResult:
    partial = out / PARTIAL_DIR
    if cfg.overwrite and partial.exists():
        shutil.rmtree(partial)
    if not partial.exists() and (out / f"{PREFIX}.rec").exists() and not cfg.overwrite:
        raise OutputExists(f"{out / (PREFIX + '.rec')} already exists; pass --overwrite to rebuild it "
                           f"or `unicom prepare-gldv2 --verify {out}` to check it")
    settings = _settings(cfg, images)
    state_path = partial / "state.json"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("version") != STATE_VERSION or state.get("settings") != settings:
            raise UsageError(f"{out} holds an unfinished run with other settings ({partial}); "
                             f"rerun it with the same options, or pass --overwrite to start over")
        entries = _read_plan(partial / "plan.lst")
        info(f"resuming: {state['done']:,} of {len(entries):,} images already done")
    else:
        partial.mkdir(parents=True, exist_ok=True)
        t_plan = time.perf_counter()
        entries, landmarks, planning = plan_images(cfg, images)
        if not entries:
            raise InputError(f"{cfg.csv}: none of the listed images was found under {images}")
        # written once: the checkpoint (state.json, rewritten every few seconds) stays small
        write_text_atomic(partial / "plan.lst", "".join(f"{label}\t{rel}\n" for label, rel in entries))
        _write_json(partial / "plan.json", {"landmarks": landmarks, **planning,
                                            "plan_seconds": round(time.perf_counter() - t_plan, 3)})
        state = {"version": STATE_VERSION, "settings": settings, "done": 0, "records": 0, "rec_bytes": 0,
                 "idx_bytes": 0, "failed": [], "encode_seconds": 0.0, "finalised": False}
        for name in (f"{PREFIX}.rec", f"{PREFIX}.idx"):
            (partial / name).write_bytes(b"")
        _write_json(state_path, state)
    resumed_from = state["done"]
    if not state["finalised"]:
        _encode_all(cfg, images, partial, entries, state)
        _write_outputs(cfg, images, out, partial, entries, state, resumed_from)
    for name in (f"{PREFIX}.rec", f"{PREFIX}.idx", f"{PREFIX}.lst", "labels.csv", "report.json"):
        if (partial / name).exists():
            os.replace(partial / name, out / name)
    shutil.rmtree(partial)
    report = json.loads((out / "report.json").read_text())
    counts = report["counts"]
    return PrepareResult(out=out, records=counts["written"], classes=counts["classes"],
                         skipped=len(report["skipped"]), resumed_from=resumed_from,
                         seconds=time.perf_counter() - t0,
                         images_per_s=report["timings"]["images_per_s"], report=report)


def _read_plan(path: Path) -> list[tuple[int, str]]:
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            label, rel = line.rstrip("\n").split("\t")
            entries.append((int(label), rel))
    return entries


def _check_partial(rec: Path, idx: Path, state: dict) -> None:
    """Make sure the checkpoint describes bytes that are really on disk (e.g. after a power cut)."""
    from unicom_cli.data.recordio import RecordIOError, parse_span

    if not state["records"]:
        return
    try:
        if rec.stat().st_size < state["rec_bytes"] or idx.stat().st_size < state["idx_bytes"]:
            raise RecordIOError("the partial files are shorter than the checkpoint says")
        with open(idx, "rb") as f:
            key, offset = (int(x) for x in f.read(state["idx_bytes"]).splitlines()[-1].split())
        with open(rec, "rb") as f:
            f.seek(offset)
            payload = parse_span(f.read(state["rec_bytes"] - offset), f"{rec} record {key}", offset)
        if key != state["records"] - 1 or payload[8:16] != key.to_bytes(8, "little"):
            raise RecordIOError(f"the last checkpointed record is not record {state['records'] - 1}")
    except (RecordIOError, ValueError) as exc:
        raise InputError(f"{rec.parent}: cannot resume: {exc} (was the machine switched off?); "
                         f"pass --overwrite to start over") from None


def _encode_all(cfg: PrepareConfig, images: Path, partial: Path, entries: list[tuple[int, str]],
                state: dict) -> None:
    """Encode entries[state.done:] into the partial .rec/.idx, checkpointing ``state`` as it goes."""
    rec, idx = partial / f"{PREFIX}.rec", partial / f"{PREFIX}.idx"
    _check_partial(rec, idx, state)
    os.truncate(rec, state["rec_bytes"])  # drop whatever a killed run wrote after its checkpoint
    os.truncate(idx, state["idx_bytes"])
    workers = default_workers() if cfg.workers is None else cfg.workers
    encoder = _Encoder(str(images), cfg.resize, cfg.quality, cfg.pass_through, cfg.max_pixels)
    start = state["done"]
    todo = [rel for _, rel in entries[start:]]
    failed, records = list(state["failed"]), state["records"]
    # Only whole iterations are committed, so an interrupt anywhere leaves a consistent checkpoint.
    committed = (start, records, state["rec_bytes"], state["idx_bytes"], len(failed))
    t_start = t_check = time.perf_counter()
    seconds_before = state["encode_seconds"]

    def checkpoint(writer: RecordWriter) -> None:
        writer.flush()  # to the OS, which keeps it across a kill; fsync here would stall the pipeline
        done, n_records, rec_bytes, idx_bytes, n_failed = committed
        state.update(done=done, records=n_records, rec_bytes=rec_bytes, idx_bytes=idx_bytes,
                     failed=failed[:n_failed],
                     encode_seconds=round(seconds_before + time.perf_counter() - t_start, 3))
        _write_json(partial / "state.json", state)

    with RecordWriter(rec, idx, append=True) as writer, \
            progress_bar(len(entries), "encoding", enabled=cfg.progress, completed=start) as bar:
        encoded = _ordered_map(encoder, _batches(todo), workers)
        try:
            for pos, (payload, reason) in enumerate(encoded, start):
                label, rel = entries[pos]
                if payload is None:
                    failed.append({"position": pos, "path": rel, "reason": reason})
                else:
                    writer.write(records, float(label), payload)
                    records += 1
                committed = (pos + 1, records, writer.tell(), writer.idx_tell(), len(failed))
                bar.advance()
                if time.perf_counter() - t_check > CHECKPOINT_SECONDS:
                    checkpoint(writer)
                    t_check = time.perf_counter()
        finally:  # also on Ctrl-C or an error: keep what is complete, then stop the workers
            try:
                checkpoint(writer)
            finally:  # even when the checkpoint fails too (a full disk): a pool left open was
                encoded.close()  # closed by the cycle collector from its own thread at exit
        if state["done"] == len(entries):
            writer.flush(fsync=True)  # the finished files reach the disk before they are renamed


def _write_outputs(cfg: PrepareConfig, images: Path, out: Path, partial: Path,
                   entries: list[tuple[int, str]], state: dict, resumed_from: int) -> None:
    """Write train.lst, labels.csv and report.json into the partial folder, then mark it final."""
    failed = {f["position"] for f in state["failed"]}
    written = [entry for pos, entry in enumerate(entries) if pos not in failed]
    write_text_atomic(partial / f"{PREFIX}.lst",
                "".join(f"{i}\t{label:f}\t{rel}\n" for i, (label, rel) in enumerate(written)))
    plan = json.loads((partial / "plan.json").read_text())
    landmarks = plan["landmarks"]
    per_label = Counter(label for label, _ in written)
    # csv quoting: a landmark id may hold a comma, a quote or a line break
    table = io.StringIO(newline="")
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["landmark_id", "label", "count"])
    writer.writerows((landmark, label, per_label[label]) for label, landmark in enumerate(landmarks))
    write_text_atomic(partial / "labels.csv", table.getvalue())
    encode_s = state["encode_seconds"]
    done_now = len(entries) - resumed_from
    report = {
        "csv": str(cfg.csv), "images": str(images), "out": str(out),
        "settings": {"resize": cfg.resize, "quality": cfg.quality, "pass_through": cfg.pass_through,
                     "seed": cfg.seed, "limit": cfg.limit, "min_images_per_class": cfg.min_images_per_class,
                     "workers": default_workers() if cfg.workers is None else cfg.workers},
        "counts": {**plan["counts"], "failed": len(state["failed"]), "written": len(written),
                   "empty_classes": sum(1 for label in range(len(landmarks)) if not per_label[label])},
        "skipped": plan["skipped"] + [{"path": f["path"], "reason": f["reason"]} for f in state["failed"]],
        "timings": {"plan_s": plan["plan_seconds"], "encode_s": encode_s,
                    "images_per_s": round(len(entries) / encode_s, 1) if encode_s else None,
                    "resumed_from": resumed_from, "encoded_this_run": done_now},
        "files": {name: (partial / name).stat().st_size for name in (f"{PREFIX}.rec", f"{PREFIX}.idx")},
    }
    _write_json(partial / "report.json", report)
    state["finalised"] = True
    _write_json(partial / "state.json", state)
