"""Training at lower cost with the same math: the reference log-prob cache and group's no-grad selection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import KillAfterStep, Killed, base
from transformers import AutoModelForCausalLM, TrainingArguments

from baldro.recipes.config import load_config
from baldro.recipes.unlearn import run_unlearn
from baldro.train.batching import UnlearnCollator, batch_part
from baldro.train.objectives import get_objective, get_retain_loss
from baldro.train.reference import ReferenceCache
from baldro.train.trainers import UnlearnTrainer
from baldro.train.weighting import GroupWeighting, make_weighting

ROOT = Path(__file__).resolve().parents[1]
UNLEARN = ROOT / "configs" / "unlearn" / "tofu.yaml"
DEVICE = os.environ.get("BALDRO_TEST_DEVICE", "cpu")  # benchmarks/gpu_check.sh runs the trainer tests on cuda


# ------------------------------------------------------------------ the cache on its own
def test_reference_cache_lookup_store_and_merge(tmp_path):
    cache = ReferenceCache(5)
    ids = torch.tensor([3, 1])
    assert cache.lookup("forget", ids) is None
    values = torch.tensor([-1.25, -7.5])
    cache.store("forget", ids, values)
    assert torch.equal(cache.lookup("forget", ids), values)
    assert cache.lookup("forget", torch.tensor([1, 2])) is None  # 2 not seen yet
    assert cache.lookup("refusal", ids) is None  # parts are separate
    cache.save(tmp_path, rank=0)
    other = ReferenceCache(5)
    other.store("forget", torch.tensor([0]), torch.tensor([-3.0]))
    other.save(tmp_path, rank=1)
    merged = ReferenceCache(5)
    assert merged.load(tmp_path) == 2
    assert torch.equal(merged.lookup("forget", torch.tensor([0, 1, 3])), torch.tensor([-3.0, -7.5, -1.25]))
    assert ReferenceCache(6).load(tmp_path) == 2 and ReferenceCache(6).n_known() == 0  # another forget set
    # pad rows of a run of several processes (id -1) are never cached nor answered
    cache.store("forget", torch.tensor([-1, 4]), torch.tensor([-9.0, -2.0]))
    assert cache.known["forget"].tolist() == [False, True, False, True, True]
    assert torch.equal(cache.lookup("forget", torch.tensor([4])), torch.tensor([-2.0]))
    assert cache.lookup("forget", torch.tensor([4, -1])) is None


def test_a_global_batch_group_runs_in_one_pass():
    w = make_weighting("group", n_samples=8, global_batch=True)
    assert w.preselect is None and make_weighting("group", n_samples=8).preselect == "nograd"


# ------------------------------------------------------------------ in a trainer
def _trainer(model_dir, weighting, ref_cache=True, objective="npo", batch=None):
    from baldro.data.formatting import EncodedQA

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)

    def qa(n):
        ids = torch.randint(3, 200, (n,), generator=gen).tolist()
        return EncodedQA(input_ids=ids, labels=[-100] * 4 + ids[4:], prompt_len=4)

    forget = [qa(int(n)) for n in torch.randint(8, 20, (8,), generator=gen)]
    retain = [qa(12) for _ in range(8)]
    from baldro.train.batching import UnlearnDataset

    args = TrainingArguments(
        output_dir="/tmp/unused",
        use_cpu=DEVICE == "cpu",
        report_to="none",
        per_device_train_batch_size=4,
        remove_unused_columns=False,
        learning_rate=1e-3,
        disable_tqdm=True,
    )
    trainer = UnlearnTrainer(
        model=model,
        args=args,
        train_dataset=UnlearnDataset(forget, retain, seed=0),
        data_collator=UnlearnCollator(0),
        objective=get_objective(objective),
        weighting=weighting,
        retain_loss=get_retain_loss("nll"),
        ref_model=ref,
        ref_cache=ref_cache,
    )
    collate = UnlearnCollator(0)
    batch = collate([trainer.train_dataset[i] for i in (batch or [0, 5, 2, 7])])
    return trainer, {k: v.to(trainer.args.device) for k, v in batch.items()}


def _grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_cached_reference_logp_is_bitwise_the_fresh_one(tiny_model_dir):
    trainer, batch = _trainer(tiny_model_dir, make_weighting("mean"))
    forget, ids = batch_part(batch, "forget"), batch["forget_ids"]
    calls = []
    trainer.ref_model.register_forward_hook(lambda *a: calls.append(1))
    first = trainer._reference_logp(trainer.model, "forget", forget, ids)
    again = trainer._reference_logp(trainer.model, "forget", forget, ids)
    assert len(calls) == 1  # the second call read the cache
    fresh = trainer._forward(trainer.ref_model, forget).token_lp.logp
    assert torch.equal(first, fresh) and torch.equal(again, fresh)
    # the same samples in another batch (another padding width): equal up to float rounding
    other = {
        k: v.to(trainer.args.device) for k, v in UnlearnCollator(0)([trainer.train_dataset[i] for i in (5, 2)]).items()
    }
    fresh_other = trainer._forward(trainer.ref_model, batch_part(other, "forget")).token_lp.logp
    torch.testing.assert_close(
        trainer.ref_cache.lookup("forget", other["forget_ids"], fresh_other.device), fresh_other, rtol=1e-6, atol=1e-5
    )


def test_cache_off_computes_the_reference_every_step(tiny_model_dir):
    trainer, batch = _trainer(tiny_model_dir, make_weighting("mean"), ref_cache=False)
    assert trainer.ref_cache is None
    calls = []
    trainer.ref_model.register_forward_hook(lambda *a: calls.append(1))
    for _ in range(2):
        trainer.compute_loss(trainer.model, batch)
    assert len(calls) == 2
    # an objective without a reference keeps no cache
    assert _trainer(tiny_model_dir, make_weighting("mean"), objective="ga")[0].ref_cache is None


@pytest.mark.parametrize("hardness", ["loss", "nll"])
@pytest.mark.parametrize("selection", ["nograd", "twopass"])
def test_group_selection_passes_match_the_one_pass_gradients(tiny_model_dir, selection, hardness):
    one, batch = _trainer(tiny_model_dir, GroupWeighting(0.5, hardness=hardness, selection="onepass"))
    other, _ = _trainer(tiny_model_dir, GroupWeighting(0.5, hardness=hardness, selection=selection))
    loss_a, grads_a = _grads(one, batch)
    loss_b, grads_b = _grads(other, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)
    # the same rows: the per-step statistics (weights) agree
    assert torch.equal(one._accum[-1][3:], other._accum[-1][3:])


def test_group_selection_is_validated():
    with pytest.raises(Exception, match="selection must be one of"):
        GroupWeighting(selection="fast")


# ------------------------------------------------------------------ a run: epochs, resume
def _npo_run(model, tofu, out, *extra, callbacks=()):
    cfg = load_config(UNLEARN, [*base(model, tofu, out), "split=forget01", "objective=npo", "weighting=dv", *extra])
    return run_unlearn(cfg, extra_callbacks=list(callbacks))


class CountReferenceCalls:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1


def _hook_reference(monkeypatch, counter):
    original = UnlearnTrainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.ref_model.register_forward_hook(counter)

    monkeypatch.setattr(UnlearnTrainer, "__init__", init)


def test_the_cache_skips_later_epochs_and_keeps_the_run(tiny_model_dir, tofu_dir, tmp_path, monkeypatch):
    counter = CountReferenceCalls()
    _hook_reference(monkeypatch, counter)
    cached = _npo_run(tiny_model_dir, tofu_dir, tmp_path / "cached")  # 6 samples, batch 2, 2 epochs
    assert counter.calls == 3  # the first epoch's 3 batches only
    counter.calls = 0
    fresh = _npo_run(tiny_model_dir, tofu_dir, tmp_path / "fresh", "objective.ref_cache=false")
    assert counter.calls == 6
    a = load_file(cached / "model" / "model.safetensors")
    b = load_file(fresh / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_a_resumed_run_reads_the_cache_from_its_checkpoint(tiny_model_dir, tofu_dir, tmp_path, monkeypatch):
    counter = CountReferenceCalls()
    _hook_reference(monkeypatch, counter)
    whole = _npo_run(tiny_model_dir, tofu_dir, tmp_path / "whole")
    out = tmp_path / "resumed"
    with pytest.raises(Killed):  # dies after step 5 (the checkpoint of step 4 holds all 6 samples)
        _npo_run(tiny_model_dir, tofu_dir, out, callbacks=[KillAfterStep(5)])
    counter.calls = 0
    _npo_run(tiny_model_dir, tofu_dir, out, "resume=true")
    assert counter.calls == 0  # steps 5 and 6 used the cache from checkpoint-4
    assert (out / "model" / "model.safetensors").read_bytes() == (whole / "model" / "model.safetensors").read_bytes()


def test_recipes_flush_subnormal_floats_on_cpu_unless_told_not_to(tiny_model_dir):
    from baldro.recipes.common import load_model_and_tokenizer
    from baldro.recipes.schema import ModelConfig

    # the smallest subnormal float, made from its bits (a float conversion could already flush it);
    # one element, so the op runs on this thread, whose flag torch.set_flush_denormal sets
    subnormal = torch.ones(1, dtype=torch.int32).view(torch.float32)
    try:
        load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir), device="cpu", flush_denormal=False))
        assert float(subnormal * 1.0) > 0
        load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir), device="cpu"))  # the default
        if float(subnormal * 1.0) > 0 and not torch.set_flush_denormal(True):
            pytest.skip("this CPU has no flush-to-zero flag")
        assert float(subnormal * 1.0) == 0.0
    finally:
        torch.set_flush_denormal(False)
