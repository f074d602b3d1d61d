"""The public Python API: every name resolves, `import baldro` stays light, and the own-loop example runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import baldro

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves():
    for name in baldro.__all__:
        assert getattr(baldro, name) is not None, name
    with pytest.raises(AttributeError):
        baldro.not_a_name  # noqa: B018


def test_import_baldro_loads_neither_torch_nor_transformers():
    code = "import sys, baldro; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_weighting_in_an_own_loop_matches_the_softmax_weights():
    losses = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    weighted = baldro.make_weighting("dv", sigma=2.0)(losses)
    weighted.value.backward()
    assert torch.allclose(losses.grad, torch.softmax(losses.detach() / 2.0, 0))
    assert torch.allclose(weighted.weights, losses.grad)


@pytest.mark.slow
def test_own_training_loop_example_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "own_training_loop.py"), "--steps", "3"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3
    nll = [[float(x) for x in re.search(r"NLL per sample \[(.*?)\]", s).group(1).split(", ")] for s in steps]
    assert sum(nll[-1]) > sum(nll[0])  # gradient ascent: the forget texts' NLL rises
    weights = [float(x) for x in re.search(r"weights \[(.*?)\]", steps[0]).group(1).split(", ")]
    assert abs(sum(weights) - 1) < 1e-3 and weights.index(max(weights)) == nll[0].index(min(nll[0]))
