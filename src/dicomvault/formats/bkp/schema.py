"""The manifest's JSON Schema, generated from the msgspec types.

The committed copy (``manifest.schema.json`` beside this module) is what
SPEC.md publishes for validators written in other languages; a test fails
when the code and the committed copy drift apart. Regenerate it with::

    python -m dicomvault.formats.bkp.schema > src/dicomvault/formats/bkp/manifest.schema.json
"""
from __future__ import annotations

import json
import sys
from importlib import resources
from typing import Any

import msgspec

from .manifest import Manifest

SCHEMA_ID = "https://dicomvault.org/schemas/bkp/v1/manifest.schema.json"


def generate() -> dict[str, Any]:
    """The schema as msgspec derives it from :class:`Manifest`, with an id
    and a note that MessagePack is the encoding (JSON is only the notation)."""
    schema = msgspec.json.schema(Manifest)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "dicomvault .bkp manifest, major version 1",
        "description": ("The manifest frame of a .bkp file (SPEC.md section 8), decoded from "
                        "MessagePack. Objects may carry keys this schema does not list (later "
                        "minor versions); arrays of fixed structure may carry extra trailing "
                        "elements."),
        **schema,
    }


def dumps(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def committed() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("manifest.schema.json").read_text(encoding="utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


if __name__ == "__main__":
    sys.stdout.write(dumps(generate()))
