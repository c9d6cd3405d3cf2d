"""`unicom index` job: embed a folder first when given one (the embed pipeline, resumable), then build the index."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from unicom_cli.errors import UsageError
from unicom_cli.index.backends.milvus import MilvusRef
from unicom_cli.index.backends.milvus_build import MilvusBuildConfig, check_milvus_output
from unicom_cli.index.build import BuildConfig, BuildSummary
from unicom_cli.pipelines.embed import EmbedConfig


@dataclass
class IndexJob:
    """A build plus, for inputs that are images, the embed runs that make its feature files."""

    build: BuildConfig | MilvusBuildConfig
    embeds: list[EmbedConfig] = field(default_factory=list)
    embed_summaries: list = field(default_factory=list)  # EmbedSummary of each embed run (rank 0)


def is_features(path: Path) -> bool:
    """A .npy from `unicom embed`, or a folder of feature shards (manifest.json)."""
    from unicom_cli.index.shards import is_shard_folder

    return Path(path).suffix.lower() == ".npy" or is_shard_folder(path)


def features_folder(index: Path) -> Path:
    """The one folder beside the index that holds the embeddings of its image inputs.

    Not inside the index: the index folder is replaced in one rename when a build finishes,
    while the embed run must survive an interruption to resume, and ``--add`` re-tunes
    against the earlier embeddings later. Deleting it costs only that."""
    index = Path(index)
    return index.parent / f"{index.name}.features"


def features_path(index: Path, input_path: Path, n: int) -> Path:
    """The embed output of the ``n``-th image input (``feats.npy``, then ``feats-1.npy`` …); tar
    shards and tables get a folder of feature shards (``feats/``, ``embed -o feats/``)."""
    from unicom_cli.data.sources import is_collection_source

    stem = "feats" if n == 0 else f"feats-{n}"
    return features_folder(index) / (stem if is_collection_source(input_path) else f"{stem}.npy")


def milvus_reference(output: str | None, uri: str | None, collection: str | None, first_input: Path) -> MilvusRef:
    """The collection `unicom index` writes: ``-o milvus:URI#NAME``, or ``--uri`` with ``--collection``
    (default: a name made from the first input's)."""
    from unicom_cli.index.backends.milvus import collection_name_for, is_reference, parse_reference

    if output is not None and not is_reference(output):
        raise UsageError(f"-o {output}: with --backend milvus write -o milvus:URI#NAME, or give --uri "
                         "and --collection instead of -o")
    if output is not None and uri is not None:
        raise UsageError("give either -o milvus:URI#NAME or --uri (with --collection), not both")
    if output is not None:
        return parse_reference(output, collection)
    if uri is None:
        raise UsageError("--backend milvus needs --uri (a local .db path or http(s)://host:19530) "
                         "or -o milvus:URI#NAME")
    return parse_reference(uri, collection or collection_name_for(Path(first_input).stem))


def milvus_features_path(ref: MilvusRef, input_path: Path, first: bool) -> Path:
    """Where a folder's embeddings for a Milvus collection are kept: beside the .db file (the current
    folder for a server), named after the collection and, for later inputs, the input, so that a
    rerun finds them and resumes."""
    from unicom_cli.index.backends.milvus import collection_name_for

    folder = Path(ref.uri).parent if ref.embedded else Path(".")
    tag = "" if first else "-" + collection_name_for(Path(input_path).name)
    return folder / f"{ref.collection}.feats{tag}.npy"


def _same_hub_model(meta: dict, model: str) -> bool:
    """For hf:/timm: names, the recorded model and (when a commit is pinned) its revision."""
    if not model.startswith(("hf:", "timm:")):
        return True
    name, _, revision = model.partition("@")
    return meta.get("model") == name and (len(revision) != 40 or meta.get("revision") == revision)


def _finished_for(embed: EmbedConfig) -> bool:
    """True when ``embed.output`` is a finished embedding of the same input and model options
    (a shard folder is never: `embed` itself skips its finished shards)."""
    if embed.output.suffix != ".npy":
        return False
    meta_path = embed.output.with_suffix(".json")
    if not (embed.output.is_file() and meta_path.is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    from unicom_cli.data.images import list_images

    same = (meta.get("input") == str(Path(embed.input).resolve())
            and meta.get("normalized") == embed.normalize and meta.get("num_feat") == embed.num_feat
            and meta.get("images") == len(list_images(embed.input)) and _same_hub_model(meta, str(embed.model)))
    if not same and not embed.overwrite:
        raise UsageError(f"{embed.output}: holds embeddings of another input or with other "
                         "options; add --overwrite to re-embed")
    return same and not embed.overwrite


def run_index_job(job: IndexJob) -> tuple[list, BuildSummary] | None:
    """Embed what needs embedding (all ranks take part), then build (all ranks add shards)."""
    from unicom_cli.distributed import barrier, is_main
    from unicom_cli.index.build import run_build
    from unicom_cli.index.folder import check_output
    from unicom_cli.pipelines.embed import embed_images
    from unicom_cli.utils.console import info

    milvus = isinstance(job.build, MilvusBuildConfig)
    if not job.build.add and not milvus:  # before any embedding: a finished index needs --overwrite
        check_output(job.build.output, job.build.overwrite)
    if not job.build.add and milvus and is_main():  # one client: milvus-lite admits one process per .db
        check_milvus_output(job.build)
    for embed in job.embeds:
        if _finished_for(embed):
            info(f"reusing {embed.output} (embeddings of {embed.input})")
            continue
        summary = embed_images(embed)
        if summary is not None:
            job.embed_summaries.append(summary)
        barrier()
    if milvus:
        from unicom_cli.index.backends.milvus_build import run_milvus_build

        built = run_milvus_build(job.build) if is_main() else None  # one client inserts
    else:
        built = run_build(job.build)
    return None if built is None else (job.embed_summaries, built)
