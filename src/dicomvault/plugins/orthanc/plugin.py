"""Registers Orthanc (REST API) as a source and a target.

Address: ``orthanc+http://[USER:PASSWORD@]HOST:PORT[/PREFIX]`` or ``orthanc+https://...``.
"""
from __future__ import annotations

from dicomvault.engine import Context, Kind, hookimpl

from .client import Orthanc, is_orthanc
from .source import OrthancSource
from .target import OrthancTarget


def _open_source(url: str, ctx: Context) -> object:
    return OrthancSource(Orthanc(url))


def _open_target(url: str, ctx: Context) -> object:
    return OrthancTarget(Orthanc(url))


@hookimpl
def dicomvault_register_sources() -> list[Kind]:
    return [Kind(name="orthanc", description="an Orthanc server through its REST API "
                 "(orthanc+http://[USER:PASS@]HOST:PORT)", matches=is_orthanc, open=_open_source)]


@hookimpl
def dicomvault_register_targets() -> list[Kind]:
    return [Kind(name="orthanc", description="an Orthanc server through its REST API; records and "
                 "attributes as metadata, attachments not transferred (orthanc+http://HOST:PORT)",
                 matches=is_orthanc, open=_open_target)]
