"""lm-evaluation-harness tasks in process (eval.benchmark=lm_eval, the eval.lm_eval stage), the WMDP corpora
and configs/unlearn/wmdp.yaml, offline: local task YAML files read local JSON files, the tiny model.

Parity: the harness's own command line (`python -m lm_eval --model hf ...` in a subprocess) and `baldro eval`
give the same per-sample records and the same summary on a multiple-choice task, a generation task and
the harness's WMDP cyber task definition pointed at local WMDP-layout questions."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install 'baldro[lm-eval]'")

from baldro.cli import main  # noqa: E402
from baldro.errors import BaldroError  # noqa: E402
from baldro.io import read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL = str(ROOT / "configs" / "eval" / "lm_eval.yaml")
TOFU_EVAL = str(ROOT / "configs" / "eval" / "tofu.yaml")
WMDP = str(ROOT / "configs" / "unlearn" / "wmdp.yaml")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub access: every dataset the tests read is a local file."""
    import datasets.config
    import huggingface_hub.constants

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def cpu(model_path) -> list[str]:
    return [
        f"model.path={model_path}",
        "model.tokenizer=null",
        "model.dtype=float32",
        "model.device=cpu",
        "model.attn_implementation=null",
        "format.use_chat_template=false",
    ]


def _tofu_rows(tofu_dir: Path, name: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (tofu_dir / f"{name}.jsonl").read_text().splitlines()[:n]]


def wmdp_questions(tofu_dir: Path, n: int, seed: int) -> list[dict]:
    """Questions in WMDP's layout (question, four choices, the answer's index), built from TOFU answers."""
    rows = _tofu_rows(tofu_dir, "full", 4 * n)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        choices = [rows[i]["answer"]] + [rows[n + 3 * i + k]["answer"] for k in range(3)]
        rng.shuffle(choices)
        out.append({"question": rows[i]["question"], "choices": choices, "answer": choices.index(rows[i]["answer"])})
    return out


@pytest.fixture(scope="module")
def tasks_dir(tofu_dir, tmp_path_factory) -> Path:
    """A folder of task YAML files over local JSON files: a multiple-choice task with a few-shot split, a
    generation task, a group of two multiple-choice tasks, and `wmdp_cyber`: the harness's own WMDP cyber
    definition (included from the installed package) pointed at local WMDP-layout questions."""
    import lm_eval

    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "data"
    data.mkdir()

    def dump(name: str, rows) -> str:
        path = data / f"{name}.json"
        path.write_text(json.dumps(rows))
        return str(path)

    mc = wmdp_questions(tofu_dir, 14, seed=1)
    qa = _tofu_rows(tofu_dir, "forget01", 12)
    files = {
        "mc_test": dump("mc_test", mc[:8]),
        "mc_train": dump("mc_train", mc[8:]),
        "gen_test": dump("gen_test", [{"question": r["question"], "answer": r["answer"]} for r in qa[:6]]),
        "gen_train": dump("gen_train", [{"question": r["question"], "answer": r["answer"]} for r in qa[6:]]),
        "mc2_test": dump("mc2_test", wmdp_questions(tofu_dir, 5, seed=2)),
        "wmdp": dump("wmdp_cyber_test", wmdp_questions(tofu_dir, 7, seed=3)),
    }
    mc_prompt = (
        '"{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. '
        '{{choices[3]}}\\nAnswer:"'
    )
    (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {files["mc_test"]}
    train: {files["mc_train"]}
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: {mc_prompt}
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    (root / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {files["gen_test"]}
    train: {files["gen_train"]}
test_split: test
fewshot_split: train
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Question:"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: bleu
    aggregation: bleu
    higher_is_better: true
""")
    (root / "tiny_mc2.yaml").write_text(f"""task: tiny_mc2
include: tiny_mc.yaml
dataset_kwargs:
  data_files:
    test: {files["mc2_test"]}
test_split: test
fewshot_split: null
""")
    (root / "tiny_group.yaml").write_text("""group: tiny_group
task: [tiny_mc, tiny_mc2]
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
""")
    (root / "hub_only.yaml").write_text(
        "task: hub_only\ndataset_path: baldro-test/no-such-dataset\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\n"
        "doc_to_choice: [a, b]\ndoc_to_target: 0\n"
    )  # not on this machine
    harness_wmdp = Path(lm_eval.__file__).parent / "tasks" / "wmdp" / "wmdp_cyber.yaml"
    assert harness_wmdp.is_file()
    (root / "wmdp_cyber.yaml").write_text(f"""task: wmdp_cyber
include: {harness_wmdp}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {files["wmdp"]}
""")
    return root


def _as_cli_record(record: dict) -> dict:
    r = dict(record)
    r["arguments"] = {
        f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(args)} for i, args in enumerate(record["arguments"])
    }

    def text(x):
        return [text(v) for v in x] if isinstance(x, list) else str(x)

    r["resps"], r["filtered_resps"], r["target"] = text(r["resps"]), text(r["filtered_resps"]), str(r["target"])
    return r


@pytest.fixture(scope="module")
def harness_cli(tiny_model_dir, tasks_dir, tmp_path_factory) -> Path:
    """The harness's own command line on the saved tiny model (one subprocess for every parity check)."""
    out = tmp_path_factory.mktemp("harness_cli")
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={tiny_model_dir}",
        "--include_path",
        str(tasks_dir),
        "--tasks",
        "tiny_mc,tiny_gen,wmdp_cyber",
        "--num_fewshot",
        "2",
        "--limit",
        "5",
        "--batch_size",
        "4",
        "--device",
        "cpu",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_parity_with_the_harness_command_line(tiny_model_dir, tasks_dir, harness_cli, tmp_path, capsys):
    out = tmp_path / "ours"
    assert (
        main(
            [
                "eval",
                LM_EVAL,
                *cpu(tiny_model_dir),
                "eval.tasks=[tiny_mc,tiny_gen,wmdp_cyber]",
                f"eval.include_path={tasks_dir}",
                "eval.num_fewshot=2",
                "eval.limit=5",
                "eval.batch_size=4",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "tiny_mc/acc" in printed and "LMEVAL_SUMMARY.json" in printed
    eval_log = json.loads((out / "LMEVAL_EVAL.json").read_text())
    summary = json.loads((out / "LMEVAL_SUMMARY.json").read_text())
    (results_file,) = harness_cli.rglob("results_*.json")
    theirs = json.loads(results_file.read_text())

    # the summary: OpenUnlearning's keys over the harness's numbers, every metric and its stderr
    from baldro.eval.lm_eval import summarize_results

    expected = summarize_results(theirs, ["tiny_mc", "tiny_gen", "wmdp_cyber"])
    assert summary == expected
    assert {
        "tiny_mc/acc",
        "tiny_mc/acc_norm",
        "tiny_mc/acc_stderr",
        "tiny_gen/exact_match",
        "tiny_gen/bleu",
        "wmdp_cyber/acc",
    } <= set(summary)
    assert theirs["n-shot"] == {"tiny_mc": 2, "tiny_gen": 2, "wmdp_cyber": 0}  # WMDP fixes 0 shots in its YAML

    # per sample: every record of every task, the few-shot prompts (same seed) and the model's responses
    assert set(eval_log) == {"tiny_mc", "tiny_gen", "wmdp_cyber"}
    for task in eval_log:
        (samples_file,) = harness_cli.rglob(f"samples_{task}_*.jsonl")
        cli_records = sorted(read_jsonl(samples_file), key=lambda r: r["doc_id"])
        ours = sorted(eval_log[task][task], key=lambda r: r["doc_id"])
        assert len(ours) == len(cli_records) == 5
        for a, b in zip(ours, cli_records):
            assert _as_cli_record(a) == b, task
    gen = eval_log["tiny_gen"]["tiny_gen"][0]
    assert gen["arguments"][0][0].count("Question:") == 3  # two few-shot examples, then the question

    timings = json.loads((out / "eval_timings.json").read_text())["stages"]
    assert {"lm_eval setup", "lm_eval loglikelihood", "lm_eval generate_until"} == set(timings)
    assert timings["lm_eval loglikelihood"]["sequences"] == 10 * 4 and timings["lm_eval loglikelihood"]["rows"] == 10
    assert timings["lm_eval generate_until"]["sequences"] == 5
    assert json.loads((out / "LMEVAL_RESULTS.json").read_text())["n-samples"]["tiny_mc"]["effective"] == 5


def test_groups_keep_their_aggregate_and_the_caller_state(tiny_model_dir, tasks_dir, tmp_path, caplog):
    """A group gives its aggregate metric (OpenUnlearning's layout) and its subtasks' samples; the model's
    mode and the caller's random streams are as before; off a terminal, progress comes as log lines."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baldro.eval.lm_eval import evaluate_lm_eval

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(7)
    random.seed(7)
    expect = (torch.rand(1).item(), random.random())
    torch.manual_seed(7)
    random.seed(7)
    timings: dict = {}
    with caplog.at_level("INFO"):
        eval_log, summary = evaluate_lm_eval(
            model,
            tok,
            ["tiny_group"],
            include_path=tasks_dir,
            limit=3,
            batch_size=8,
            out_dir=tmp_path,
            timings=timings,
            progress=None,
        )
    assert (torch.rand(1).item(), random.random()) == expect
    assert model.training
    assert set(summary) == {"tiny_group/acc", "tiny_group/acc_stderr"}
    assert set(eval_log) == {"tiny_group"} and set(eval_log["tiny_group"]) == {"tiny_mc", "tiny_mc2"}
    per_task = json.loads((tmp_path / "LMEVAL_RESULTS.json").read_text())["results"]
    accs = [per_task[t]["acc,none"] for t in ("tiny_mc", "tiny_mc2")]
    assert summary["tiny_group/acc"] == pytest.approx(sum(accs) / 2)  # 3 documents each
    assert any("lm-eval loglikelihood: 24/24 requests" in r.getMessage() for r in caplog.records)
    assert timings["lm_eval loglikelihood"]["rows"] == 6


def test_lm_eval_stage_of_a_tofu_evaluation_and_the_report(tiny_model_dir, tofu_dir, tasks_dir, tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "eval",
                TOFU_EVAL,
                *cpu(tiny_model_dir),
                f"data.source={tofu_dir}",
                "split=forget01",
                "eval.limit=2",
                "eval.max_new_tokens=4",
                "eval.batch_size=4",
                "eval.lm_eval.tasks=[wmdp_cyber]",
                f"eval.lm_eval.include_path={tasks_dir}",
                f"output_dir={run / 'eval'}",
            ]
        )
        == 0
    )
    assert (run / "eval" / "TOFU_SUMMARY.json").is_file()
    lm = json.loads((run / "eval" / "LMEVAL_SUMMARY.json").read_text())
    assert set(lm) == {"wmdp_cyber/acc", "wmdp_cyber/acc_stderr"}
    samples = json.loads((run / "eval" / "LMEVAL_EVAL.json").read_text())["wmdp_cyber"]["wmdp_cyber"]
    assert len(samples) == 2  # eval.limit applies to the stage too
    stages = json.loads((run / "eval" / "eval_timings.json").read_text())["stages"]
    assert "lm_eval loglikelihood" in stages and "probability" in stages
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| Forget quality |" in report and " wmdp_cyber acc |" in report
    assert f"{lm['wmdp_cyber/acc']:.3f}" in report


# ------------------------------------------------------------------------------------------- WMDP corpora
def write_corpora(root: Path, tofu_dir: Path, corpus: str = "cyber") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = _tofu_rows(tofu_dir, "full", 80)
    (root / f"{corpus}-forget-corpus.jsonl").write_text(
        "".join(json.dumps({"text": r["answer"]}) + "\n" for r in rows[:40])
    )
    (root / f"{corpus}-retain-corpus.jsonl").write_text(
        "".join(json.dumps({"text": r["answer"]}) + "\n" for r in rows[40:])
    )
    return root


def test_corpus_loader_reads_the_jsonl_layout(tofu_dir, tmp_path):
    from baldro.data.wmdp import load_corpus, load_unlearn_texts

    folder = write_corpora(tmp_path / "corpora", tofu_dir)
    with open(folder / "cyber-forget-corpus.jsonl", "a") as f:
        f.write('"a bare JSON string is a document too"\n\n')
    docs = load_corpus(folder, "cyber-forget-corpus")
    assert len(docs) == 41 and docs[-1] == "a bare JSON string is a document too"
    forget, retain = load_unlearn_texts(str(folder), "cyber-forget-corpus", "cyber-retain-corpus", need_retain=True)
    assert forget == "\n\n".join(docs) and retain.count("\n\n") == 39
    assert load_unlearn_texts(str(folder), "cyber-forget-corpus", None, need_retain=False)[1] is None
    with pytest.raises(BaldroError, match=r"WMDP corpus 'bio-forget-corpus' not found: .*the folder has \[.*\].*gated"):
        load_corpus(folder, "bio-forget-corpus")
    (folder / "bad-corpus.jsonl").write_text('{"text": "ok"}\n{"text": \n{"text": "ok"}\n')
    with pytest.raises(BaldroError, match=r"bad-corpus\.jsonl line 2 is not valid JSON"):
        load_corpus(folder, "bad-corpus")
    (folder / "notext-corpus.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(BaldroError, match=r"line 1 must be an object with a 'text' string"):
        load_corpus(folder, "notext-corpus")


def test_corpus_loader_reads_the_hub_with_datasets(monkeypatch):
    import datasets

    from baldro.data.wmdp import load_corpus

    calls = []

    def fake(*args, split=None, **kwargs):
        calls.append((args, split))
        if args == ("cais/wmdp-bio-forget-corpus",):
            raise datasets.exceptions.DatasetNotFoundError(
                "Dataset 'cais/wmdp-bio-forget-corpus' is a gated dataset on the Hub. You must be authenticated"
            )
        return datasets.Dataset.from_dict({"text": ["one", " ", "two"]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_corpus("cais/wmdp-corpora", "cyber-forget-corpus") == ["one", "two"]
    assert calls == [(("cais/wmdp-corpora", "cyber-forget-corpus"), "train")]
    with pytest.raises(
        BaldroError,
        match=r"bio forget corpus is gated: request access on "
        r"https://huggingface\.co/datasets/cais/wmdp-bio-forget-corpus",
    ):
        load_corpus("cais/wmdp-corpora", "bio-forget-corpus")


def test_wmdp_recipe_trains_rmu_on_local_corpora_through_the_cli(tiny_model_dir, tofu_dir, tasks_dir, tmp_path):
    """configs/unlearn/wmdp.yaml on local WMDP-layout corpora: RMU under a DRO weighting at the recipe's
    module, only the chosen down projections change, and the final model is evaluated on (local) WMDP cyber."""
    from safetensors.torch import load_file

    corpora = write_corpora(tmp_path / "corpora", tofu_dir)
    run = tmp_path / "wmdp"
    assert (
        main(
            [
                "unlearn",
                WMDP,
                *cpu(tiny_model_dir),
                "train.bf16=false",
                "train.use_cpu=true",
                "train.save_strategy=no",
                "train.disable_tqdm=true",
                f"data.source={corpora}",
                "data.chunk_length=64",
                "data.limit=8",
                "train.max_steps=3",
                "train.per_device_train_batch_size=2",
                "train.gradient_accumulation_steps=2",
                "train.learning_rate=1e-2",
                "weighting=dv",
                r"objective.module_regex=model\.layers\.1",
                r"objective.trainable_params_regex=[model\.layers\.(0|1)\.mlp\.down_proj\.weight]",
                "eval.tasks=[wmdp_cyber]",
                f"eval.include_path={tasks_dir}",
                "eval.limit=4",
                "eval.batch_size=8",
                f"output_dir={run}",
            ]
        )
        == 0
    )
    info = json.loads((run / "run_info.json").read_text())
    assert (info["benchmark"], info["objective"], info["retain_loss"], info["weighting"]) == (
        "wmdp",
        "rmu",
        "embed_diff",
        "dv",
    )
    assert info["n_forget"] == 8 and info["chunk_length"] == 64 and info["module"] == "model.layers.1"
    assert info["trainable_parameter_tensors"] == 2
    log = read_jsonl(run / "train_log.jsonl")
    assert len(log) == 3 and all("retain_loss" in r for r in log)
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)}
    summary = json.loads((run / "eval" / "LMEVAL_SUMMARY.json").read_text())
    assert set(summary) == {"wmdp_cyber/acc", "wmdp_cyber/acc_stderr"}  # the local copy (no MMLU offline)
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| Method | wmdp_cyber acc | Train time (s) |" in report and "| rmu_dv |" in report


# ------------------------------------------------------------------------------------------- bad input
def one_line(capsys, args) -> tuple[int, str]:
    """The exit code and the error line (the last line of stderr; progress bars of model loading come before it)."""
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return rc, err.splitlines()[-1] if err else ""


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["eval.tasks=[wmdp_cyberr]"], "eval.tasks: unknown lm-eval task 'wmdp_cyberr': did you mean wmdp_cyber"),
        (["eval.tasks=[no_such_task_anywhere]"], "it is not in the harness's registry"),
        (["eval.tasks=[]"], "eval.tasks is empty"),
        (["eval.include_path=/no/such/folder"], "eval.include_path /no/such/folder does not exist"),
        (["eval.num_fewshot=-1"], "eval.num_fewshot=-1 must be >= 0"),
        (["eval.lm_eval.tasks=[tiny_mc]"], "eval.lm_eval.tasks is the extra stage of a TOFU or MUSE evaluation"),
        (["eval.tasks=[tiny_group,tiny_mc]"], "eval.tasks: Duplicate task 'tiny_mc'"),
    ],
)
def test_bad_lm_eval_input_is_one_line(tiny_model_dir, tasks_dir, tmp_path, capsys, overrides, message):
    rc, err = one_line(
        capsys,
        [
            "eval",
            LM_EVAL,
            *cpu(tiny_model_dir),
            f"eval.include_path={tasks_dir}",
            f"output_dir={tmp_path / 'out'}",
            *overrides,
        ],
    )
    assert rc == 2 and message in err and err.startswith("baldro eval: error:"), err


def test_bad_stage_task_is_refused_before_the_model_loads(tiny_model_dir, tofu_dir, tasks_dir, tmp_path, capsys):
    rc, err = one_line(
        capsys,
        [
            "eval",
            TOFU_EVAL,
            *cpu(tmp_path / "no_model"),
            f"data.source={tofu_dir}",
            "eval.lm_eval.tasks=[tiny_mcc]",
            f"eval.lm_eval.include_path={tasks_dir}",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    assert rc == 2 and "eval.lm_eval.tasks: unknown lm-eval task 'tiny_mcc': did you mean tiny_mc" in err, err
    rc, err = one_line(
        capsys,
        [
            "eval",
            TOFU_EVAL,
            *cpu(tiny_model_dir),
            f"data.source={tofu_dir}",
            "eval.tasks=[tiny_mc]",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    assert rc == 2 and "eval.tasks runs lm-eval tasks with eval.benchmark=lm_eval" in err, err


def test_wmdp_needs_lm_eval_and_its_corpora(tiny_model_dir, tofu_dir, tmp_path, capsys):
    corpora = write_corpora(tmp_path / "corpora", tofu_dir)
    base = [
        "unlearn",
        WMDP,
        *cpu(tiny_model_dir),
        "train.bf16=false",
        "train.use_cpu=true",
        f"output_dir={tmp_path / 'o'}",
    ]
    rc, err = one_line(capsys, [*base, f"data.source={corpora}", "corpus=bio", "eval.at_end=false"])
    assert rc == 2 and "WMDP corpus 'bio-forget-corpus' not found" in err, err
    rc, err = one_line(capsys, [*base, f"data.source={corpora}", "eval.benchmark=tofu", "eval.tasks=[]"])
    assert rc == 2 and "cannot evaluate the WMDP corpora" in err, err
    rc, err = one_line(capsys, [*base, f"data.source={tmp_path / 'missing'}", "eval.at_end=false"])
    assert rc == 2 and "missing does not exist: set data.source to a WMDP-corpora folder" in err, err


def test_lm_eval_missing_names_the_install_command(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    rc, err = one_line(capsys, ["eval", LM_EVAL, *cpu(tiny_model_dir), f"output_dir={tmp_path / 'out'}"])
    assert rc == 2 and "pip install 'baldro[lm-eval]'" in err, err


def test_a_gated_task_dataset_is_one_line(tiny_model_dir, tasks_dir, tmp_path, capsys, monkeypatch):
    import datasets
    import lm_eval.evaluator

    def gated(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(
            "Dataset 'cais/wmdp' is a gated dataset on the Hub. You must be authenticated to access it."
        )

    monkeypatch.setattr(lm_eval.evaluator, "simple_evaluate", gated)
    rc, err = one_line(
        capsys,
        [
            "eval",
            LM_EVAL,
            *cpu(tiny_model_dir),
            "eval.tasks=[tiny_mc]",
            f"eval.include_path={tasks_dir}",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    assert rc == 2 and "dataset is gated" in err and "request access" in err, err


def test_a_dataset_missing_offline_is_one_line(tiny_model_dir, tasks_dir, tmp_path, capsys):
    rc, err = one_line(
        capsys,
        [
            "eval",
            LM_EVAL,
            *cpu(tiny_model_dir),
            "eval.tasks=[hub_only]",
            f"eval.include_path={tasks_dir}",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    assert rc == 2 and "an lm-eval task's dataset could not be" in err, err
