"""Where the Jinja2 templates are: ``templates/`` beside the package in a checkout, or the copy a
wheel installs under ``<prefix>/share/presence/templates``."""

from __future__ import annotations

import sys
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape


def template_dir() -> Path:
    candidates = [
        Path(__file__).resolve().parent.parent.parent / "templates",
        Path(sys.prefix) / "share" / "presence" / "templates",
    ]
    for candidate in candidates:
        if (candidate / "base.html").exists():
            return candidate
    raise RuntimeError("cannot find Presence's templates; reinstall the package (pip install presence)")


def environment() -> Environment:
    return Environment(loader=FileSystemLoader(str(template_dir())), autoescape=select_autoescape(default=True))
