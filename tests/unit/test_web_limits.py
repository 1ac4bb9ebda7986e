"""The browser page's copies of the server's text limits (web/app.js) and its message box.

The page checks a message's length before sending it, so it must use the server's numbers;
and its input must not carry a ``maxlength``, which cuts a long paste without a word.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.limits import MAX_LINE_BYTES, MAX_TEXT_CHARS

WEB = Path(__file__).resolve().parents[2] / "web"


@pytest.mark.parametrize(
    ("name", "value"),
    [("MAX_TEXT_CHARS", MAX_TEXT_CHARS), ("MAX_LINE_BYTES", MAX_LINE_BYTES)],
)
def test_page_checks_the_servers_limit(name: str, value: int) -> None:
    source = (WEB / "app.js").read_text(encoding="utf-8")
    found = re.findall(rf"const {name} = (\d+);", source)
    assert found == [str(value)]


def test_message_box_has_no_maxlength_that_would_cut_a_paste() -> None:
    page = (WEB / "index.html").read_text(encoding="utf-8")
    (tag,) = re.findall(r"<input id=\"composer-input\"[^>]*>", page)
    assert "maxlength" not in tag
    assert 'aria-describedby="composer-note"' in tag
    assert 'id="composer-note"' in page
