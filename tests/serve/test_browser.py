"""The web page in a real browser (the distribution's headless Chromium, driven by Playwright):
upload an image, see k result cards with scores, click one and get a new result set."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import TOKEN

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
K = 10


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _scores(page) -> list[float]:
    return [float(s) for s in page.locator(".card .score").all_inner_texts()]


def test_upload_then_more_like_this(browser, server, collection, tmp_path):
    page = browser.new_page(viewport={"width": 1366, "height": 820})
    outside: list[str] = []
    page.on("request", lambda req: None if req.url.startswith((server.url, "blob:", "data:"))
            else outside.append(req.url))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    page.goto(f"{server.url}/?token={TOKEN}")
    page.wait_for_function("document.getElementById('meta').textContent.includes('images')")
    assert f"{len(collection.ids)} images" in page.inner_text("#meta")
    page.select_option("#k", str(K))
    k = K

    query = collection.images / "astronaut.jpg"
    page.set_input_files("#file", str(query))
    page.wait_for_function("document.getElementById('results').dataset.searches === '1'")
    page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
    cards = page.locator(".card")
    assert cards.count() == k
    shown = _scores(page)
    assert shown == sorted(shown, reverse=True) and shown[0] == pytest.approx(1.0, abs=1e-3)
    # The page shows what the API answers for the same image, card by card.
    api = httpx.post(f"{server.url}/search?k={k}", headers={"Authorization": f"Bearer {TOKEN}"},
                     files={"image": ("q.jpg", query.read_bytes())}).json()["results"]
    assert [int(c) for c in cards.evaluate_all("cs => cs.map(c => c.dataset.row)")] == [r["row"] for r in api]
    assert shown == [round(r["score"], 3) for r in api]
    names = page.locator(".card .name").all_inner_texts()
    assert names == [r["id"].split("/")[-1] for r in api]
    assert "results in" in page.inner_text("#status")
    first_screenshot = tmp_path / "serve-results.png"
    page.screenshot(path=str(first_screenshot), full_page=False)

    # "More like this": the fourth result becomes the query; it is its own best match.
    clicked = api[3]
    cards.nth(3).click()
    page.wait_for_function("document.getElementById('results').dataset.searches === '2'")
    page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
    rows = [int(c) for c in page.locator(".card").evaluate_all("cs => cs.map(c => c.dataset.row)")]
    assert len(rows) == k and rows != [r["row"] for r in api]
    assert rows[0] == clicked["row"] and _scores(page)[0] == pytest.approx(1.0, abs=1e-3)
    assert page.inner_text("#query-name") == clicked["id"].split("/")[-1]
    page.screenshot(path=str(tmp_path / "serve-more-like-this.png"))

    # A file that is not an image: the page says why and clears the query image and the old results.
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"not an image at all")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    assert "not a usable image" in page.inner_text("#error")
    assert page.locator(".card").count() == 0 and "the query failed" in page.inner_text("#results")
    assert page.locator("#query-image").is_hidden() and page.get_attribute("#query-image", "src") is None
    assert page.inner_text("#query-name") == "" and page.inner_text("#status") == ""
    assert page.locator("#notice").is_hidden()  # trained weights: no random-init notice

    assert outside == [] and errors == []
    keep = os.environ.get("UNICOM_SCREENSHOT_DIR")  # a place CI or a person keeps artifacts
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(first_screenshot, Path(keep) / first_screenshot.name)
    page.close()


def test_hostile_names_stay_text_and_unserved_files_stay_away(browser, hostile_server, hostile, tmp_path):
    """A random-init index over an HTML-like name, a Latin-1 name and ids that lead outside the
    collection: the notice says random, every name is shown as text (no script runs), and the
    rows whose files are not served show no image and are not clickable."""
    from tests.serve.conftest import HTML_NAME, LATIN1_NAME, OUTSIDE_IDS

    page = browser.new_page(viewport={"width": 1366, "height": 820})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(hostile_server.url + "/")
    page.wait_for_function("document.getElementById('meta').textContent.includes('images')")
    assert "randomly initialised (seed 3)" in page.inner_text("#notice")
    page.select_option("#k", str(len(hostile.ids)))
    page.set_input_files("#file", str(hostile.images / HTML_NAME))
    page.wait_for_function("document.getElementById('results').dataset.searches === '1'")
    cards = page.locator(".card")
    assert cards.count() == len(hostile.ids)
    assert cards.first.get_attribute("data-row") == str(hostile.ids.index(HTML_NAME))
    names = page.locator(".card .name").all_inner_texts()
    assert HTML_NAME in names and page.inner_text("#query-name") == HTML_NAME
    assert os.fsdecode(LATIN1_NAME) in names  # the page holds the name's bytes as lone surrogates (shown as �)
    assert page.evaluate("window.pwned") is None and dialogs == [] and errors == []
    assert page.locator(".card img[src='x']").count() == 0
    unserved = page.locator(".card:has(.unserved)")
    assert unserved.count() == len(OUTSIDE_IDS)
    assert sorted(int(r) for r in unserved.evaluate_all("cs => cs.map(c => c.dataset.row)")) == sorted(
        hostile.ids.index(name) for name in OUTSIDE_IDS)
    assert all(unserved.evaluate_all("cs => cs.map(c => c.disabled)"))
    page.close()


def test_paste_and_drop_search_too(browser, server, collection):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(f"{server.url}/?token={TOKEN}")
    page.wait_for_function("document.getElementById('meta').textContent.includes('images')")
    data = list((collection.images / "coffee.jpg").read_bytes())
    row = collection.ids.index("coffee.jpg")
    make_file = "bytes => new File([new Uint8Array(bytes)], 'coffee.jpg', {type: 'image/jpeg'})"
    # Drop onto the drop zone.
    page.evaluate(f"""bytes => {{
        const dt = new DataTransfer(); dt.items.add(({make_file})(bytes));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {{dataTransfer: dt, bubbles: true}}));
    }}""", data)
    page.wait_for_function("document.getElementById('results').dataset.searches === '1'")
    assert page.locator(".card").first.get_attribute("data-row") == str(row)
    # Paste (Ctrl+V of an image).
    page.evaluate(f"""bytes => {{
        const dt = new DataTransfer(); dt.items.add(({make_file})(bytes));
        document.dispatchEvent(new ClipboardEvent('paste', {{clipboardData: dt, bubbles: true}}));
    }}""", data)
    page.wait_for_function("document.getElementById('results').dataset.searches === '2'")
    assert page.locator(".card").first.get_attribute("data-row") == str(row)
    assert page.inner_text("#query-name") == "pasted image"
    page.close()
