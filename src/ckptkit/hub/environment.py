"""Facts about the machine ckptkit runs on, for ``ckpt doctor`` and bug reports.

Nothing here imports a framework: optional packages are looked up with
``importlib.util.find_spec`` (which finds a top-level module without running it) and their
versions read from installed metadata.  Secrets are never reported: credential variables
appear as set or not, and a password in a proxy URL is masked.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptkit import __version__
from ckptkit.config import Settings
from ckptkit.storage.hashing import tree_files

if TYPE_CHECKING:
    from ckptkit.hub.credentials import KaggleLookup
    from ckptkit.hub.pins import PinsSnapshot

#: (importable module, distribution, ckptkit extra that installs it)
EXTRAS: tuple[tuple[str, str, str], ...] = (
    ("torch", "torch", "torch"),
    ("tensorflow", "tensorflow", "tf"),
    ("tensorflow_hub", "tensorflow-hub", "tf"),
    ("kagglehub", "kagglehub", "kaggle"),
    ("kagglesdk", "kagglesdk", "kaggle"),
    ("jax", "jax", "jax"),
    ("flax", "flax", "jax"),
    ("safetensors", "safetensors", "safetensors"),
)
#: Variables that change where files go or how the network is reached (values shown).
SHOWN_VARIABLES = ("TFHUB_CACHE_DIR", "KAGGLEHUB_CACHE", "KAGGLE_CONFIG_DIR", "HF_ENDPOINT",
                   "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HTTP_PROXY",
                   "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                   "all_proxy", "no_proxy", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
#: Variables holding secrets (only "set" is shown).
SECRET_VARIABLES = ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "HF_TOKEN",
                    "HUGGING_FACE_HUB_TOKEN")
HIDDEN = "(set, hidden)"


@dataclass(frozen=True)
class Extra:
    """One optional package: importable or not, and its installed version."""

    module: str
    distribution: str
    extra: str
    installed: bool
    version: str | None


@dataclass(frozen=True)
class CacheFacts:
    """The ckptkit cache directory: size on disk and free space where it lives."""

    path: Path
    exists: bool
    files: int
    bytes: int
    free_bytes: int | None
    problem: str | None = None  # why size or free space could not be measured


@dataclass(frozen=True)
class Environment:
    """Everything ``ckpt doctor`` reports about the machine (see :func:`describe_environment`)."""

    ckptkit: str
    python: str
    implementation: str
    executable: str
    platform: str
    extras: tuple[Extra, ...]
    cache: CacheFacts
    config_dir: Path
    pins_path: Path
    pins: int | None
    pins_problem: str | None
    tfhub_cache_dir: Path
    kagglehub_cache_dir: Path
    kaggle_credentials: str | None  # where kagglehub would find them, never their value
    kaggle_credentials_problem: str | None
    variables: tuple[tuple[str, str], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ckptkit": self.ckptkit, "python": self.python,
            "implementation": self.implementation, "executable": self.executable,
            "platform": self.platform,
            "extras": [{"module": e.module, "distribution": e.distribution, "extra": e.extra,
                        "installed": e.installed, "version": e.version} for e in self.extras],
            "cache": {"path": str(self.cache.path), "exists": self.cache.exists,
                      "files": self.cache.files, "bytes": self.cache.bytes,
                      "free_bytes": self.cache.free_bytes, "problem": self.cache.problem},
            "config_dir": str(self.config_dir),
            "pins": {"path": str(self.pins_path), "count": self.pins,
                     "problem": self.pins_problem},
            "tfhub_cache_dir": str(self.tfhub_cache_dir),
            "kagglehub_cache_dir": str(self.kagglehub_cache_dir),
            "kaggle_credentials": {"origin": self.kaggle_credentials,
                                   "problem": self.kaggle_credentials_problem},
            "variables": dict(self.variables),
        }


def describe_environment(settings: Settings, environ: Mapping[str, str] | None = None, *,
                         pins: PinsSnapshot | None = None,
                         kaggle: KaggleLookup | None = None) -> Environment:
    """Collect the environment facts; reads the disk (cache size), never the network.

    Args:
        settings: the resolved settings (cache, config and origin cache directories).
        environ: the variables to read (default ``os.environ``).
        pins: ``lock.json`` as the caller already read it; read here when None.
        kaggle: the Kaggle credentials the caller already looked up (in ``environ``); looked
            up here when None.

    Example:
        >>> from ckptkit.config import settings
        >>> describe_environment(settings()).ckptkit  # doctest: +SKIP
        '0.1.0'
    """
    from ckptkit.hub.credentials import look_up_kaggle_credentials
    from ckptkit.hub.pins import Pins

    env = os.environ if environ is None else environ
    pins = Pins(settings.pins_path).snapshot() if pins is None else pins
    kaggle = look_up_kaggle_credentials(env) if kaggle is None else kaggle
    return Environment(
        ckptkit=__version__, python=platform.python_version(),
        implementation=platform.python_implementation(), executable=sys.executable,
        platform=platform.platform(), extras=tuple(find_extras()),
        cache=measure_cache(settings.cache_dir), config_dir=settings.config_dir,
        pins_path=settings.pins_path, pins=None if pins.problem else len(pins.pins),
        pins_problem=pins.problem, tfhub_cache_dir=settings.tfhub_cache_dir,
        kagglehub_cache_dir=settings.kagglehub_cache_dir,
        kaggle_credentials=kaggle.credentials.origin if kaggle.credentials else None,
        kaggle_credentials_problem=kaggle.problem, variables=variables(env))


def find_extras() -> list[Extra]:
    """Each package of :data:`EXTRAS`: found without importing it."""
    found = []
    for module, distribution, extra in EXTRAS:
        try:
            installed = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install, or a module without a spec
            installed = False
        version = None
        if installed:
            try:
                version = importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                version = None
        found.append(Extra(module, distribution, extra, installed, version))
    return found


def measure_cache(root: Path) -> CacheFacts:
    """Files and bytes under ``root`` and free space on its disk.

    The files are those :func:`ckptkit.storage.hashing.tree_files` lists (regular files; symlinks
    neither followed nor counted), the same walk that sizes and hashes cached trees.
    """
    files = size = 0
    problem = None
    for path in tree_files(root) if root.is_dir() else ():
        try:
            size += path.stat().st_size
        except OSError:  # removed while counting: a fetch or a prune is running
            continue
        files += 1
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    free = None
    if existing is not None:
        try:
            free = shutil.disk_usage(existing).free
        except OSError as exc:
            problem = f"free space not checked: {exc.strerror or exc}"
    return CacheFacts(root, root.is_dir(), files, size, free, problem)


def variables(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The relevant variables that are set: every ``CKPTKIT_*``, :data:`SHOWN_VARIABLES`
    (proxy passwords masked), and :data:`SECRET_VARIABLES` as set-but-hidden."""
    shown = [(name, value) for name, value in sorted(environ.items())
             if name.startswith("CKPTKIT_")]
    shown += [(name, _mask(environ[name])) for name in SHOWN_VARIABLES if name in environ]
    shown += [(name, HIDDEN) for name in SECRET_VARIABLES if name in environ]
    return tuple(shown)


def _mask(value: str) -> str:
    """``value`` with the password of a ``scheme://user:password@host`` URL replaced."""
    try:
        parts = urllib.parse.urlsplit(value)
        if parts.password is None:
            return value
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a URL, or a bad port: show nothing that might be a secret
        return HIDDEN if "@" in value else value
    netloc = f"{parts.username}:***@{parts.hostname or ''}{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
