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
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Collection, Iterable

import pluggy

from sandbox import hookspecs
from sandbox.api import PROJECT_NAME
from sandbox.errors import SandboxError
from sandbox.registry import BUILT_IN, ENTRY_POINT, KINDS, PLUGIN, Origin, Registry

if TYPE_CHECKING:
    from sandbox.recipe import Recipe

ENTRY_POINT_GROUP = "sandbox"

OWN_DISTRIBUTION = "sandbox-ssl"
"""The distribution of this package: its entry points are the built-ins (``plugins/``)."""


@dataclass
class PluginHost:
    """A plugin manager together with where each plugin came from."""

    manager: pluggy.PluginManager
    providers: dict[int, str] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    """Installed plugins that failed to import or define hooks that are never called:
    ``{"package version (entry point)": "failed to import: ..." or the hook problems}``."""
    origins: dict[int, Origin] = field(default_factory=dict)
    """Where each entry-point plugin came from (distribution, version, entry point), by ``id``."""

    def provider_of(self, plugin: object) -> str:
        """``"package version"`` for installed plugins, the module name otherwise."""
        return self.providers.get(id(plugin), getattr(plugin, "__name__", repr(plugin)))

    def origin_of(self, plugin: object) -> Origin:
        """Where ``plugin`` came from: its entry point's origin, else the ``--plugin`` it was registered
        as (a module name, or a ``.py`` file's absolute path)."""
        origin = self.origins.get(id(plugin))
        if origin is not None:
            return origin
        name = self.manager.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
        return Origin(PLUGIN, plugin=str(Path(name).resolve()) if name.endswith(".py") else name)


def entry_point_origin(entry_point: importlib.metadata.EntryPoint) -> Origin:
    """The origin of an entry point of the ``sandbox`` group: built-in when this package's own
    distribution declares it, else the declaring distribution's name and version."""
    dist = entry_point.dist
    package = dist.metadata["Name"] if dist is not None else "?"
    version = dist.version if dist is not None else "?"
    source = BUILT_IN if package == OWN_DISTRIBUTION else ENTRY_POINT
    return Origin(source, package=package, version=version, entry_point=entry_point.name)


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
        loaded = sys.modules.get(path.stem)
        if loaded is not None and same_file(loaded, path):
            return loaded  # the file given again (by another path, or by its module name): one module, run once
        clash = module_named(path.stem)
        if clash is not None and os.path.realpath(clash) != os.path.realpath(path):
            raise SandboxError(
                f"plugin file {spec} has the name of the module {path.stem!r} ({clash}), which it would replace for "
                f"everything in this process; rename the file (e.g. my_{path.name})"
            )
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            raise SandboxError(f"plugin file {spec} failed to import: {type(error).__name__}: {error}") from error
        return module
    if not all(part.isidentifier() for part in spec.split(".")) and Path(spec).is_dir():
        raise no_hooks_error(spec, None)  # a path to a folder: no module name
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(spec)
    except Exception as error:
        raise SandboxError(f"plugin module {spec!r} failed to import: {type(error).__name__}: {error}") from error


def no_hooks_error(spec: str, module: ModuleType | None) -> SandboxError:
    """The error for a ``--plugin`` (or recipe ``plugins`` entry) that registers nothing: a folder
    (a path, or a module name that is a folder without ``__init__.py``) or a module without hooks."""
    expected = "expected a module or .py file defining at least one sandbox hook (@hookimpl from sandbox.api)"
    locations = list(getattr(module, "__path__", [])) if module is not None and module.__file__ is None else []
    folder = Path(spec) if module is None else Path(locations[0]) if locations else None
    if folder is None:
        return SandboxError(f"plugin {spec} defines no sandbox hook; {expected}")
    files = sorted(folder.glob("*.py"))
    example = f", e.g. {Path(spec) / files[0].name}" if files else ""
    return SandboxError(f"plugin {spec} is a folder; {expected}{example}")


def module_named(name: str) -> str | None:
    """Where the module ``name`` that this process uses, or would import, comes from (its file, or
    ``built-in``); None when there is no such module."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None) or "built-in"
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return None if found is None else (found.origin or "a namespace package")


def same_file(module: object, path: str | Path | None) -> bool:
    """Whether ``module`` was loaded from the file ``path``."""
    loaded_from = getattr(module, "__file__", None)
    return loaded_from is not None and path is not None and os.path.realpath(loaded_from) == os.path.realpath(path)


def same_file_registered(manager: pluggy.PluginManager, module: ModuleType) -> bool:
    """Whether a plugin registered in ``manager`` was loaded from ``module``'s file (an installed
    plugin given again as a ``.py`` file)."""
    return any(same_file(plugin, getattr(module, "__file__", None)) for plugin in manager.get_plugins())


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
            host.origins[id(plugin)] = entry_point_origin(entry_point)
            problems = hook_problems(manager, plugin)
            if problems:  # the package's valid hooks still count; what it meant to register is reported
                host.broken[where] = "; ".join(problems)
    for spec in extra_plugins:
        module = import_plugin_module(spec)
        if manager.is_registered(module) or same_file_registered(manager, module):
            continue  # given twice: registered once
        manager.register(module, name=spec)
        check_hooks(manager, module, spec)
        if not manager.get_hookcallers(module):
            raise no_hooks_error(spec, module)
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
            provider, origin = host.provider_of(impl.plugin), host.origin_of(impl.plugin)

            def register(name: str, factory: Any, description: str | None = None, *, _kind: str = kind.name,
                         _provider: str = provider, _origin: Origin = origin) -> None:
                if trace:
                    print(f"sandbox: {_provider} registers {_kind} {name!r}", file=sys.stderr)
                registry.add(_kind, name, factory, description, _provider, _origin)

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


def run_provenance(recipe: Recipe, registry: Registry, unused: Collection[str] = ()) -> dict[str, Any]:
    """What a run records in ``provenance.json``: for each component table of ``recipe`` it uses (not
    those in ``unused``), the component's kind, name and :class:`~sandbox.registry.Origin`."""
    components: dict[str, Any] = {}
    for table, (kind, spec) in recipe.component_specs().items():
        if table in unused:
            continue
        origin = registry.get(kind, spec.name).origin
        components[table] = {"kind": kind, "name": spec.name, **(origin.to_json() if origin is not None else {})}
    return {"components": components}


def load_run_recipe(
    path: Path, overrides: list[str] | None, plugins: list[str] | None, beside: Iterable[Path] = ()
) -> tuple[Recipe, Registry]:
    """:func:`~sandbox.recipe.load_resolved_recipe`, for a recipe a run used: when loading fails because a
    component the run recorded (``provenance.json`` beside the recipe, in a folder of ``beside``, or in the
    run directory the recipe trains into) is not registered here, the error names the package and version
    (or the ``--plugin``) the run took it from."""
    from sandbox.recipe import load_resolved_recipe

    try:
        return load_resolved_recipe(path, overrides, plugins)
    except SandboxError as error:
        missing = missing_run_component(path, overrides, plugins, beside)
        if missing is None:
            raise
        raise SandboxError(missing) from error


def missing_run_component(
    path: Path, overrides: list[str] | None, plugins: list[str] | None, beside: Iterable[Path] = ()
) -> str | None:
    """The one-line error for the first component a run recorded that the recipe at ``path`` still names
    but that is not registered here (see :func:`load_run_recipe`); None when there is none."""
    from sandbox.rundir.files import read_provenance
    from sandbox.recipe import as_recipe_plugin, load_recipe
    from sandbox.rundir.directory import RunDirectory

    try:
        recipe = load_recipe(path, list(overrides or []))
    except SandboxError:
        return None
    records = ((folder, read_provenance(folder)) for folder in [path.parent, *beside, RunDirectory.for_recipe(recipe).path])
    run_dir, recorded = next(((folder, record) for folder, record in records if record), (None, None))
    if run_dir is None or recorded is None:
        return None
    try:
        registry: Registry | None = load_registry(dict.fromkeys([*recipe.plugins, *map(as_recipe_plugin, plugins or [])]))
    except SandboxError:  # a plugin failed to load: only a recorded --plugin that is gone can be named
        registry = None
    for table, (kind, spec) in recipe.component_specs().items():
        entry = recorded.get(table, {})
        origin = Origin.from_json(entry)
        if origin is None or entry.get("kind") != kind or entry.get("name") != spec.name:
            continue
        if registry is not None and spec.name in registry.names(kind):
            continue
        problem = origin_problem(origin, kind, spec.name, registry)
        if problem is not None:
            return f"run {run_dir} used {kind} {spec.name!r} from {origin.describe()}, {problem}"
    return None


def origin_problem(origin: Origin, kind: str, name: str, registry: Registry | None) -> str | None:
    """Why the component ``kind`` ``name`` from ``origin`` is not registered here (``registry``: what
    is; None when loading the plugins failed), with what brings it back; None when ``origin`` is here
    and so not the cause."""
    if origin.source == PLUGIN:
        if origin.plugin.endswith(".py"):
            here = Path(origin.plugin).is_file()
        else:
            try:
                here = importlib.util.find_spec(origin.plugin) is not None
            except (ImportError, ValueError):
                here = False
        if not here:
            return "which does not exist here" if origin.plugin.endswith(".py") else "which cannot be imported here"
        return None if registry is None else f"which registers no {kind} {name!r} here"
    installed = installed_version(origin.package)
    pin = f"; pip install {origin.package}=={origin.version}"
    if installed is None:
        return f"which is not installed here{pin}"
    if registry is None:
        return None
    if installed != origin.version:
        return f"but {origin.package} {installed} installed here registers no {kind} {name!r}{pin}"
    return f"but {origin.package} {installed} installed here registers no {kind} {name!r}{registry.broken_note()}"


def installed_version(package: str) -> str | None:
    """The version of the installed distribution ``package`` (names compared as pip does), or None."""
    wanted = normalised(package)
    for dist in importlib.metadata.distributions():
        if normalised(dist.metadata["Name"] or "") == wanted:
            return dist.version
    return None


def normalised(package: str) -> str:
    """A distribution name as pip compares it: lower case, runs of ``-``, ``_``, ``.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", package).lower()
