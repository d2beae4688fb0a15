"""Plugin discovery: a fresh plugin manager per invocation, and the registry built from it.

Plugins come from the ``sandbox`` entry-point group (the built-ins in ``plugins/`` included) and
from module names or ``.py`` files given with ``--plugin`` or a recipe's ``plugins = [...]``.
Set ``SANDBOX_TRACE_PLUGINS=1`` to print every registration as it happens.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import pluggy

from sandbox import hookspecs
from sandbox.api import PROJECT_NAME
from sandbox.errors import SandboxError
from sandbox.registry import KINDS, Registry

ENTRY_POINT_GROUP = "sandbox"


@dataclass
class PluginHost:
    """A plugin manager together with where each plugin came from."""

    manager: pluggy.PluginManager
    providers: dict[int, str] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    """Installed plugins that failed to import or define hooks that are never called:
    ``{"package version (entry point)": "failed to import: ..." or the hook problems}``."""

    def provider_of(self, plugin: object) -> str:
        """``"package version"`` for installed plugins, the module name otherwise."""
        return self.providers.get(id(plugin), getattr(plugin, "__name__", repr(plugin)))


def _entry_points() -> Iterable[tuple[importlib.metadata.EntryPoint, str]]:
    """``(entry point, "distribution version")`` for the sandbox group, each once."""
    seen: set[tuple[str, str]] = set()
    for dist in importlib.metadata.distributions():
        for entry_point in dist.entry_points:
            key = (entry_point.name, entry_point.value)
            if entry_point.group != ENTRY_POINT_GROUP or key in seen:
                continue
            seen.add(key)
            yield entry_point, f"{dist.metadata['Name']} {dist.version}"


def import_plugin_module(spec: str) -> ModuleType:
    """Import a plugin given as a module path (``pkg.mod``) or a ``.py`` file path."""
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            looked = "" if path.is_absolute() else f" (looked in {Path.cwd()})"
            raise SandboxError(f"plugin file {spec} does not exist{looked}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            raise SandboxError(f"plugin file {spec} failed to import: {type(error).__name__}: {error}") from error
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(spec)
    except Exception as error:
        raise SandboxError(f"plugin module {spec!r} failed to import: {type(error).__name__}: {error}") from error


def make_plugin_host(extra_plugins: Iterable[str] = ()) -> PluginHost:
    """A new plugin manager with the entry-point plugins and ``extra_plugins`` registered."""
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    host = PluginHost(manager)
    for entry_point, provider in _entry_points():
        where = f"{provider} ({entry_point.name} = {entry_point.value})"
        try:
            plugin = entry_point.load()
        except Exception as error:  # one broken package must not break the others
            host.broken[where] = f"failed to import: {type(error).__name__}: {error}"
            continue
        if not manager.is_registered(plugin):
            manager.register(plugin, name=f"{provider.split()[0]}:{entry_point.name}")
            host.providers[id(plugin)] = provider
            problems = hook_problems(manager, plugin)
            if problems:  # the package's valid hooks still count; what it meant to register is reported
                host.broken[where] = "; ".join(problems)
    for spec in extra_plugins:
        module = import_plugin_module(spec)
        if not manager.is_registered(module):
            manager.register(module, name=spec)
            check_hooks(manager, module, spec)
    return host


def hook_problems(manager: pluggy.PluginManager, plugin: object) -> list[str]:
    """The hooks of a registered ``plugin`` that would never be called: a misspelled hook name, or a
    function of the plugin module named like a hook but not marked ``@hookimpl``."""
    hooks = ", ".join(sorted(name for name in dir(hookspecs) if name.startswith("sandbox_")))
    problems = [
        f"{caller.name} is no sandbox hook; the hooks are: {hooks}"
        for caller in manager.get_hookcallers(plugin) or [] if caller.spec is None
    ]
    if isinstance(plugin, ModuleType):
        for name, value in vars(plugin).items():
            defined_here = inspect.isfunction(value) and value.__module__ == plugin.__name__
            if defined_here and name.startswith("sandbox_") and not hasattr(value, f"{PROJECT_NAME}_impl"):
                problems.append(f"{name} is not marked @hookimpl (from sandbox.api), so it would never be called")
    return problems


def check_hooks(manager: pluggy.PluginManager, module: ModuleType, spec: str) -> None:
    """The first of :func:`hook_problems` of a ``--plugin`` (or recipe ``plugins``) module, as an error."""
    problems = hook_problems(manager, module)
    if problems:
        raise SandboxError(f"plugin {spec}: {problems[0]}")


def build_registry(host: PluginHost) -> Registry:
    """Call every registration hook of every plugin and collect the components."""
    registry = Registry(broken=host.broken)
    trace = bool(os.environ.get("SANDBOX_TRACE_PLUGINS"))
    for kind in KINDS.values():
        for impl in getattr(host.manager.hook, kind.hook).get_hookimpls():
            provider = host.provider_of(impl.plugin)

            def register(name: str, factory: Any, description: str | None = None, *, _kind: str = kind.name,
                         _provider: str = provider) -> None:
                if trace:
                    print(f"sandbox: {_provider} registers {_kind} {name!r}", file=sys.stderr)
                registry.add(_kind, name, factory, description, _provider)

            try:
                impl.function(register=register)
            except SandboxError:
                raise
            except Exception as error:
                raise SandboxError(f"plugin {provider}: {kind.hook} failed: {type(error).__name__}: {error}") from error
    return registry


def load_registry(extra_plugins: Iterable[str] = ()) -> Registry:
    """The registry of all discoverable plugins plus ``extra_plugins``."""
    return build_registry(make_plugin_host(extra_plugins))
