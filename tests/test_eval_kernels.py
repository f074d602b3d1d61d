"""Linear layers on prepacked oneDNN weights during evaluation (`baldro.eval.kernels`)."""

from __future__ import annotations

import pytest
import torch

from baldro.eval import kernels
from baldro.eval.kernels import packable_linears, prepacked_linears, should_prepack

pytestmark = pytest.mark.skipif(not kernels.onednn_linear_available(), reason="this torch build has no oneDNN")


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().eval()


def _patched(model) -> int:
    return sum("forward" in m.__dict__ for m in model.modules())


def test_packed_logits_equal_torch_products_within_float32_rounding(llama):
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = llama(ids).logits
        with prepacked_linears(llama, True) as on:
            assert on
            assert _patched(llama) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the LM head
            packed = llama(ids).logits
        after = llama(ids).logits
    assert _patched(llama) == 0
    torch.testing.assert_close(packed, before, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, before)  # every module is as before


def test_packing_is_undone_when_the_evaluation_fails(llama):
    with pytest.raises(RuntimeError, match="boom"):
        with prepacked_linears(llama, True):
            raise RuntimeError("boom")
    assert _patched(llama) == 0


def test_false_and_unpackable_layers_keep_torch_products(llama):
    with prepacked_linears(llama, False) as on:
        assert not on and _patched(llama) == 0

    class QuantizedLinear(torch.nn.Linear):  # bitsandbytes' layers subclass nn.Linear: never packed
        pass

    model = torch.nn.Sequential(QuantizedLinear(4, 4), torch.nn.Linear(4, 4).double(), torch.nn.Linear(4, 4))
    hooked = torch.nn.Linear(4, 4)
    hooked.forward = hooked.forward  # what accelerate's hooks do: an instance forward, left alone
    model.append(hooked)
    assert packable_linears(model) == [model[2]]
    with prepacked_linears(model, True) as on:
        assert on and "forward" in model[2].__dict__ and "forward" not in model[0].__dict__
    assert "forward" in hooked.__dict__ and "forward" not in model[2].__dict__


def test_auto_packs_only_models_wide_enough_to_gain(llama):
    wide = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(64, 64))
    assert kernels.linears_to_pack(wide, None) == list(wide)  # no config: the widest input, 512
    assert kernels.linears_to_pack(llama, None) == []  # hidden size 64
    assert len(kernels.linears_to_pack(llama, True)) == 2 * 7 + 1
    assert kernels.linears_to_pack(wide, False) == []


def test_auto_packs_only_when_the_copies_fit_in_memory(llama, monkeypatch):
    monkeypatch.setattr(kernels, "AUTO_MIN_WIDTH", 64)  # the test model is 64 wide
    weight_bytes = sum(m.weight.numel() * 4 for m in packable_linears(llama))
    monkeypatch.setattr(kernels, "available_memory_bytes", lambda: 4 * weight_bytes)
    assert should_prepack(llama, None)
    monkeypatch.setattr(kernels, "available_memory_bytes", lambda: 4 * weight_bytes - 1)
    assert not should_prepack(llama, None)
    assert should_prepack(llama, True)  # asked for: packed whatever the memory
    monkeypatch.setattr(kernels, "available_memory_bytes", lambda: None)
    assert should_prepack(llama, None)
    assert not should_prepack(torch.nn.Sequential(torch.nn.Linear(2, 2).double()), None)  # nothing to pack


def test_available_memory_is_read_on_linux():
    avail = kernels.available_memory_bytes()
    if avail is None:
        pytest.skip("no /proc/meminfo")
    assert avail > 2**20


def test_lora_model_is_packed_around_its_adapters(llama):
    """Under PEFT's LoRA the base layers and adapters are plain nn.Linear modules: packed, same outputs."""
    peft = pytest.importorskip("peft")
    import copy

    model = peft.get_peft_model(
        copy.deepcopy(llama), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        with prepacked_linears(model, True):
            assert _patched(model) == 2 * 7 + 1 + 2 * 2 * 2  # and lora_A, lora_B of q and v in both layers
            packed = model(input_ids=ids).logits
    assert _patched(model) == 0
    torch.testing.assert_close(packed, before, rtol=1e-4, atol=1e-5)


def test_eval_info_names_what_prepacked_linears_yielded(llama):
    with prepacked_linears(llama, True) as packed:
        assert kernels.linear_kernels(packed) == "onednn_prepacked"
    with prepacked_linears(llama, False) as packed:
        assert kernels.linear_kernels(packed) == "torch"
