"""One registry pattern for every kind of extension: teachers, datasets, loss terms, LLM backends, tasks.

An extension registers itself where it is defined, with a decorator (as timm's `@register_model`):

    TEACHERS = Registry("teacher", option="teacher.name", modules=("makd.teachers.bridge", ...))

    @TEACHERS.register("bridge")
    class BridgeTeacher: ...

A registry knows which modules define its entries and imports them on the first lookup, so importing makd
(or printing `--help`) loads none of them, and a lookup of an unknown name is one error that names the option
and the choices. Third-party packages add entries through the `makd.<kind>s` entry-point group (e.g.
`[project.entry-points."makd.teachers"] my_teacher = "my_pkg.teacher"`: the module is imported like makd's own).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Generic, TypeVar

from makd.errors import MakdError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    info: dict[str, Any] = field(default_factory=dict)  # what the registering code said about it (e.g. needs)


class Registry(Generic[T]):
    def __init__(self, kind: str, option: str, modules: tuple[str, ...] = ()) -> None:
        self.kind, self.option, self.modules = kind, option, modules
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False
        self._loading = False  # this registry's modules are being imported (by the thread holding the lock)
        self._lock = threading.RLock()

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        """Decorator: add `obj` under `name` (a second registration of a name is a programming error)."""

        def add(obj: T) -> T:
            if name in self._entries and self._entries[name].obj is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, info)
            return obj

        return add

    def _load(self) -> None:
        """Import the modules that define the entries, once. Another thread looking up meanwhile waits for all of
        them (it would otherwise see a half-filled registry: "unknown teacher"); a lookup made by those imports
        themselves sees the entries registered so far."""
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                for module in self.modules:
                    importlib.import_module(module)
                for plugin in metadata.entry_points(group=f"makd.{self.kind}s"):
                    importlib.import_module(plugin.value.split(":")[0])
                self._loaded = True
            finally:
                self._loading = False

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entry(self, name: str) -> Entry[T]:
        self._load()
        if name not in self._entries:
            raise MakdError(f"{self.option}: unknown {self.kind} {name!r} (choose from {', '.join(self.names())})")
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def check(self, name: str) -> str:
        """`name` if registered; a ValueError naming the choices otherwise (for pydantic validators)."""
        if name not in self.names():
            raise ValueError(f"unknown {self.kind} {name!r} (choose from {', '.join(self.names())})")
        return name

    def __iter__(self) -> Iterator[Entry[T]]:
        self._load()
        return iter([self._entries[n] for n in sorted(self._entries)])

    def __contains__(self, name: object) -> bool:
        return name in self.names()
