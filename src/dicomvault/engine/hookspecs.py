"""Hook specifications: the plugin author's manual.

A plugin is a module or object with functions named like the hooks below,
decorated with ``dicomvault.hookimpl``. Install it as a distribution that
declares an entry point in the group ``dicomvault``::

    [project.entry-points.dicomvault]
    myplugin = "mypackage.myplugin"

``register_*`` hooks contribute things (every plugin is asked, results are
collected); ``on_*`` hooks are notifications (every plugin is told, results
are ignored). Hooks and their parameters are only ever added; an
implementation may accept fewer parameters than the specification lists.
The contracts of what you return are written on the classes in
:mod:`dicomvault.engine.interfaces`.
"""
from __future__ import annotations

import pluggy

from .interfaces import Kind, Operation
from .types import Event, Report

PROJECT = "dicomvault"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dicomvault_register_sources() -> list[Kind]:
    """Return the kinds of source this plugin provides.

    Each :class:`~dicomvault.engine.interfaces.Kind` decides by ``matches(url)``
    whether it handles an address given to ``--from``; ``open(url, context)``
    returns a :class:`~dicomvault.engine.interfaces.Source`. When several kinds
    match, the one registered last (third-party plugins load after the
    built-ins) wins, so a plugin can take over an address form.
    """
    raise NotImplementedError


@hookspec
def dicomvault_register_targets() -> list[Kind]:
    """Return the kinds of target this plugin provides.

    Like :func:`dicomvault_register_sources` for ``--to`` addresses;
    ``open(url, context)`` returns a :class:`~dicomvault.engine.interfaces.Target`.
    """
    raise NotImplementedError


@hookspec
def dicomvault_register_databases() -> list[Kind]:
    """Return the kinds of online database this plugin provides.

    ``open(url, context)`` returns a
    :class:`~dicomvault.engine.interfaces.Database` for ``--db`` addresses.
    """
    raise NotImplementedError


@hookspec
def dicomvault_register_operations() -> list[Operation]:
    """Return the CLI commands this plugin provides.

    Names must be unique across plugins; a clash is reported at start-up.
    """
    raise NotImplementedError


@hookspec
def dicomvault_on_event(event: Event) -> None:
    """Be told about progress: an operation started, one item got an outcome,
    a warning, the operation finished.

    Called in the thread that runs the operation, once per item: keep it
    cheap. Events never carry patient names, IDs or birth dates.
    """


@hookspec
def dicomvault_on_report(report: Report) -> None:
    """Be told the final report of an operation (for audit logs, metrics)."""
