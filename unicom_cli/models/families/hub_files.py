"""Hub model files through huggingface_hub (its cache, resume, revisions, mirror, offline mode),
and the checks that refuse unsafe or unusable repositories before any weights are read.

Only ``config.json``, ``preprocessor_config.json`` and safetensors weights are fetched; pickled
weights (``.bin``) and models that need ``trust_remote_code`` are refused with the reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from unicom_cli.errors import DownloadError, InputError, UnknownModel, UnsupportedModel, UsageError

HUB_EXTRA = "pip install 'unicom-cli[hub]'"
CONFIG_FILES = ["config.json", "preprocessor_config.json"]
WEIGHT_PATTERNS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class HubFiles:
    """A model's files on this machine: the folder and, for a hub download, the commit."""

    folder: Path  # holds config.json (+ preprocessor_config.json, safetensors weights)
    repo: str  # hub repo id, or the folder for a local model
    commit: str | None  # resolved hub commit; None for a local folder


def require_hub() -> None:
    """transformers and huggingface_hub, or one line naming the extra that installs them."""
    try:
        import huggingface_hub  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"hub and MLCD models need transformers and huggingface_hub ({exc.name} is "
                         f"missing): {HUB_EXTRA}") from exc


def parse_hub_name(key: str) -> tuple[str, str | None]:
    """``hf:ORG/NAME[@REVISION]`` → (repo id, revision or None)."""
    body = key[3:] if key.startswith("hf:") else key
    repo, _, revision = body.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UnknownModel(f"'{key}': a hub model is named hf:ORG/NAME[@REVISION], e.g. "
                           f"hf:DeepGlint-AI/mlcd-vit-base-patch32-224")
    return repo, revision or None


def is_commit(revision: str) -> bool:
    """A full 40-hex commit id (immutable), not a branch or tag."""
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def hub_cache(cache: str | Path | None) -> str | None:
    """Where hub files go: <--cache-dir>/huggingface, else huggingface_hub's own cache (HF_HOME…)."""
    return str(Path(cache) / "huggingface") if cache else None


def _offline_fix(repo: str, endpoint: str | None) -> str:
    where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return (f"download it once where {where} is reachable (or point --mirror/HF_ENDPOINT at a hub "
            f"mirror), or pass a local save_pretrained folder of {repo} as --model")


def fetch(repo: str, revision: str | None, *, cache: str | Path | None = None, mirror: str | None = None,
          weights: bool = True, config_files: list[str] = CONFIG_FILES) -> HubFiles:
    """The model's configuration (and with ``weights`` its safetensors) at ``revision``, from the
    cache or downloaded. Repository checks run before any weights are transferred."""
    require_hub()
    from huggingface_hub import constants, snapshot_download

    endpoint = mirror.rstrip("/") if mirror else None
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise UsageError(f"--mirror {mirror}: a hub mirror is an http(s) address (it serves the hub's "
                         f"API, as HF_ENDPOINT does)")
    cache_dir = hub_cache(cache)
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    patterns = config_files + (WEIGHT_PATTERNS if weights else [])
    if not offline and revision and is_commit(revision):  # immutable: a cached copy needs no network
        offline = _cached(repo, revision, cache_dir, patterns, weights)
    checked = None if offline else _check_repo(repo, revision, endpoint)
    try:  # by the name asked for, so that the cache records the branch → commit ref (offline use)
        folder = snapshot_download(repo, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                                   allow_patterns=patterns, local_files_only=offline)
    except Exception as exc:  # noqa: BLE001 - mapped to one line below
        raise _download_error(exc, repo, revision, endpoint, offline) from exc
    folder = Path(folder)
    if checked and folder.name != checked:
        raise DownloadError(f"hf:{repo}: {revision or 'main'} moved from {checked} to {folder.name} during the "
                            f"download; run again (or pin @{folder.name})")
    check_folder(folder, repo, processor="preprocessor_config.json" in config_files)
    if weights and not any(folder.glob("*.safetensors")):  # offline, cached without the weights
        raise InputError(f"{repo}: the cache holds its configuration but not its weights; "
                         f"{_offline_fix(repo, endpoint)}")
    return HubFiles(folder, repo, folder.name)


def _cached(repo: str, commit: str, cache_dir: str | None, patterns: list[str], weights: bool) -> bool:
    """Whether the cache holds this commit's files (with weights when asked for)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, revision=commit, cache_dir=cache_dir, allow_patterns=patterns,
                                        local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and kin)
        return False
    return (folder / "config.json").is_file() and (not weights or any(folder.glob("*.safetensors")))


def _check_repo(repo: str, revision: str | None, endpoint: str | None) -> str | None:
    """The commit ``revision`` resolves to, after refusing repositories without safetensors.
    None when the hub cannot be reached (the cache decides then)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=revision)
    except Exception as exc:  # noqa: BLE001
        error = _download_error(exc, repo, revision, endpoint, offline=False)
        if isinstance(error, DownloadError):
            return revision  # unreachable: a cached copy may still do
        raise error from exc
    files = [s.rfilename for s in (info.siblings or [])]
    if not any(f.endswith(".safetensors") for f in files):
        pickled = [f for f in files if f.endswith(PICKLED)]
        what = f"only pickled weights ({', '.join(pickled[:3])})" if pickled else "no weights file"
        raise UnsupportedModel(f"hf:{repo}: has {what}; unicom loads safetensors only, because "
                               f"unpickling a downloaded file can run arbitrary code")
    return info.sha


def _download_error(exc: Exception, repo: str, revision: str | None, endpoint: str | None,
                    offline: bool) -> Exception:
    """huggingface_hub's exceptions as one-line UnicomErrors with the fix."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, RevisionNotFoundError):
        return UsageError(f"hf:{repo}@{revision}: the hub has no revision {revision!r} of {repo}; "
                          f"use a branch, tag or commit that exists (or drop @{revision})")
    if isinstance(exc, GatedRepoError):
        return UsageError(f"hf:{repo}: gated on the hub; accept its terms and log in (hf auth login)")
    if isinstance(exc, RepositoryNotFoundError):
        return UnknownModel(f"hf:{repo}: no such model on {endpoint or 'the hub'}; check the id "
                            f"(hf:ORG/NAME) or use a registered name (`unicom models`)")
    if isinstance(exc, LocalEntryNotFoundError) or offline:
        state = "offline (HF_HUB_OFFLINE)" if offline else "the hub cannot be reached"
        return UsageError(f"hf:{repo}: not in the cache and {state}; {_offline_fix(repo, endpoint)}")
    return DownloadError(f"hf:{repo}: download failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                         f"run again to resume, or {_offline_fix(repo, endpoint)}")


def check_folder(folder: Path, name: str, processor: bool = True) -> dict:
    """config.json of a model folder, after refusing what cannot be loaded safely; returns it."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder / 'config.json'}: cannot read the model configuration ({exc})") from exc
    if not isinstance(config, dict):
        raise InputError(f"{folder / 'config.json'}: not a model configuration (a JSON object)")
    if config.get("auto_map"):
        raise UnsupportedModel(f"{name}: needs trust_remote_code (its config.json maps to code in the "
                               f"repository, auto_map), which unicom never runs: downloaded code "
                               f"would execute on this machine")
    files = [p.name for p in folder.iterdir()]
    if not any(f.endswith(".safetensors") for f in files) and any(f.endswith(PICKLED) for f in files):
        raise UnsupportedModel(f"{name}: has only pickled weights; unicom loads safetensors only, "
                               f"because unpickling a file can run arbitrary code (re-save it with "
                               f"save_pretrained(safe_serialization=True))")
    if processor and not (folder / "preprocessor_config.json").is_file():
        raise InputError(f"{name}: no preprocessor_config.json beside config.json: the image "
                         f"preprocessing (size, crop, mean/std) would be a guess; save the model's "
                         f"image processor with it")
    return config


def local_files(folder: Path) -> HubFiles:
    """A save_pretrained folder on this machine: no network, no commit."""
    folder = Path(folder)
    check_folder(folder, str(folder))
    return HubFiles(folder.resolve(), str(folder.resolve()), None)


def cached_weights(repo: str, cache: str | Path | None = None) -> Path | None:
    """model.safetensors of ``repo``'s main revision in the hub cache (None: not cached, or no
    huggingface_hub). Reads the cache only: instant, no network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, "model.safetensors", cache_dir=hub_cache(cache))
    return Path(found) if isinstance(found, str) else None
