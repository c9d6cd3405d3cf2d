"""`unicom index` job: embed a folder first when given one (the embed pipeline, resumable), then build the index."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from unicom_cli.errors import UsageError
from unicom_cli.index.build import BuildConfig, BuildSummary
from unicom_cli.pipelines.embed import EmbedConfig


@dataclass
class IndexJob:
    """A build plus, for inputs that are images, the embed runs that make its feature files."""

    build: BuildConfig
    embeds: list[EmbedConfig] = field(default_factory=list)
    embed_summaries: list = field(default_factory=list)  # EmbedSummary of each embed run (rank 0)


def is_features(path: Path) -> bool:
    """A .npy from `unicom embed`, or a folder of feature shards (manifest.json)."""
    from unicom_cli.index.shards import is_shard_folder

    return Path(path).suffix.lower() == ".npy" or is_shard_folder(path)


def features_path(index: Path, input_path: Path, n: int) -> Path:
    """Where a folder's embeddings are kept: beside the index, named after it, so that the
    embed run resumes after an interruption and ``--add`` can re-tune against them later.
    Tar shards and tables get a folder of feature shards (``embed -o feats/``)."""
    from unicom_cli.data.sources import is_collection_source

    index = Path(index)
    tag = "" if n == 0 else f"-{n}"
    if is_collection_source(input_path):
        return index.parent / f"{index.name}.feats{tag}"
    return index.parent / f"{index.name}.feats{tag}.npy"


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
            and meta.get("images") == len(list_images(embed.input)))
    if not same and not embed.overwrite:
        raise UsageError(f"{embed.output}: holds embeddings of another input or with other "
                         "options; add --overwrite to re-embed")
    return same and not embed.overwrite


def run_index_job(job: IndexJob) -> tuple[list, BuildSummary] | None:
    """Embed what needs embedding (all ranks take part), then build (all ranks add shards)."""
    from unicom_cli.distributed import barrier
    from unicom_cli.index.build import run_build
    from unicom_cli.index.store import check_output
    from unicom_cli.pipelines.embed import embed_images
    from unicom_cli.utils.console import info

    if not job.build.add:  # before any embedding: a finished index needs --overwrite
        check_output(job.build.output, job.build.overwrite)
    for embed in job.embeds:
        if _finished_for(embed):
            info(f"reusing {embed.output} (embeddings of {embed.input})")
            continue
        summary = embed_images(embed)
        if summary is not None:
            job.embed_summaries.append(summary)
        barrier()
    built = run_build(job.build)
    return None if built is None else (job.embed_summaries, built)
