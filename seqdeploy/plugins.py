"""Plugin manager: entry-point group ``seqdeploy`` plus ``SEQDEPLOY_PLUGINS`` / ``--plugin``.

Build a fresh :class:`Registry` with :func:`load_registry`; nothing here is global, so each
test gets its own. A plugin that fails to import or to register is recorded in
``Registry.failures`` by name with its error, and every other plugin keeps working.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import pluggy

from seqdeploy import hookspecs
from seqdeploy.errors import SeqdeployError

if TYPE_CHECKING:
    from seqdeploy.architecture import Architecture
    from seqdeploy.engines.base import Engine
    from seqdeploy.ops import CustomOp

ENTRY_POINT_GROUP = "seqdeploy"
PLUGINS_ENV = "SEQDEPLOY_PLUGINS"  # comma-separated module names to load as plugins
NO_AUTOLOAD_ENV = "SEQDEPLOY_DISABLE_PLUGIN_AUTOLOAD"  # "1": skip installed entry points

BUILTIN_MODULES = ("seqdeploy.engines.builtin",)


@dataclass
class PluginInfo:
    name: str
    module: str
    source: str  # "builtin", "entry-point" or "env/cli"
    version: str | None = None
    hooks: list[str] = field(default_factory=list)


@dataclass
class PluginFailure:
    name: str
    error: str


@dataclass
class Registry:
    pm: pluggy.PluginManager
    architectures: dict[str, Architecture] = field(default_factory=dict)
    ops: dict[str, CustomOp] = field(default_factory=dict)
    engines: dict[str, Engine] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)

    def architecture(self, name: str) -> Architecture:
        if name not in self.architectures:
            known = ", ".join(sorted(self.architectures)) or "none"
            hint = ""
            broken = [f.name for f in self.failures]
            if broken:
                hint = f"; plugins that failed to load: {', '.join(broken)}"
            raise SeqdeployError(f"unknown architecture {name!r} (known: {known}{hint})")
        return self.architectures[name]

    def reference_engine(self) -> Engine:
        """The engine whose role is ``reference``: what ``validate`` compares against."""
        from seqdeploy.engines.base import REFERENCE

        found = [e for e in self.engines.values() if e.role == REFERENCE]
        if len(found) != 1:
            names = ", ".join(sorted(e.name for e in found)) or "none"
            raise SeqdeployError(f"exactly one engine must have the reference role (found: {names})")
        return found[0]

    def engine(self, name: str) -> Engine:
        if name not in self.engines:
            known = ", ".join(sorted(self.engines))
            raise SeqdeployError(f"unknown engine {name!r} (known: {known})")
        return self.engines[name]


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _culprit(pm: pluggy.PluginManager, hook_name: str, exc: BaseException) -> object | None:
    """The plugin whose implementation of ``hook_name`` raised ``exc``: the innermost frame
    of the traceback that runs one of the hook's implementations."""
    codes = {impl.function.__code__: impl.plugin
             for impl in getattr(pm.hook, hook_name).get_hookimpls()
             if hasattr(impl.function, "__code__")}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        found = codes.get(tb.tb_frame.f_code, found)
        tb = tb.tb_next
    return found


def call_hook(registry: Registry, hook_name: str, **kwargs) -> None:
    """Call a hook through the plugin manager (so pluggy's ordering and wrappers apply).

    A plugin whose implementation raises is recorded in ``registry.failures``, unregistered,
    and the hook is called again without it, so one broken plugin never takes the others
    down. ``kwargs`` are the hook's arguments; a ``register`` argument may be a factory
    ``() -> (register, commit)``: each attempt gets a fresh one and only the successful
    attempt commits what it registered."""
    factory = kwargs.pop("register", None)
    while True:
        attempt = dict(kwargs)
        commit = None
        if factory is not None:
            attempt["register"], commit = factory()
        try:
            getattr(registry.pm.hook, hook_name)(**attempt)
        except Exception as exc:  # a broken plugin must not take the CLI down
            plugin = _culprit(registry.pm, hook_name, exc)
            if plugin is None:
                raise
            name = registry.pm.get_name(plugin) or "?"
            registry.failures.append(PluginFailure(name, f"{hook_name}: {_one_line(exc)}"))
            registry.pm.unregister(plugin)
            registry.plugins = [p for p in registry.plugins if p.name != name]
            continue
        if commit is not None:
            commit()
        return


def _collect(registry: Registry) -> None:
    """Run the registration hooks of every plugin through the plugin manager."""
    kinds = (("register_architectures", registry.architectures, "architecture"),
             ("register_ops", registry.ops, "op"),
             ("register_engines", registry.engines, "engine"))
    for hook_name, store, kind in kinds:
        def factory(store=store, kind=kind):
            staged: dict = {}

            def register(item) -> None:
                key = item.name
                if key in staged or key in store:
                    raise SeqdeployError(f"{kind} {key!r} registered twice")
                staged[key] = item

            return register, lambda: store.update(staged)

        call_hook(registry, hook_name, register=factory)


def _register_module(registry: Registry, module_name: str, name: str, source: str,
                     version: str | None = None, loader=None) -> None:
    try:
        module = loader() if loader else importlib.import_module(module_name)
    except Exception as exc:
        registry.failures.append(PluginFailure(name, _one_line(exc)))
        return
    if registry.pm.is_registered(module):
        return
    registry.pm.register(module, name=name)
    hooks = [h.name for h in registry.pm.get_hookcallers(module) or []]
    registry.plugins.append(PluginInfo(name, getattr(module, "__name__", module_name),
                                       source, version, sorted(hooks)))


def load_registry(extra_modules: Iterable[str] = (), autoload: bool | None = None) -> Registry:
    """Build a registry from built-ins, installed entry points and named modules.

    ``autoload`` defaults to true unless ``SEQDEPLOY_DISABLE_PLUGIN_AUTOLOAD=1``.
    """
    pm = pluggy.PluginManager("seqdeploy")
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm=pm)
    for module_name in BUILTIN_MODULES:
        _register_module(registry, module_name, module_name.rsplit(".", 1)[-1], "builtin")
    if autoload is None:
        autoload = os.environ.get(NO_AUTOLOAD_ENV, "") not in ("1", "true", "yes")
    if autoload:
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
                         key=lambda e: e.name):
            version = ep.dist.version if ep.dist is not None else None
            _register_module(registry, ep.value, ep.name, "entry-point", version, ep.load)
    names = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    for module_name in [*names, *extra_modules]:
        _register_module(registry, module_name, module_name, "env/cli")
    _collect(registry)
    return registry
