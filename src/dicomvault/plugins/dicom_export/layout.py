"""Layout templates: where each exported instance goes.

A template is a ``/``-separated list of components, each a Python format
string over the fields below, e.g. the default
``{PatientName}_{PatientID}/{StudyDate}_{StudyDescription}/{Modality}_{SeriesNumber}_{SeriesDescription}/{InstanceNumber:05}.dcm``.
Values come from the source's records (no file parsing). Each component is
made a valid name by :mod:`.naming`; a folder stands for the entity of the
deepest *identifying* field it uses (patient, study, series), so two
different patients never share a folder; components that only use grouping
fields (``Modality``, ``StudyDate``) or literal text are shared. The last
component names the file and always belongs to one instance.
"""
from __future__ import annotations

import string
from collections.abc import Callable

from dicomvault.engine import Item, UsageError

from . import naming

DEFAULT_TEMPLATE = ("{PatientName}_{PatientID}/{StudyDate}_{StudyDescription}/"
                    "{Modality}_{SeriesNumber}_{SeriesDescription}/{InstanceNumber:05}.dcm")
DICOMDIR_TEMPLATE = "PT{PatientIndex:06}/ST{StudyIndex:06}/SE{SeriesIndex:06}/IM{InstanceIndex:06}"
LEVELS = ("patient", "study", "series", "instance")


def pn(value: str) -> str:
    """A person name for humans: ``^`` between components becomes a space,
    ``=`` between representations (alphabetic=ideographic=phonetic) stays."""
    groups = [" ".join(p for p in g.split("^") if p.strip()) for g in value.split("=")]
    return "=".join(g for g in groups if g)


def multi(value: str) -> str:
    """Multi-valued attributes: ``A\\B`` becomes ``A+B``."""
    return "+".join(v.strip() for v in value.split("\\") if v.strip())


# field -> (level, identifying, getter)
FIELDS: dict[str, tuple[str, bool, Callable[[Item], object]]] = {
    "PatientName": ("patient", True, lambda it: pn(it.patient.name)),
    "PatientID": ("patient", True, lambda it: multi(it.patient.patient_id)),
    "StudyDate": ("study", False, lambda it: it.study.date.replace(".", "")),
    "StudyTime": ("study", False, lambda it: it.study.time.split(".")[0]),
    "StudyDescription": ("study", True, lambda it: multi(it.study.description)),
    "StudyID": ("study", True, lambda it: it.study.study_id),
    "AccessionNumber": ("study", True, lambda it: it.study.accession),
    "StudyInstanceUID": ("study", True, lambda it: it.study.study_uid),
    "Modality": ("series", False, lambda it: multi(it.series.modality)),
    "SeriesNumber": ("series", True, lambda it: it.series.number),
    "SeriesDescription": ("series", True, lambda it: multi(it.series.description)),
    "SeriesInstanceUID": ("series", True, lambda it: it.series.series_uid),
    "InstanceNumber": ("instance", True, lambda it: it.instance.number),
    "SOPInstanceUID": ("instance", True, lambda it: it.instance.sop_uid),
    "PatientIndex": ("patient", True, lambda it: None),
    "StudyIndex": ("study", True, lambda it: None),
    "SeriesIndex": ("series", True, lambda it: None),
    "InstanceIndex": ("instance", True, lambda it: None),
}
COUNTERS = ("PatientIndex", "StudyIndex", "SeriesIndex", "InstanceIndex")


def _identity(item: Item, level: str) -> str:
    return {"patient": "P" + item.patient.key, "study": "S" + item.study.study_uid,
            "series": "E" + item.series.series_uid, "instance": "I" + item.instance.sop_uid}[level]


class _Component:
    def __init__(self, text: str, last: bool) -> None:
        self.text = text
        self.fields: list[tuple[str, str]] = []  # (field name, format spec)
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise UsageError(f"layout component '{text}': {exc}") from None
        for _lit, field, spec, conv in parsed:
            if field is None:
                continue
            if field not in FIELDS:
                raise UsageError(f"unknown layout field '{{{field}}}'; known: {', '.join(FIELDS)}")
            if conv:
                raise UsageError(f"layout field '{{{field}}}': conversions (!{conv}) are not supported")
            self.fields.append((field, spec or ""))
        idents = [LEVELS.index(FIELDS[f][0]) for f, _ in self.fields if FIELDS[f][1]]
        self.level = "instance" if last else (LEVELS[max(idents)] if idents else "")
        self.fallback = self.level or "folder"


def _render(spec: str, value: object) -> str:
    if value is None or value == "":
        return ""
    try:
        return format(value, spec)
    except (ValueError, TypeError):
        return str(value)


class Layout:
    """Turns items into relative paths, deterministically for a given order
    of items; never a path outside the output folder."""

    def __init__(self, template: str, *, dicom_file_ids: bool = False) -> None:
        parts = [p for p in template.replace("\\", "/").split("/")]
        if not template.strip() or any(not p.strip() for p in parts):
            raise UsageError(f"layout '{template}': empty component")
        if any(p.strip() in (".", "..") for p in parts):
            raise UsageError(f"layout '{template}': '.' and '..' are not components (everything is written "
                             "inside OUTDIR)")
        if dicom_file_ids and len(parts) > 8:
            raise UsageError("a DICOMDIR File ID has at most 8 components; the layout has "
                             f"{len(parts)}")
        self.template = template
        self.dicom = dicom_file_ids
        self.components = [_Component(p, i == len(parts) - 1) for i, p in enumerate(parts)]
        self.names = naming.NameAllocator(dicom_file_ids=dicom_file_ids)
        budget = naming.PATH_MAX // len(parts) - 1
        self.limit = max(8, min(naming.COMPONENT_MAX, budget))
        self.counters: dict[tuple[str, str], dict[str, int]] = {}

    def _counter(self, level: str, parent_identity: str, identity: str) -> int:
        seen = self.counters.setdefault((level, parent_identity), {})
        return seen.setdefault(identity, len(seen) + 1)

    def _values(self, item: Item) -> dict[str, object]:
        ids = [_identity(item, lv) for lv in LEVELS]
        values: dict[str, object] = {}
        for comp in self.components:
            for field, _spec in comp.fields:
                if field in values:
                    continue
                if field in COUNTERS:
                    i = COUNTERS.index(field)
                    values[field] = self._counter(LEVELS[i], ids[i - 1] if i else "", ids[i])
                else:
                    values[field] = FIELDS[field][2](item)
        return values

    def path(self, item: Item) -> list[str]:
        """The components of the item's path below the output folder."""
        values = self._values(item)
        out: list[str] = []
        for comp in self.components:
            text = "".join(lit + (_render(spec or "", values[f]) if f is not None else "")
                           for lit, f, spec, _c in string.Formatter().parse(comp.text))
            if self.dicom:
                wanted = naming.file_id(text, comp.fallback.upper())
            else:
                wanted = naming.sanitize(text, comp.fallback, self.limit)
            owner = _identity(item, comp.level) if comp.level else "T" + text
            out.append(self.names.allocate("/".join(out), wanted, owner))
        return out
