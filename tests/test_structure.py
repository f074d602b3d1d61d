"""The codebase's shape: no import cycle, layers read top-down, every recipe fits the schema."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from baldro.cli import main
from baldro.errors import BaldroError
from baldro.recipes.config import _merge, as_recipe, load_config
from baldro.recipes.schema import Recipe

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "baldro"
CONFIGS = ROOT / "configs"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """baldro module -> the baldro modules it imports anywhere (top level or inside functions)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    packages = {_module_name(p) for p in SRC.rglob("__init__.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps - packages  # package __init__s hold only a docstring
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# The layers, lowest first: a module imports only from its own layer and the ones below it.
LAYERS = [
    ("baldro.errors", "baldro.io", "baldro.progress", "baldro.distributed"),
    ("baldro.data",),
    ("baldro.models",),
    ("baldro.train",),
    ("baldro.eval",),
    ("baldro.report",),
    ("baldro.recipes",),
    ("baldro.cli",),
]


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def test_layers_read_top_down():
    graph = import_graph()
    for name, deps in graph.items():
        if name == "baldro":
            continue  # the public API: imports lazily from every layer
        for dep in deps:
            assert layer_of(dep) <= layer_of(name), f"{name} imports {dep}, a higher layer"


def test_every_folder_is_a_layer_and_src_has_no_loose_modules():
    loose = sorted(p.name for p in SRC.glob("*.py"))
    assert loose == ["__init__.py", "cli.py", "distributed.py", "errors.py", "io.py", "progress.py"], loose
    assert {layer_of(f"baldro.{d.name}") for d in SRC.iterdir() if (d / "__init__.py").is_file()}


def _recipes() -> list[Path]:
    return sorted(p for folder in ("finetune", "unlearn", "eval", "attack") for p in (CONFIGS / folder).glob("*.yaml"))


def test_every_yaml_file_fits_the_schema():
    # configs/accelerate/ holds accelerate launch configs, not recipes (tests/test_distributed.py loads them)
    files = sorted(p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] != "accelerate")
    assert len(files) > 20
    for path in files:
        if path in _recipes():
            recipe = as_recipe(load_config(path))
        else:  # a config group file, merged onto the defaults
            recipe = as_recipe(_merge(OmegaConf.structured(Recipe), OmegaConf.load(path), str(path)))
        assert isinstance(recipe, Recipe), path


@pytest.mark.parametrize(
    "override,message",
    [
        ("weighting.sigmaa=0.5", "unknown key 'weighting.sigmaa'"),
        ("train.lerning_rate=1e-4", "unknown key 'train.lerning_rate': did you mean train.learning_rate?"),
        ("eval.max_new_token=8", "did you mean eval.max_new_tokens?"),
        ("datta.source=x", "unknown key 'datta': did you mean data?"),
        ("train.learning_rate=abc", "train.learning_rate"),
    ],
)
def test_unknown_keys_and_bad_types_are_one_line_errors(override, message, capsys):
    with pytest.raises(BaldroError, match=message.replace("?", r"\?").replace(".", r"\.")):
        load_config(CONFIGS / "unlearn" / "tofu.yaml", [override])
    assert main(["unlearn", str(CONFIGS / "unlearn" / "tofu.yaml"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and message.split("'")[0] in err


def test_unknown_key_in_a_recipe_file_names_the_file(tmp_path):
    recipe = tmp_path / "unlearn" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text("weighting:\n  name: dv\n  sigma: 1.0\n")
    with pytest.raises(BaldroError, match=f"{recipe}: unknown key 'weighting.sigma'.*weighting.args"):
        load_config(recipe)


def test_show_config_prints_the_resolved_recipe_with_every_default(capsys):
    assert (
        main(["show-config", str(CONFIGS / "unlearn" / "tofu.yaml"), "weighting=dv", "model=smollm2-135m-instruct"])
        == 0
    )
    shown = OmegaConf.create(capsys.readouterr().out)
    assert shown.weighting.name == "dv" and shown.objective.dv_sigma == 2.0  # dv's sigma: the objective's scale
    assert shown.model.base == "package:smollm2-135m-instruct" and shown.format.date_string == "10 Apr 2025"
    assert shown.balance.batch_size == 16  # a default no YAML file sets


@pytest.mark.slow
def test_a_new_weighting_is_one_class_and_no_trainer_edit(monkeypatch, tiny_model_dir, tofu_dir, tmp_path):
    from baldro.io import read_jsonl
    from baldro.train import weighting as W

    class TopOne(W.Weighting):
        """The single hardest sample, and a retain batch of the same size."""

        name = "top_one"

        def __call__(self, losses, *, ids=None, nll=None, gather=None):
            return W.group(losses, ratio=1e-9)

        def retain_rows(self, weighted, n_retain, device):
            return weighted.selected

    monkeypatch.setitem(W.WEIGHTINGS, "top_one", TopOne)
    out = tmp_path / "run"
    rc = main(
        [
            "unlearn",
            str(CONFIGS / "unlearn" / "tofu.yaml"),
            f"model.path={tiny_model_dir}",
            "model.dtype=float32",
            "model.device=cpu",
            "model.attn_implementation=null",
            "train.use_cpu=true",
            "train.bf16=false",
            "train.disable_tqdm=true",
            "format.use_chat_template=false",
            f"data.source={tofu_dir}",
            "split=forget01",
            "weighting.name=top_one",
            "data.limit=8",
            "train.num_train_epochs=1",
            "train.save_strategy=no",
            "train.per_device_train_batch_size=4",
            "train.gradient_accumulation_steps=1",
            f"output_dir={out}",
        ]
    )
    assert rc == 0
    rows = read_jsonl(out / "forget_losses.jsonl")
    assert [sorted(r["weights"]) for r in rows] == [[0.0, 0.0, 0.0, 1.0]] * 2


def test_long_modules_say_why_they_are_long():
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        assert lines <= 520 or "Over 500 lines for a reason" in doc, (
            f"{path.relative_to(SRC)}: {lines} lines, no reason"
        )
