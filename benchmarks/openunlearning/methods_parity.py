"""OpenUnlearning's own method code (commit d3d7cf9) against baldro's per-sample objectives: loss and gradients.

For RMU (EMBED_DIFF retain loss), UNDIAL, CE-U, PDU (with its retain/dual term) and AltPO (OpenUnlearning's
DPO trainer with the alternates as the preferred answers), on one model, one batch and one frozen reference:

- OpenUnlearning's side runs in OpenUnlearning's venv (transformers 4.45.1; `setup.sh`): its trainer classes'
  `compute_loss` (src/trainer/unlearn/*.py, src/trainer/utils.py, code unchanged) called on a minimal stand-in
  for the trainer `self` (a `types.SimpleNamespace` holding the attributes the method reads, with the methods
  it calls bound to it), then `loss.backward()`. RMU's `control_vec` is set to baldro's steering vector times
  `steering_coeff`, so both sides use one u. This mode imports only torch, transformers and OpenUnlearning's
  `src/` (which imports deepspeed for RMU's isinstance check; if deepspeed cannot be imported, a stub module
  holding an empty `DeepSpeedEngine` class is put into `sys.modules` and the output says so).
- baldro's side runs in the main environment with baldro's pieces (`baldro.train.forward.forward_parts`,
  `baldro.train.objectives.get_objective / get_retain_loss / steering_vector / PrimalDual`, `baldro.train.weighting.mean`),
  and, as a cross-check of the trainer's glue, `UnlearnTrainer.compute_loss` on the same batch.
- The two processes talk through files: baldro's side writes the model folders (the trained model, a seeded
  perturbation of the original so that it differs from the reference, and the reference, both also as
  transformers 4.45.1 reads them), the batches and u into WORK/methods_parity/<model>/, runs
  `OU_PYTHON methods_parity.py --ou-side --inputs FILE --out DIR` (the same file) once per method, which writes
  one .pt per case (loss, gradient of every parameter, PDU's dual variable after its update), and compares.

Batch kinds (B forget samples, B retain samples, B alternates):
- `equal`: TOFU forget samples with one answer length (prompts of different lengths, right padding), and
  retain samples with one answer length (RMU's reduction needs that of both, see below);
- `full`: every position except the first is an answer position (labels = the input ids, -100 on position 0,
  which no logit predicts): B TOFU sequences cut to one length, no padding; the batch on which UNDIAL's
  all-position mean and baldro's answer-token mean coincide; the retain part as in `equal`;
- `tofu`: an ordinary TOFU batch (the first B forget and retain samples, answers of unequal lengths).
PDU reads the logits at the answer tokens' own positions (its mask is the unshifted `labels != -100`), one
position later than the logits that predict them (baldro's, SPEC 2b). Its cases run twice: `ou_labels=shifted`
gives OpenUnlearning labels shifted one to the left (so its unshifted mask picks baldro's positions; PDU reads
only the mask, never the label values), `ou_labels=as-is` the batch's own labels.
Where OpenUnlearning reduces differently (SPEC 2b), the difference is reported and its stated cause tested:
baldro's own objective computed under the hypothesis (token-count weights instead of the mean of per-sample
means; UNDIAL with every position of the batch an answer position and label -100 read as id V-100; PDU with
labels shifted one to the right and one padding column appended; RMU with the per-sample sums S_i = n_i l_i
reduced as mean_i(S_i) mean_j(1/n_j), which is what its `compute_activation_loss` computes: it divides a [B]
tensor by the [B, 1] token counts, a B x B broadcast) must then match OpenUnlearning to 1e-5.

    OU_REPO=/path/to/open-unlearning bash benchmarks/openunlearning/setup.sh   # once: the venv
    OMP_NUM_THREADS=1 python benchmarks/openunlearning/methods_parity.py --model tiny
    OMP_NUM_THREADS=1 python benchmarks/openunlearning/methods_parity.py --model smollm2 --merge
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_WORK = Path.home() / ".cache" / "baldro" / "openunlearning"
OU_COMMIT = "d3d7cf9"
RTOL, ATOL = 1e-5, 1e-8  # per gradient entry (torch.allclose's rule: |a - b| <= atol + rtol |b|)
TARGET = 1e-5  # loss and largest gradient difference, relative
IGNORE = -100

# Hyperparameters: OpenUnlearning's configs/trainer/*.yaml at d3d7cf9, except where noted.
METHODS = {
    # RMU.yaml: gamma 1, alpha 1, steering_coeff 2, EMBED_DIFF; module = baldro's default (layer 7 of 32 scaled)
    "rmu": dict(gamma=1.0, alpha=1.0, steering_coeff=2.0, retain="embed_diff"),
    # UNDIAL.yaml: beta 10, gamma 1, alpha 0; alpha 1 here so that its NLL retain term is compared too
    "undial": dict(gamma=1.0, alpha=1.0, beta=10.0, retain="nll"),
    # CEU.yaml: ignore_first_n_answer_tokens 1, no retain term
    "ceu": dict(gamma=1.0, alpha=0.0, ignore_first_n_answer_tokens=1, retain=None),
    # PDU.yaml: retain_loss_eps is required (???): 2.0 here; dual step 1, per step; the warm-up taken as over
    "pdu": dict(gamma=1.0, alpha=1.0, retain_loss_eps=2.0, dual_step_size=1.0, retain="nll"),
    # DPO.yaml: beta 0.1, gamma 1, alpha 1, NLL retain; AltPO = DPO with the alternates as the preferred answers
    "altpo": dict(gamma=1.0, alpha=1.0, beta=0.1, retain="nll"),
}
KINDS = ("equal", "full", "tofu")
KIND_TEXT = {"equal": "equal answer lengths", "full": "every position an answer", "tofu": "TOFU, unequal lengths"}


def case_list() -> list[dict]:
    """Every (method, kind, OpenUnlearning label variant) with what SPEC 2b says to expect."""
    cases = [dict(method="control_nll", kind="tofu", ou_labels="as-is", expect="agree", hypothesis=None, cause="")]
    for method in METHODS:
        for kind in KINDS:
            variants = ("shifted", "as-is") if method == "pdu" else ("as-is",)
            for ou_labels in variants:
                c = dict(method=method, kind=kind, ou_labels=ou_labels, expect="agree", hypothesis=None, cause="")
                if method == "rmu" and kind == "tofu":
                    c.update(
                        expect="differ",
                        hypothesis="broadcast",
                        cause="RMU's compute_activation_loss divides the [B] per-sample sums S_i by the [B, 1] "
                        "token counts: a B x B broadcast, mean_i(S_i) mean_j(1/n_j) instead of "
                        "mean_i(S_i/n_i) (forget and EMBED_DIFF retain terms)",
                    )
                if method == "ceu" and kind == "tofu":
                    c.update(
                        expect="differ",
                        hypothesis="token_mean",
                        cause="token mean over the whole batch vs the mean of per-sample means",
                    )
                if method == "undial" and kind in ("equal", "tofu"):
                    c.update(
                        expect="differ",
                        hypothesis="all_positions",
                        cause="UNDIAL also distils prompt and padding positions (label -100 lowers id V-100)"
                        + (", mean over all B(T-1) positions" if kind == "tofu" else ""),
                    )
                if method == "pdu" and ou_labels == "shifted" and kind == "tofu":
                    c.update(
                        expect="differ",
                        hypothesis="token_mean",
                        cause="token mean over the whole batch vs the mean of per-sample means",
                    )
                if method == "pdu" and ou_labels == "as-is":
                    c.update(
                        expect="differ",
                        hypothesis="own_positions",
                        cause="PDU reads the logits at the answer tokens' own positions (one later)"
                        + (" and the token mean over the batch" if kind == "tofu" else ""),
                    )
                cases.append(c)
    for c in cases:
        c["id"] = f"{c['method']}-{c['kind']}-{c['ou_labels']}"
    return cases


# =============================================================================== OpenUnlearning's side
def _ou_import(ou_src: Path) -> dict:
    """OpenUnlearning's trainer classes from its src/ (transformers 4.45.1 checked)."""
    import transformers

    info = {"transformers": str(transformers.__version__), "torch": str(torch.__version__), "deepspeed_stub": False}
    try:
        import deepspeed  # noqa: F401  (RMU imports it for an isinstance check on DeepSpeed-wrapped models)
    except Exception as e:  # a stub is enough for that check: the model here is never wrapped
        stub = types.ModuleType("deepspeed")
        stub.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
        stub.DeepSpeedEngine = type("DeepSpeedEngine", (), {})
        sys.modules["deepspeed"] = stub
        info["deepspeed_stub"] = f"{type(e).__name__}: {e}"
    sys.path.insert(0, str(ou_src))
    from trainer.unlearn.ceu import CEU
    from trainer.unlearn.dpo import DPO
    from trainer.unlearn.grad_diff import GradDiff
    from trainer.unlearn.pdu import PDU
    from trainer.unlearn.rmu import RMU
    from trainer.unlearn.undial import UNDIAL

    info["classes"] = dict(RMU=RMU, UNDIAL=UNDIAL, CEU=CEU, PDU=PDU, DPO=DPO, GradDiff=GradDiff)
    return info


def _bind(ns, cls, *names):
    for name in names:
        setattr(ns, name, types.MethodType(getattr(cls, name), ns))
    return ns


def _ou_loss(case: dict, spec: dict, model, ref, cls: dict):
    """One case through OpenUnlearning's compute_loss on a stand-in `self`; returns (loss, extra)."""
    hp, inputs = METHODS.get(case["method"], {}), case["ou_inputs"]
    extra = {}
    method = case["method"]
    if method == "control_nll":  # GradDiff's NLL retain loss (transformers' own token-mean loss) on the forget batch
        ns = types.SimpleNamespace(retain_loss_type="NLL")
        _bind(ns, cls["GradDiff"], "compute_retain_loss")
        return ns.compute_retain_loss(model, inputs["forget"]), extra
    if method == "rmu":
        RMU = cls["RMU"]
        ns = types.SimpleNamespace(
            gamma=hp["gamma"],
            alpha=hp["alpha"],
            retain_loss_type="EMBED_DIFF",
            ref_model=ref,
            steering_coeff=hp["steering_coeff"],
            module_regex=spec["module_regex"],
        )
        _bind(
            ns,
            RMU,
            "_get_matching_module",
            "forward_with_cache",
            "get_control_vector",
            "compute_activation_loss",
            "compute_retain_loss",
        )
        ns.model_module = ns._get_matching_module(model, ns.module_regex)
        ns.ref_module = ns._get_matching_module(ref, ns.module_regex)
        ns.control_vec = (spec["steering"] * hp["steering_coeff"]).view(1, 1, -1)  # baldro's u times c
        return RMU.compute_loss(ns, model, inputs), extra
    if method == "undial":
        ns = types.SimpleNamespace(
            gamma=hp["gamma"], alpha=hp["alpha"], beta=hp["beta"], retain_loss_type="NLL", ref_model=ref
        )
        _bind(ns, cls["GradDiff"], "compute_retain_loss")
        return cls["UNDIAL"].compute_loss(ns, model, inputs), extra
    if method == "ceu":
        ns = types.SimpleNamespace(ignore_first_n_answer_tokens=hp["ignore_first_n_answer_tokens"])
        return cls["CEU"].compute_loss(ns, model, inputs), extra
    if method == "pdu":
        logged = {}
        ns = types.SimpleNamespace(
            gamma=hp["gamma"],
            alpha=hp["alpha"],
            retain_loss_type="NLL",
            ref_model=None,
            preferences=[hp["gamma"], hp["alpha"]],
            retain_loss_eps=hp["retain_loss_eps"],
            primal_dual=True,
            dual_step_size=hp["dual_step_size"],
            dual_update_upon="step",
            can_update=True,
            loss_names=["forget_loss", "retain_loss"],
            log=logged.update,
        )
        _bind(ns, cls["GradDiff"], "compute_retain_loss")
        _bind(ns, cls["PDU"], "final_loss_value")
        loss = cls["PDU"].compute_loss(ns, model, inputs)
        extra = {"lambda_after": float(ns.preferences[1]), **{k: float(v) for k, v in logged.items()}}
        return loss, extra
    if method == "altpo":
        ns = types.SimpleNamespace(
            gamma=hp["gamma"], alpha=hp["alpha"], beta=hp["beta"], retain_loss_type="NLL", ref_model=ref
        )
        _bind(ns, cls["GradDiff"], "compute_retain_loss")
        return cls["DPO"].compute_loss(ns, model, inputs), extra
    raise ValueError(method)


def ou_side(inputs_path: Path, out_dir: Path, ou_src: Path) -> None:
    torch.set_num_threads(1)
    info = _ou_import(ou_src)
    cls = info.pop("classes")
    from transformers import AutoModelForCausalLM

    spec = torch.load(inputs_path)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir_ou"], torch_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(spec["ref_dir_ou"], torch_dtype=torch.float32)
    model.train()
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    out_dir.mkdir(parents=True, exist_ok=True)
    for case in spec["cases"]:
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        start = time.time()
        loss, extra = _ou_loss(case, spec, model, ref, cls)
        loss.backward()
        grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
        torch.save(
            {"loss": float(loss.detach()), "grads": grads, "extra": extra, "seconds": time.time() - start, "env": info},
            out_dir / f"{case['id']}.pt",
        )
        print(f"ou-side {case['id']}: loss {float(loss.detach()):.8g} ({time.time() - start:.1f} s)", flush=True)


# =============================================================================== baldro's side: inputs
def prepare_models(source: str, work: Path, perturb: float, seed: int) -> dict:
    """The reference (the original weights) and the trained model (a seeded perturbation of them), saved by
    this transformers and laid out as transformers 4.45.1 reads them (prepare.py's model view)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(HERE))
    from prepare import model_view

    if source == "tiny":
        from baldro.data.tofu import load_split
        from baldro.models.tiny import build_tiny_model

        src = work / "tiny-src"
        if not (src / "config.json").exists():  # as tests/conftest.py's tiny_model_dir
            texts = []
            for name in ("full", "holdout10", "real_authors_perturbed", "world_facts_perturbed"):
                for row in load_split(TOFU, name)[:400]:
                    texts += [row["question"], row["answer"]]
            build_tiny_model(src, texts, preset="test", vocab_size=512, seed=0)
    elif source == "smollm2":
        from baldro.models.sources import resolve_model_path

        src = Path(resolve_model_path("package:smollm2-135m-instruct"))
    else:
        src = Path(source)
    tok = AutoTokenizer.from_pretrained(src)
    out = {}
    for name in ("ref", "model"):
        folder = work / name
        if not (folder / "model.safetensors").exists():
            m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            if name == "model":
                g = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    for p in m.parameters():
                        scale = float(p.std()) if p.numel() > 1 else 0.0
                        p.add_(perturb * (scale if scale > 0 else 1.0) * torch.randn(p.shape, generator=g))
            m.save_pretrained(folder, safe_serialization=True)
            tok.save_pretrained(folder)
        model_view(folder, work / f"{name}-ou")
        out[name], out[f"{name}_ou"] = folder, work / f"{name}-ou"
    out["source"] = str(src)
    return out


TOFU = ROOT.parent / "shared" / "data" / "tofu"


def _collate(encoded, pad_id) -> dict:
    from baldro.data.formatting import collate_encoded

    return collate_encoded(encoded, pad_id)


def first_equal(encoded, batch_size: int, what: str) -> list[int]:
    """The first B samples (in file order) that share an answer length, with prompts of several lengths."""
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        group = by_len.setdefault(sum(1 for x in e.labels if x != IGNORE), [])
        group.append(i)
        if len(group) == batch_size and len({encoded[j].prompt_len for j in group}) > 1:
            return group
    raise SystemExit(f"no {batch_size} {what} samples share an answer length")


def build_batches(tok, batch_size: int, model, seed: int, max_new_tokens: int) -> tuple[dict, dict]:
    """The three batch kinds (forget, retain, alternate parts) and what they hold."""
    from baldro.data.formatting import EncodedQA, QAFormatter
    from baldro.data.tofu import load_split
    from baldro.train.alternates import generate_alternates

    fmt = QAFormatter(tok, max_length=512)
    forget_rows, retain_rows = load_split(TOFU, "forget10"), load_split(TOFU, "retain90")
    encoded = fmt.encode_many([r["question"] for r in forget_rows], [r["answer"] for r in forget_rows], "forget")
    n_answer = [sum(1 for x in e.labels if x != IGNORE) for e in encoded]
    equal_idx = first_equal(encoded, batch_size, "forget10")
    tofu_idx = list(range(batch_size))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    retain_enc = fmt.encode_many([r["question"] for r in retain_rows], [r["answer"] for r in retain_rows], "retain")
    retain_equal_idx = first_equal(retain_enc, batch_size, "retain90")
    retain = _collate(retain_enc[:batch_size], pad)  # the ordinary batch (tofu kind)
    retain_equal = _collate([retain_enc[i] for i in retain_equal_idx], pad)  # one answer length (equal, full)
    # AltPO's alternates: sampled (temperature 1) by the reference model, as baldro's alternates.py does
    wanted = sorted(set(equal_idx) | set(tofu_idx))
    alts = generate_alternates(
        model,
        tok,
        fmt,
        [forget_rows[i] for i in wanted],
        n=1,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        batch_size=len(wanted),
        seed=seed,
    )
    alt_of = {i: a[0] for i, a in zip(wanted, alts)}

    def alternate(idx):
        return _collate(
            fmt.encode_many([forget_rows[i]["question"] for i in idx], [alt_of[i] for i in idx], "alternate"), pad
        )

    full_len = min(len(encoded[i].input_ids) for i in tofu_idx)
    full_forget = [
        EncodedQA(encoded[i].input_ids[:full_len], [IGNORE] + encoded[i].input_ids[1:full_len], 0) for i in tofu_idx
    ]
    batches = {
        "equal": {
            "forget": _collate([encoded[i] for i in equal_idx], pad),
            "retain": retain_equal,
            "alternate": alternate(equal_idx),
        },
        "full": {"forget": _collate(full_forget, pad), "retain": retain_equal, "alternate": alternate(tofu_idx)},
        "tofu": {
            "forget": _collate([encoded[i] for i in tofu_idx], pad),
            "retain": retain,
            "alternate": alternate(tofu_idx),
        },
    }
    info = {
        kind: {
            "forget_rows": idx,
            "answer_tokens": [n_answer[i] for i in idx],
            "prompt_tokens": [encoded[i].prompt_len for i in idx],
            "width": int(batches[kind]["forget"]["input_ids"].shape[1]),
        }
        for kind, idx in (("equal", equal_idx), ("tofu", tofu_idx))
    }
    info["full"] = {"forget_rows": tofu_idx, "length": full_len, "answer_tokens": [full_len - 1] * batch_size}
    info["retain_tofu"] = {
        "retain_rows": list(range(batch_size)),
        "answer_tokens": (retain["labels"] != IGNORE).sum(-1).tolist(),
    }
    info["retain_equal"] = {
        "retain_rows": retain_equal_idx,
        "answer_tokens": (retain_equal["labels"] != IGNORE).sum(-1).tolist(),
    }
    info["alternates"] = {str(i): alt_of[i] for i in wanted}
    return batches, info


def shift_left(labels: torch.Tensor) -> torch.Tensor:
    """Labels moved one position left (-100 last): the unshifted mask then marks the positions that predict."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], 1)


def ou_inputs(case: dict, batch: dict) -> dict:
    """The exact inputs OpenUnlearning's compute_loss receives (its collator's dict layout)."""

    def part(name, labels=None):
        b = batch[name]
        return {
            "input_ids": b["input_ids"],
            "attention_mask": b["attention_mask"],
            "labels": b["labels"] if labels is None else labels,
        }

    forget = part("forget", shift_left(batch["forget"]["labels"]) if case["ou_labels"] == "shifted" else None)
    if case["method"] == "altpo":
        return {"forget": {"original": forget, "alternate": part("alternate")}, "retain": part("retain")}
    return {"forget": forget, "retain": part("retain")}


# =============================================================================== baldro's side: losses
@contextlib.contextmanager
def flat_token_log_probs():
    """baldro's `token_log_probs` (as `forward_parts` calls it) with its cross-entropy taken over [N, V] rows
    (the class dimension last, as transformers' own loss takes it) instead of the [B, V, T] layout: on the CPU,
    torch's fp32 log-softmax over the middle dimension of a 3-D tensor is the less accurate of the two."""
    import torch.nn.functional as F

    import baldro.train.forward as forward_module
    from baldro.train.sequence import TokenLogProbs, shift_for_next_token

    def flat(logits, labels):
        logits, labels = shift_for_next_token(logits, labels)
        mask = labels != IGNORE
        ce = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.masked_fill(~mask, 0).reshape(-1), reduction="none"
        ).view_as(labels)
        return TokenLogProbs(token_logp=(-ce).masked_fill(~mask, 0.0), mask=mask)

    original = forward_module.token_log_probs
    forward_module.token_log_probs = flat
    try:
        yield
    finally:
        forward_module.token_log_probs = original


def baldro_loss(
    method: str,
    model,
    ref,
    batch: dict,
    steering: torch.Tensor,
    module_regex: str,
    hypothesis: str | None = None,
    flat_nll: bool = False,
) -> tuple[torch.Tensor, dict]:
    """gamma * mean(l) + alpha * R (PDU: + lambda (R - eps)) from baldro's pieces; `hypothesis` computes the
    same objective with the reduction or positions SPEC 2b says OpenUnlearning uses; `flat_nll` takes the NLL
    retain loss's (and the control's) token log-probs over [N, V] rows, as transformers' loss (which
    OpenUnlearning's NLL retain loss is) does."""
    nll_layout = flat_token_log_probs if flat_nll else contextlib.nullcontext
    from baldro.train import weighting
    from baldro.train.forward import forward_parts
    from baldro.train.objectives import (
        ForgetInputs,
        PrimalDual,
        RetainInputs,
        find_module,
        get_objective,
        get_retain_loss,
    )
    from baldro.train.sequence import AnswerHidden

    forget = dict(batch["forget"])
    if method == "control_nll":
        with nll_layout():
            out = forward_parts(model, forget)
        return get_retain_loss("nll").fn(RetainInputs(out.token_lp)), {}
    hp = METHODS[method]
    if hypothesis == "all_positions":  # every position predicts a label; -100 read as id V-100
        v = model.config.vocab_size
        forget["labels"] = forget["labels"].masked_fill(forget["labels"] == IGNORE, v + IGNORE)
    elif hypothesis == "own_positions":  # one padding column more, labels one to the right
        forget = {
            k: torch.cat([t, torch.full_like(t[:, :1], IGNORE if k == "labels" else 0)], 1) for k, t in forget.items()
        }
        forget["labels"] = torch.cat([torch.full_like(forget["labels"][:, :1], IGNORE), forget["labels"][:, :-1]], 1)
    obj = get_objective(method)
    needs = obj.needs
    module = find_module(model, module_regex)[1] if needs.hidden else None
    out = forward_parts(model, forget, token_logp=needs.token_logp, logits=needs.logits, hidden_module=module)
    x = ForgetInputs(out.token_lp, logits=out.logits, hidden=out.hidden, steering=steering if needs.steering else None)
    with torch.no_grad():
        if needs.reference:
            x.forget_ref_logp = forward_parts(ref, forget).token_lp.logp
        if needs.reference_logits:
            x.ref_logits = forward_parts(ref, forget, token_logp=False, logits=True).logits.values
    if needs.alternate:
        x.alternate = forward_parts(model, batch["alternate"]).token_lp
        with torch.no_grad():
            x.alternate_ref_logp = forward_parts(ref, batch["alternate"]).token_lp.logp
    args = {k: hp[k] for k in obj.defaults if k in hp}
    losses = obj(x, **args)
    if hypothesis == "broadcast":  # RMU: mean_i(S_i) mean_j(1/n_j), S_i = n_i l_i
        n = torch.bincount(out.hidden.rows, minlength=out.hidden.n_rows).float()
        forget_value = (losses * n).mean() * (1.0 / n).mean()
    elif hypothesis in ("token_mean", "own_positions"):  # weights n_i / sum n: the batch token mean
        rows = out.logits
        keep = rows.position >= int(hp.get("ignore_first_n_answer_tokens", 0)) if method == "ceu" else None
        counts = torch.bincount(rows.rows if keep is None else rows.rows[keep], minlength=rows.n_rows).float()
        forget_value = (losses * counts).sum() / counts.sum()
    else:
        forget_value = weighting.mean(losses).value
    parts = {"forget": float(forget_value.detach()), "per_sample": losses.detach().tolist()}
    if hp["retain"] is None:
        return hp["gamma"] * forget_value, parts
    rl = get_retain_loss(hp["retain"])
    retain = batch["retain"]
    rmod = find_module(model, module_regex)[1] if rl.needs.hidden else None
    with nll_layout():
        rout = forward_parts(model, retain, token_logp=rl.needs.token_logp, logits=rl.needs.logits, hidden_module=rmod)
    rx = RetainInputs(rout.token_lp, logits=rout.logits, hidden=rout.hidden)
    if rl.needs.reference_hidden:
        with torch.no_grad():
            rx.ref_hidden = forward_parts(
                ref, retain, token_logp=False, hidden_module=find_module(ref, module_regex)[1]
            ).hidden.values
    if hypothesis == "broadcast":  # the same reduction of EMBED_DIFF's per-sample values (baldro's function per row)
        h = rx.hidden
        values = []
        for j in range(h.n_rows):
            sel = h.rows == j
            one = AnswerHidden(h.values[sel], torch.zeros_like(h.rows[sel]), h.position[sel], 1)
            values.append(rl.fn(RetainInputs(hidden=one, ref_hidden=rx.ref_hidden[sel])))
        n = torch.bincount(h.rows, minlength=h.n_rows).float()
        r = (torch.stack(values) * n).mean() * (1.0 / n).mean()
    else:
        r = rl.fn(rx)
    parts["retain"] = float(r.detach())
    if method == "pdu":
        pd = PrimalDual(hp["alpha"], hp["retain_loss_eps"], step_size=hp["dual_step_size"], update_upon="step")
        total = hp["gamma"] * forget_value + pd.term(r)
        pd.ascend(float(r.detach()))
        parts["lambda_after"] = pd.lam
        return total, parts
    return hp["gamma"] * forget_value + hp["alpha"] * r, parts


@torch.no_grad()
def layout_check(model, batch: dict) -> dict:
    """Per-token NLL of the answer tokens from baldro's `token_log_probs` ([B, V, T] cross-entropy) and from the
    [N, V] layout, both fp32, against fp64 (the same logits), on one batch."""
    from baldro.train.sequence import token_log_probs

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    exact = -logits[:, :-1].double().log_softmax(-1).gather(-1, labels.masked_fill(~mask, 0)[..., None])[..., 0][mask]
    out = {"tokens": int(mask.sum()), "mean_nll_fp64": float(exact.mean())}
    with flat_token_log_probs():
        import baldro.train.forward as forward_module

        flat = -forward_module.token_log_probs(logits, batch["labels"]).token_logp[mask]
    for name, nll in (("baldro_BVT", -token_log_probs(logits, batch["labels"]).token_logp[mask]), ("flat_NV", flat)):
        out[f"{name}_max_abs_err"] = float((nll.double() - exact).abs().max())
        out[f"{name}_mean_nll"] = float(nll.double().mean())
    return out


def make_trainer(method: str, model, ref, steering, module_regex: str, batch_size: int, out_dir: Path):
    """baldro's UnlearnTrainer for the method (weighting mean), for the compute_loss cross-check."""
    from transformers import TrainingArguments

    from baldro.train.objectives import PrimalDual, get_objective, get_retain_loss
    from baldro.train.trainers import UnlearnTrainer
    from baldro.train.weighting import make_weighting

    hp = METHODS[method]
    args = TrainingArguments(
        output_dir=str(out_dir),
        use_cpu=True,
        report_to="none",
        seed=0,
        disable_tqdm=True,
        per_device_train_batch_size=batch_size,
        remove_unused_columns=False,
    )
    pd = None
    if method == "pdu":
        pd = PrimalDual(hp["alpha"], hp["retain_loss_eps"], step_size=hp["dual_step_size"], update_upon="step")
    obj = get_objective(method)
    trainer = UnlearnTrainer(
        model=model,
        args=args,
        objective=obj,
        objective_args={k: hp[k] for k in obj.defaults if k in hp},
        weighting=make_weighting("mean"),
        retain_loss=get_retain_loss(hp["retain"] or "nll"),
        gamma=hp["gamma"],
        alpha=hp["alpha"],
        ref_model=ref,
        ref_cache=False,
        module_regex=module_regex,
        primal_dual=pd,
    )
    if trainer.steering is not None:
        trainer.steering = steering
    return trainer


def trainer_inputs(method: str, batch: dict) -> dict:
    b = len(batch["forget"]["input_ids"])
    inputs = {"forget_ids": torch.arange(b)}
    parts = (
        ["forget"] + (["retain"] if METHODS[method]["retain"] else []) + (["alternate"] if method == "altpo" else [])
    )
    for part in parts:
        inputs.update({f"{part}_{k}": v for k, v in batch[part].items()})
    if method == "altpo":
        inputs["alt_ids"] = torch.arange(b)
    return inputs


def grads_of(model) -> dict:
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def run_backward(model, fn):
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    loss, parts = fn()
    loss.backward()
    return float(loss.detach()), grads_of(model), parts


def compare(loss_a: float, grads_a: dict, loss_b: float, grads_b: dict) -> dict:
    """a against b (b the baseline): loss |a-b|/|b|; per parameter max|a-b| / max|b|, its max over parameters;
    entries beyond rtol/atol; parameters missing on one side."""
    names = sorted(set(grads_a) | set(grads_b))
    worst, worst_name, beyond, total, missing = 0.0, None, 0, 0, []
    for n in names:
        if n not in grads_a or n not in grads_b:
            missing.append(n)
            continue
        a, b = grads_a[n], grads_b[n]
        if a is None and b is None:
            continue
        ref = b if b is not None else torch.zeros_like(a)
        a = a if a is not None else torch.zeros_like(b)
        diff = (a - ref).abs()
        scale = float(ref.abs().max())
        rel = float(diff.max()) / scale if scale > 0 else (0.0 if float(diff.max()) == 0 else float("inf"))
        if rel > worst:
            worst, worst_name = rel, n
        beyond += int((diff > ATOL + RTOL * ref.abs()).sum())
        total += ref.numel()
    return {
        "loss_rel_diff": abs(loss_a - loss_b) / abs(loss_b) if loss_b else abs(loss_a - loss_b),
        "grad_rel_diff": worst,
        "grad_worst_param": worst_name,
        "entries_beyond": beyond,
        "entries": total,
        "missing_params": missing,
    }


def within(c: dict) -> bool:
    return c["loss_rel_diff"] <= TARGET and c["grad_rel_diff"] <= TARGET and not c["missing_params"]


# =============================================================================== driver
def run_model(name: str, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baldro.train.objectives import default_module_regex, steering_vector

    work = Path(args.work) / "methods_parity" / name
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare_models(name, work, args.perturb, args.seed)
    tok = AutoTokenizer.from_pretrained(paths["ref"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(paths["ref"], dtype=torch.float32)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    batches, batch_info = build_batches(tok, args.batch_size, ref, args.seed, args.alt_tokens)
    layout = layout_check(model, batches["tofu"]["forget"])
    print("token log-prob layout check:", layout, flush=True)
    model.train()
    steering = steering_vector(model.config.hidden_size, args.seed)
    module_regex = default_module_regex(model.config.num_hidden_layers)
    cases = [c for c in case_list() if not args.methods or c["method"] in args.methods or c["method"] == "control_nll"]
    results = []
    by_method: dict[str, list[dict]] = {}
    for c in cases:
        by_method.setdefault(c["method"], []).append(c)
    for method, group in by_method.items():
        spec = {
            "model_dir_ou": str(paths["model_ou"]),
            "ref_dir_ou": str(paths["ref_ou"]),
            "steering": steering,
            "module_regex": module_regex,
            "cases": [{**c, "ou_inputs": ou_inputs(c, batches[c["kind"]])} for c in group],
        }
        inputs_path, out_dir = work / f"inputs-{method}.pt", work / f"ou-{method}"
        torch.save(spec, inputs_path)
        cmd = [
            args.ou_python,
            str(Path(__file__).resolve()),
            "--ou-side",
            "--inputs",
            str(inputs_path),
            "--out",
            str(out_dir),
            "--ou-src",
            str(Path(args.work) / "open-unlearning" / "src"),
        ]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONNOUSERSITE": "1",
        }
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env, cwd=str(ROOT))
        trainer = (
            make_trainer(method, model, ref, steering, module_regex, args.batch_size, work / "trainer")
            if method != "control_nll" and not args.no_trainer_check
            else None
        )
        for c in group:
            batch = batches[c["kind"]]
            ou = torch.load(out_dir / f"{c['id']}.pt")
            start = time.time()
            b_loss, b_grads, b_parts = run_backward(
                model, lambda: baldro_loss(method, model, ref, batch, steering, module_regex)
            )
            row = {k: c[k] for k in ("id", "method", "kind", "ou_labels", "expect", "cause", "hypothesis")}
            row.update(
                ou_loss=ou["loss"],
                baldro_loss=b_loss,
                ou_extra=ou["extra"],
                baldro_parts=b_parts,
                ou_env=ou["env"],
                **compare(ou["loss"], ou["grads"], b_loss, b_grads),
            )
            if "lambda_after" in ou["extra"]:
                row["lambda_after_rel_diff"] = abs(ou["extra"]["lambda_after"] - b_parts["lambda_after"]) / max(
                    abs(b_parts["lambda_after"]), 1e-30
                )
            uses_nll = method == "control_nll" or METHODS[method]["retain"] == "nll"
            if c["expect"] == "agree" and not within(row) and uses_nll:
                f_loss, f_grads, _ = run_backward(
                    model, lambda: baldro_loss(method, model, ref, batch, steering, module_regex, flat_nll=True)
                )
                row["flat_nll"] = compare(ou["loss"], ou["grads"], f_loss, f_grads)
            if trainer is not None:  # the trainer's compute_loss on the same batch, against the pieces

                def trainer_loss():
                    loss = trainer.compute_loss(model, trainer_inputs(method, batch))
                    return loss, {}

                t_loss, t_grads, _ = run_backward(model, trainer_loss)
                row["trainer_vs_pieces"] = compare(t_loss, t_grads, b_loss, b_grads)
                if trainer.primal_dual is not None:
                    trainer.dual_step_end()
                    row["trainer_lambda_after"] = trainer.primal_dual.lam
                    row["trainer_lambda_rel_diff"] = abs(ou["extra"]["lambda_after"] - trainer.primal_dual.lam) / max(
                        abs(trainer.primal_dual.lam), 1e-30
                    )
                    trainer.primal_dual.lam = METHODS["pdu"]["alpha"]  # the next case starts from alpha again
            if c["hypothesis"]:
                h_loss, h_grads, h_parts = run_backward(
                    model,
                    lambda: baldro_loss(method, model, ref, batch, steering, module_regex, hypothesis=c["hypothesis"]),
                )
                row["hypothesis_loss"] = h_loss
                row["ou_vs_hypothesis"] = compare(ou["loss"], ou["grads"], h_loss, h_grads)
                if not within(row["ou_vs_hypothesis"]) and METHODS[method]["retain"] == "nll":
                    h_loss, h_grads, _ = run_backward(
                        model,
                        lambda: baldro_loss(
                            method, model, ref, batch, steering, module_regex, hypothesis=c["hypothesis"], flat_nll=True
                        ),
                    )
                    row["ou_vs_hypothesis_flat_nll"] = compare(ou["loss"], ou["grads"], h_loss, h_grads)
            row["agrees"] = within(row)
            row["verdict"] = verdict(row)
            row["baldro_seconds"] = time.time() - start
            results.append(row)
            print(
                f"{row['id']}: OU {row['ou_loss']:.8g} baldro {row['baldro_loss']:.8g} loss rel "
                f"{row['loss_rel_diff']:.2e} grad rel {row['grad_rel_diff']:.2e} beyond "
                f"{row['entries_beyond']}/{row['entries']} -> {row['verdict']}",
                flush=True,
            )
            (out_dir / f"{c['id']}.pt").unlink()
        out_dir.rmdir()
        inputs_path.unlink()
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "source": paths["source"],
        "parameters": n_params,
        "batch_size": args.batch_size,
        "module_regex": module_regex,
        "perturb": args.perturb,
        "seed": args.seed,
        "batches": batch_info,
        "nll_layout_check": layout,
        "baldro_env": {"torch": str(torch.__version__), "transformers": str(__import__("transformers").__version__)},
        "cases": results,
    }


FLAT_NOTE = " with baldro's NLL log-probs over [N, V] rows"


def verdict(row: dict) -> str:
    if row["expect"] == "agree":
        if row["agrees"]:
            return "agrees"
        return "agrees" + FLAT_NOTE if "flat_nll" in row and within(row["flat_nll"]) else "DISAGREES"
    if row["agrees"]:
        return "agrees (difference expected but not seen)"
    if "ou_vs_hypothesis" in row and within(row["ou_vs_hypothesis"]):
        return "differs, cause confirmed"
    if "ou_vs_hypothesis_flat_nll" in row and within(row["ou_vs_hypothesis_flat_nll"]):
        return "differs, cause confirmed" + FLAT_NOTE
    return "differs, cause NOT confirmed"


def fmt_e(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def write_md(report: dict, path: Path) -> None:
    lines = [
        f"# OpenUnlearning's methods against baldro's (OpenUnlearning {OU_COMMIT})",
        "",
        "Written by `benchmarks/openunlearning/methods_parity.py`; see `benchmarks/RESULTS.md` for the commands.",
        f"Loss and the gradient of every parameter from OpenUnlearning's `compute_loss` (its venv, "
        "transformers 4.45.1) against baldro's objective under `weighting=mean` (main environment). "
        f"Target: loss and largest gradient difference (max over parameters of max|g_OU - g_baldro| / "
        f"max|g_baldro|) within {TARGET:g} relative; entries beyond: gradient entries with "
        f"|g_OU - g_baldro| > {ATOL:g} + {RTOL:g} |g_baldro|. 'cause confirmed': OpenUnlearning matches "
        f"baldro's objective under SPEC 2b's stated reduction/positions to {TARGET:g}.",
        "",
    ]
    for m in report["models"]:
        lines += [
            f"## {m['model']} ({m['parameters']:,} parameters, B = {m['batch_size']}, module `{m['module_regex']}`)",
            "",
            "| method | batch kind | OU labels | loss rel diff | largest grad rel diff | entries beyond "
            "tolerance | verdict | OU vs stated cause (loss / grad) | cause | with NLL log-probs over [N, V] "
            "(loss / grad) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in m["cases"]:
            hyp = r.get("ou_vs_hypothesis")
            hyp_txt = f"{fmt_e(hyp['loss_rel_diff'])} / {fmt_e(hyp['grad_rel_diff'])}" if hyp else ""
            flat = r.get("flat_nll") or r.get("ou_vs_hypothesis_flat_nll")
            flat_txt = f"{fmt_e(flat['loss_rel_diff'])} / {fmt_e(flat['grad_rel_diff'])}" if flat else ""
            labels = r["ou_labels"] if r["method"] == "pdu" else ""
            lines.append(
                f"| {r['method']} | {KIND_TEXT[r['kind']]} | {labels} | {fmt_e(r['loss_rel_diff'])} | "
                f"{fmt_e(r['grad_rel_diff'])} | {r['entries_beyond']:,} / {r['entries']:,} | {r['verdict']} "
                f"| {hyp_txt} | {r['cause']} | {flat_txt} |"
            )
        trainer = [r["trainer_vs_pieces"] for r in m["cases"] if "trainer_vs_pieces" in r]
        dual = [r for r in m["cases"] if "lambda_after_rel_diff" in r]
        b = m["batches"]
        lay = m["nll_layout_check"]
        lines += [
            "",
            f"- Token NLL layout (the TOFU forget batch, {lay['tokens']} answer tokens, same fp32 logits): "
            f"baldro's `token_log_probs` (cross-entropy over [B, V, T]) max abs error against fp64 "
            f"{lay['baldro_BVT_max_abs_err']:.1e} nats, mean NLL {lay['baldro_BVT_mean_nll']:.7f}; over [N, V] "
            f"rows {lay['flat_NV_max_abs_err']:.1e}, {lay['flat_NV_mean_nll']:.7f}; fp64 "
            f"{lay['mean_nll_fp64']:.7f}.",
            f"- Batches: equal = forget10 rows {b['equal']['forget_rows']} ({b['equal']['answer_tokens'][0]} "
            f"answer tokens each, prompts of {b['equal']['prompt_tokens']} tokens) with retain90 rows "
            f"{b['retain_equal']['retain_rows']} ({b['retain_equal']['answer_tokens'][0]} answer tokens each); "
            f"full = forget10 rows {b['full']['forget_rows']} cut to {b['full']['length']} tokens, with the same "
            f"retain rows; TOFU = forget10 rows {b['tofu']['forget_rows']} (answers of "
            f"{b['tofu']['answer_tokens']} tokens) with retain90 rows {b['retain_tofu']['retain_rows']} "
            f"({b['retain_tofu']['answer_tokens']} tokens). The trained model is the reference plus "
            f"{m['perturb']:g} x (each tensor's std) x N(0, 1) noise (seed {m['seed']}).",
            "- `control_nll`: OpenUnlearning's GradDiff NLL (transformers 4.45.1's own loss) against baldro's "
            "token-mean NLL on the TOFU forget batch: the floor set by the two transformers versions.",
            f"- baldro's `UnlearnTrainer.compute_loss` (weighting mean) against the pieces above, every case: "
            f"largest loss rel diff {fmt_e(max(t['loss_rel_diff'] for t in trainer))}, largest grad rel diff "
            f"{fmt_e(max(t['grad_rel_diff'] for t in trainer))}."
            if trainer
            else "- baldro's `UnlearnTrainer.compute_loss` cross-check: not run for this model (--no-trainer-check).",
            f"- PDU's dual variable after the step's update (OpenUnlearning's `preferences[1]` against baldro's "
            f"`PrimalDual.ascend`, then the trainer's `dual_step_end`): largest rel diff "
            f"{fmt_e(max(r['lambda_after_rel_diff'] for r in dual))} / "
            f"{fmt_e(max(r.get('trainer_lambda_rel_diff', 0) for r in dual))}."
            if dual
            else "",
            "",
        ]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ou-side", action="store_true", help="OpenUnlearning's side (run in its venv)")
    ap.add_argument("--inputs", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--ou-src", type=Path, default=DEFAULT_WORK / "open-unlearning" / "src")
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | a model folder")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--methods", nargs="*", help="only these methods (default all)")
    ap.add_argument("--work", default=str(DEFAULT_WORK))
    ap.add_argument("--ou-python", default=str(DEFAULT_WORK / "venv" / "bin" / "python"))
    ap.add_argument("--perturb", type=float, default=0.1, help="the trained model = reference + this * std * noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alt-tokens", type=int, default=32, help="max new tokens of the generated alternates")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "openunlearning_methods_parity.json")
    ap.add_argument("--md", type=Path, default=ROOT / "benchmarks" / "results" / "openunlearning_methods_parity.md")
    ap.add_argument("--merge", action="store_true", help="keep the other models already in --json")
    ap.add_argument(
        "--no-trainer-check",
        action="store_true",
        help="skip the UnlearnTrainer.compute_loss cross-check (it doubles baldro's side)",
    )
    args = ap.parse_args()
    if args.ou_side:
        ou_side(args.inputs, args.out, args.ou_src)
        return
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    start = time.time()
    result = run_model(args.model, args)
    result["seconds"] = round(time.time() - start, 1)
    report = {
        "openunlearning_commit": OU_COMMIT,
        "target_rel": TARGET,
        "rtol": RTOL,
        "atol": ATOL,
        "hyperparameters": METHODS,
        "models": [],
    }
    if args.merge and args.json.exists():
        report["models"] = [m for m in json.loads(args.json.read_text())["models"] if m["model"] != args.model]
    report["models"].append(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    write_md(report, args.md)
    bad = [r["id"] for r in result["cases"] if r["verdict"] in ("DISAGREES", "differs, cause NOT confirmed")]
    result["no_trainer_check"] = args.no_trainer_check
    print(f"{args.model}: {len(result['cases'])} cases, {len(bad)} unexplained: {bad} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
