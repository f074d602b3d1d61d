"""The documentation's generated references cover the code (CI also runs `mkdocs build --strict`, which
checks every link, anchor, include and API reference), and the README keeps the commands CI runs."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import gen_reference  # noqa: E402  (docs/gen_reference.py)


def _all_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _all_fields(type(default), prefix + f.name + ".")


def test_config_reference_lists_every_schema_key_with_its_type_and_default():
    from baldro.recipes.schema import Recipe

    page = gen_reference.config_reference()
    rows = {
        line.split(" | ")[0].removeprefix("| `").removesuffix("`"): line
        for line in page.splitlines()
        if line.startswith("| `")
    }
    sections = {line.removeprefix("## `").removesuffix("`") for line in page.splitlines() if line.startswith("## `")}
    for key, f in _all_fields(Recipe):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            assert key in sections, f"section {key} missing from the configuration reference"
            continue
        assert key in rows, f"{key} missing from the configuration reference"
        cells = rows[key].split(" | ")
        assert cells[1] == f"`{f.type}`", (key, cells[1])
        assert cells[2].strip("` ") == gen_reference._yaml(default).replace("|", "\\|"), (key, cells[2])


def test_config_reference_keeps_each_fields_comments():
    page = gen_reference.config_reference()
    # a comment above the field (two lines) and one at the end of its line
    assert "CPU: treat subnormal floats (&lt; 1.2e-38) as zero." in page
    assert "saturated forget losses reach them" in page
    row = next(line for line in page.splitlines() if line.startswith("| `train.warmup_steps`"))
    assert row.endswith("| a count, or a fraction of the run when below 1 |")
    # a section's docstring, and the comment beside a section's field
    assert "AltPO's alternate answers" in page
    assert "tofu / muse: harness tasks as an extra stage" in page
    # every comment at the end of a field's line in schema.py
    source = (ROOT / "src" / "baldro" / "recipes" / "schema.py").read_text(encoding="utf-8")
    comments = re.findall(r"^    \w+: [^#\n]+  # (.+)$", source, flags=re.M)
    assert len(comments) > 50
    for comment in comments:
        assert gen_reference._prose(comment.strip()) in page, comment


def test_api_reference_documents_every_public_name():
    import baldro

    page = gen_reference.api_reference()
    public = [name for name in baldro.__all__ if name != "__version__"]
    assert public
    for name in public:
        assert f"::: {baldro._API[name]}.{name}\n" in page, name


def test_cli_reference_shows_every_command():
    page = gen_reference.cli_reference()
    for name in gen_reference.cli_commands():
        assert f"## `baldro {name}`" in page if name else "## `baldro`" in page
    for command in ("finetune", "unlearn", "eval", "attack", "show-config", "summarize", "report", "demo"):
        assert f"usage: baldro {command}" in page


@pytest.mark.parametrize(
    "command",
    [
        "pip install torch==2.13.0 -e . && baldro demo",
        'pip install torch==2.13.0 -e ".[test]" && python -m pytest',
    ],
)
def test_readme_keeps_the_set_up_commands(command):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"```bash\n{command}\n```" in readme


def test_ci_runs_the_readme_test_command_and_the_strict_docs_build():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install torch==2.13.0 -e ".[test]"' in ci and "python -m pytest" in ci
    assert "mkdocs build --strict" in ci


def test_markers_are_in_the_reference_pages():
    pages = {
        "configuration.md": gen_reference.CONFIG_MARKER,
        "api.md": gen_reference.API_MARKER,
        "cli.md": gen_reference.CLI_MARKER,
    }
    for page, marker in pages.items():
        assert marker in (ROOT / "docs" / "reference" / page).read_text(encoding="utf-8"), page
