"""UniErase (method=unierase): the closed form and the null space on hand-made tensors; on a tiny fine-tuned
model, phase 1 (prompt + token -> the refusal), phase 2 (forget questions -> the token, retain questions kept),
determinism, which weights change, and the bad inputs that exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from baldro.cli import main
from baldro.data.formatting import QAFormatter
from baldro.errors import BaldroError
from baldro.models.loading import load_model, load_tokenizer
from baldro.train import unierase as ue

ROOT = Path(__file__).resolve().parents[1]
UNLEARN = str(ROOT / "configs" / "unlearn" / "tofu.yaml")
FINETUNE = str(ROOT / "configs" / "finetune" / "tofu.yaml")
REFUSAL = "I'm not certain about that."
PROMPT = "format.prompt_template='Question: {question}\nAnswer: '"
N_FORGET = 8


def _cpu(model_path) -> list[str]:
    return [
        f"model.path={model_path}",
        "model.dtype=float32",
        "model.device=cpu",
        "model.attn_implementation=null",
        "train.bf16=false",
        "train.use_cpu=true",
        "train.save_strategy=no",
        "train.warmup_steps=0",
        "train.disable_tqdm=true",
        "format.use_chat_template=false",
        PROMPT,
    ]


# ----------------------------------------------------------------------------- the linear algebra
def test_null_space_projector_keeps_the_small_eigen_directions():
    basis = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    moment = basis @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 1e-4, 1e-5, 0.0], dtype=torch.float64)) @ basis.T
    p, dim, values = ue.null_space_projector(moment, 1e-3)
    p = p.double()  # kept as float32 (one d x d matrix per edited layer)
    torch.testing.assert_close(values[-1].item(), 5.0)
    assert dim == 3
    small = basis[:, 3:]
    torch.testing.assert_close(p, small @ small.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(p @ p, p, atol=1e-6, rtol=0)
    assert (p @ basis[:, :3]).abs().max() < 1e-6


def test_closed_form_update_moves_the_edited_keys_and_spares_the_preserved_ones():
    g = torch.Generator().manual_seed(1)
    d_in, d_out = 8, 5
    preserved = torch.randn(d_in, 4, generator=g, dtype=torch.float64)  # span a 4-dim subspace
    moment = preserved @ preserved.T / 4
    p, dim, _ = ue.null_space_projector(moment, 1e-8)
    assert dim == 4
    keys = torch.randn(d_in, 3, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, 3, generator=g, dtype=torch.float64)
    delta = ue.closed_form_update(keys, resid, p, l2=1e-6)
    assert delta.shape == (d_out, d_in)
    assert (delta @ preserved).abs().max() < 1e-6  # the retain keys' outputs do not move
    torch.testing.assert_close(delta @ keys, resid, atol=1e-4, rtol=1e-4)  # the forget keys' do, as asked
    # a larger ridge term gives a smaller edit, still within the null space
    damped = ue.closed_form_update(keys, resid, p, l2=10.0)
    assert damped.norm() < delta.norm() and (damped @ preserved).abs().max() < 1e-6


def test_capacity_says_why_a_forget_set_is_too_large():
    ue.check_capacity({4: 10, 5: 12}, 10, 0.02)
    with pytest.raises(BaldroError, match=r"larger than the edit can hold.*10-dimensional null space at layer 4"):
        ue.check_capacity({4: 10, 5: 12}, 11, 0.02)


# ----------------------------------------------------------------------------- the tiny model
@pytest.fixture(scope="module")
def data_dir(tofu_dir, tmp_path_factory) -> Path:
    """forget01 and a retain slice, plus a fine-tuning split that teaches the refusal on other questions
    (as a chat model knows how to say it does not know) and one refusal answer."""
    out = tmp_path_factory.mktemp("tofu_unierase")
    rows = lambda name: [json.loads(line) for line in (tofu_dir / f"{name}.jsonl").read_text().splitlines()]  # noqa: E731
    forget, retain = rows("forget01")[:N_FORGET], rows("retain90")
    write = lambda name, rs: (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))  # noqa: E731
    write("forget01", forget)
    write("retain99", retain[:32])
    refuse = [{"question": r["question"], "answer": REFUSAL} for r in retain[100:132]]
    write("train_mix", forget * 2 + refuse)
    (out / "idontknow.jsonl").write_text(REFUSAL + "\n")
    for name in (
        "forget01_perturbed",
        "retain_perturbed",
        "real_authors_perturbed",
        "world_facts_perturbed",
        "holdout01",
    ):
        (out / f"{name}.jsonl").symlink_to(tofu_dir / f"{name}.jsonl")  # the evaluation's sets
    return out


@pytest.fixture(scope="module")
def target_model(tiny_model_dir, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft")
    rc = main(
        [
            "finetune",
            FINETUNE,
            *_cpu(tiny_model_dir),
            f"data.source={data_dir}",
            "data.train_split=train_mix",
            f"output_dir={out}",
            "train.num_train_epochs=60",
            "train.learning_rate=5e-3",
            "train.per_device_train_batch_size=8",
            "train.gradient_accumulation_steps=1",
        ]
    )
    assert rc == 0
    return out / "model"


def _unierase(model, data_dir, out, *extra) -> int:
    return main(
        [
            "unlearn",
            UNLEARN,
            *_cpu(model),
            f"data.source={data_dir}",
            "split=forget01",
            "method=unierase",
            f"output_dir={out}",
            "unierase.layers=[0,1]",
            "unierase.token_epochs=60",
            "unierase.token_learning_rate=0.1",
            "unierase.token_batch_size=8",
            "unierase.nullspace_threshold=5e-2",
            "unierase.l2=0.3",
            "unierase.target_steps=25",
            "unierase.target_learning_rate=0.5",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def edited(target_model, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unierase")
    assert _unierase(target_model, data_dir, out) == 0
    return out


def test_run_folder_records_the_edit(edited):
    info = json.loads((edited / "run_info.json").read_text())
    assert info["method"] == "unierase" and info["status"] == "done"
    assert info["layers"] == [0, 1]
    assert info["edited_parameters"] == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert info["statistics"]["n_keys"] > 0 and set(info["statistics"]["null_space_dims"]) == {"0", "1"}
    assert info["token_losses"][-1] < info["token_losses"][0]
    assert (edited / "config.yaml").is_file()
    assert info["forget_token_rate"] == 1.0


def _load(path):
    return load_model(str(path), dtype="float32", device="cpu"), load_tokenizer(str(path))


def _formatter(tokenizer):
    return QAFormatter(tokenizer, use_chat_template=False, prompt_template="Question: {question}\nAnswer: ")


def _rows(data_dir, name):
    return [json.loads(line) for line in (data_dir / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def with_token(target_model, data_dir):
    """The target model after phase 1 alone, with its tokenizer and the token's id."""
    model, tokenizer = _load(target_model)
    token_id = ue.add_unlearning_token(model, tokenizer, "<unlearn_0>")
    questions = [r["question"] for r in _rows(data_dir, "forget01")]
    sequences = ue.token_sequences(
        _formatter(tokenizer), questions, [REFUSAL] * len(questions), "<unlearn_0>", token_id
    )
    losses = ue.train_token(model, token_id, sequences, tokenizer.pad_token_id, epochs=60, lr=0.1, batch_size=8, seed=0)
    assert losses[-1] < losses[0] / 2
    return model, tokenizer, token_id


def test_phase_1_prompt_and_token_lead_to_the_refusal(with_token, target_model, data_dir):
    """After `question <unlearn_0>`, the refusal is the most likely continuation token by token (teacher-forced),
    and greedy decoding starts it for every forget question (a 2-layer model does not hold all 18 tokens
    against the answers it memorised: the measured exact rate is printed)."""
    model, tokenizer, token_id = with_token
    fmt = _formatter(tokenizer)
    refusal = tokenizer(REFUSAL, add_special_tokens=False)["input_ids"]
    correct = total = exact = 0
    for row in _rows(data_dir, "forget01"):
        prompt = fmt.encode_prompt(row["question"])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + [token_id] + refusal])).logits[0]
            plain = model(torch.tensor([prompt + refusal])).logits[0]
        start = len(prompt)
        guess = logits[start : start + len(refusal)].argmax(-1).tolist()
        assert plain[start - 1 : start - 1 + len(refusal)].argmax(-1).tolist() != refusal  # the model alone answers
        correct += sum(a == b for a, b in zip(guess, refusal))
        total += len(refusal)
        out = model.generate(torch.tensor([prompt + [token_id]]), max_new_tokens=24, do_sample=False, pad_token_id=0)
        text = tokenizer.decode(out[0, start + 1 :], skip_special_tokens=True).strip()
        assert out[0, start + 1].item() == refusal[0], text
        exact += text == REFUSAL
    print(f"teacher-forced refusal tokens right: {correct}/{total}; exact greedy refusals: {exact}/8")
    assert correct >= 0.9 * total
    # nothing but the token's row was trained (tied embeddings: one row serves both)
    original, _ = _load(target_model)
    before, after = original.state_dict(), model.state_dict()
    for name, weight in before.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(after[name][: weight.shape[0]], weight), name
        else:
            assert torch.equal(after[name], weight), name


def test_phase_2_preserves_what_the_null_space_protects(with_token, data_dir):
    """The edit's preservation, measured: the retain keys' MLP outputs move far less than the forget keys',
    and more retain questions keep their greedy next token than under the same edit without the null space."""
    import copy

    model, tokenizer, token_id = with_token
    fmt, pad = _formatter(tokenizer), tokenizer.pad_token_id
    forget, retain = _rows(data_dir, "forget01"), _rows(data_dir, "retain99")
    forget_prompts = [fmt.encode_prompt(r["question"]) for r in forget]
    retain_prompts = [fmt.encode_prompt(r["question"]) for r in retain]
    retain_texts = [
        e.input_ids for e in fmt.encode_many([r["question"] for r in retain], [r["answer"] for r in retain])
    ]
    before = ue.next_tokens(model, retain_prompts, pad)
    w0 = model.get_submodule(ue.KEY_MODULE.format(0)).weight.detach().clone()
    retain_keys, _ = ue.keys_and_hidden(model, 0, 1, retain_prompts, pad)  # layer 0's keys: the edit cannot move them
    forget_keys, _ = ue.keys_and_hidden(model, 0, 1, forget_prompts, pad)
    kept = {}
    for name, threshold in (("null space", 5e-2), ("no null space", 1e9)):
        edited = copy.deepcopy(model)
        moments, n_keys = ue.second_moments(edited, [0, 1], retain_texts, pad, 16)
        assert n_keys == sum(len(t) for t in retain_texts)
        projectors = {layer: ue.null_space_projector(moments[layer], threshold)[0] for layer in (0, 1)}
        ue.unlearning_edit(
            edited, [0, 1], forget_prompts, token_id, pad, projectors,
            l2=0.3, steps=25, lr=0.5, weight_decay=0.5, clamp_norm_factor=0.75,
        )  # fmt: skip
        assert ue.next_tokens(edited, forget_prompts, pad) == [token_id] * len(forget)
        delta = edited.get_submodule(ue.KEY_MODULE.format(0)).weight.detach() - w0
        moved = lambda keys, delta=delta: ((keys @ delta.T).norm(dim=-1) / (keys @ w0.T).norm(dim=-1)).mean().item()  # noqa: E731
        same = sum(a == b for a, b in zip(before, ue.next_tokens(edited, retain_prompts, pad)))
        kept[name] = (same, moved(retain_keys), moved(forget_keys))
    print("retain next tokens kept, retain and forget keys' relative output change:", kept)
    n, retain_moved, forget_moved = kept["null space"]
    assert retain_moved < forget_moved / 3
    assert n > kept["no null space"][0]
    assert n >= 0.75 * len(retain)


def test_the_edit_is_deterministic_and_changes_only_the_named_layer_and_the_token(target_model, data_dir, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert _unierase(target_model, data_dir, out, "unierase.layers=[1]") == 0
    first, second = (load_file(str(out / "model" / "model.safetensors")) for out in runs)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    original = load_file(str(target_model / "model.safetensors"))
    changed = {k for k in original if not torch.equal(first[k][: original[k].shape[0]], original[k])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    embed = "model.embed_tokens.weight"  # tied: one new row, for input and output
    assert first[embed].shape[0] == original[embed].shape[0] + 1
    assert json.loads((runs[0] / "run_info.json").read_text())["edited_parameters"] == [
        "model.layers.1.mlp.down_proj.weight"
    ]
    tokenizer = load_tokenizer(str(runs[0] / "model"))
    assert tokenizer.convert_tokens_to_ids("<unlearn_0>") == original[embed].shape[0]


def _gpt2_folder(target_model, out: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer(str(target_model))
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer), n_positions=512)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "case, message",
    [
        ("layers", "unierase.layers [5] out of range: this model has 2 decoder layers"),
        ("capacity", "the forget set (8 questions) is larger than the edit can hold"),
        ("token", "is already in the tokenizer's vocabulary"),
        ("architecture", "GPT2LMHeadModel has no such module"),
        ("lora", "method=unierase edits the model's own weights"),
        ("duplicate", "names a layer twice"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(case, message, target_model, data_dir, tmp_path, capsys):
    model = target_model
    extra = {
        "layers": ["unierase.layers=[5]"],
        "capacity": ["unierase.nullspace_threshold=1e-9"],
        "token": [f"unierase.token='{load_tokenizer(str(target_model)).eos_token}'"],
        "architecture": [],
        "lora": ["model.lora={r: 4}"],
        "duplicate": ["unierase.layers=[1,1]"],
    }[case]
    if case == "architecture":
        model = _gpt2_folder(target_model, tmp_path / "gpt2")
    out = tmp_path / "run"
    assert _unierase(model, data_dir, out, *extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("baldro unlearn: error:")]
    assert len(err) == 1 and message in err[0], err
    if case in ("layers", "architecture", "token", "lora", "duplicate"):
        assert not out.exists() or not any(out.iterdir())  # refused before the folder was claimed


def test_a_tokenizer_that_cannot_take_a_token_is_refused(target_model):
    model, _ = _load(target_model)
    with pytest.raises(BaldroError, match="cannot take a new token"):
        ue.add_unlearning_token(model, object(), "<unlearn_0>")


def test_the_run_evaluates_at_the_end_and_reports_like_any_run(target_model, data_dir, tmp_path):
    run = tmp_path / "run"
    extra = ["eval.at_end=true", "eval.limit=2", "eval.max_new_tokens=8", "eval.batch_size=4"]
    assert _unierase(target_model, data_dir, run, *extra) == 0
    summary = json.loads((run / "eval" / "TOFU_SUMMARY.json").read_text())
    assert "forget_Q_A_Prob" in summary and "model_utility" in summary
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert "unierase" in (tmp_path / "report" / "report.md").read_text()
