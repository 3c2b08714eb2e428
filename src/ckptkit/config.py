"""Settings and environment variables, read in one place.

Precedence for every setting: 1. the command-line flag (or keyword argument), 2. the
``CKPTKIT_*`` environment variable, 3. the built-in default.

| variable | meaning | default |
|---|---|---|
| ``CKPTKIT_CACHE`` | cache directory | the user cache dir (platformdirs), e.g. ``~/.cache/ckptkit`` |
| ``CKPTKIT_CONFIG`` | config directory (user ``catalogue.toml``, ``lock.json`` pins) | the user config dir |
| ``CKPTKIT_OFFLINE`` | ``1``: never touch the network | off |
| ``CKPTKIT_MIRROR`` | ``FROM=TO[,FROM=TO]`` URL prefix rewrites | none |
| ``CKPTKIT_LOCAL_PATH`` | folders searched for files (``os.pathsep``-separated) | none |
| ``CKPTKIT_CONNECTIONS`` | parallel connections per file | 8 |
| ``CKPTKIT_TIMEOUT`` | seconds to connect, and of silence mid-download, before a retry | 30 |
| ``CKPTKIT_DEBUG`` | ``1``: tracebacks instead of one-line errors | off |
| ``TFHUB_CACHE_DIR`` | where TF Hub models are made visible to ``tensorflow_hub`` | tensorflow_hub's default |
| ``KAGGLEHUB_CACHE`` | kagglehub's own cache, read and filled by the Kaggle source | ``~/.cache/kagglehub`` |
| ``NO_COLOR`` | no colour in output | unset |
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ckptkit.errors import UsageError
from ckptkit.mirrors import Mirrors

TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
DEFAULT_CONNECTIONS = 8
DEFAULT_TIMEOUT = 30.0
#: ``ckpt doctor --timeout``.  Not CKPTKIT_TIMEOUT, which bounds a download's silences and must
#: be patient: a probe is one tiny request, and a dead host must not hold the report up.
DOCTOR_TIMEOUT = 5.0


def env_flag(name: str, default: bool = False) -> bool:
    """True when the environment variable ``name`` is set to 1/true/yes/on."""
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in TRUE_VALUES


def debug() -> bool:
    """``CKPTKIT_DEBUG=1``: show tracebacks instead of one-line errors."""
    return env_flag("CKPTKIT_DEBUG")


def no_color() -> bool:
    """``NO_COLOR`` (any value) turns colour off, as https://no-color.org asks."""
    return "NO_COLOR" in os.environ


@dataclass(frozen=True)
class Settings:
    """Everything fetch and cache commands need to know about the environment."""

    cache_dir: Path
    config_dir: Path
    offline: bool = False
    mirrors: Mirrors = Mirrors()
    local_dirs: tuple[Path, ...] = ()
    catalogs: tuple[Path, ...] = ()
    tfhub_cache_dir: Path = Path(tempfile.gettempdir()) / "tfhub_modules"
    kagglehub_cache_dir: Path = Path("~/.cache/kagglehub").expanduser()
    connections: int = DEFAULT_CONNECTIONS
    timeout: float = DEFAULT_TIMEOUT

    @property
    def user_catalogue(self) -> Path:
        return self.config_dir / "catalogue.toml"

    @property
    def pins_path(self) -> Path:
        return self.config_dir / "lock.json"

    def all_catalogs(self) -> tuple[Path, ...]:
        """User catalogue (if present) then ``--catalog`` files: later ones win."""
        user = (self.user_catalogue,) if self.user_catalogue.is_file() else ()
        return user + self.catalogs


def settings(*, cache_dir: Path | None = None, offline: bool | None = None,
             mirror: str | None = None, local_dirs: tuple[Path, ...] = (),
             catalogs: tuple[Path, ...] = (), connections: int | None = None) -> Settings:
    """Resolve settings: explicit arguments, then ``CKPTKIT_*`` variables, then defaults."""
    import platformdirs

    env = os.environ
    cache = cache_dir or Path(env.get("CKPTKIT_CACHE") or platformdirs.user_cache_dir("ckptkit"))
    config = Path(env.get("CKPTKIT_CONFIG") or platformdirs.user_config_dir("ckptkit"))
    env_local = tuple(Path(p) for p in env.get("CKPTKIT_LOCAL_PATH", "").split(os.pathsep) if p)
    if connections is None:
        raw = env.get("CKPTKIT_CONNECTIONS", str(DEFAULT_CONNECTIONS))
        if not raw.isdigit() or not 1 <= int(raw) <= 64:
            raise UsageError(f"CKPTKIT_CONNECTIONS={raw!r} is not a number from 1 to 64",
                             hint="Set it to a number from 1 to 64, or unset it")
        connections = int(raw)
    timeout = _timeout(env.get("CKPTKIT_TIMEOUT"))
    tfhub = env.get("TFHUB_CACHE_DIR") or str(Path(tempfile.gettempdir()) / "tfhub_modules")
    return Settings(
        cache_dir=cache.expanduser(), config_dir=config.expanduser(),
        offline=env_flag("CKPTKIT_OFFLINE") if offline is None else offline,
        mirrors=Mirrors.parse(mirror if mirror is not None else env.get("CKPTKIT_MIRROR")),
        local_dirs=tuple(p.expanduser() for p in (*local_dirs, *env_local)),
        catalogs=tuple(catalogs), tfhub_cache_dir=Path(tfhub).expanduser(),
        kagglehub_cache_dir=Path(env.get("KAGGLEHUB_CACHE") or "~/.cache/kagglehub").expanduser(),
        connections=connections, timeout=timeout)


def _timeout(raw: str | None) -> float:
    """``CKPTKIT_TIMEOUT``: seconds, above 0 (a stalled server is retried after that long)."""
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise UsageError(f"CKPTKIT_TIMEOUT={raw!r} is not a number of seconds above 0",
                         hint="Example: CKPTKIT_TIMEOUT=60")
    return value
