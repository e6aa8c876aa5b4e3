"""``plugins``: what is loaded, and which kinds and commands each adds."""
from __future__ import annotations

import argparse
import sys

import msgspec

from dicomvault.engine import Context, Operation, hookimpl


def run(ctx: Context, args: argparse.Namespace) -> int:
    hooks = ctx.hooks
    info: dict[str, list] = {  # type: ignore[type-arg]
        "plugins": [{"name": n, "origin": o} for n, o in hooks.plugin_list()],
        "sources": [{"name": k.name, "description": k.description} for k in hooks.sources()],
        "targets": [{"name": k.name, "description": k.description} for k in hooks.targets()],
        "databases": [{"name": k.name, "description": k.description} for k in hooks.databases()],
        "operations": sorted(op.name for op in hooks.operations()),
    }
    if args.json:
        sys.stdout.write(msgspec.json.encode(info).decode() + "\n")
        return 0
    print("plugins:")
    for p in info["plugins"]:
        print(f"  {p['name']}  ({p['origin']})")
    for what in ("sources", "targets", "databases"):
        print(f"{what}:")
        for k in info[what]:
            print(f"  {k['name']}: {k['description']}")
    print("commands: " + ", ".join(info["operations"]))  # type: ignore[arg-type]
    return 0


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [Operation(name="plugins", help="list loaded plugins, source/target/database kinds and commands",
                      configure=lambda p: None, run=run)]
