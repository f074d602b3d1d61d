"""Balance metrics (SPEC section 6) on hand-made arrays, trajectory spread and the BalanceTracker callback."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import TrainerControl, TrainerState

from baldro.errors import BaldroError
from baldro.eval.balance import (
    BALANCE_KEYS,
    BalanceTracker,
    balance_from_eval_logs,
    balance_metrics,
    trajectory_spread,
)
from baldro.io import read_jsonl

PROB = [0.1, 0.2, 0.4, 0.8]
TR = [0.5, 1.0, 1.5, 3.0]
ROUGE = [0.5, 0.0, 1.0, 1.0]
TARGET = [200.0, 0.5, 0.5, 0.5]  # sample 0: 0.1 < 1e-3 * 200 -> over-forgotten by probability

# hand-computed: prob mean 0.375, squared deviations sum 0.2875 -> var 0.071875;
# linear-interpolation quartiles at positions 0.75 and 2.25: 0.175 and 0.5 -> IQR 0.325
PROB_STD = math.sqrt(0.071875)
PROB_IQR = 0.325
# TR mean 1.5, squared deviations 1 + 0.25 + 0 + 2.25 = 3.5 -> var 0.875; quartiles 0.875, 1.875
TR_STD = math.sqrt(0.875)
TR_IQR = 1.0


def test_balance_metrics_hand_computed():
    m = balance_metrics(PROB, TR, ROUGE, retain_prob_median=0.3, target_prob=TARGET)
    assert set(m) == set(BALANCE_KEYS) | {"balance_note"}
    assert m["balance_prob_std"] == pytest.approx(PROB_STD)
    assert m["balance_prob_iqr"] == pytest.approx(PROB_IQR)
    assert m["balance_tr_std"] == pytest.approx(TR_STD)
    assert m["balance_tr_iqr"] == pytest.approx(TR_IQR)
    assert m["balance_frac_remembered"] == pytest.approx(0.5)  # 0.4 and 0.8 > 0.3
    assert m["balance_frac_over_forgotten"] == pytest.approx(0.5)  # sample 0 (prob) + sample 1 (ROUGE 0)
    assert m["balance_note"] is None


def test_over_forgotten_each_criterion_alone():
    prob_only = balance_metrics(PROB, TR, None, 0.3, TARGET)
    assert prob_only["balance_frac_over_forgotten"] == pytest.approx(0.25)
    assert "only the probability criterion" in prob_only["balance_note"]
    rouge_only = balance_metrics(PROB, TR, ROUGE, 0.3, None)
    assert rouge_only["balance_frac_over_forgotten"] == pytest.approx(0.25)
    assert "only the ROUGE-L" in rouge_only["balance_note"]
    neither = balance_metrics(PROB, TR, None, None, None)
    assert neither["balance_frac_over_forgotten"] is None
    assert neither["balance_frac_remembered"] is None
    assert neither["balance_prob_std"] == pytest.approx(PROB_STD)


def test_over_forgotten_threshold_is_strict_and_both_criteria_count_once():
    # prob exactly 1e-3 * target is not over-forgotten; a sample flagged by both criteria counts once
    m = balance_metrics([1e-3, 1e-6], None, [1.0, 0.0], None, [1.0, 1.0])
    assert m["balance_frac_over_forgotten"] == pytest.approx(0.5)
    # remembered uses a strict inequality too
    assert balance_metrics([0.3, 0.31], retain_prob_median=0.3)["balance_frac_remembered"] == 0.5


def test_missing_values_are_left_out():
    m = balance_metrics([0.1, None, 0.3], [1.0, 2.0, None], [None, 0.0, 1.0], 0.2, [None, 1.0, 1.0])
    assert m["balance_prob_std"] == pytest.approx(0.1)  # over [0.1, 0.3]
    assert m["balance_tr_std"] == pytest.approx(0.5)
    assert m["balance_frac_remembered"] == pytest.approx(0.5)
    # sample 0: no target, no rouge -> not evaluable; sample 1: rouge 0 -> flagged; sample 2: neither fires
    assert m["balance_frac_over_forgotten"] == pytest.approx(0.5)
    assert "lack a target-model probability" in m["balance_note"]


def test_balance_metrics_errors():
    with pytest.raises(BaldroError, match="empty"):
        balance_metrics([])
    with pytest.raises(BaldroError, match="truth_ratio.*3 values.*prob.*4"):
        balance_metrics(PROB, [1.0, 2.0, 3.0])
    with pytest.raises(BaldroError, match="target_prob"):
        balance_metrics(PROB, target_prob=[1.0])
    with pytest.raises(BaldroError, match="one-dimensional"):
        balance_metrics(np.ones((2, 2)))
    with pytest.raises(BaldroError, match="list of numbers"):
        balance_metrics(["a", "b"])


def _eval_log(prob, tr=None, rouge=None):
    log = {
        "forget_Q_A_Prob": {
            "agg_value": float(np.mean(prob)),
            "value_by_index": {str(i): {"prob": p, "avg_loss": -math.log(p)} for i, p in enumerate(prob)},
        }
    }
    if tr is not None:
        log["forget_truth_ratio"] = {
            "agg_value": 0.5,
            "value_by_index": {str(i): {"score": t} for i, t in enumerate(tr)},
        }
    if rouge is not None:
        log["forget_Q_A_ROUGE"] = {
            "agg_value": 0.5,
            "value_by_index": {str(i): {"rougeL_recall": r, "rouge1_recall": r} for i, r in enumerate(rouge)},
        }
    log["model_utility"] = {"agg_value": 0.6}
    return log


def test_balance_from_eval_logs_matches_pure_function():
    log = _eval_log(PROB, TR, ROUGE)
    retain = _eval_log([0.2, 0.3, 0.4, 0.01])  # median 0.25 -> remembered: 0.4, 0.8
    target = _eval_log(TARGET)
    m = balance_from_eval_logs(log, retain, target)
    assert m == balance_metrics(PROB, TR, ROUGE, 0.25, TARGET)
    assert m["balance_frac_remembered"] == 0.5
    assert m["balance_frac_over_forgotten"] == 0.5


def test_balance_from_eval_logs_orders_indices_numerically_and_matches_target_by_index():
    log = _eval_log([0.1] * 12, rouge=[1.0] * 12)
    log["forget_Q_A_Prob"]["value_by_index"]["10"]["prob"] = 1e-9
    target = _eval_log([0.5] * 12)
    target["forget_Q_A_Prob"]["value_by_index"] = dict(
        reversed(list(target["forget_Q_A_Prob"]["value_by_index"].items()))
    )
    m = balance_from_eval_logs(log, None, target)
    assert m["balance_frac_over_forgotten"] == pytest.approx(1 / 12)


def test_balance_from_eval_logs_missing_references():
    log = _eval_log(PROB, TR, ROUGE)
    m = balance_from_eval_logs(log, None, None)
    assert m["balance_frac_remembered"] is None
    assert m["balance_frac_over_forgotten"] == pytest.approx(0.25)  # ROUGE criterion only
    assert "only the ROUGE-L" in m["balance_note"]
    assert m["balance_prob_iqr"] == pytest.approx(PROB_IQR)
    # references without the needed metric: None + note, no crash
    m = balance_from_eval_logs(_eval_log(PROB), {"model_utility": {"agg_value": 0.5}}, {})
    assert m["balance_frac_remembered"] is None and m["balance_frac_over_forgotten"] is None
    assert m["balance_tr_std"] is None
    assert "retain eval log has no per-sample forget_Q_A_Prob" in m["balance_note"]
    with pytest.raises(BaldroError, match="forget_Q_A_Prob"):
        balance_from_eval_logs({"model_utility": {"agg_value": 0.5}})


def test_trajectory_spread():
    rows = [
        {"step": 4, "ids": [0, 1, 2, 3], "nll": [-math.log(p) for p in PROB], "prob": PROB},
        {"step": 0, "ids": [0, 1], "nll": [0.0, math.log(2.0)]},  # prob from nll: [1.0, 0.5]
    ]
    out = trajectory_spread(rows)
    assert [r["step"] for r in out] == [0, 4]
    assert out[0]["prob_mean"] == pytest.approx(0.75)
    assert out[0]["prob_std"] == pytest.approx(0.25)
    assert out[0]["prob_iqr"] == pytest.approx(0.25)
    assert out[1] == pytest.approx({"step": 4, "prob_mean": 0.375, "prob_std": PROB_STD, "prob_iqr": PROB_IQR})
    assert trajectory_spread([]) == []
    with pytest.raises(BaldroError, match="step"):
        trajectory_spread([{"prob": [0.1]}])


class FakeModel:
    def __init__(self):
        self.training = True
        self.calls = 0

    def eval(self):
        self.training = False
        return self

    def train(self, mode=True):
        self.training = mode
        return self


def _run_fake_training(tracker, model, max_steps, world_zero=True):
    state = TrainerState(global_step=0, max_steps=max_steps, is_world_process_zero=world_zero)
    args, control = SimpleNamespace(), TrainerControl()
    tracker.on_train_begin(args, state, control, model=model)
    for step in range(1, max_steps + 1):
        state.global_step = step
        tracker.on_step_end(args, state, control, model=model)
    tracker.on_train_end(args, state, control, model=model)


def test_balance_tracker_records_at_expected_steps(tmp_path):
    seen = []

    def score_fn(model):
        seen.append((model.training, torch.is_inference_mode_enabled()))
        model.calls += 1
        return [7, 3], [0.0, model.calls * 1.0]

    out = tmp_path / "run" / "balance.jsonl"
    model = FakeModel()
    _run_fake_training(BalanceTracker(score_fn, out, every_n_steps=3), model, max_steps=7)
    rows = read_jsonl(out)
    assert [r["step"] for r in rows] == [0, 3, 6, 7]
    assert all(set(r) == {"step", "ids", "nll", "prob"} for r in rows)
    assert rows[1]["ids"] == [7, 3]
    assert rows[1]["nll"] == [0.0, 2.0]
    assert rows[1]["prob"] == pytest.approx([1.0, math.exp(-2.0)])
    assert seen == [(False, True)] * 4  # eval mode, inference mode while scoring
    assert model.training is True  # train mode restored

    # the last step is a multiple of N: train end does not record it twice
    out2 = tmp_path / "b2.jsonl"
    _run_fake_training(BalanceTracker(score_fn, out2, every_n_steps=2), FakeModel(), max_steps=4)
    assert [r["step"] for r in read_jsonl(out2)] == [0, 2, 4]


def test_balance_tracker_only_main_process_writes_and_restores_mode_on_error(tmp_path):
    calls = []
    out = tmp_path / "balance.jsonl"
    _run_fake_training(BalanceTracker(lambda m: calls.append(1) or ([0], [1.0]), out), FakeModel(), 2, world_zero=False)
    assert len(calls) == 3 and not out.exists()  # every rank scores, only rank 0 writes

    model = FakeModel()

    def boom(m):
        raise RuntimeError("oom")

    with pytest.raises(RuntimeError):
        BalanceTracker(boom, out).record(model, 0)
    assert model.training is True
    model.training = False  # a model in eval mode stays in eval mode
    BalanceTracker(lambda m: ([0], [1.0]), out).record(model, 0)
    assert model.training is False


def test_balance_tracker_errors(tmp_path):
    with pytest.raises(BaldroError, match="every_n_steps"):
        BalanceTracker(lambda m: ([], []), tmp_path / "b.jsonl", every_n_steps=0)
    with pytest.raises(BaldroError, match="callable"):
        BalanceTracker(None, tmp_path / "b.jsonl")
    with pytest.raises(BaldroError, match="2 ids but 1 nll"):
        BalanceTracker(lambda m: ([0, 1], [1.0]), tmp_path / "b.jsonl").record(FakeModel(), 0)
    with pytest.raises(BaldroError, match=r"\(ids: list\[int\], nll: list\[float\]\)"):
        BalanceTracker(lambda m: None, tmp_path / "b.jsonl").record(FakeModel(), 0)


def test_balance_tracker_in_a_real_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, x, labels=None):
            return {"loss": ((self.lin(x).squeeze(-1) - labels) ** 2).mean()}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"x": torch.full((2,), float(i)), "labels": torch.tensor(float(i))}

    modes = []

    def score_fn(model):
        modes.append((model.training, torch.is_inference_mode_enabled()))
        return [0, 1], [10.0 + float(model.lin.weight[0, 0]), 1.0]

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=5,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=Tiny(),
        args=args,
        train_dataset=Data(),
        callbacks=[BalanceTracker(score_fn, tmp_path / "balance.jsonl", every_n_steps=2)],
    )
    trainer.train()
    rows = read_jsonl(tmp_path / "balance.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4, 5]
    assert rows[0]["nll"] != rows[-1]["nll"]  # scored the model as it trains
    assert modes == [(False, True)] * 4 and trainer.model.training


def test_spread_at_mean_forgetting():
    from baldro.eval.balance import spread_at_mean_forgetting

    rows = [
        {"step": 0, "prob": [0.9, 0.9]},
        {"step": 5, "prob": [0.4, 0.1]},  # mean 0.25 < 0.3, std 0.15
        {"step": 9, "prob": [0.05, 0.09]},  # mean 0.07 < 0.1, std 0.02
    ]
    lo, hi = spread_at_mean_forgetting(rows, levels=(0.3, 0.1))
    assert (lo["step"], lo["prob_mean"], lo["prob_std"]) == (5, pytest.approx(0.25), pytest.approx(0.15))
    assert (hi["step"], hi["prob_mean"], hi["prob_std"]) == (9, pytest.approx(0.07), pytest.approx(0.02))
    never = spread_at_mean_forgetting(rows, levels=(0.01,))[0]
    assert never["step"] is None and never["prob_std"] is None and never["prob_std_at_level"] is None


def test_spread_at_mean_forgetting_interpolates_to_the_level():
    from baldro.eval.balance import spread_at_mean_forgetting

    rows = [
        {"step": 0, "prob": [0.9, 0.9]},  # mean 0.9, std 0
        {"step": 2, "prob": [0.7, 0.3]},  # mean 0.5, std 0.2
        {"step": 4, "prob": [0.2, 0.0]},  # mean 0.1, std 0.1: the first step below 0.3 ...
    ]
    lo, hi, start = spread_at_mean_forgetting(rows, levels=(0.3, 0.1, 0.95))
    # ... and a mean of 0.3 lies halfway between 0.5 and 0.1, so the std there is halfway between 0.2 and 0.1
    assert lo["step"] == 4 and lo["prob_std"] == pytest.approx(0.1)
    assert lo["prob_std_at_level"] == pytest.approx(0.15)
    assert hi["step"] is None  # mean 0.1 is not below 0.1
    assert start["step"] == 0 and start["prob_std_at_level"] is None  # nothing scored before the first step
