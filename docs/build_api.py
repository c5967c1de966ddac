"""Builds the API reference (``docs/api/``) from the docstrings with pdoc; any warning fails.

    python docs/build_api.py [--out docs/api]

Writes a landing page (``index.html``) that lists and links every public module. Fails (exit
1) on every pdoc warning, on a module without a page, and on every Sphinx-style
cross-reference in a docstring (``:func:`name```, ``:class:``, ``:mod:``, ``:meth:``,
``:attr:``) that names nothing importable: looked up in the docstring's module (and class),
then as an absolute dotted name. Two pdoc warnings are not ours and are ignored: pdoc cannot
evaluate the string annotations of a ``NamedTuple``'s generated ``__init__`` (its globals are
``collections``'), while the fields themselves are documented correctly; nor
``optax.OptState`` (an alias of chex's ``ArrayTree``).
"""

from __future__ import annotations

import argparse
import html
import importlib
import pkgutil
import re
import sys
import warnings
from pathlib import Path

import pdoc
import pdoc.doc

ROOT = Path(__file__).resolve().parent.parent
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj):`~?([^`<>]+?)`")
NOT_OURS = re.compile(
    r"Error parsing type annotation .* for (\S+\.__init__\. Import of"
    r"|.*Import of ArrayTree failed)"  # optax.OptState is chex's ArrayTree, unknown to pdoc
)


def _resolves(name: str, module: str, qualname: str) -> bool:
    # the module's packages too: sharpjax.sharpness.landscape may cite hessian_trace, which
    # its package sharpjax.sharpness exports
    pieces = module.split(".")
    scopes = [".".join(pieces[:i]) for i in range(1, len(pieces) + 1)]
    parts = qualname.split(".")
    scopes += [f"{module}.{'.'.join(parts[:i])}" for i in range(1, len(parts) + 1)]
    candidates = [f"{scope}.{name}" for scope in reversed(scopes)] + [name]
    for dotted in candidates:
        pieces = dotted.split(".")
        for cut in range(len(pieces), 0, -1):
            try:
                obj = importlib.import_module(".".join(pieces[:cut]))
            except ImportError:
                continue
            try:
                for attr in pieces[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            return True
    return False


def _walk(doc: pdoc.doc.Doc):
    yield doc
    for member in getattr(doc, "own_members", []):
        if member.name.startswith("_") and member.name != "__init__":
            continue  # private: not in the reference
        if isinstance(member, pdoc.doc.Module) and not member.modulename.startswith("sharpjax"):
            continue
        yield from _walk(member)


def _landing_page(modules: list[str], out: Path) -> list[str]:
    """Writes ``index.html``: every public module, linked, with its docstring's first line
    (pdoc's own index only redirects to ``sharpjax``, whose page lists what its ``__all__``
    exports, two modules of them). Returns the modules whose page is missing."""
    rows, missing = [], []
    for name in modules:
        page = name.replace(".", "/") + ".html"
        if not (out / page).is_file():
            missing.append(name)
        doc = pdoc.doc.Module.from_name(name).docstring.strip()
        summary = html.escape(doc.splitlines()[0] if doc else "")
        summary = re.sub(r"``(.+?)``", r"<code>\1</code>", summary)
        indent = "&emsp;" * (name.count(".") - 1) if "." in name else ""
        rows.append(
            f'<tr><td>{indent}<a href="{page}"><code>{name}</code></a></td><td>{summary}</td></tr>'
        )
    (out / "index.html").write_text(
        "<!doctype html>\n<html>\n<head><meta charset='utf-8'><title>sharpjax API reference"
        "</title>\n<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "td{padding:.2em .8em;vertical-align:top}</style></head>\n<body>\n"
        "<h1>sharpjax API reference</h1>\n<p>Every public module, from the docstrings. "
        'Search and the cross-links are on the module pages; start with <a href="sharpjax.html">'
        "<code>sharpjax</code></a> (the optimizers) or <code>sharpjax.sharpness</code> "
        "(the measures).</p>\n<table>\n" + "\n".join(rows) + "\n</table>\n</body>\n</html>\n"
    )
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "api"), help="output folder")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import sharpjax

    pdoc.render.configure(docformat="google", search=True, show_source=True)
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # every public module (sharpjax's __all__ alone would hide train/, data/, models/)
        children = [
            m.name
            for m in pkgutil.iter_modules(sharpjax.__path__, "sharpjax.")
            if not m.name.split(".")[-1].startswith("_")
            and m.name.split(".")[-1] not in sharpjax.__all__  # already under sharpjax
        ]
        specs = ["sharpjax", *sorted(children)]
        pdoc.pdoc(*specs, output_directory=Path(args.out))
        modules = sorted(pdoc.extract.walk_specs(specs))
        for name in modules:
            module = pdoc.doc.Module.from_name(name)
            for doc in _walk(module):
                for ref in ROLE.findall(doc.docstring or ""):
                    # where it is defined, not where it is re-exported; a type alias is "taken
                    # from" its value's module (collections.abc), so try both
                    home, qualname = doc.taken_from
                    if not (
                        _resolves(ref.strip(), home, qualname)
                        or _resolves(ref.strip(), doc.modulename, doc.qualname)
                    ):
                        problems.append(f"{doc.fullname}: broken reference {ref!r}")
    for w in caught:
        if not NOT_OURS.search(str(w.message)):
            problems.append(f"pdoc: {w.message}")
    for name in _landing_page(modules, Path(args.out)):
        problems.append(f"{name}: no page under {args.out} for the landing page to link")
    for line in sorted(set(problems)):
        print(line, file=sys.stderr)
    if problems:
        print(f"API reference: {len(set(problems))} problem(s)", file=sys.stderr)
        return 1
    print(f"API reference written to {args.out}/index.html ({len(modules)} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
