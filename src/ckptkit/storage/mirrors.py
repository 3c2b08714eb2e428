"""URL prefix rewriting for air-gapped mirrors (``--mirror`` / ``CKPTKIT_MIRROR``).

The value is one or more ``FROM=TO`` pairs separated by commas; a URL starting with ``FROM`` is
fetched from ``TO`` followed by the rest of the URL.  The longest matching ``FROM`` wins, so a
specific rule can override a general one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckptkit.errors import UsageError


@dataclass(frozen=True)
class Mirrors:
    """An ordered set of prefix rewrite rules; empty means "fetch from the origin"."""

    rules: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, value: str | None) -> Mirrors:
        """Parse ``FROM=TO[,FROM=TO...]``.

        Raises:
            UsageError: a pair without ``=`` or with an empty side.
        """
        rules: list[tuple[str, str]] = []
        for pair in (value or "").split(","):
            pair = pair.strip()
            if not pair:
                continue
            origin, sep, target = pair.partition("=")
            if not sep or not origin.strip() or not target.strip():
                raise UsageError(f"mirror rule {pair!r} is not FROM=TO",
                                 hint="Example: CKPTKIT_MIRROR=https://openaipublic.azureedge.net"
                                      "=http://127.0.0.1:8000")
            rules.append((origin.strip(), target.strip()))
        return cls(tuple(sorted(rules, key=lambda r: -len(r[0]))))

    def rewrite(self, url: str) -> str:
        """``url`` with the longest matching prefix replaced, or unchanged."""
        for origin, target in self.rules:
            if url.startswith(origin):
                rest = url[len(origin):]
                if target.endswith("/") and rest.startswith("/"):
                    rest = rest[1:]  # "…:8000/" + "/jukebox" would double the slash
                return target + rest
        return url

    def __bool__(self) -> bool:
        return bool(self.rules)
