"""seqdeploy's extension points: one pluggy hook per kind of thing a plugin can add.

Every hook receives a ``register`` callback (or the CLI group), so a plugin adds items
without any return-value convention. Built-in engines and architectures use these same hooks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import click

    from seqdeploy.architecture import Architecture
    from seqdeploy.engines.base import Engine
    from seqdeploy.ops import CustomOp

hookspec = pluggy.HookspecMarker("seqdeploy")
hookimpl = pluggy.HookimplMarker("seqdeploy")


@hookspec
def register_architectures(register: Callable[[Architecture], None]) -> None:
    """Add model architectures: call ``register(arch)`` once per ``Architecture``."""


@hookspec
def register_ops(register: Callable[[CustomOp], None]) -> None:
    """Add custom ops (torch op + reference + ONNX forms): ``register(op)`` per ``CustomOp``."""


@hookspec
def register_engines(register: Callable[[Engine], None]) -> None:
    """Add inference engines: call ``register(engine)`` once per ``Engine``."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``seqdeploy`` Click group."""
