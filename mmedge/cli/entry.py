"""The ``mmedge`` console entry point.

A plain ``mmedge query BUNDLE --index DIR (--text T | --image F) [-k N] [--json] [--threads N]
[--provider P]`` is answered here without importing typer: building the typer app (its
parameter machinery imports pydantic) would be a large share of a cold query's start-up.
Everything else, and any query invocation that is not plainly well formed (help, unknown,
repeated or ``--opt=value`` options, a value that looks like an option, ``--debug``), goes to
the typer app in :mod:`mmedge.cli.main`, which parses and reports errors as usual. Both paths
run the same :func:`run_query`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_VALUED = {"--index": "index", "-i": "index", "--text": "text", "-t": "text", "--image": "image",
           "-k": "k", "--threads": "threads", "--provider": "provider"}
_SWITCHES = {"--json": "as_json"}


def _hit_dict(h: Any) -> dict[str, Any]:
    return {"key": h.key, "score": round(float(h.score), 6), "modality": h.modality, "path": h.path,
            "caption": h.caption, "metadata": h.metadata}


def run_query(bundle: Path, index: Path, text: str | None, image: Path | None, k: int, as_json: bool,
              threads: int | None, provider: str | None, out: Callable[[str], None]) -> None:
    """The body of ``mmedge query``: search and print the hits through ``out`` (one call per line)."""
    from mmedge.errors import UsageError

    if (text is None) == (image is None):
        raise UsageError("give exactly one of --text or --image")
    if k <= 0:
        raise UsageError(f"-k must be at least 1, got {k}")
    from mmedge.runtime.retriever import Retriever

    r = Retriever(bundle, index, providers=provider, threads=threads, readonly=True)
    hits = r.search(text=text, k=k) if text is not None else r.search(image=image, k=k)
    if as_json:
        out(json.dumps([_hit_dict(h) for h in hits], indent=2, ensure_ascii=False))
        return
    for rank, h in enumerate(hits, 1):
        label = h.caption if h.modality == "text" else (h.path or h.key)
        out(f"{rank:>3}. {h.score:.4f}  {h.key}  {label if label != h.key else ''}".rstrip())


def parse_plain_query(args: list[str]) -> dict[str, Any] | None:
    """The arguments after ``query`` -> keyword arguments of :func:`run_query` (without
    ``out``), or None when they are not plainly well formed (typer then handles them)."""
    opts: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in _SWITCHES:
            if _SWITCHES[a] in opts:
                return None
            opts[_SWITCHES[a]] = True
            i += 1
        elif a in _VALUED:
            key = _VALUED[a]
            if key in opts or i + 1 >= len(args) or args[i + 1].startswith("-"):
                return None
            opts[key] = args[i + 1]
            i += 2
        elif a.startswith("-"):
            return None
        else:
            positional.append(a)
            i += 1
    if len(positional) != 1 or "index" not in opts:
        return None
    try:
        k = int(opts.get("k", "10"))
        threads = int(opts["threads"]) if "threads" in opts else None
    except ValueError:
        return None
    return {"bundle": Path(positional[0]), "index": Path(opts["index"]), "text": opts.get("text"),
            "image": Path(opts["image"]) if "image" in opts else None, "k": k,
            "as_json": bool(opts.get("as_json", False)), "threads": threads, "provider": opts.get("provider")}


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("MMEDGE_DEBUG", "") not in ("", "0")
    plain = parse_plain_query(args[1:]) if args[:1] == ["query"] and not debug else None
    if plain is None:
        from mmedge.cli.main import main as typer_main

        typer_main(args)
        return
    # numpy is only glue on this path (no large matrix products): one OpenBLAS thread skips
    # starting its thread pool when numpy is imported, a measurable part of a cold query
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from mmedge.errors import MmedgeError

    try:
        run_query(**plain, out=_print)
        sys.stdout.flush()
    except MmedgeError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - same one line as mmedge.cli.main.main
        sys.stderr.write(f"error: {e.__class__.__name__}: {e} (run with --debug for the traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
