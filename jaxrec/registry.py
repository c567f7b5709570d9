"""Tasks found by name: adding a method is a new folder, never an edit here or in `train/`.

`task: NAME` in a config resolves, in this order, to
1. a task class already registered under NAME (`@register`, e.g. by an imported module);
2. the package `jaxrec.methods.NAME` (NAME may be dotted: `foo.bar` → `jaxrec.methods.foo.bar`),
   imported and expected to register a task called NAME;
3. an installed entry point of group `jaxrec.tasks` called NAME (third-party methods);
4. `some.module:ClassName` — a task class anywhere on the Python path (tests, notebooks).
Nothing in this module names a method; the lookup is by convention.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
from typing import Any

ENTRY_POINT_GROUP = "jaxrec.tasks"
METHODS_PACKAGE = "jaxrec.methods"

_TASKS: dict[str, type] = {}


class UnknownTask(KeyError):
    def __str__(self) -> str:   # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else "unknown task"


def register(cls: type) -> type:
    """Class decorator: make a task findable by its `name`."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__qualname__}: a task class needs a non-empty `name`")
    existing = _TASKS.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"task name {name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _TASKS[name] = cls
    return cls


def task_class(name: str) -> type:
    """The task class for a config's `task` value (see the module docstring)."""
    if name in _TASKS:
        return _TASKS[name]
    if ":" in name:
        return _from_path(name)
    if all(part.isidentifier() for part in name.split(".")):
        module = f"{METHODS_PACKAGE}.{name}"
        if _module_exists(module):
            importlib.import_module(module)
            if name not in _TASKS:
                raise UnknownTask(f"{module} was imported but registers no task named {name!r}")
            return _TASKS[name]
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        cls = entry.load()
        _TASKS[name] = cls
        return cls
    raise UnknownTask(f"unknown task {name!r} (known: {', '.join(known_tasks())}; or give module.path:ClassName)")


def model_schema(name: str) -> type:
    """The dataclass of the `model` section of a task's configs."""
    return task_class(name).model_config


def known_tasks() -> list[str]:
    """Registered names, the packages under jaxrec/methods and installed entry points."""
    names = set(_TASKS)
    package = importlib.import_module(METHODS_PACKAGE)
    names |= {m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")}
    names |= {e.name for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:    # a parent package is missing
        return False


def _from_path(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    if not _module_exists(module_name):
        raise UnknownTask(f"task {path!r}: module {module_name!r} not found")
    cls = getattr(importlib.import_module(module_name), attribute, None)
    if cls is None or not isinstance(cls, type):
        raise UnknownTask(f"task {path!r}: {module_name} has no class {attribute!r}")
    _TASKS[path] = cls
    return cls
