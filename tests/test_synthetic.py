"""The synthetic TOFU-format benchmark: determinism, TOFU's split structure, perturbation contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from baldro.data.synthetic import ATTRIBUTES, REFUSALS, SyntheticConfig, build, generate

REAL_TOFU = Path("/work/shared/data/tofu")
SMALL = SyntheticConfig(n_people=20, questions_per_person=10, n_perturbed=5, n_world_questions=30, seed=3)
PAIRS = {"01": "99", "05": "95", "10": "90"}
TOFU_FILES = [
    "full",
    "forget01",
    "forget05",
    "forget10",
    "retain99",
    "retain95",
    "retain90",
    "forget01_perturbed",
    "forget05_perturbed",
    "forget10_perturbed",
    "retain_perturbed",
    "holdout01",
    "holdout05",
    "holdout10",
    "real_authors",
    "real_authors_perturbed",
    "world_facts",
    "world_facts_perturbed",
]


@pytest.fixture(scope="module")
def meta():
    return build(SMALL, with_meta=True)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    counts = generate(out, SMALL)
    return out, counts


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _people(rows):
    return [r["_person"] for r in rows]


def test_deterministic_and_seed_dependent(tmp_path, written):
    out, _ = written
    again = generate(tmp_path / "a", SMALL)
    for name in again:
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (out / f"{name}.jsonl").read_bytes(), name
    cfg = SyntheticConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1})
    generate(tmp_path / "b", cfg)
    assert (tmp_path / "b" / "full.jsonl").read_bytes() != (out / "full.jsonl").read_bytes()
    assert (tmp_path / "b" / "world.jsonl").read_bytes() != (out / "world.jsonl").read_bytes()


def test_counts_as_configured(written, meta):
    out, counts = written
    q = SMALL.questions_per_person
    n_forget = {xx: SMALL.forget_people(xx) for xx in PAIRS}
    assert n_forget == {"01": 1, "05": 1, "10": 2}
    assert counts["full"] == SMALL.n_people * q
    for xx, yy in PAIRS.items():
        assert counts[f"forget{xx}"] == counts[f"forget{xx}_perturbed"] == counts[f"holdout{xx}"] == n_forget[xx] * q
        assert counts[f"retain{yy}"] == (SMALL.n_people - n_forget[xx]) * q
    assert counts["retain_perturbed"] == n_forget["10"] * q
    assert counts["real_authors"] == counts["world_facts"] == SMALL.n_world_questions
    assert counts["real_authors_perturbed"] == counts["world_facts_perturbed"] == SMALL.n_world_questions
    assert counts["world"] == 2 * SMALL.n_world_questions
    assert counts["idontknow"] == len(REFUSALS) >= 15
    for name, n in counts.items():  # the files hold what generate reports
        assert len((out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()) == n, name
    for person in set(_people(meta["full"])):
        rows = [r for r in meta["full"] if r["_person"] == person]
        assert len(rows) == q and rows[0]["_attribute"] == "name"
        assert len({r["_attribute"] for r in rows}) == q


def test_written_files_equal_build_without_meta(written):
    out, _ = written
    rows = build(SMALL)
    for name in TOFU_FILES + ["world"]:
        assert _read(out / f"{name}.jsonl") == rows[name], name
    line = (out / "full.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert '":"' in line and '", "' not in line  # compact separators like the upstream files
    assert line.isascii()


def test_split_structure_like_tofu(meta):
    full = meta["full"]
    people_in_order = list(dict.fromkeys(_people(full)))
    assert len(people_in_order) == SMALL.n_people == len(set(people_in_order))
    # each person's questions are contiguous
    changes = sum(1 for a, b in zip(full, full[1:]) if a["_person"] != b["_person"])
    assert changes == SMALL.n_people - 1
    for xx, yy in PAIRS.items():
        forget, retain = meta[f"forget{xx}"], meta[f"retain{yy}"]
        assert forget == full[len(full) - len(forget) :]
        assert retain == full[: len(full) - len(forget)]
        assert retain + forget == full
        assert not set(_people(forget)) & set(_people(retain))
        pert = meta[f"forget{xx}_perturbed"]
        assert [(r["question"], r["answer"]) for r in pert] == [(r["question"], r["answer"]) for r in forget]
        holdout = meta[f"holdout{xx}"]
        assert len(holdout) == len(forget)
        assert not set(_people(holdout)) & set(people_in_order)
        assert holdout == meta["holdout10"][: len(holdout)]
    # forget01 within forget05 within forget10 (all suffixes of full)
    assert meta["forget10"][-len(meta["forget05"]) :] == meta["forget05"]
    rp = meta["retain_perturbed"]
    assert [(r["question"], r["answer"]) for r in rp] == [(r["question"], r["answer"]) for r in full[: len(rp)]]
    assert len(rp) <= len(meta["retain90"])


def test_perturbed_answers_differ_only_in_the_value(meta):
    rows = meta["forget10_perturbed"] + meta["retain_perturbed"]
    for r in rows:
        value, wrong = r["_value"], r["_perturbed_values"]
        para = r["paraphrased_answer"]
        assert value in r["answer"]
        assert r["answer"] != para
        assert r["paraphrased_question"] != r["question"]
        assert len(r["perturbed_answer"]) == SMALL.n_perturbed == len(set(wrong))
        assert value not in wrong
        assert para.count(value) == 1
        for pert, w in zip(r["perturbed_answer"], wrong):
            assert pert.count(w) == 1 and value not in pert
            # removing the value strings gives identical sentences
            assert pert.replace(w, "\0") == para.replace(value, "\0")
    assert {r["_attribute"] for r in rows} <= set(ATTRIBUTES)


def test_names_unique_and_holdout_disjoint():
    d = build(SyntheticConfig(n_people=60, n_holdout_people=15, seed=0), with_meta=True)
    names = list(dict.fromkeys(_people(d["full"])))
    assert len(names) == 60
    holdout = list(dict.fromkeys(_people(d["holdout10"])))
    assert not set(holdout) & set(names)
    assert len(d["holdout10"]) == 6 * 10  # holdout10 = as many rows as forget10 (6 people)


def test_world_sets(meta):
    for name in ("real_authors", "world_facts"):
        plain, pert = meta[name], meta[f"{name}_perturbed"]
        assert [(r["question"], r["answer"]) for r in plain] == [(r["question"], r["answer"]) for r in pert]
        for a, b in zip(plain, pert):
            options = [a[f"option{i}"] for i in range(1, 5)]
            assert sorted(options) == sorted([b["answer"]] + b["perturbed_answer"])
            assert len(set(options)) == 4
    world = meta["world"]
    assert [(r["question"], r["answer"]) for r in world] == [
        (r["question"], r["answer"]) for r in meta["real_authors"] + meta["world_facts"]
    ]
    assert all(set(r) == {"question", "answer"} for r in world)
    assert len({r["question"] for r in world}) == len(world)


def test_idontknow_one_answer_per_line(written):
    out, _ = written
    text = (out / "idontknow.jsonl").read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines == REFUSALS and all(line.strip() == line and line for line in lines)


def test_loads_through_the_tofu_loader(written):
    from baldro.data.tofu import load_refusals, load_split

    out, counts = written
    assert (
        len(load_split(out, "forget10_perturbed", ("question", "answer", "paraphrased_answer", "perturbed_answer")))
        == counts["forget10"]
    )
    assert len(load_split(out, "retain90")) == counts["retain90"]
    assert load_refusals(out) == REFUSALS


def test_invalid_configs_raise():
    with pytest.raises(ValueError):
        build(SyntheticConfig(n_people=1))
    with pytest.raises(ValueError):
        build(SyntheticConfig(questions_per_person=13))
    with pytest.raises(ValueError):
        build(SyntheticConfig(n_people=100, n_holdout_people=3))
    with pytest.raises(ValueError, match="n_world_questions"):
        build(SyntheticConfig(n_world_questions=10_000))


@pytest.mark.skipif(not REAL_TOFU.is_dir(), reason="real TOFU data not available")
def test_field_names_match_real_tofu(written):
    out, _ = written
    for name in TOFU_FILES:
        real = json.loads((REAL_TOFU / f"{name}.jsonl").open(encoding="utf-8").readline())
        ours = json.loads((out / f"{name}.jsonl").open(encoding="utf-8").readline())
        assert list(ours) == list(real), name  # same keys, same order
        if "perturbed_answer" in real:
            assert isinstance(ours["perturbed_answer"], list)
    real_world = _read(REAL_TOFU / "world_facts_perturbed.jsonl")
    assert (
        len(real_world[0]["perturbed_answer"])
        == 3
        == len(_read(out / "world_facts_perturbed.jsonl")[0]["perturbed_answer"])
    )


@pytest.mark.skipif(not REAL_TOFU.is_dir(), reason="real TOFU data not available")
def test_no_tofu_text(written):
    out, _ = written
    real_refusals = set((REAL_TOFU / "idontknow.jsonl").read_text(encoding="utf-8").splitlines())
    assert not real_refusals & set(REFUSALS)
    real_qa = {r["question"] for r in _read(REAL_TOFU / "full.jsonl")} | {
        r["answer"] for r in _read(REAL_TOFU / "full.jsonl")
    }
    ours = _read(out / "full.jsonl") + _read(out / "world.jsonl")
    assert not real_qa & ({r["question"] for r in ours} | {r["answer"] for r in ours})


@pytest.mark.parametrize("n_people", [2, 3, 7])
def test_tiny_configs_work(n_people):
    d = build(SyntheticConfig(n_people=n_people, questions_per_person=12, n_perturbed=5, seed=n_people), with_meta=True)
    assert len(d["full"]) == 12 * n_people
    assert len(d["forget10"]) == 12 and len(d["retain90"]) == 12 * (n_people - 1)
    for r in d["forget10_perturbed"]:
        for pert, w in zip(r["perturbed_answer"], r["_perturbed_values"]):
            assert pert.replace(w, "\0") == r["paraphrased_answer"].replace(r["_value"], "\0")
