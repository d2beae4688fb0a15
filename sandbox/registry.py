"""The component registry: every registered component, by kind and name, and how to build one.

A component's options are the keyword parameters of its factory. Options are validated with a
pydantic model derived from the factory's signature, so a recipe gets the same type checking and
defaults whatever plugin it names.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterator

import pydantic

from sandbox.api import (
    Backbone,
    ConsistencyLoss,
    DensityEstimator,
    Perturbation,
    SegmentationNetwork,
    SegmentationSource,
)
from sandbox.errors import SandboxError, describe_exception, lower_first


@dataclass(frozen=True)
class ComponentKind:
    """One kind of component: its hook, what its factory must return, what the host passes."""

    name: str
    hook: str
    product: type
    context: tuple[str, ...] = ()


KINDS: dict[str, ComponentKind] = {
    kind.name: kind
    for kind in (
        ComponentKind("backbone", "sandbox_register_backbones", Backbone),
        ComponentKind(
            "density", "sandbox_register_density_estimators", DensityEstimator, ("feature_dim", "num_classes", "total_steps")
        ),
        ComponentKind("perturbation", "sandbox_register_perturbations", Perturbation),
        ComponentKind("consistency", "sandbox_register_consistency_losses", ConsistencyLoss),
        ComponentKind("dataset", "sandbox_register_datasets", SegmentationSource),
        ComponentKind("network", "sandbox_register_networks", SegmentationNetwork, ("num_classes", "build_backbone")),
    )
}


def first_doc_line(obj: object) -> str:
    """The first non-empty line of ``obj``'s docstring, or an empty string."""
    doc = inspect.getdoc(obj) or ""
    return next((line.strip() for line in doc.splitlines() if line.strip()), "")


BUILT_IN, ENTRY_POINT, PLUGIN = "built-in", "entry point", "plugin"
"""Where a component comes from: the sandbox's own distribution, another distribution's entry point in
the ``sandbox`` group, or a ``--plugin`` (or recipe ``plugins``) module or ``.py`` file."""


@dataclass(frozen=True)
class Origin:
    """Where a component came from, as a run records it (``provenance.json``): ``source`` is one of
    :data:`BUILT_IN`, :data:`ENTRY_POINT` (both with the distribution's ``package``, ``version`` and
    ``entry_point`` name) or :data:`PLUGIN` (the module name or absolute ``.py`` path in ``plugin``)."""

    source: str
    package: str = ""
    version: str = ""
    entry_point: str = ""
    plugin: str = ""

    def describe(self) -> str:
        """``package shake-plugin 1.2.3 (entry point shake)``, ``sandbox-ssl 0.1.0 (built-in)`` or
        ``--plugin /abs/shake.py``."""
        if self.source == PLUGIN:
            return f"--plugin {self.plugin}"
        if self.source == BUILT_IN:
            return f"{self.package} {self.version} (built-in)"
        return f"package {self.package} {self.version} (entry point {self.entry_point})"

    def to_json(self) -> dict[str, str]:
        """The fields that apply to this source, for ``provenance.json``."""
        keys = ("plugin",) if self.source == PLUGIN else ("package", "version", "entry_point")
        return {"source": self.source, **{key: getattr(self, key) for key in keys}}

    @classmethod
    def from_json(cls, data: Any) -> Origin | None:
        """The origin :meth:`to_json` wrote, or None for anything else (a damaged or foreign record)."""
        if not isinstance(data, dict) or data.get("source") not in (BUILT_IN, ENTRY_POINT, PLUGIN):
            return None
        fields = ("source", "package", "version", "entry_point", "plugin")
        return cls(**{key: str(data[key]) for key in fields if key in data})


@dataclass(frozen=True)
class Component:
    """A registered component: its kind, name, factory, description, provider and where it came from."""

    kind: ComponentKind
    name: str
    factory: Callable[..., Any]
    description: str
    provider: str
    origin: Origin | None = None
    """Where the component came from (None: registered without a plugin host, e.g. in a test)."""

    @cached_property
    def _options_model(self) -> type[pydantic.BaseModel]:
        """A pydantic model of the factory's options (its parameters minus the host's context)."""
        target = self.factory.__init__ if inspect.isclass(self.factory) else self.factory
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # unresolvable annotations: fall back to no type checking
            hints = {}
        fields: dict[str, Any] = {}
        for param in inspect.signature(self.factory).parameters.values():
            if param.name in self.kind.context or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (hints.get(param.name, Any), default)
        config = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True, strict=False)
        return pydantic.create_model(f"{self.kind.name}.{self.name}", __config__=config, **fields)

    @property
    def label(self) -> str:
        """How messages name this component: ``perturbation 'ddfp' (from sandbox-ssl 0.1.0)``."""
        return f"{self.kind.name} {self.name!r} (from {self.provider})"

    def option_names(self) -> list[str]:
        """Names of the options a recipe may set for this component."""
        return list(self._options_model.model_fields)

    def resolve_options(self, options: dict[str, Any], where: str) -> dict[str, Any]:
        """Validate ``options`` and return them with every default filled in.

        ``where`` names the recipe table for error messages (e.g. ``"recipe.toml: [perturbation]"``).
        """
        try:
            model = self._options_model.model_validate(options)
        except pydantic.ValidationError as error:
            raise SandboxError(describe_option_error(error, self, where)) from None
        return model.model_dump(mode="json")

    def _accepted(self, context: dict[str, Any]) -> dict[str, Any]:
        """The host's context arguments the factory declares (all of them with ``**kwargs``)."""
        parameters = inspect.signature(self.factory).parameters
        if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            return context
        return {key: value for key, value in context.items() if key in parameters}

    def build(self, options: dict[str, Any], **context: Any) -> Any:
        """Call the factory with validated ``options`` and the host's ``context`` arguments."""
        resolved = self.resolve_options(options, f"[{self.kind.name}]")
        try:
            product = self.factory(**self._accepted(context), **resolved)
        except SandboxError:
            raise
        except (ValueError, FileNotFoundError, KeyError) as error:  # a factory refusing its options or files
            raise SandboxError(f"{self.kind.name} {self.name!r} ({self.provider}): {error}") from error
        except Exception as error:  # noqa: BLE001 - any other failure of a plugin's factory is the plugin's
            raise SandboxError(f"{self.kind.name} {self.name!r} ({self.provider}): {describe_exception(error)}") from error
        if not isinstance(product, self.kind.product):
            raise SandboxError(f"{self.label} returned {type(product).__name__}, expected a {self.kind.product.__name__}")
        return product


def describe_option_error(error: pydantic.ValidationError, component: Component, where: str) -> str:
    """One line naming the first bad option of ``component``, its value and what was expected."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "?"
    if first["type"] == "extra_forbidden":
        valid = ", ".join(component.option_names()) or "none"
        return f"{where}: unknown option {key!r} for {component.kind.name} {component.name!r}; valid options: {valid}"
    if first["type"] == "missing":
        return f"{where}: {component.kind.name} {component.name!r} needs option {key!r}"
    return f"{where}: {key} = {first.get('input')!r}: {lower_first(first['msg'])}"


class Registry:
    """All components, by kind and name. Built from a plugin manager by ``sandbox.plugins``."""

    def __init__(self, broken: dict[str, str] | None = None) -> None:
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        self.broken = dict(broken or {})
        """Installed plugins that failed to import or have hooks never called (named in unknown-name errors)."""

    def add(
        self, kind: str, name: str, factory: Callable[..., Any], description: str | None, provider: str,
        origin: Origin | None = None,
    ) -> None:
        """Record a component (``origin``: where it came from); a name taken in the same kind is an error
        naming both providers."""
        if not isinstance(name, str) or not name:
            raise SandboxError(f"plugin {provider}: {kind} names must be non-empty strings, got {name!r}")
        if not callable(factory):
            raise SandboxError(f"plugin {provider}: {kind} {name!r} factory is not callable: {factory!r}")
        existing = self._components[kind].get(name)
        if existing is not None:
            raise SandboxError(
                f"{kind} name {name!r} is registered twice: by {existing.provider} and by {provider}"
            )
        self._components[kind][name] = Component(
            KINDS[kind], name, factory, description or first_doc_line(factory), provider, origin
        )

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` of ``kind``; an unknown name is an error listing those that exist."""
        try:
            return self._components[kind][name]
        except KeyError:
            known = ", ".join(sorted(self._components[kind])) or "none"
            raise SandboxError(f"unknown {kind} {name!r}; registered {kind} plugins: {known}{self.broken_note()}") from None

    def broken_note(self) -> str:
        """A sentence naming the broken plugins and what is wrong with each, or an empty string."""
        if not self.broken:
            return ""
        return "; broken plugins: " + ", ".join(f"{name}: {error}" for name, error in self.broken.items())

    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind``, sorted."""
        return sorted(self._components[kind])

    def __iter__(self) -> Iterator[Component]:
        for kind in KINDS:
            yield from (self._components[kind][name] for name in self.names(kind))
