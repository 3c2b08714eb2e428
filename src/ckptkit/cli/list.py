"""``ckpt list``: the catalogue, with sizes and what is cached."""

from __future__ import annotations

from pathlib import Path

import click

from ckptkit.cli import render
from ckptkit.cli.examples import command
from ckptkit.cli.options import cache_options, json_option


@command("list", ("ckpt list", "ckpt list --json | jq '.[].name'"))
@cache_options
@json_option
def list_command(cache_dir: Path | None, catalogs: tuple[Path, ...], as_json: bool) -> None:
    """List catalogue models: files, known size, cached state, description."""
    from ckptkit.hub import catalogue
    from ckptkit.hub.cache import Cache
    from ckptkit.config import settings
    from ckptkit.hub.pins import Pins

    conf = settings(cache_dir=cache_dir, catalogs=catalogs)
    cat = catalogue.load(conf.all_catalogs())
    cache, pins = Cache(conf.cache_dir), Pins(conf.pins_path)
    rows = []
    for model in sorted(cat.models.values(), key=lambda m: m.name):
        sizes, cached = [], 0
        for spec in cat.files_of(model.name):
            pin = pins.get(spec.id)
            sizes.append(spec.size if spec.size is not None else (pin.size if pin else None))
            cached += cache.entry(spec.id) is not None
        known = None if None in sizes else sum(s for s in sizes if s is not None)
        rows.append({"name": model.name, "aliases": list(model.aliases),
                     "files": len(model.files), "size": known,
                     "cached_files": cached, "description": model.description,
                     "origin": model.origin})
    if as_json:
        render.emit_json(rows)
        return
    click.echo(render.table(
        [("NAME", "FILES", "SIZE", "CACHED", "DESCRIPTION")]
        + [(r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else ""),
            r["files"], render.size(r["size"]) if r["size"] is not None else "?",
            "yes" if r["cached_files"] == r["files"] else
            (f"{r['cached_files']}/{r['files']}" if r["cached_files"] else "no"),
            r["description"]) for r in rows], indent=0, right=(1, 2)))
