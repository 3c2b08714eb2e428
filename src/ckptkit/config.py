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
| ``CKPTKIT_MAX_DOWNLOAD`` | largest download of a file whose size is not known (bytes; K/M/G/T suffixes) | 32G |
| ``CKPTKIT_LOW_SPEED_LIMIT`` | bytes per second a download must average over the low-speed time (0: off) | 1024 |
| ``CKPTKIT_LOW_SPEED_TIME`` | seconds of the low-speed window | 60 |
| ``CKPTKIT_HEADER_TIMEOUT`` | seconds an answer may take to send all its headers | 60 |
| ``CKPTKIT_PIN_UNSIZED`` | ``1``: pin a first download even when no size or hash vouched for it | off |
| ``CKPTKIT_DEBUG`` | ``1``: tracebacks instead of one-line errors | off |
| ``CKPTKIT_MAX_*`` | the reading budget of :mod:`ckptkit.storage.budget` (``OPCODES``, ``NODES``, ``STACK``, ``TREE``, ``KEY``, ``DEPTH``, ``HEADER``, ``BYTES``, ``RATIO``) | :func:`ckptkit.storage.budget.configured` |
| ``TFHUB_CACHE_DIR`` | where TF Hub models are made visible to ``tensorflow_hub`` | tensorflow_hub's default |
| ``KAGGLEHUB_CACHE`` | kagglehub's own cache, read and filled by the Kaggle source | ``~/.cache/kagglehub`` |
| ``NO_COLOR`` | no colour in output | unset |
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ckptkit.errors import UsageError
from ckptkit.storage.mirrors import Mirrors

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
class TransferLimits:
    """What a download may cost before it is abandoned (see :mod:`ckptkit.hub.download.stalls`).

    Attributes:
        max_bytes: the largest body accepted when the caller expects no particular size (a file
            the catalogue has no size for); an announced or streamed body beyond it is refused
            as "too large".  None: no ceiling.
        min_speed: bytes per second a body must average over ``speed_window`` seconds (0: off).
        speed_window: seconds of the low-speed window.
        header_timeout: seconds an answer may take to send its status line and headers.
    """

    max_bytes: int | None = 32 << 30
    min_speed: int = 1024
    speed_window: float = 60.0
    header_timeout: float | None = 60.0


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
    limits: TransferLimits = TransferLimits()
    #: pin a first download whose size no server or catalogue stated and that has no
    #: catalogue hash (``--pin-unsized``, ``CKPTKIT_PIN_UNSIZED``); off: such bytes are cached
    #: but not trusted for later fetches
    pin_unsized: bool = False

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
             catalogs: tuple[Path, ...] = (), connections: int | None = None,
             pin_unsized: bool | None = None) -> Settings:
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
        connections=connections, timeout=timeout, limits=transfer_limits(),
        pin_unsized=env_flag("CKPTKIT_PIN_UNSIZED") if pin_unsized is None else pin_unsized)


def transfer_limits() -> TransferLimits:
    """What one download may cost: ``CKPTKIT_MAX_DOWNLOAD``, ``CKPTKIT_LOW_SPEED_LIMIT``,
    ``CKPTKIT_LOW_SPEED_TIME`` and ``CKPTKIT_HEADER_TIMEOUT``, else the defaults."""
    env, default = os.environ, TransferLimits()
    max_bytes = _byte_count("CKPTKIT_MAX_DOWNLOAD", env.get("CKPTKIT_MAX_DOWNLOAD"),
                            default.max_bytes)
    raw_speed = (env.get("CKPTKIT_LOW_SPEED_LIMIT") or "").strip()
    if raw_speed and not (raw_speed.isascii() and raw_speed.isdigit()):
        raise UsageError(f"CKPTKIT_LOW_SPEED_LIMIT={raw_speed!r} is not a whole number of bytes "
                         "per second", hint="Example: CKPTKIT_LOW_SPEED_LIMIT=1024 (0 turns the "
                                            "low-speed limit off)")
    return TransferLimits(
        max_bytes=max_bytes,
        min_speed=int(raw_speed) if raw_speed else default.min_speed,
        speed_window=_seconds("CKPTKIT_LOW_SPEED_TIME", env.get("CKPTKIT_LOW_SPEED_TIME"),
                              default.speed_window),
        header_timeout=_seconds("CKPTKIT_HEADER_TIMEOUT", env.get("CKPTKIT_HEADER_TIMEOUT"),
                                default.header_timeout))


_BYTE_COUNT = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def _byte_count(name: str, raw: str | None, default: int | None) -> int | None:
    """A size such as ``1048576``, ``512M`` or ``32GiB`` (binary units), at least 1."""
    if raw is None or not raw.strip():
        return default
    match = _BYTE_COUNT.fullmatch(raw.strip())
    value = (int(match.group(1)) << (10 * "_KMGT".index(match.group(2).upper() or "_"))
             if match else 0)
    if value < 1:
        raise UsageError(f"{name}={raw!r} is not a size in bytes",
                         hint=f"Example: {name}=64G (K, M, G and T are powers of 1024)")
    return value


def _seconds(name: str, raw: str | None, default: float | None) -> float | None:
    """A number of seconds above 0 and below infinity."""
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise UsageError(f"{name}={raw!r} is not a number of seconds above 0",
                         hint=f"Example: {name}=60")
    return value


def _timeout(raw: str | None) -> float:
    """``CKPTKIT_TIMEOUT``: seconds, above 0 (a stalled server is retried after that long)."""
    value = _seconds("CKPTKIT_TIMEOUT", raw, DEFAULT_TIMEOUT)
    assert value is not None
    return value


def max_settings() -> dict[str, str]:
    """The ``CKPTKIT_MAX_*`` variables that are set (the reading budget's overrides, checked
    and applied by :func:`ckptkit.storage.budget.configured`)."""
    return {name: value for name, value in os.environ.items()
            if name.startswith("CKPTKIT_MAX_") and value.strip()}
