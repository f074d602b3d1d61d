"""MUSE: raw-text chunking, the evaluation encodings and prompts, the evaluator (optimised = naive),
PrivLeak through the evaluator's code path, bad input, and unlearn -> eval -> summarize -> report
through the CLI on a slice of the real MUSE-Books files with the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from baldro.cli import main
from baldro.data import muse as D
from baldro.data.formatting import IGNORE_INDEX, QAFormatter
from baldro.errors import BaldroError
from baldro.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BOOKS, NEWS = SHARED / "muse" / "books", SHARED / "muse" / "news"
LOGS = SHARED / "reference_logs"
UNLEARN, EVAL = str(ROOT / "configs" / "unlearn" / "muse.yaml"), str(ROOT / "configs" / "eval" / "muse.yaml")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found (shared data not checked out)")
    return path


class WordTokenizer:
    """Words with their leading space as tokens (like a BPE), an optional BOS: for hand-made examples."""

    def __init__(self, bos: bool = True):
        self.vocab: dict[str, int] = {"<s>": 0, "</s>": 1}
        self.bos = bos
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 0, 1, 1

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r" ?\S+| +$", text)]
        return {"input_ids": ([0] if self.bos and add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=False):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids if not (skip_special_tokens and i in (0, 1)))


# ------------------------------------------------------------------------------------ chunking
@pytest.mark.parametrize("bos", [True, False])
def test_chunks_cover_every_token_and_start_with_the_special_tokens(bos):
    tok = WordTokenizer(bos)
    text = " ".join(f"w{i}" for i in range(10))
    chunks = D.chunk_tokens(tok, text, 4)
    words = [tok.decode(c.input_ids, skip_special_tokens=True).split() for c in chunks]
    assert words == [["w0", "w1", "w2", "w3"], ["w4", "w5", "w6", "w7"], ["w8", "w9"]]
    for c in chunks:
        assert c.prompt_len == 0 and c.labels == c.input_ids  # the loss covers every token of a chunk
        assert (c.input_ids[0] == tok.bos_token_id) == bos
        assert len(c.input_ids) <= 4 + bos


def test_a_limited_run_tokenises_a_prefix_and_gets_the_same_chunks():
    tok = WordTokenizer()
    text = "\n\n".join(" ".join(f"d{d}w{i}" for i in range(300)) for d in range(20))
    full = D.chunk_tokens(tok, text, 16)
    assert [c.input_ids for c in D.chunk_tokens(tok, text, 16, limit=3)] == [c.input_ids for c in full[:3]]
    assert len(D.chunk_tokens(tok, "a b c", 16, limit=5)) == 1  # a short corpus gives what it has


def test_chunk_errors_are_one_line():
    tok = WordTokenizer()
    with pytest.raises(
        BaldroError,
        match=r"data.chunk_length=8 \+ 1 special token\(s\) is longer than the model's "
        r"context of 8 tokens: set data.chunk_length <= 7",
    ):
        D.chunk_tokens(tok, "a b c", 8, context=8)
    assert len(D.chunk_tokens(tok, "a b c", 7, context=8)) == 1
    with pytest.raises(BaldroError, match="the forget corpus is empty"):
        D.chunk_tokens(tok, " \n\n ", 4)
    with pytest.raises(BaldroError, match="chunk_length must be a positive"):
        D.chunk_tokens(tok, "a", 0)


# ----------------------------------------------------------------------------- eval encodings
def test_verbmem_prompt_and_continuation():
    tok = WordTokenizer()
    e = D.encode_completion(tok, "It was a dark", "and stormy night")
    assert e.input_ids[: e.prompt_len] == tok("It was a dark")["input_ids"]  # what generation starts from
    assert tok.decode([t for t in e.labels if t != IGNORE_INDEX]) == " and stormy night"
    assert e.labels[: e.prompt_len] == [IGNORE_INDEX] * e.prompt_len
    # the whole text tokenises across the boundary ("ab" + "c" -> "abc"): the prompt keeps its own tokens
    merged = D.encode_completion(tok, "x ab", "c", insert_space=False)
    assert merged.input_ids == tok("x ab")["input_ids"] + tok("c", add_special_tokens=False)["input_ids"]
    assert tok.decode(merged.labels[merged.prompt_len :]) == "c"


@pytest.mark.parametrize("bos", [True, False])
def test_mia_texts_score_every_token_after_the_specials(bos):
    tok = WordTokenizer(bos)
    e = D.encode_text(tok, "one two three four five", max_length=3)
    assert tok.decode(e.input_ids, skip_special_tokens=True) == "one two three"
    scored = [t for t in e.labels if t != IGNORE_INDEX]
    assert tok.decode(scored) == ("one two three" if bos else " two three")
    assert e.prompt_len == 1 and len(scored) == (3 if bos else 2)  # nothing predicts the first token


def test_knowmem_prompts_are_openunlearnings(tiny_model_dir):
    """The plain template with the _icl pairs as earlier turns gives the exact prompts of
    OpenUnlearning's published MUSE-Books log (its decoding drops a space before a quote once)."""
    from transformers import AutoTokenizer

    logged = json.loads(need(LOGS / "muse_Llama-2-7b-hf_Books_target" / "MUSE_EVAL.json").read_text())
    fmt = QAFormatter(AutoTokenizer.from_pretrained(tiny_model_dir), use_chat_template=False)
    for which, key in (("forget", "forget_knowmem_ROUGE"), ("retain", "retain_knowmem_ROUGE")):
        rows, icl = D.load_knowmem(need(BOOKS), which)
        history = [(r["question"], r["answer"]) for r in icl]
        assert len(rows) == 100 and len(icl) == 10
        for i, r in enumerate(rows):
            ours, theirs = fmt.prompt_text(r["question"], history), logged[key]["value_by_index"][str(i)]["input"]
            assert ours.replace(" '", "'") == theirs.replace(" '", "'"), (which, i)
            assert r["answer"].strip() == logged[key]["value_by_index"][str(i)]["ground_truth"]
    verbmem = D.load_verbmem(BOOKS)
    for i, r in enumerate(verbmem):
        assert r["gt"].strip() == logged["forget_verbmem_ROUGE"]["value_by_index"][str(i)]["ground_truth"]


def test_stop_strings_cut_like_openunlearning():
    from baldro.eval.generation import cut_at_stop_strings
    from baldro.eval.muse import KNOWMEM_STOP

    assert cut_at_stop_strings("Tonks\n\nQuestion: who?", KNOWMEM_STOP) == "Tonks"
    assert cut_at_stop_strings("a Question: b\n\nc", KNOWMEM_STOP) == "a "
    assert cut_at_stop_strings("\n\nfoo", KNOWMEM_STOP) == ""  # cut before stripping
    assert cut_at_stop_strings("no stop", KNOWMEM_STOP) == "no stop"


def test_early_stopping_at_stop_strings_keeps_the_texts(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baldro.eval.generation import generate

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tok(t)["input_ids"] for t in ("The author was born in", "Her father", "Basil Mahfouz")]
    free = generate(model, tok, prompts, 12, 2, progress=False)
    # a stop string that one generation holds first at position p > 0
    i, p = next((i, p) for i, f in enumerate(free) for p in range(1, len(f) - 1) if f.find(f[p : p + 2]) == p)
    stops = (free[i][p : p + 2],)
    continuous = generate(model, tok, prompts, 12, 2, progress=False, stop_strings=stops)
    static = generate(model, tok, prompts, 12, 2, progress=False, stop_strings=stops, sort_by_length=False)
    assert continuous == static
    assert continuous[i] == free[i][:p].strip() and all(f.startswith(c) for f, c in zip(free, continuous))


def test_few_shot_prompts_share_their_prefix_encoding(tiny_model_dir):
    """Prompts with the same in-context examples are grouped; each group's prefix is encoded once and
    the generations are those of plain `model.generate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baldro.eval.generation import generate, shared_prefix_groups

    assert shared_prefix_groups([[1] * 70 + [2], [1] * 70 + [3, 4], [5] * 80, [1] * 70], min_len=64) == (
        [0, 0, -1, 0],
        [69],
    )
    assert shared_prefix_groups([[1, 2, 3], [1, 2, 4]], min_len=2) == ([0, 0], [2])
    assert shared_prefix_groups([[1, 2, 3], [1, 2, 4]], min_len=3) == ([-1, -1], [])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    shots = "Question: Who wrote the book? Answer: Basil Mahfouz Al-Kuwaiti.\n\n" * 6
    prompts = [tok(shots + f"Question: {q}\nAnswer:")["input_ids"] for q in ("Who?", "Where was she born?", "When?")]
    prompts += [tok("The author was born in")["input_ids"], tok("Her father")["input_ids"]]
    assert shared_prefix_groups(prompts)[0] == [0, 0, 0, -1, -1]
    assert generate(model, tok, prompts, 6, 2, progress=False) == generate(
        model, tok, prompts, 6, 2, progress=False, sort_by_length=False
    )


# ------------------------------------------------------------------------------------- loading
def test_hub_layout_is_read_like_the_folder(monkeypatch):
    import datasets

    tables = {
        ("raw", "forget"): {"text": ["doc one", "doc two"]},
        ("knowmem", "forget_qa"): {"question": ["q?"], "answer": ["a"]},
        ("knowmem", "forget_qa_icl"): {"question": ["q0?"], "answer": ["a0"]},
        ("verbmem", "forget"): {"prompt": ["p"], "gt": ["g"]},
        ("privleak", "holdout"): {"text": ["t1", "t2"]},
    }
    calls = []

    def fake(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(tables[(name, split)])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    hub = D.HUB_IDS["books"]
    assert D.load_raw_text(hub, "forget") == "doc one\n\ndoc two"
    assert D.load_knowmem(hub, "forget") == ([{"question": "q?", "answer": "a"}], [{"question": "q0?", "answer": "a0"}])
    assert D.load_verbmem(hub) == [{"prompt": "p", "gt": "g"}]
    assert D.load_privleak(hub, "holdout", limit=1) == ["t1"]
    assert calls[0] == ("muse-bench/MUSE-Books", "raw", "forget")


def test_offline_news_has_no_raw_retain_corpus():
    with pytest.raises(BaldroError, match=r"raw/retain1\.json or .*raw/retain1\.txt \(the offline MUSE-News copy"):
        D.load_unlearn_texts(need(NEWS), "forget", "retain1", need_retain=True)
    forget, retain = D.load_unlearn_texts(NEWS, "forget", "retain1", need_retain=False)
    assert retain is None and forget.startswith(json.loads((NEWS / "raw" / "forget.json").read_text())[0])


# ------------------------------------------------------------------------- PrivLeak and MIA AUCs
@pytest.mark.parametrize("corpus", ["News", "Books"])
def test_privleak_through_the_evaluators_code_path(corpus):
    """Per-sample scores of the published logs, run through the evaluator's own entries
    (`suite.mia_entry` on scores shaped like the engine's), its reference-log reader and
    `summarize_muse`, give the published MIA AUCs and PrivLeak."""
    from baldro.eval import engine, suite
    from baldro.eval.muse import load_reference_log
    from baldro.eval.summarize import summarize_muse

    target_dir = need(LOGS / f"muse_Llama-2-7b-hf_{corpus}_target")
    target = json.loads((target_dir / "MUSE_EVAL.json").read_text())
    published = json.loads((target_dir / "MUSE_SUMMARY.json").read_text())
    reference = load_reference_log(LOGS / f"muse_Llama-2-7b-hf_{corpus}_retrain")

    def as_scores(name, side):
        values = [v["score"] for v in target[name][side]["value_by_index"].values()]
        if name == "mia_loss":
            return [engine.SequenceScore(avg_loss=v, n_tokens=1, targets=torch.zeros(1)) for v in values]
        # Min-K% of [-v, anything] with its last position dropped is v
        return [
            engine.SequenceScore(
                avg_loss=0.0,
                n_tokens=2,
                targets=torch.zeros(2),
                token_logp=torch.tensor([-v, 0.0], dtype=torch.float64),
            )
            for v in values
        ]

    log = {}
    for name in ("mia_loss", "mia_min_k"):
        scores = {side: as_scores(name, side) for side in ("forget", "holdout")}
        log[name] = suite.mia_entry(name, scores, {"forget": [], "holdout": []}, k=0.4)
        assert log[name]["auc"] == pytest.approx(published[name], abs=1e-12)
    summary = summarize_muse(log, reference)
    assert summary["privleak"] == pytest.approx(published["privleak"], abs=1e-9)
    # a limited evaluation compares the same first texts of the reference
    cut = load_reference_log(
        LOGS / f"muse_Llama-2-7b-hf_{corpus}_retrain" / "MUSE_EVAL.json", {"forget": 10, "holdout": 10}
    )
    assert (
        len(cut["mia_min_k"]["forget"]["value_by_index"]) == 10
        and len(cut["mia_loss"]["holdout"]["value_by_index"]) == 10
    )
    with pytest.raises(BaldroError, match="is a TOFU log"):
        load_reference_log(need(LOGS / "tofu_Llama-2-7b-chat-hf_retain99" / "TOFU_EVAL.json"))


# ---------------------------------------------------------------------------- a slice of Books
def books_slice(root: Path, rows: int = 3, chars: int = 6000, drop: tuple[str, ...] = ()) -> Path:
    """The first rows / characters of every MUSE-Books file the recipes read, in the same layout."""
    src = need(BOOKS)
    for rel in (
        "knowmem/forget_qa.json",
        "knowmem/retain_qa.json",
        "knowmem/forget_qa_icl.json",
        "knowmem/retain_qa_icl.json",
        "verbmem/forget.json",
        "privleak/forget.json",
        "privleak/holdout.json",
    ):
        items = json.loads((src / rel).read_text(encoding="utf-8"))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(items if rel.endswith("_icl.json") else items[:rows]), encoding="utf-8")
    for name in ("forget", "retain1"):
        with open(src / "raw" / f"{name}.txt", encoding="utf-8") as f:
            text = f.read(chars)
        (root / "raw").mkdir(exist_ok=True)
        (root / "raw" / f"{name}.txt").write_text(text, encoding="utf-8")
    for rel in drop:
        (root / rel).unlink()
    return root


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Path:
    return books_slice(tmp_path_factory.mktemp("books"))


def cpu(model_path) -> list[str]:
    return [
        f"model.path={model_path}",
        "model.tokenizer=null",
        "model.dtype=float32",
        "model.device=cpu",
        "model.attn_implementation=null",
        "train.bf16=false",
        "train.use_cpu=true",
        "train.save_strategy=no",
        "train.disable_tqdm=true",
        "format.use_chat_template=false",
        "data.chunk_length=64",
        "eval.verbmem_max_new_tokens=8",
        "eval.knowmem_max_new_tokens=4",
        "eval.batch_size=4",
    ]


def test_evaluator_optimised_equals_naive(tiny_model_dir, books):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baldro.eval.muse import evaluate_muse
    from baldro.eval.suite import diff_eval_logs

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    kw = dict(batch_size=2, verbmem_max_new_tokens=6, knowmem_max_new_tokens=4, max_length=64, progress=False)
    t_fast, t_slow = {}, {}
    fast, summary = evaluate_muse(model, tok, QAFormatter(tok), books, timings=t_fast, **kw)
    slow, _ = evaluate_muse(
        model, tok, QAFormatter(tok), books, shared_forward=False, sort_by_length=False, timings=t_slow, **kw
    )
    assert diff_eval_logs(fast, slow) == []
    assert set(t_fast) == {"memorization", "mia", "verbmem", "knowmem"} and set(t_slow) == set(t_fast)
    assert t_fast["mia"]["sequences"] == 6 and t_slow["mia"]["sequences"] == 24  # 4 attacks, one pass
    assert set(summary) >= {
        "forget_verbmem_ROUGE",
        "forget_knowmem_ROUGE",
        "retain_knowmem_ROUGE",
        "privleak",
        "mia_loss",
        "mia_zlib",
        "mia_min_k",
        "mia_min_k_plus_plus",
        "exact_memorization",
        "extraction_strength",
    }
    assert (
        len(fast["forget_knowmem_ROUGE"]["value_by_index"]) == 3
        and fast["privleak"]["agg_value"] == summary["privleak"]
    )


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


@pytest.mark.parametrize(
    "drop,command,overrides,message",
    [
        (("verbmem/forget.json",), "eval", [], r"MUSE verbmem file .*verbmem/forget\.json not found"),
        (("knowmem/retain_qa_icl.json",), "eval", [], r"knowmem/retain_qa\.json has no in-context partner"),
        (("raw/forget.txt",), "unlearn", [], r"MUSE raw split 'forget' not found: expected .*raw/forget\.json"),
        (
            (),
            "unlearn",
            ["data.chunk_length=1024"],
            r"data\.chunk_length=1024.* is longer than the model's context of 512",
        ),
        ((), "unlearn", ["objective=idk"], r"objective 'idk' needs questions to answer otherwise"),
        ((), "eval", ["data.benchmark=tofu"], r"eval\.benchmark is muse but data\.benchmark is tofu"),
    ],
)
def test_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys, drop, command, overrides, message):
    data = books_slice(tmp_path / "books", drop=drop)
    recipe = UNLEARN if command == "unlearn" else EVAL
    rc, err = run_cli(
        capsys,
        command,
        recipe,
        *cpu(tiny_model_dir),
        f"data.source={data}",
        f"output_dir={tmp_path / 'out'}",
        "eval.limit=2",
        *overrides,
    )
    assert rc == 2 and re.search(message, err) and err.startswith(f"baldro {command}: error:"), err


def test_empty_forget_corpus(tiny_model_dir, tmp_path, capsys):
    data = books_slice(tmp_path / "books")
    (data / "raw" / "forget.txt").write_text("\n\n", encoding="utf-8")
    rc, err = run_cli(
        capsys, "unlearn", UNLEARN, *cpu(tiny_model_dir), f"data.source={data}", f"output_dir={tmp_path}/o"
    )
    assert rc == 2 and re.search(r"MUSE raw split .*forget\.txt is empty", err), err


def test_news_needs_its_missing_retain_corpus(tiny_model_dir, tmp_path, capsys):
    rc, err = run_cli(
        capsys,
        "unlearn",
        UNLEARN,
        "corpus=news",
        *cpu(tiny_model_dir),
        f"data.source={need(NEWS)}",
        f"output_dir={tmp_path}/o",
    )
    assert rc == 2 and "raw/retain1.json" in err and "offline MUSE-News copy" in err, err


def test_unlearn_then_eval_through_the_cli(tiny_model_dir, books, tmp_path, capsys):
    run = tmp_path / "npo_dv"
    rc = main(
        [
            "unlearn",
            UNLEARN,
            *cpu(tiny_model_dir),
            f"data.source={books}",
            "weighting=dv",
            "data.limit=4",
            "train.num_train_epochs=2",
            "train.per_device_train_batch_size=2",
            "train.gradient_accumulation_steps=1",
            "train.learning_rate=1e-3",
            "balance.every_n_steps=2",
            "eval.at_end=true",
            "eval.limit=3",
            f"output_dir={run}",
        ]
    )
    assert rc == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["benchmark"] == "muse" and info["n_forget"] == 4 and info["chunk_length"] == 64
    log = read_jsonl(run / "train_log.jsonl")
    assert len(log) == 4 and log[-1]["forget_loss_mean"] < log[0]["forget_loss_mean"]
    per_sample = read_jsonl(run / "forget_losses.jsonl")
    assert sorted(i for r in per_sample[:2] for i in r["ids"]) == [0, 1, 2, 3]  # chunk indices
    assert read_jsonl(run / "balance.jsonl")[0]["ids"] == [0, 1, 2, 3]
    summary = json.loads((run / "eval" / "MUSE_SUMMARY.json").read_text())
    eval_log = json.loads((run / "eval" / "MUSE_EVAL.json").read_text())
    keys = {
        "forget_verbmem_ROUGE",
        "forget_knowmem_ROUGE",
        "retain_knowmem_ROUGE",
        "exact_memorization",
        "extraction_strength",
        "mia_loss",
        "mia_zlib",
        "mia_min_k",
        "mia_min_k_plus_plus",
        "privleak",
    }
    assert set(summary) == keys and set(eval_log) == keys
    row = eval_log["forget_knowmem_ROUGE"]["value_by_index"]["0"]
    assert set(row) == {"rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}
    assert row["input"].endswith("Question: What is the most important ball in Quidditch according to Wood?\nAnswer: ")

    # baldro eval on the unlearned model, PrivLeak against a "retrained" log (here: its own, so 0)
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                EVAL,
                *cpu(run / "model"),
                f"data.source={books}",
                "eval.limit=3",
                f"output_dir={out}",
                f"eval.retain_logs_path={run / 'eval'}",
            ]
        )
        == 0
    )
    again = json.loads((out / "MUSE_SUMMARY.json").read_text())
    assert again["privleak"] == pytest.approx(0.0, abs=1e-6)
    assert again["forget_verbmem_ROUGE"] == pytest.approx(summary["forget_verbmem_ROUGE"])
    assert set(json.loads((out / "eval_timings.json").read_text())["stages"]) == {
        "memorization",
        "mia",
        "verbmem",
        "knowmem",
    }
    capsys.readouterr()
    assert main(["summarize", str(out / "MUSE_EVAL.json"), "--reference", str(run / "eval" / "MUSE_EVAL.json")]) == 0
    assert "forget_verbmem_ROUGE" in capsys.readouterr().out
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| VerbMem (forget) |" in report and "| npo_dv |" in report

    # no retain loss (alpha = 0), e.g. the offline MUSE-News copy: no retain corpus is read
    news = tmp_path / "news"
    (news / "raw").mkdir(parents=True)
    (news / "raw" / "forget.txt").write_text((books / "raw" / "forget.txt").read_text()[:3000])
    assert (
        main(
            [
                "unlearn",
                UNLEARN,
                "corpus=news",
                *cpu(tiny_model_dir),
                f"data.source={news}",
                "objective=ga",
                "data.limit=2",
                "train.per_device_train_batch_size=2",
                "train.num_train_epochs=1",
                f"output_dir={tmp_path / 'ga'}",
            ]
        )
        == 0
    )
    assert read_jsonl(tmp_path / "ga" / "train_log.jsonl")[0]["retain_loss"] == 0.0
