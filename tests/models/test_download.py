"""Downloads against a real HTTP server on 127.0.0.1: resume, verify, retry, mirror, Drive, cache."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from tests.weights_server import weights_server  # noqa: F401 (fixture)
from unicom_cli.errors import ChecksumMismatch, DownloadError, UsageError
from unicom_cli.models import registry
from unicom_cli.models.download import fetch, fetch_weights, source_url
from unicom_cli.models.registry import GITHUB_RELEASES, ModelSpec
from unicom_cli.models.weights import read_sidecar

PATH = "/tiny/FP16-tiny.pt"


@pytest.fixture
def payload(tiny_checkpoint) -> bytes:
    return tiny_checkpoint.read_bytes()


def _spec(url: str | None, sha256: str | None, gdrive_id: str | None = None) -> ModelSpec:
    return ModelSpec("tiny-dl", 32, 8, 32, 2, 2, 16, filename="FP16-tiny.pt", url=url,
                     gdrive_id=gdrive_id, sha256=sha256)


@pytest.fixture
def served(weights_server, payload):  # noqa: F811
    weights_server.files[PATH] = payload
    return weights_server


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "cache"  # apart from the checkpoint fixture's file
    path.mkdir()
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_complete_download_verifies_and_records(served, payload, cache):
    result = fetch(_spec(served.base + PATH, _sha(payload)), cache=cache)
    assert result.status == "downloaded" and result.checksum == "published"
    assert result.path == cache / "FP16-tiny.pt"
    assert result.path.read_bytes() == payload
    assert read_sidecar(result.path) == _sha(payload)
    assert not (cache / "FP16-tiny.pt.part").exists()
    assert served.requested(PATH) == [None]


def test_cut_connection_resumes_with_range(served, payload, cache):
    served.fault(PATH, "cut")
    path = fetch_weights(_spec(served.base + PATH, _sha(payload)), cache=cache)
    assert path.read_bytes() == payload
    ranges = served.requested(PATH)
    assert ranges == [None, f"bytes={len(payload) // 2}-"]


def test_interrupted_part_from_earlier_run_is_resumed(served, payload, cache):
    (cache / "FP16-tiny.pt.part").write_bytes(payload[:1000])
    path = fetch_weights(_spec(served.base + PATH, _sha(payload)), cache=cache)
    assert path.read_bytes() == payload
    assert served.requested(PATH) == ["bytes=1000-"]


def test_server_ignoring_range_restarts_from_zero(served, payload, cache):
    (cache / "FP16-tiny.pt.part").write_bytes(payload[:1000])
    served.fault(PATH, "ignore-range")
    path = fetch_weights(_spec(served.base + PATH, _sha(payload)), cache=cache)
    assert path.read_bytes() == payload  # not 1000 bytes + the whole file
    assert served.requested(PATH) == ["bytes=1000-"]


def test_junk_part_is_discarded_and_downloaded_again(served, payload, cache):
    (cache / "FP16-tiny.pt.part").write_bytes(b"\0" * 1000)
    path = fetch_weights(_spec(served.base + PATH, _sha(payload)), cache=cache)
    assert path.read_bytes() == payload
    assert served.requested(PATH) == ["bytes=1000-", None]


def test_corrupted_bytes_are_rejected_and_nothing_is_cached(served, payload, cache):
    served.fault(PATH, "corrupt")
    with pytest.raises(ChecksumMismatch, match="do not match the expected"):
        fetch(_spec(served.base + PATH, _sha(payload)), cache=cache)
    assert not (cache / "FP16-tiny.pt").exists()
    assert not (cache / "FP16-tiny.pt.part").exists()


def test_server_error_then_success(served, payload, cache):
    served.fault(PATH, "500")
    path = fetch_weights(_spec(served.base + PATH, _sha(payload)), cache=cache)
    assert path.read_bytes() == payload
    assert len(served.requested(PATH)) == 2


def test_persistent_server_error_gives_up_naming_the_url(served, payload, cache):
    served.fault(PATH, "500", "500", "500")
    url = served.base + PATH
    with pytest.raises(DownloadError, match="500") as info:
        fetch(_spec(url, _sha(payload)), cache=cache, retries=2)
    assert url in str(info.value) and "--mirror" in str(info.value)
    assert len(served.requested(PATH)) == 3


def test_404_is_a_clear_error(served, cache):
    url = served.base + "/tiny/missing.pt"
    with pytest.raises(DownloadError) as info:
        fetch(_spec(url, None), cache=cache)
    message = str(info.value)
    assert url in message and "404" in message and "--weights" in message
    assert len(served.requested("/tiny/missing.pt")) == 1  # a 404 is not retried


def test_html_instead_of_weights_is_refused(served, cache):
    served.fault(PATH, "html")
    with pytest.raises(DownloadError, match="web page"):
        fetch(_spec(served.base + PATH, None), cache=cache)
    assert not (cache / "FP16-tiny.pt").exists()


def test_cached_file_is_reused_without_a_request(served, payload, cache):
    spec = _spec(served.base + PATH, _sha(payload))
    fetch(spec, cache=cache)
    served.requests.clear()
    again = fetch(spec, cache=cache)
    assert again.status == "cached" and again.sha256 == _sha(payload)
    assert served.requests == []


def test_corrupt_cached_file_is_downloaded_again(served, payload, cache):
    spec = _spec(served.base + PATH, _sha(payload))
    (cache / "FP16-tiny.pt").write_bytes(payload[:-1] + b"x")
    result = fetch(spec, cache=cache)
    assert result.status == "downloaded" and result.path.read_bytes() == payload
    assert served.requested(PATH) == [None]


def test_mirror_env_replaces_the_github_prefix(served, payload, cache, monkeypatch):
    spec = _spec(f"{GITHUB_RELEASES}/tiny/FP16-tiny.pt", _sha(payload))
    monkeypatch.setenv("UNICOM_MIRROR", served.base + "/")
    assert source_url(spec) == served.base + PATH
    assert fetch_weights(spec, cache=cache).read_bytes() == payload
    assert served.requested(PATH) == [None]


def test_mirror_can_be_a_local_folder(payload, tmp_path):
    (tmp_path / "mirror" / "tiny").mkdir(parents=True)
    (tmp_path / "mirror" / "tiny" / "FP16-tiny.pt").write_bytes(payload)
    spec = _spec(f"{GITHUB_RELEASES}/tiny/FP16-tiny.pt", _sha(payload))
    path = fetch_weights(spec, cache=tmp_path / "cache", mirror=str(tmp_path / "mirror"))
    assert path.read_bytes() == payload


def test_unreachable_server_names_url_and_ways_out(cache, monkeypatch):
    monkeypatch.setenv("UNICOM_DOWNLOAD_BACKOFF", "0")
    spec = _spec(f"{GITHUB_RELEASES}/tiny/FP16-tiny.pt", None)
    with pytest.raises(DownloadError) as info:  # port 9 (discard) is closed on the loopback
        fetch(spec, cache=cache, mirror="http://127.0.0.1:9", retries=1)
    message = str(info.value)
    assert "http://127.0.0.1:9/tiny/FP16-tiny.pt" in message
    assert "--mirror" in message and "--weights" in message


def test_google_drive_confirm_flow_computes_and_records_checksum(served, payload, cache,
                                                                 monkeypatch):
    served.drive["abc_ID-1"] = PATH
    monkeypatch.setenv("UNICOM_GDRIVE_URL", served.base)
    spec = _spec(None, None, gdrive_id="abc_ID-1")
    result = fetch(spec, cache=cache)
    assert result.status == "downloaded" and result.checksum == "computed"
    assert result.path.read_bytes() == payload
    assert result.sha256 == _sha(payload) == read_sidecar(result.path)
    assert [p for p, _ in served.requests] == ["/uc", "/download"]
    # A later corruption is caught against the recorded digest.
    result.path.write_bytes(payload[:-1] + b"x")
    assert fetch(spec, cache=cache).path.read_bytes() == payload


def test_google_drive_pin_rejects_other_bytes(served, payload, cache):
    served.drive["abc"] = PATH
    spec = _spec(None, None, gdrive_id="abc")
    with pytest.raises(ChecksumMismatch):
        fetch(spec, cache=cache, sha256="0" * 64, gdrive_url=served.base)
    assert fetch(spec, cache=cache, sha256=_sha(payload).upper(),
                 gdrive_url=served.base).checksum == "pinned"


def test_google_drive_quota_page_is_a_clear_error(served, cache):
    served.drive_quota.add("busy")
    with pytest.raises(DownloadError, match="quota may be exceeded.*--weights"):
        fetch(_spec(None, None, gdrive_id="busy"), cache=cache, gdrive_url=served.base)
    assert [p for p, _ in served.requests] == ["/uc", "/uc"]  # the page, then confirm=t
    assert not (cache / "FP16-tiny.pt").exists()


def test_bad_pin_is_a_usage_error(cache):
    with pytest.raises(UsageError, match="64 hexadecimal"):
        fetch(_spec("http://127.0.0.1:9/x.pt", None), cache=cache, sha256="abc")


def test_concurrent_fetches_download_once(served, payload, cache):
    spec = _spec(served.base + PATH, _sha(payload))
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch(spec, cache=cache)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status for r in results) == ["cached", "cached", "downloaded"]
    assert served.requested(PATH) == [None]


def test_create_model_downloads_on_first_use(served, payload, tiny_checkpoint, monkeypatch):
    import torch

    from unicom_cli.models.factory import create_model

    spec = _spec(served.base + PATH, _sha(payload))
    monkeypatch.setitem(registry._MODELS, spec.name, spec)
    loaded = create_model(spec.name)
    assert loaded.sha256 == _sha(payload) and loaded.weights_path.name == "FP16-tiny.pt"
    reference = torch.load(tiny_checkpoint, weights_only=True)
    assert torch.equal(loaded.model.state_dict()["pos_embed"], reference["pos_embed"].float())
    served.requests.clear()
    create_model(spec.name)
    assert served.requests == []


# ----------------------------------------------------------------------------- issue 19, items 7-8

def test_cut_then_416_is_never_cached_as_final(served, payload, cache):
    """Item 7: a Drive-style file (no published digest) cut halfway, then 416 to the resume: the
    half must not be cached (it was, digest recorded, --verify ok); the download starts over."""
    served.fault(PATH, "cut", "416")
    result = fetch(_spec(served.base + PATH, None), cache=cache)
    assert result.path.read_bytes() == payload
    assert read_sidecar(result.path) == _sha(payload)
    assert served.requested(PATH)[-1] is None  # the last request started over from byte 0


def test_416_to_a_leftover_part_starts_over(served, payload, cache):
    (cache / "FP16-tiny.pt.part").write_bytes(payload[: len(payload) // 3])
    served.fault(PATH, "416")
    assert fetch(_spec(served.base + PATH, None), cache=cache).path.read_bytes() == payload


def test_a_trickle_stalls_and_is_retried(served, payload, cache, monkeypatch):
    """Item 8: 20 bytes/s never trips the per-read timeout; the stall window does."""
    monkeypatch.setenv("UNICOM_DOWNLOAD_STALL_S", "0.5")
    served.fault(PATH, "trickle")
    path = fetch_weights(_spec(served.base + PATH, _sha(payload)), cache=cache)
    assert path.read_bytes() == payload
    assert len(served.requested(PATH)) == 2 and served.requested(PATH)[1] is not None


def test_a_server_cutting_every_response_is_given_up_on(served, payload, cache):
    """Item 8: every response cut at half used to mean requests without end."""
    served.fault(PATH, *["cut"] * 1000)
    with pytest.raises(DownloadError, match="failed attempts"):
        fetch(_spec(served.base + PATH, _sha(payload)), cache=cache, retries=2)
    assert len(served.requested(PATH)) == 4 * (2 + 1)
    assert not (cache / "FP16-tiny.pt").exists()


def test_a_body_without_length_is_capped(served, cache):
    """Item 8: no Content-Length and no end: stopped at the expected size + margin."""
    served.fault(PATH, "endless")
    spec = _spec(served.base + PATH, None)
    with pytest.raises(DownloadError, match="without announcing a length"):
        fetch(spec, cache=cache, retries=0)
    assert not (cache / "FP16-tiny.pt").exists() and not (cache / "FP16-tiny.pt.part").exists()


def _age(path, seconds: int = 10) -> None:
    """Move the file's modification time into the past (as a download finished long ago)."""
    old = path.stat().st_mtime_ns - seconds * 10**9
    os.utime(path, ns=(old, old))


def test_fresh_record_is_trusted_and_verify_still_hashes(served, payload, cache, monkeypatch):
    """Loading trusts <file>.sha256 when size and mtime are unchanged; --verify reads every byte."""
    from unicom_cli.models import weights
    from unicom_cli.models.download import verify_cache

    spec = _spec(served.base + PATH, _sha(payload))
    monkeypatch.setitem(registry._MODELS, spec.name, spec)
    path = fetch(spec, cache=cache).path
    _age(path)  # the record no longer matches: the next load hashes once and records again
    hashed = []
    real = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert fetch(spec, cache=cache).sha256 == _sha(payload) and hashed == [path]
    assert fetch(spec, cache=cache).sha256 == _sha(payload) and hashed == [path]  # trusted

    # Same size, same mtime, other bytes: loading cannot tell; --verify can.
    stat = path.stat()
    path.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fetch(spec, cache=cache).status == "cached" and len(hashed) == 1
    [result] = verify_cache([spec.name], cache=cache)
    assert result.status == "corrupt" and result.sha256 == _sha(path.read_bytes())


def test_changed_file_is_hashed_again_even_within_one_clock_tick(served, payload, cache, monkeypatch):
    """A rewrite keeping the size is caught by the mtime, or, in the same tick, by the record
    being no older than the file."""
    spec = _spec(served.base + PATH, _sha(payload))
    path = fetch(spec, cache=cache).path
    _age(path)
    fetch(spec, cache=cache)  # fresh record now
    stat = path.stat()
    path.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    assert path.stat().st_mtime_ns != stat.st_mtime_ns
    result = fetch(spec, cache=cache)
    assert result.status == "downloaded" and path.read_bytes() == payload


def test_a_download_that_keeps_stalling_gives_up_after_the_stall_budget(served, payload, cache, monkeypatch):
    """Issue 28 item 27: each stalled attempt made progress (a few bytes), so the failure count
    reset and only the 20-attempt budget ended it: ~20 minutes at the 60 s stall window. The
    stalled time now adds up across attempts: 0.3 s windows, a 0.75 s budget → the third stall."""
    monkeypatch.setenv("UNICOM_DOWNLOAD_STALL_S", "0.3")
    monkeypatch.setenv("UNICOM_DOWNLOAD_STALL_BUDGET_S", "0.75")
    served.fault(PATH, *["trickle"] * 100)
    with pytest.raises(DownloadError, match=r"stalled for [\d.]+ s in all .*UNICOM_DOWNLOAD_STALL_BUDGET_S"):
        fetch(_spec(served.base + PATH, _sha(payload)), cache=cache)
    assert 3 <= len(served.requested(PATH)) <= 4
    assert not (cache / "FP16-tiny.pt").exists()


def test_the_default_stall_budget_is_a_few_minutes():
    from unicom_cli.models.download import _settings

    settings = _settings(None, None, False, None)
    assert 60 <= settings.stall_budget <= 300 and settings.stall_budget >= settings.stall
