"""Building the plugin manager, and the typed façade that is the only caller
of the hook relay."""
from __future__ import annotations

import importlib
from collections.abc import Iterable

import pluggy

from . import hookspecs
from .errors import PluginError, UsageError
from .interfaces import Kind, Operation
from .types import Event, Report

# Built-in plugins, registered through the same API a third party uses.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "dicomvault.plugins.embedded.plugin",
    "dicomvault.plugins.folder_source",
    "dicomvault.plugins.bkp_plugin",
    "dicomvault.plugins.ops.ingest",
    "dicomvault.plugins.ops.browse",
    "dicomvault.plugins.ops.select",
    "dicomvault.plugins.ops.attach",
    "dicomvault.plugins.ops.gc",
    "dicomvault.plugins.ops.transfer",
    "dicomvault.plugins.ops.plugins_cmd",
    "dicomvault.plugins.ops.compare",
    "dicomvault.plugins.ops.demo",
    "dicomvault.plugins.postgres.plugin",
    "dicomvault.plugins.orthanc.plugin",
    "dicomvault.plugins.ops.replicate",
    "dicomvault.plugins.dicom_export.plugin",
    "dicomvault.plugins.ops.bkp_tools",
    "dicomvault.plugins.dimse.plugin",
)


def make_plugin_manager(*, autoload: bool = True, block: Iterable[str] = (),
                        extra: Iterable[object] = ()) -> pluggy.PluginManager:
    """Build a manager: built-ins, then entry-point plugins, then ``extra``.

    ``block`` names plugins (built-in module names or entry-point names) that
    must not load. Set ``DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD=1`` to skip
    entry points (``autoload=False`` here).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in block:
        pm.set_blocked(name)
    for modname in BUILTIN_PLUGINS:
        if pm.is_blocked(modname):
            continue
        pm.register(importlib.import_module(modname), name=modname)
    try:
        if autoload:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        for plugin in extra:
            pm.register(plugin)
        pm.check_pending()
    except Exception as exc:  # a broken third-party plugin must not look like our bug
        raise PluginError(f"could not load a plugin from entry point group '{hookspecs.PROJECT}': "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    return pm


class Hooks:
    """Typed access to the hooks. Nothing else touches ``pm.hook``."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    def _kinds(self, results: list[list[Kind]]) -> list[Kind]:
        # pluggy calls the last registered first; flatten in that order so
        # that later plugins take precedence when several match.
        return [k for group in results for k in (group or [])]

    def _collect(self, hook: str) -> list:  # type: ignore[type-arg]
        try:
            return getattr(self.pm.hook, hook)()  # type: ignore[no-any-return]
        except Exception as exc:  # a plugin's bug, reported as such rather than as a traceback
            raise PluginError(f"a plugin failed in {hook}: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}") from exc

    def sources(self) -> list[Kind]:
        return self._kinds(self._collect("dicomvault_register_sources"))

    def targets(self) -> list[Kind]:
        return self._kinds(self._collect("dicomvault_register_targets"))

    def databases(self) -> list[Kind]:
        return self._kinds(self._collect("dicomvault_register_databases"))

    def operations(self) -> list[Operation]:
        ops: dict[str, Operation] = {}
        for group in reversed(self._collect("dicomvault_register_operations")):
            for op in group or []:
                if op.name in ops:
                    raise PluginError(f"two plugins provide the command '{op.name}'")
                ops[op.name] = op
        return list(ops.values())

    def find(self, kinds: list[Kind], url: str, what: str) -> Kind:
        for kind in kinds:
            if kind.matches(url):
                return kind
        names = ", ".join(sorted(k.name for k in kinds)) or "none"
        raise UsageError(f"no {what} kind handles '{url}' (known kinds: {names})")

    def on_event(self, event: Event) -> None:
        self.pm.hook.dicomvault_on_event(event=event)

    def on_report(self, report: Report) -> None:
        self.pm.hook.dicomvault_on_report(report=report)

    def plugin_list(self) -> list[tuple[str, str]]:
        """(name, origin) of every registered plugin, built-ins first."""
        dists = {id(p): f"{d.project_name} {d.version}" for p, d in self.pm.list_plugin_distinfo()}
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            out.append((name, dists.get(id(plugin), "built-in" if name in BUILTIN_PLUGINS else "registered")))
        return out
