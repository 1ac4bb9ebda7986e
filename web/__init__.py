"""The browser UI's static files (HTML, JS, CSS), shipped as package data."""

from __future__ import annotations

from pathlib import Path

#: Folder holding the static files the router serves over HTTP.
WEB_ROOT = Path(__file__).resolve().parent
