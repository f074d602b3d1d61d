"""Bad input, table-driven: every case exits with code 2 and one line on stderr that names the key or
the file and says what to do; never a traceback. Nothing here loads model weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from baldro.cli import main

ROOT = Path(__file__).resolve().parents[1]
UNLEARN = str(ROOT / "configs" / "unlearn" / "tofu.yaml")
FINETUNE = str(ROOT / "configs" / "finetune" / "tofu.yaml")
EVAL = str(ROOT / "configs" / "eval" / "tofu.yaml")
ATTACK = str(ROOT / "configs" / "attack" / "all.yaml")
LOGS = ROOT.parent / "shared" / "data" / "reference_logs"


@pytest.fixture(scope="module")
def files(tiny_model_dir, tofu_dir, tmp_path_factory) -> dict[str, Path]:
    """Damaged models and data files, a file where a folder belongs, small eval logs."""
    root = tmp_path_factory.mktemp("bad")
    f: dict[str, Path] = {"root": root, "model": tiny_model_dir, "tofu": tofu_dir}

    def model_copy(name: str, drop: tuple[str, ...] = ()) -> Path:
        out = root / name
        shutil.copytree(tiny_model_dir, out)
        for d in drop:
            (out / d).unlink()
        return out

    f["no_tokenizer"] = model_copy("no_tokenizer", ("tokenizer.json", "tokenizer_config.json"))
    f["no_config"] = model_copy("no_config", ("config.json",))
    f["no_weights"] = model_copy("no_weights", ("model.safetensors",))
    f["truncated"] = model_copy("truncated")
    weights = f["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])

    rows = [json.loads(line) for line in (tofu_dir / "forget01.jsonl").read_text().splitlines()[:8]]
    retain = (tofu_dir / "retain99.jsonl").read_text().splitlines()[:8]

    def data(name: str, lines: list[str] | bytes) -> Path:
        folder = root / name
        folder.mkdir()
        (folder / "retain99.jsonl").write_text("\n".join(retain) + "\n")
        content = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode()
        (folder / "forget01.jsonl").write_bytes(content)
        return folder

    good = [json.dumps(r) for r in rows]
    f["row5_no_answer"] = data("row5_no_answer", good[:4] + [json.dumps({"question": "q?"})] + good[5:])
    f["not_utf8"] = data(
        "not_utf8", ("\n".join(good[:2]) + "\n").encode() + b'{"question": "\xff\xfe", "answer": "a"}\n'
    )
    f["bad_json"] = data("bad_json", good[:3] + ['{"question": "q?", "answer": '] + good[4:])
    f["answer_null"] = data("answer_null", good[:1] + [json.dumps({"question": "q?", "answer": None})])
    f["a_file"] = root / "a_file.txt"
    f["a_file"].write_text("not a folder\n")
    f["used_by_training"] = root / "trained"
    f["used_by_training"].mkdir()
    (f["used_by_training"] / "train_log.jsonl").write_text("")
    f["old_run"] = root / "old_run"
    (f["old_run"] / "eval").mkdir(parents=True)
    (f["old_run"] / "config.yaml").write_text("seed: 0\n")
    (f["old_run"] / "eval" / "TOFU_SUMMARY.json").write_text("{}")
    f["half_checkpoint"] = root / "checkpoints" / "checkpoint-4"
    f["half_checkpoint"].mkdir(parents=True)
    (f["half_checkpoint"] / "config.json").write_text("{}")
    f["vbi_list"] = root / "vbi_list.json"
    f["vbi_list"].write_text(json.dumps({"forget_Q_A_Prob": {"agg_value": 0.5, "value_by_index": [{"prob": 0.5}]}}))
    f["bad_yaml"] = root / "unlearn" / "bad.yaml"
    f["bad_yaml"].parent.mkdir()
    f["bad_yaml"].write_text("train: [unclosed\n")
    return f


def unlearn(f, *extra) -> list[str]:
    return [
        "unlearn",
        UNLEARN,
        f"model.path={f['model']}",
        "model.device=cpu",
        "format.use_chat_template=false",
        f"data.source={f['tofu']}",
        "split=forget01",
        f"output_dir={f['root'] / 'out'}",
        *extra,
    ]


def finetune(f, *extra) -> list[str]:
    return [
        "finetune",
        FINETUNE,
        f"model.path={f['model']}",
        "model.device=cpu",
        "format.use_chat_template=false",
        f"data.source={f['tofu']}",
        "data.train_split=forget01",
        f"output_dir={f['root'] / 'out_ft'}",
        *extra,
    ]


def evaluate(f, *extra) -> list[str]:
    return [
        "eval",
        EVAL,
        f"model.path={f['model']}",
        "model.device=cpu",
        "format.use_chat_template=false",
        f"data.source={f['tofu']}",
        "split=forget01",
        f"output_dir={f['root'] / 'out_eval'}",
        *extra,
    ]


def attack(f, *extra) -> list[str]:
    return [
        "attack",
        ATTACK,
        f"model.path={f['model']}",
        "model.device=cpu",
        "format.use_chat_template=false",
        f"data.source={f['tofu']}",
        "split=forget01",
        f"output_dir={f['root'] / 'out_attack'}",
        *extra,
    ]


NO_CUDA = not torch.cuda.is_available()

# (id, args(files) -> argv, what the one-line message must contain)
CASES = [
    # types, unknown keys (the schema)
    ("lr not a number", lambda f: unlearn(f, "train.learning_rate=abc"), "train.learning_rate"),
    ("unknown top-level key", lambda f: unlearn(f, "weightin=dv"), "unknown key 'weightin': did you mean weighting?"),
    ("misspelt weighting key", lambda f: unlearn(f, "weighting.nmae=dv"), "did you mean weighting.name?"),
    ("misspelt train key", lambda f: unlearn(f, "train.lerning_rate=1e-4"), "did you mean train.learning_rate?"),
    ("bool from text", lambda f: unlearn(f, "overwrite=maybe"), "overwrite"),
    ("config file missing", lambda f: ["unlearn", str(f["root"] / "nope.yaml")], "config file"),
    ("config not YAML", lambda f: ["unlearn", str(f["bad_yaml"])], "is not valid YAML"),
    ("override without =", lambda f: unlearn(f, "learning_rate"), "must look like key=value"),
    # ranges
    ("negative lr", lambda f: unlearn(f, "train.learning_rate=-1e-3"), "train.learning_rate=-0.001 must be > 0"),
    ("zero lr", lambda f: finetune(f, "train.learning_rate=0"), "train.learning_rate=0.0 must be > 0"),
    ("infinite lr", lambda f: unlearn(f, "train.learning_rate=.inf"), "train.learning_rate=inf must be finite"),
    (
        "batch 0",
        lambda f: unlearn(f, "train.per_device_train_batch_size=0"),
        "train.per_device_train_batch_size=0 must be >= 1",
    ),
    (
        "accumulation 0",
        lambda f: finetune(f, "train.gradient_accumulation_steps=0"),
        "train.gradient_accumulation_steps=0 must be >= 1",
    ),
    ("epochs 0", lambda f: unlearn(f, "train.num_train_epochs=0"), "train.num_train_epochs=0.0 must be >= 1"),
    ("max_steps 0", lambda f: finetune(f, "train.max_steps=0"), "train.max_steps=0 trains nothing"),
    ("negative weight decay", lambda f: unlearn(f, "train.weight_decay=-0.1"), "train.weight_decay=-0.1 must be >= 0"),
    ("nan grad norm", lambda f: unlearn(f, "train.max_grad_norm=.nan"), "train.max_grad_norm=nan must be finite"),
    ("save strategy", lambda f: unlearn(f, "train.save_strategy=sometimes"), "train.save_strategy='sometimes'"),
    ("save limit 0", lambda f: unlearn(f, "train.save_total_limit=0"), "train.save_total_limit=0 must be >= 1"),
    ("workers -1", lambda f: unlearn(f, "train.dataloader_num_workers=-1"), "train.dataloader_num_workers=-1"),
    (
        "scheduler",
        lambda f: unlearn(f, "train.lr_scheduler_type=sideways", "train.bf16=false"),
        "train.lr_scheduler_type",
    ),
    (
        "extra arg",
        lambda f: unlearn(f, "+train.extra.lerning_rate=1", "train.bf16=false"),
        "train.extra.lerning_rate is not a transformers",
    ),
    ("negative seed", lambda f: unlearn(f, "seed=-1"), "seed=-1 must be >= 0"),
    ("sigma inf", lambda f: unlearn(f, "weighting=dv", "weighting.args.sigma=.inf"), "weighting sigma must be finite"),
    ("sigma 0", lambda f: unlearn(f, "weighting=dv", "weighting.args.sigma=0"), "weighting sigma must be > 0, got 0"),
    ("ratio 0", lambda f: unlearn(f, "weighting=group", "weighting.args.ratio=0"), "weighting ratio must be in (0, 1]"),
    (
        "ratio text",
        lambda f: unlearn(f, "weighting=group", "weighting.args.ratio=half"),
        "weighting.args.ratio='half' is not a number",
    ),
    ("unknown weighting arg", lambda f: unlearn(f, "weighting=dv", "+weighting.args.sgima=1"), "did you mean sigma?"),
    ("beta 0", lambda f: unlearn(f, "objective=npo", "objective.args.beta=0"), "objective.args.beta=0 must be > 0"),
    (
        "beta text",
        lambda f: unlearn(f, "objective=npo", "objective.args.beta=big"),
        "objective.args.beta='big' is not a number",
    ),
    ("negative gamma", lambda f: unlearn(f, "objective.gamma=-1"), "objective.gamma=-1.0 must be >= 0"),
    ("unknown objective", lambda f: unlearn(f, "objective.name=nope"), "unknown forget objective 'nope'"),
    ("unknown retain loss", lambda f: unlearn(f, "objective.retain_loss=l2"), "unknown retain loss 'l2'"),
    ("lora r 0", lambda f: unlearn(f, "+model.lora.r=0"), "model.lora.r=0 must be >= 1"),
    ("lora field", lambda f: unlearn(f, "+model.lora.rank=4"), "model.lora.rank is not a LoraConfig field"),
    ("lora dropout", lambda f: unlearn(f, "+model.lora.lora_dropout=1.5"), "model.lora.lora_dropout=1.5 must be <= 1"),
    ("dtype", lambda f: unlearn(f, "model.dtype=float8"), "model.dtype='float8' is not one of"),
    ("max_length 0", lambda f: unlearn(f, "data.max_length=0"), "data.max_length=0 must be >= 1"),
    ("limit 0", lambda f: unlearn(f, "data.limit=0"), "data.limit=0 must be >= 1"),
    ("eval batch 0", lambda f: evaluate(f, "eval.batch_size=0"), "eval.batch_size=0 must be >= 1"),
    (
        "eval generation batch 0",
        lambda f: evaluate(f, "eval.generation_batch_size=0"),
        "eval.generation_batch_size=0 must be >= 1",
    ),
    ("eval tokens 0", lambda f: unlearn(f, "eval.at_end=true", "eval.max_new_tokens=0"), "eval.max_new_tokens=0"),
    ("benchmark", lambda f: evaluate(f, "eval.benchmark=wmdp"), "eval.benchmark='wmdp' is not supported"),
    (
        "forget_only with a utility floor",
        lambda f: unlearn(f, "eval.forget_only=true", "eval.utility_floor=0.5", "train.eval_strategy=epoch"),
        "eval.utility_floor needs model utility, which eval.forget_only does not compute",
    ),
    (
        "forget_only on lm_eval",
        lambda f: evaluate(f, "eval.forget_only=true", "eval.benchmark=lm_eval", "eval.tasks=[mmlu]"),
        "eval.forget_only is only implemented for TOFU",
    ),
    ("balance -1", lambda f: unlearn(f, "balance.every_n_steps=-1"), "balance.every_n_steps=-1 must be >= 0"),
    ("prompt template", lambda f: unlearn(f, "format.prompt_template=Q"), "format.prompt_template must contain"),
    # the device
    ("no such device", lambda f: unlearn(f, "model.device=tpu"), "model.device='tpu' is not a device"),
    (
        "cuda without cuda" if NO_CUDA else "cuda index",
        lambda f: unlearn(f, "model.device=cuda" if NO_CUDA else "model.device=cuda:99"),
        "no usable CUDA device" if NO_CUDA else "CUDA device(s)",
    ),
    (
        "bf16 without a GPU" if NO_CUDA else "fp16 and bf16",
        lambda f: unlearn(f, "train.bf16=true", "train.use_cpu=false", *([] if NO_CUDA else ["train.fp16=true"])),
        "train.bf16=true needs a GPU" if NO_CUDA else "train.",
    ),
    # files: model
    (
        "model missing",
        lambda f: unlearn(f, "model.path=/nonexistent/model"),
        "model path /nonexistent/model does not exist",
    ),
    ("model is a file", lambda f: unlearn(f, f"model.path={f['a_file']}"), "a_file.txt is a file"),
    ("no tokenizer", lambda f: unlearn(f, f"model.path={f['no_tokenizer']}"), "no_tokenizer has no tokenizer"),
    ("no config", lambda f: unlearn(f, f"model.path={f['no_config']}"), "no_config has no config.json"),
    ("truncated weights", lambda f: finetune(f, f"model.path={f['truncated']}"), "model.safetensors is truncated"),
    # files: data
    ("data folder missing", lambda f: unlearn(f, "data.source=/nonexistent/tofu"), "data folder /nonexistent/tofu"),
    ("data is a file", lambda f: unlearn(f, f"data.source={f['a_file']}"), "data.source"),
    ("split missing", lambda f: unlearn(f, "data.forget_split=forget42"), "TOFU split 'forget42' not found"),
    (
        "row 5 lacks answer",
        lambda f: unlearn(f, f"data.source={f['row5_no_answer']}"),
        "forget01.jsonl line 5 lacks field(s) ['answer']",
    ),
    ("not UTF-8", lambda f: unlearn(f, f"data.source={f['not_utf8']}"), "forget01.jsonl line 3 is not UTF-8 text"),
    ("bad JSON line", lambda f: finetune(f, f"data.source={f['bad_json']}"), "forget01.jsonl line 4 is not valid JSON"),
    ("answer null", lambda f: unlearn(f, f"data.source={f['answer_null']}"), "line 2: field 'answer' is NoneType"),
    ("no train split", lambda f: finetune(f, "data.train_split=null"), "data.train_split is not set"),
    # OpenUnlearning's other methods: what each cannot run without
    (
        "pdu without eps",
        lambda f: unlearn(f, "objective=pdu"),
        "objective.primal_dual=true (pdu) needs objective.retain_loss_eps",
    ),
    (
        "pdu update upon",
        lambda f: unlearn(f, "objective=pdu", "objective.retain_loss_eps=0.1", "objective.dual_update_upon=batch"),
        "must be step or epoch",
    ),
    (
        "altpo without a budget",
        lambda f: unlearn(f, "objective=altpo", "objective.alternates.max_new_tokens=0"),
        "altpo generates its alternate answers: give it a token budget",
    ),
    (
        "altpo file missing",
        lambda f: unlearn(f, "objective=altpo", "objective.alternates.file=/nonexistent/alt.jsonl"),
        "objective.alternates.file /nonexistent/alt.jsonl is not a file",
    ),
    (
        "rmu steering coefficient",
        lambda f: unlearn(f, "objective=rmu", "objective.args.steering_coeff=0"),
        "objective.args.steering_coeff=0",
    ),
    (
        "trainable regex under lora",
        lambda f: unlearn(f, "objective=rmu", "objective.trainable_params_regex=[.*mlp.*]", "+model.lora.r=4"),
        "exclude each other",
    ),
    (
        "altpo on muse",
        lambda f: [
            "unlearn",
            str(ROOT / "configs" / "unlearn" / "muse.yaml"),
            f"model.path={f['model']}",
            "model.device=cpu",
            "objective=altpo",
            f"data.source={ROOT.parent / 'shared' / 'data' / 'muse' / 'news'}",
            f"output_dir={f['root'] / 'out_muse'}",
        ],
        "MUSE unlearns raw text",
    ),
    (
        "refusal file",
        lambda f: unlearn(f, "objective=idk", "data.refusal_file=/nonexistent/idk.jsonl"),
        "data.refusal_file /nonexistent/idk.jsonl is not a file",
    ),
    (
        "retain log missing",
        lambda f: evaluate(f, "eval.retain_logs_path=/nonexistent/TOFU_EVAL.json"),
        "eval.retain_logs_path /nonexistent/TOFU_EVAL.json does not exist",
    ),
    # files: outputs and resuming
    ("output is a file", lambda f: unlearn(f, f"output_dir={f['a_file']}"), "output_dir"),
    ("output under a file", lambda f: finetune(f, f"output_dir={f['a_file']}/run"), "a_file.txt is a file"),
    (
        "output read-only",
        lambda f: unlearn(f, "output_dir=/sys/baldro_run"),
        "output_dir /sys/baldro_run is not writable",
    ),
    ("output unset", lambda f: finetune(f, "output_dir=null"), "output_dir is not set"),
    (
        "output holds a run",
        lambda f: unlearn(f, f"output_dir={f['old_run']}", "train.bf16=false"),
        "old_run already holds a run: pass resume=true to continue it, overwrite=true to replace it",
    ),
    (
        "output holds other files",
        lambda f: finetune(f, f"output_dir={f['used_by_training'].parent / 'no_config'}", "train.bf16=false"),
        "no_config is not empty",
    ),
    ("eval into a training run", lambda f: evaluate(f, f"output_dir={f['used_by_training']}"), "holds a training run"),
    ("resume path missing", lambda f: unlearn(f, "resume=/no/such/path"), "resume=/no/such/path: no such checkpoint"),
    (
        "resume from a half checkpoint",
        lambda f: unlearn(f, f"resume={f['half_checkpoint']}", "train.bf16=false"),
        "checkpoint-4: the checkpoint is incomplete",
    ),
    ("resume and overwrite", lambda f: unlearn(f, "resume=true", "overwrite=true"), "overwrite=true and resume"),
    # attacks
    ("attack without a model", lambda f: attack(f, "model.path=null"), "baldro attack needs the unlearned model"),
    (
        "attack a folder without weights",
        lambda f: attack(f, f"model.path={f['no_weights']}"),
        "no_weights has no weights",
    ),
    (
        "attack bit width",
        lambda f: attack(f, "attack.quantize.bits=[3]"),
        "attack.quantize.bits=3 is not supported: use 8 or 4",
    ),
    (
        "attack library",
        lambda f: attack(f, "attack.quantize.library=gptq"),
        "attack.quantize.library='gptq' is not supported: use bitsandbytes",
    ),
    (
        "relearn split larger than the forget set",
        lambda f: attack(f, "attack.relearn.n_samples=41"),
        "attack.relearn.n_samples=41 is larger than the forget set (40 rows of forget01): use at most 40",
    ),
    (
        "held-out split without held-out rows",
        lambda f: attack(f, "attack.relearn.split=heldout", "attack.relearn.n_samples=40"),
        "leaves none held out",
    ),
    (
        "retain split larger than data.limit",
        lambda f: attack(f, "attack.relearn.split=retain", "data.limit=4", "attack.relearn.n_samples=5"),
        "attack.relearn.n_samples=5 is larger than the retain set (4 rows of retain99)",
    ),
    ("unknown attack", lambda f: attack(f, "attack.attacks=[relearnn]"), "did you mean relearn?"),
    (
        "relearn split name",
        lambda f: attack(f, "attack.relearn.split=forget"),
        "attack.relearn.split='forget' is not one",
    ),
    ("relearn steps 0", lambda f: attack(f, "attack.relearn.steps=0"), "attack.relearn.steps=0 must be >= 1"),
    (
        "relearn lora field",
        lambda f: attack(f, "+attack.relearn.lora.rank=4"),
        "attack.relearn.lora.rank is not a LoraConfig",
    ),
    (
        "threshold of no metric",
        lambda f: attack(f, "+attack.thresholds.probability=0.2"),
        "TOFU has no per-sample metric 'probability'",
    ),
    ("attack resume path", lambda f: attack(f, "resume=/no/such/path"), "an attack has no checkpoints"),
    (
        "before eval missing",
        lambda f: attack(f, "attack.before_eval=/nonexistent/eval"),
        "attack.before_eval /nonexistent/eval does not exist",
    ),
    # summarize
    (
        "summarize --out folder",
        lambda f: [
            "summarize",
            str(LOGS / "tofu_Llama-2-7b-chat-hf_retain99" / "TOFU_EVAL.json"),
            "--out",
            str(f["root"]),
        ],
        "is a folder: give a file path",
    ),
    (
        "summarize other samples",
        lambda f: [
            "summarize",
            str(LOGS / "tofu_Llama-2-7b-chat-hf_full" / "evals_forget05" / "TOFU_EVAL.json"),
            "--reference",
            str(LOGS / "tofu_Llama-2-7b-chat-hf_retain99" / "TOFU_EVAL.json"),
        ],
        "160 of 200 sample ids differ",
    ),
    ("value_by_index list", lambda f: ["summarize", str(f["vbi_list"])], "forget_Q_A_Prob.value_by_index is a list"),
    ("summarize missing", lambda f: ["summarize", str(f["root"] / "nope.json")], "eval log not found"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(case, files, capsys):
    _, argv, expected = case
    if "/sys/" in expected and Path("/sys").is_dir():
        import os

        if os.access("/sys", os.W_OK) and os.geteuid() != 0:
            pytest.skip("/sys is writable here")
    argv = argv(files)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"baldro {argv[0]}: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err[-2000:]
    assert expected in errors[0], errors[0]


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


def test_debug_shows_the_traceback(files):
    from baldro.errors import BaldroError

    with pytest.raises(BaldroError, match="must be > 0"):
        main(["--debug", *unlearn(files, "train.learning_rate=-1")])
    with pytest.raises(BaldroError):
        main(["-v", *unlearn(files, "train.learning_rate=-1")])


def test_a_reference_of_other_samples_of_the_same_size_is_refused():
    from baldro.errors import BaldroError
    from baldro.eval.summarize import check_same_samples

    def log(answers):
        rows = {str(i): {"rougeL_recall": 0.5, "generation": "g", "ground_truth": a} for i, a in enumerate(answers)}
        return {"forget_Q_A_ROUGE": {"agg_value": 0.5, "value_by_index": rows}}

    check_same_samples(log(["a", "b", "c"]), log(["a", "b", "c"]))
    with pytest.raises(BaldroError, match="2 of 3 sample ids differ in forget_Q_A_ROUGE"):
        check_same_samples(log(["a", "b", "c"]), log(["a", "x", "y"]))
