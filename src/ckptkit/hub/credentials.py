"""Where hub credentials come from, found the way the hubs' own clients look for them.

Only Kaggle needs any.  kagglehub (``config.get_kaggle_credentials``) and kagglesdk
(``kaggle_env.get_access_token_from_env``) look, in this order, at:

1. in a Kaggle notebook, the token file named by ``KAGGLE_API_V1_TOKEN``;
2. ``KAGGLE_API_TOKEN``: a token, or the path of a file holding one;
3. ``~/.kaggle/access_token`` (or ``access_token.txt``);
4. ``KAGGLE_USERNAME`` and ``KAGGLE_KEY``, both set;
5. ``kaggle.json`` in ``$KAGGLE_CONFIG_DIR`` (default ``~/.kaggle``), with ``username`` and
   ``key``;
6. Colab secrets, inside Colab (readable only through ``google.colab``; not looked at here).

The secrets are kept off ``repr`` and are only ever sent to the Kaggle API (or its mirror).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckptkit.errors import CkptkitError, FormatError


@dataclass(frozen=True)
class KaggleCredentials:
    """Kaggle credentials and where they were found (``origin``: a variable or a file)."""

    origin: str
    token: str | None = field(default=None, repr=False)
    username: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header kagglesdk sends: a bearer token, else basic auth."""
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        pair = base64.b64encode(f"{self.username}:{self.key}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}


@dataclass(frozen=True)
class KaggleLookup:
    """Where the search for Kaggle credentials ended: what was found (None: nothing, public
    models only), or why an unreadable ``kaggle.json`` stopped it (``problem``)."""

    credentials: KaggleCredentials | None
    problem: str | None = None


def in_colab(environ: Mapping[str, str] | None = None) -> bool:
    """True inside Google Colab, where Kaggle credentials may be Colab secrets."""
    return "COLAB_RELEASE_TAG" in (os.environ if environ is None else environ)


def find_kaggle_credentials(environ: Mapping[str, str] | None = None,
                            home: Path | None = None) -> KaggleCredentials | None:
    """The credentials kagglehub would use, or None when there are none (public models only).

    Args:
        environ: the environment to read (default ``os.environ``).
        home: the home directory (default ``Path.home()``).

    Raises:
        FormatError: ``kaggle.json`` exists but is not JSON with ``username`` and ``key``
            (kagglehub refuses it too).

    Example:
        >>> find_kaggle_credentials({"KAGGLE_USERNAME": "me", "KAGGLE_KEY": "k"}).origin
        'KAGGLE_USERNAME/KAGGLE_KEY'
    """
    env = os.environ if environ is None else environ
    home = Path.home() if home is None else home
    if env.get("KAGGLE_KERNEL_RUN_TYPE") is not None and env.get("KAGGLE_DATA_PROXY_URL"):
        token = _token_file(env.get("KAGGLE_API_V1_TOKEN"))
        if token:
            return KaggleCredentials("KAGGLE_API_V1_TOKEN", token=token)
    value = env.get("KAGGLE_API_TOKEN")
    if value:
        token = _token_file(value) if _exists(value) else value
        if token:
            return KaggleCredentials("KAGGLE_API_TOKEN", token=token)
    for name in ("access_token", "access_token.txt"):
        token = _token_file(str(home / ".kaggle" / name))
        if token:
            return KaggleCredentials(f"~/.kaggle/{name}", token=token)
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return KaggleCredentials("KAGGLE_USERNAME/KAGGLE_KEY", username=env["KAGGLE_USERNAME"],
                                 key=env["KAGGLE_KEY"])
    folder = Path(env["KAGGLE_CONFIG_DIR"]) if env.get("KAGGLE_CONFIG_DIR") else home / ".kaggle"
    return _kaggle_json(folder / "kaggle.json")


def look_up_kaggle_credentials(environ: Mapping[str, str] | None = None,
                               home: Path | None = None) -> KaggleLookup:
    """:func:`find_kaggle_credentials`, for callers that report an unreadable ``kaggle.json``
    instead of stopping on it (``ckpt doctor``: it is looked up once, then shown and used).

    Example:
        >>> look_up_kaggle_credentials({"KAGGLE_API_TOKEN": "t"}).credentials.origin
        'KAGGLE_API_TOKEN'
    """
    try:
        return KaggleLookup(find_kaggle_credentials(environ, home))
    except CkptkitError as exc:
        return KaggleLookup(None, str(exc))


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a token too long, or with a NUL, to be a path
        return False


def _token_file(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _kaggle_json(path: Path) -> KaggleCredentials | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path} is not valid JSON ({type(exc).__name__})",
                          hint="kagglehub refuses it too: fix it or delete it",
                          path=str(path)) from exc
    if not (isinstance(data, dict) and data.get("username") and data.get("key")):
        raise FormatError(f"{path} lacks a 'username' or a 'key'",
                          hint="Download a fresh one from kaggle.com > Settings > API",
                          path=str(path))
    return KaggleCredentials(str(path), username=str(data["username"]), key=str(data["key"]))
