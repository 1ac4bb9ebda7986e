"""The browser UI's static files: read once at start, served with ETag revalidation."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

log = logging.getLogger(__name__)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}

#: Every response may be cached but must be revalidated (cheap: a 304 on a matching ETag),
#: so a new version of the page shows up on the next load.
CACHE_CONTROL = "no-cache"


class StaticFile(NamedTuple):
    body: bytes
    content_type: str
    etag: str


class StaticFiles:
    """The files of one folder (not its subfolders) with a known type, by URL path;
    ``/`` is ``index.html``. Nothing outside the folder can be named."""

    def __init__(self, root: Path) -> None:
        self.files: Dict[str, StaticFile] = {}
        for path in sorted(root.iterdir()):
            content_type = CONTENT_TYPES.get(path.suffix)
            if content_type is None or not path.is_file():
                continue
            body = path.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            self.files["/" + path.name] = StaticFile(body, content_type, etag)
        if "/index.html" in self.files:
            self.files["/"] = self.files["/index.html"]
        else:
            log.warning("no index.html in %s: the browser UI is missing", root)

    def lookup(self, path: str) -> Optional[StaticFile]:
        return self.files.get(path)

    @staticmethod
    def headers(file: StaticFile) -> Tuple[Tuple[str, str], ...]:
        return (
            ("Content-Type", file.content_type),
            ("ETag", file.etag),
            ("Cache-Control", CACHE_CONTROL),
        )

    @staticmethod
    def not_modified(file: StaticFile, if_none_match: Optional[str]) -> bool:
        """True if the client's ``If-None-Match`` names this version (or is ``*``)."""
        if not if_none_match:
            return False
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or file.etag in tags
