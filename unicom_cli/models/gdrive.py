"""Google Drive's download flow: from a file id's address to the address that serves the file."""

from __future__ import annotations

import http.client
import http.cookiejar
import urllib.parse
from html.parser import HTMLParser

from unicom_cli.errors import DownloadError
from unicom_cli.models.resumable import DRIVE_PAGE, Retry, Settings, open_url

GDRIVE_URL = "https://drive.google.com"


class _DriveForm(HTMLParser):
    """Collects the download form (action + hidden inputs) and confirm links of a Drive page."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.confirm_link: str | None = None
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form" and (self.action is None or values.get("id") == "download-form"):
            self.action, self.fields, self._in_form = values.get("action", ""), {}, True
        elif tag == "input" and self._in_form and values.get("name"):
            self.fields[values["name"]] = values.get("value", "")
        elif tag == "a" and "confirm=" in values.get("href", "") and self.confirm_link is None:
            self.confirm_link = values["href"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def resolve_drive(opener, url: str, jar: http.cookiejar.CookieJar, settings: Settings) -> str:
    """Follow Google Drive's flow to the address that serves the file itself.

    Small files come straight back. Large ones get an HTML "can't scan for viruses" page whose
    form (hidden ``id``/``confirm``/``uuid`` fields) points at the usercontent download address;
    older pages carry a ``confirm=`` link or a ``download_warning`` cookie instead.
    """
    response = open_url(opener, url, 0, settings.timeout)
    with response:
        if response.headers.get_content_type() != "text/html":
            return url  # the file itself: download it with the same address (and Range)
        page_url = response.geturl()
        try:
            page = response.read(4 << 20).decode("utf-8", "replace")
        except (http.client.HTTPException, OSError) as exc:
            raise Retry(exc) from exc
    form = _DriveForm()
    form.feed(page)
    if form.action is not None and ("confirm" in form.fields or "id" in form.fields):
        action = urllib.parse.urljoin(page_url, form.action or "")
        return f"{action}?{urllib.parse.urlencode(form.fields)}"
    if form.confirm_link:
        return urllib.parse.urljoin(page_url, form.confirm_link)
    for cookie in jar:
        if cookie.name.startswith("download_warning"):
            return f"{url}&confirm={urllib.parse.quote(cookie.value)}"
    if "confirm=" not in url:  # a page we do not know: Drive accepts confirm=t for large files
        return f"{url}&confirm=t"
    raise DownloadError(DRIVE_PAGE.format(url=url))
