"""The optional extras: which modules each one brings, and the one-line hint when a feature lacks them.

The base install (numpy, safetensors, pydantic, click, rich, ...) aggregates, inspects, plans and prices rounds on
a local store. Everything else is an extra, imported only when a feature is asked for (an ``s3://`` store, the
Ray executor, training, a plot). Such a feature calls :func:`require_extra` before importing; a missing module
becomes a :class:`MissingExtraError` naming the extra to install, which the CLI prints as one line with exit
code 4 (:attr:`gradshard.cli.common.ExitCode.MISSING_EXTRA`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from gradshard.errors import MissingExtraError


@dataclass(frozen=True)
class Extra:
    """An extra of ``pip install 'gradshard[<name>]'``: its import names and how a person calls them."""

    name: str
    modules: tuple[str, ...]  # top-level import names, as ``import`` spells them (sklearn, not scikit-learn)
    what: str  # "PyTorch and scikit-learn"

    @property
    def install(self) -> str:
        return f"pip install 'gradshard[{self.name}]'"


#: Every extra in ``[project.optional-dependencies]`` that a feature checks for (``all`` is their union).
EXTRAS: dict[str, Extra] = {extra.name: extra for extra in (
    Extra("train", ("torch", "sklearn"), "PyTorch and scikit-learn"),
    Extra("s3", ("boto3", "botocore"), "boto3"),
    Extra("ray", ("ray",), "Ray"),
    Extra("plots", ("matplotlib",), "matplotlib"),
    Extra("report", ("jinja2", "matplotlib"), "Jinja2 and matplotlib"),
    Extra("flower", ("flwr",), "Flower (flwr)"),
    Extra("privacy", ("dp_accounting", "opacus"), "dp-accounting and Opacus"),
)}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import; a module set to None in sys.modules
        return False


def missing_modules(extra: str) -> list[str]:
    """The import names of ``extra`` that cannot be found here (empty: the extra is installed)."""
    return [module for module in EXTRAS[extra].modules if not _importable(module)]


def has_extra(extra: str) -> bool:
    """Whether every module of ``extra`` can be imported (found, without importing it)."""
    return not missing_modules(extra)


def missing_extra_error(extra: str, feature: str, missing: list[str] | None = None) -> MissingExtraError:
    """The error saying that ``feature`` (``"gradshard train"``, ``"the S3 store"``) needs ``extra``."""
    spec = EXTRAS[extra]
    missing = missing if missing is not None else missing_modules(extra) or list(spec.modules)
    return MissingExtraError(f"{feature} needs {spec.what} (not installed: {', '.join(missing)}): {spec.install}",
                             extra=extra, feature=feature, missing=tuple(missing))


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``extra`` can be imported; call it before importing.

    Only looks the modules up (``importlib.util.find_spec``): nothing is imported, so a check costs microseconds.
    """
    missing = missing_modules(extra)
    if missing:
        raise missing_extra_error(extra, feature, missing)


def extra_of_module(module: str) -> str | None:
    """The extra that provides the (possibly dotted) ``module``, or None for a module no extra brings."""
    top = module.partition(".")[0]
    return next((spec.name for spec in EXTRAS.values() if top in spec.modules), None)
