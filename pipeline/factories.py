"""Objects named in a job spec as "package.module:name" or "/path/file.py:name" (imports no torch)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def load_factory(reference: str, key: str = "metrics.feature_extractor"):
    """Import "package.module:name" or "/path/file.py:name" and return `name`; `key` names the setting."""
    location, _, name = reference.rpartition(":")
    if not location or not name:
        raise ValueError(f"{key} {reference!r}: expected 'package.module:factory' or '/path/file.py:factory'")
    if location.endswith(".py"):
        module_name = f"_inversa_factory_{Path(location).stem}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, location)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up here
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]  # a later attempt must not find a half-run module
                raise
    else:
        module = importlib.import_module(location)
    return getattr(module, name)


def factory_problem(reference: str, key: str) -> str | None:
    """Why `reference` cannot be loaded as a factory (one line naming `key`), or None if it can.

    Imports the module (as the workers will) and checks that `name` exists and is callable; the
    factory itself is not called, so no model is built.
    """
    location = reference.rpartition(":")[0]
    if location.endswith(".py") and not Path(location).is_file():
        return f"{key}: {reference!r}: file {location} does not exist"
    try:
        factory = load_factory(reference, key)
    except ValueError as error:
        return str(error)
    except AttributeError:
        return f"{key}: {reference!r}: module {location!r} has no attribute {reference.rpartition(':')[2]!r}"
    except Exception as error:  # ImportError, SyntaxError, whatever the module raises on import
        return f"{key}: {reference!r}: cannot import {location!r} ({type(error).__name__}: {error})"
    if not callable(factory):
        return f"{key}: {reference!r} is not callable"
    return None
