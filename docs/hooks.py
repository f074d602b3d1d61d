"""MkDocs hooks (`hooks:` in mkdocs.yml): the site is built from the repository as it is.

- Repository files outside `docs/` that the pages link to (the README as the home page, the results
  notebooks, their tables, plots and scripts, source files) are added to the site under their
  repository path, found by following the links of every page from `docs/` and the README. A link is
  written as the file sees it in the repository (`../experiments/RESULTS.md` from `docs/results.md`,
  `docs/concepts.md` from the README), so it works on GitHub too, and rewritten here to the page it
  became. A link to a folder becomes its text. `../shared/SPEC.md` (the specification shipped beside
  the repository) becomes `spec.md`, or a page saying where to find it when this checkout has none.
- The markers of `docs/gen_reference.py` are replaced by the generated configuration and API
  references.
"""

from __future__ import annotations

import posixpath
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

from markdown import Extension
from markdown.treeprocessors import Treeprocessor
from mkdocs.structure.files import File, Files

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
SPEC = REPO.parent / "shared" / "SPEC.md"

# real path of a file outside docs/ -> its path (uri) in the site
_MOUNTS: dict[Path, str] = {}
_page_real: list[Path] = [DOCS / "index.md"]  # the real path of the page being rendered

_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)")


def _real_to_uri(real: Path) -> str | None:
    if real.is_relative_to(DOCS):
        return real.relative_to(DOCS).as_posix()
    return _MOUNTS.get(real)


def _resolve(base: Path, target: str) -> Path | None:
    """The real path a relative link of the file `base` points at (None for URLs, anchors, absolute paths)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path or parts.path.startswith("/"):
        return None
    return Path(posixpath.normpath((base.parent / unquote(parts.path)).as_posix()))


def _mount(real: Path, uri: str, files: Files, config) -> None:
    _MOUNTS[real] = uri
    if files.get_file_from_path(uri) is None:
        files.append(_file(real, uri, config))


def _file(real: Path, uri: str, config) -> File:
    f = File(uri, src_dir=str(REPO), dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"])
    f.abs_src_path = str(real)
    return f


def on_config(config):
    sys.path[:0] = [str(DOCS), str(REPO / "src")]  # this checkout's baldro, not an installed one
    config["markdown_extensions"].append(_RepoLinks())
    return config


def on_files(files: Files, config):
    _MOUNTS.clear()
    readme = REPO / "README.md"
    _mount(readme, "index.md", files, config)
    if SPEC.is_file():
        _mount(SPEC, "spec.md", files, config)
    else:  # a checkout without shared/ beside it: links to it lead to this page
        _MOUNTS[SPEC] = "spec.md"
        files.append(
            File.generated(
                config,
                "spec.md",
                content=(
                    "# Specification\n\nThe specification, `SPEC.md`, is shipped beside the repository as "
                    "`shared/SPEC.md`; this checkout has no `shared/` folder beside it.\n"
                ),
            )
        )
    # follow the links of every Markdown page (those of docs/ and each mounted one)
    todo = [Path(f.abs_src_path) for f in files if f.src_uri.endswith(".md") and f.abs_src_path]
    seen: set[Path] = set()
    while todo:
        page = todo.pop()
        if page in seen or not page.is_file():
            continue
        seen.add(page)
        for target in _LINK.findall(page.read_text(encoding="utf-8")):
            real = _resolve(page, target)
            if real is None or not real.is_file() or _real_to_uri(real) is not None:
                continue
            if not real.is_relative_to(REPO) or real.is_relative_to(REPO / "site"):
                continue  # outside the repository: left to MkDocs to report
            _mount(real, real.relative_to(REPO).as_posix(), files, config)
            if real.suffix == ".md":
                todo.append(real)
    return files


def on_page_markdown(markdown: str, page, config, files):
    _page_real[0] = Path(page.file.abs_src_path) if page.file.abs_src_path else DOCS / page.file.src_uri
    if "<!-- " in markdown:
        import gen_reference as g

        for marker, make in (
            (g.CONFIG_MARKER, g.config_reference),
            (g.API_MARKER, g.api_reference),
            (g.CLI_MARKER, g.cli_reference),
        ):
            if marker in markdown:
                markdown = markdown.replace(marker, make())
    return markdown


class _RepoLinkProcessor(Treeprocessor):
    """Rewrites links and images written as repository paths to the site's paths (before MkDocs's own
    link processing, which then checks them)."""

    def run(self, root):
        page = _page_real[0]
        page_uri = _real_to_uri(page) or "index.md"
        for el in list(root.iter()):
            for child in list(el):
                attr = "href" if child.tag == "a" else "src" if child.tag == "img" else None
                if attr is None or child.get(attr) is None:
                    continue
                target = child.get(attr)
                real = _resolve(page, target)
                if real is None:
                    continue
                if real.is_dir() and _real_to_uri(real) is None and child.tag == "a":
                    _unwrap(el, child)  # a link to a folder: keep its text
                    continue
                uri = _real_to_uri(real)
                if uri is None:
                    continue  # MkDocs reports it
                fragment = urlsplit(target).fragment
                rel = posixpath.relpath(uri, posixpath.dirname(page_uri) or ".")
                child.set(attr, rel + (f"#{fragment}" if fragment else ""))
        return root


def _unwrap(parent, child) -> None:
    """Replace the element `child` of `parent` by its text and children."""
    i = list(parent).index(child)
    kids, tail = list(child), child.tail or ""
    text = child.text or ""
    parent.remove(child)
    if not kids:
        text, tail = text + tail, ""
    if text:
        if i == 0:
            parent.text = (parent.text or "") + text
        else:
            parent[i - 1].tail = (parent[i - 1].tail or "") + text
    for j, k in enumerate(kids):
        parent.insert(i + j, k)
    if kids:
        kids[-1].tail = (kids[-1].tail or "") + tail


class _RepoLinks(Extension):
    def extendMarkdown(self, md):
        md.treeprocessors.register(_RepoLinkProcessor(md), "baldro_repo_links", 5)
