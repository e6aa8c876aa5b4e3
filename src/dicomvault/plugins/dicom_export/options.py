"""What an export is asked to do; light on purpose (no pydicom): the CLI
builds it before anything is exported."""
from __future__ import annotations

from dataclasses import dataclass

from .layout import DEFAULT_TEMPLATE, DICOMDIR_TEMPLATE

REPORT_NAME = "export-report.json"
ON_EXISTING = ("skip", "overwrite", "rename", "fail")


@dataclass
class Options:
    layout: str = ""
    dicomdir: bool = False
    on_existing: str = "skip"
    fileset_id: str = "DICOMVAULT"

    def template(self) -> str:
        return self.layout or (DICOMDIR_TEMPLATE if self.dicomdir else DEFAULT_TEMPLATE)
