"""What the service sends from disk and what it calls it: only files inside the collection,
named relative to it, and every name `embed` accepts intact through the JSON API
(issue 28 items 1-2, issue 27 items 12 and 14)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from tests.serve.conftest import HTML_NAME, LATIN1_NAME, OUTSIDE_IDS

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow


def _search(server, data: bytes, k: int) -> httpx.Response:
    return httpx.post(server.url + f"/search?k={k}", files={"image": ("q.jpg", data)}, timeout=60)


def test_files_outside_the_collection_are_refused_and_announced(hostile_server, hostile):
    log = "\n".join(hostile_server.lines)
    assert f"{len(OUTSIDE_IDS)} of {len(hostile.ids)} ids lead outside the collection" in log
    secret = (hostile.images.parent / "outside" / "secret.jpg").read_bytes()
    passwd = open("/etc/passwd", "rb").read()
    for name in OUTSIDE_IDS:
        row = hostile.ids.index(name)
        for query in ("", "?size=64"):
            r = httpx.get(hostile_server.url + f"/images/{row}{query}")
            assert r.status_code == 404, (name, r.status_code)
            assert "outside the collection" in r.json()["detail"]
            assert r.content not in (secret, passwd) and b"root:" not in r.content


def test_a_symlink_that_stays_inside_is_served(hostile_server, hostile):
    row = hostile.ids.index("inside-link.jpg")
    r = httpx.get(hostile_server.url + f"/images/{row}")
    assert r.status_code == 200 and r.content == (hostile.images / "sub" / "coins.jpg").read_bytes()


def test_results_name_files_relative_to_the_collection(hostile_server, hostile):
    """Every row as a query: each answer is 200 (the Latin-1 name among its results), a served
    row's path is its id (relative, no '..'), a refused row has no path and no thumbnail."""
    feats = hostile.feats / np.linalg.norm(hostile.feats, axis=1, keepdims=True)
    for row in range(len(hostile.ids)):
        r = httpx.post(hostile_server.url + f"/search?k={len(hostile.ids)}",
                       json={"vector": feats[row].tolist()}, timeout=60)
        assert r.status_code == 200, (hostile.ids[row], r.text)
        for hit in r.json()["results"]:
            name = hostile.ids[hit["row"]]
            assert hit["id"] == name
            if name in OUTSIDE_IDS:
                assert hit["path"] is None and hit["thumbnail"] is None
            else:
                assert hit["path"] == name and not os.path.isabs(hit["path"]) and ".." not in hit["path"]
                assert hit["thumbnail"] == f"/images/{hit['row']}?size=256"


def test_a_latin1_file_name_round_trips(hostile_server, hostile):
    name = os.fsdecode(LATIN1_NAME)
    row = hostile.ids.index(name)
    data = (hostile.images / name).read_bytes()
    r = _search(hostile_server, data, 3)
    assert r.status_code == 200, r.text
    r.content.decode("utf-8")  # the body is valid UTF-8 JSON
    top = json.loads(r.content)["results"][0]
    assert top["row"] == row
    assert top["id"].encode("utf-8", "surrogateescape") == LATIN1_NAME  # the name's own bytes
    assert top["path"].encode("utf-8", "surrogateescape") == LATIN1_NAME
    assert httpx.get(hostile_server.url + top["thumbnail"]).status_code == 200
    assert httpx.get(hostile_server.url + f"/images/{row}").content == data


def test_an_html_like_name_is_data(hostile_server, hostile):
    row = hostile.ids.index(HTML_NAME)
    r = _search(hostile_server, (hostile.images / HTML_NAME).read_bytes(), 1)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["results"][0]["id"] == HTML_NAME and r.json()["results"][0]["row"] == row


def test_info_says_the_model_is_randomly_initialised(hostile_server, server):
    info = httpx.get(hostile_server.url + "/info").json()
    assert info["random_init"] is True and info["random_init_seed"] == 3
    assert "random" in info["weights"]
    trained = httpx.get(server.url + "/info", headers={"Authorization": "Bearer s3cret-token"}).json()
    assert trained["random_init"] is False and trained["random_init_seed"] is None
    assert trained["weights"].startswith("sha256 ")


def test_the_log_has_no_traceback(hostile_server):
    time.sleep(0.2)
    assert "Traceback" not in "\n".join(hostile_server.lines)
