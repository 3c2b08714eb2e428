"""Locations in any fsspec file system: ``s3://``, ``gs://``, ``hf://``, ``memory://``...

fsspec is the file-system layer the ecosystem shares (torch DCP's FsspecReader,
huggingface_hub's HfFileSystem, zarr, pandas).  A location costs one ``info`` (a HEAD for
object stores) for its size and validator, then one ranged ``cat_file`` per fetched span.

Credentials come only from each file system's standard chain, which ckptkit never sees:
s3fs/botocore (``AWS_*`` variables, profiles, instance roles; ``AWS_ENDPOINT_URL`` for
S3-compatible stores), gcsfs (application-default credentials), huggingface_hub
(``HF_TOKEN`` or the stored token).  Errors are mapped to ckptkit's and name the URL
without credentials; an access-denied error names the chain to check.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ckptkit.errors import (AuthError, MissingDependencyError, NotFoundError, SourceError,
                            UsageError)
from ckptkit.storage.entries import Entry
from ckptkit.storage.remote import EXTRAS, HEAD, RemoteLocation, display

#: scheme -> where its credentials come from (named in access-denied hints).
CHAINS = {
    "s3": "the AWS credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and "
          "~/.aws, or the instance role; AWS_ENDPOINT_URL for S3-compatible stores)",
    "gs": "Google application-default credentials (GOOGLE_APPLICATION_CREDENTIALS or "
          "`gcloud auth application-default login`)",
    "hf": "the Hugging Face token (HF_TOKEN or `hf auth login`)",
}
CHAINS["s3a"] = CHAINS["s3"]
CHAINS["gcs"] = CHAINS["gs"]


def fsspec_opener(scheme: str) -> Callable[[str], FsspecLocation] | None:
    """A maker of locations for ``scheme``, or None when fsspec (or the protocol) is not
    installed and ckptkit knows no extra for it."""
    try:
        import fsspec
    except ImportError:
        if scheme in EXTRAS:
            _module, extra, package = EXTRAS[scheme]
            raise MissingDependencyError("fsspec", extra, f"reading {scheme}:// URLs") from None
        return None
    if scheme not in fsspec.available_protocols():
        return None
    return FsspecLocation


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system for ``url`` and the path inside it (one instance per
    protocol and options, as fsspec caches them)."""
    import fsspec
    from fsspec.core import split_protocol

    scheme = (split_protocol(url)[0] or "file").lower()
    try:
        cls = fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        module, extra, package = EXTRAS.get(scheme, (scheme, None, str(exc.name or scheme)))
        raise MissingDependencyError(package, extra, f"reading {scheme}:// URLs") from None
    except ValueError:
        raise UsageError(f"{display(url)}: no fsspec file system reads {scheme}://",
                         hint="Install the fsspec implementation for it (docs/remote.md)"
                         ) from None
    options = cls._get_kwargs_from_urls(url)
    options.update(_options(scheme))
    return cls(**options), cls._strip_protocol(url)


def _options(scheme: str) -> dict[str, Any]:
    """Options ckptkit sets itself: timeouts (so a refused or silent endpoint fails within
    CKPTKIT_TIMEOUT) and nothing about credentials."""
    from ckptkit.config import _timeout

    timeout = _timeout(os.environ.get("CKPTKIT_TIMEOUT"))
    if scheme in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": min(timeout, 10.0),
                                  "read_timeout": timeout,
                                  "retries": {"max_attempts": 2, "mode": "standard"}}}
    if scheme in ("gs", "gcs"):
        import logging

        # gcsfs warns on every new bucket when it cannot probe its type (no ADC, emulators);
        # it then reads it as a plain bucket, which is what ckptkit wants: keep stderr clean.
        gcs_log = logging.getLogger("gcsfs")
        if gcs_log.level == logging.NOTSET:
            gcs_log.setLevel(logging.ERROR)
        return {"timeout": timeout}
    return {}


class FsspecLocation(RemoteLocation):
    """A file or directory (prefix) of an fsspec file system."""

    def __init__(self, url: str, fs: Any = None, path: str | None = None):
        super().__init__(url)
        if fs is None:
            fs, path = filesystem(url)
        self.fs = fs
        self.path = path or ""
        self.scheme = url.split("://", 1)[0].lower()

    def _make(self, url: str) -> FsspecLocation:
        return FsspecLocation(url, self.fs, self.fs._strip_protocol(url))

    def _forget(self) -> None:
        self.fs.invalidate_cache(self.path)

    def _stat(self) -> tuple[int, str | None] | None:
        if self.scheme in ("s3", "s3a") and hasattr(self.fs, "_call_s3"):
            found = self._s3_head()
            if found is not None:
                return found if found != "missing" else None
        return self._info()

    def _info(self) -> tuple[int, str | None] | None:
        info = self._call(self.fs.info, self.path, missing=None)
        self._count(0)
        if info is None or info.get("type") == "directory":
            return None
        return int(info.get("size") or 0), _validator(info)

    def fingerprint(self) -> tuple[int, str | None]:
        """``(size, ETag)`` from a fresh ``HEAD`` (never a ranged GET: nothing is read)."""
        self._forget()
        stat = self._info()
        if stat is None:
            raise NotFoundError(f"{self}: no such file", path=str(self),
                                hint="It was removed since it was listed")
        return stat

    def _s3_head(self) -> tuple[int, str | None] | str | None:
        """Size, ETag and the first :data:`HEAD` bytes in one ranged ``GetObject`` (S3 has
        the size in ``Content-Range``), instead of a ``HEAD`` and then a ``GET``.  Returns
        "missing" for no such key, None when this does not apply (an empty object, which
        S3 answers 416) so that ``info`` decides."""
        from fsspec.asyn import sync

        bucket, key, version = self.fs.split_path(self.path)
        if not key or self.url.endswith("/"):
            return None
        extra = {"VersionId": version} if version else {}

        async def get() -> tuple[dict[str, Any], bytes]:
            answer = await self.fs._call_s3("get_object", Bucket=bucket, Key=key,
                                            Range=f"bytes=0-{HEAD - 1}", **extra)
            try:
                return answer, await answer["Body"].read()
            finally:
                answer["Body"].close()

        try:
            answer, body = sync(self.fs.loop, get)
        except FileNotFoundError:
            self._count(0)
            return "missing"
        except PermissionError:
            raise AuthError(f"{self}: access denied", url=str(self), path=str(self),
                            reason="access denied",
                            hint=f"Check {CHAINS.get(self.scheme, 'the credentials')}") from None
        except Exception:  # an empty object (416), an odd store: HEAD decides
            return None
        self._count(len(body))
        total = str(answer.get("ContentRange") or "").rpartition("/")[2]
        size = int(total) if total.isdigit() else len(body)
        with self._lock:
            self._keep(0, body)
        return size, answer.get("ETag")

    def _fetch(self, start: int, stop: int) -> bytes:
        data = self._call(self._ranged, start, stop)
        self._count(len(data))
        return data

    def _ranged(self, start: int, stop: int) -> bytes:
        """One ranged read.  Object stores implement ``cat_file`` with a ranged GET; fsspec's
        generic one (HfFileSystem uses it) opens a file whose read-ahead cache would fetch
        whole blocks of megabytes, so those are opened without a cache, sized to the span."""
        from fsspec.spec import AbstractFileSystem

        if type(self.fs).cat_file is not AbstractFileSystem.cat_file:
            return bytes(self.fs.cat_file(self.path, start=start, end=stop))
        with self.fs.open(self.path, "rb", block_size=max(1, stop - start),
                          cache_type="none") as fh:
            fh.seek(start)
            return bytes(fh.read(stop - start))

    def _is_dir(self) -> bool:
        try:
            return bool(self._call(self.fs.isdir, self.path, missing=False))
        finally:
            self._count(0)

    def _list(self) -> list[Entry]:
        found = self._call(self.fs.ls, self.path, detail=True, refresh=True)
        self._count(0)
        entries = []
        for info in found:
            name = info["name"].rstrip("/").rpartition("/")[2]
            if not name or info["name"].rstrip("/") == self.path.rstrip("/"):
                continue
            is_dir = info.get("type") == "directory"
            entries.append(Entry(name, is_dir, None if is_dir else int(info.get("size") or 0),
                                 _mtime(info)))
        return entries

    def walk(self) -> list[FsspecLocation]:
        """Every file below this prefix, one listing request per page (not per directory)."""
        found = self._call(self.fs.find, self.path, withdirs=False, detail=True)
        self._count(0)
        base = self.url.rstrip("/")
        strip = self.path.rstrip("/")
        objects = []
        for name, info in sorted(found.items()):
            if not name.startswith(strip):
                continue
            obj = self._make(f"{base}{name[len(strip):]}")
            # The listing already says each object's size and ETag: no HEAD per object.
            obj._stat_cache = (int(info.get("size") or 0), _validator(info))
            objects.append(obj)
        return objects

    def _call(self, method: Any, *args: Any, missing: Any = ..., **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except FileNotFoundError:
            if missing is not ...:
                return missing
            raise NotFoundError(f"{self}: no such file or bucket", path=str(self),
                                hint="Check the bucket, key and spelling") from None
        except PermissionError:
            raise AuthError(f"{self}: access denied", url=str(self), path=str(self),
                            reason="access denied",
                            hint=f"Check {CHAINS.get(self.scheme, 'the credentials')}"
                            ) from None
        except (MissingDependencyError, NotFoundError, SourceError, UsageError):
            raise
        except Exception as exc:
            raise _mapped(self, exc) from None


def _mapped(where: FsspecLocation, exc: Exception) -> Exception:
    """A ckptkit error for a failure of the file system (names never include credentials:
    botocore and aiohttp messages name the endpoint and the operation only)."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if any(s in lowered for s in ("nosuchbucket", "nosuchkey", "not found", "404")):
        return NotFoundError(f"{where}: no such file or bucket", path=str(where),
                             hint="Check the bucket, key and spelling")
    if any(s in lowered for s in ("accessdenied", "forbidden", "403", "401",
                                  "invalidaccesskeyid", "signaturedoesnotmatch",
                                  "nocredentials", "unable to locate credentials")):
        return AuthError(f"{where}: access denied", url=str(where), path=str(where),
                         reason="access denied",
                         hint=f"Check {CHAINS.get(where.scheme, 'the credentials')}")
    if any(s in lowered for s in ("connect", "refused", "timed out", "timeout", "endpoint",
                                  "name resolution")):
        return SourceError(f"{where}: unreachable ({_first_line(exc)})", url=str(where),
                           path=str(where), reason="unreachable",
                           hint="Check the endpoint (AWS_ENDPOINT_URL for S3-compatible "
                                "stores) and the network")
    return SourceError(f"{where}: {_first_line(exc)}", url=str(where), path=str(where),
                       hint="Check the URL and try again")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _validator(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "crc32c", "blob_id", "lfs", "sha"):
        value = info.get(key)
        if value:
            return str(value if not isinstance(value, dict) else value.get("sha256", value))
    mtime = _mtime(info)
    return None if mtime is None else repr(mtime)


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("LastModified", "mtime", "updated", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


__all__ = ["CHAINS", "FsspecLocation", "filesystem", "fsspec_opener"]
