"""The tiny model loads in transformers, has an exact-size real tokenizer, and peaked logits."""

import pytest
import torch

from rollout_service.models.tiny import ARCHS, TinyModelSpec, make_tiny_model
from rollout_service.weights.store import safetensors_names


def test_tiny_model_loads_in_transformers_with_spread_logits(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert len(tok) == model.config.vocab_size == 2048
    ids = tok("The trainer computes the loss", return_tensors="pt").input_ids
    assert ids.shape[1] < 12  # BPE merges, not one token per byte
    assert tok.decode(ids[0]) == "The trainer computes the loss"
    logits = model(ids).logits[0, -1]
    raw = logits.log_softmax(-1)
    tempered = (logits / 0.7).log_softmax(-1)
    top = raw.argmax()
    assert abs(float(raw[top].detach() - tempered[top].detach())) > 0.1  # temperature visibly moves logprobs
    assert not (tok.convert_tokens_to_ids("<|endoftext|>") != model.config.eos_token_id)


def test_spec_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="divisible"):
        TinyModelSpec(hidden=250, heads=4)
    with pytest.raises(ValueError, match="vocab"):
        TinyModelSpec(vocab=100)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_family_loads_in_transformers_with_its_naming(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path, TinyModelSpec(arch=arch, layers=1, hidden=128, heads=2, kv_heads=1))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    on_disk = set(safetensors_names(path / "model.safetensors"))
    assert ("lm_head.weight" in on_disk) is not ARCHS[arch].tied
    assert ("lm_head.weight" in model.state_dict()) and model(torch.tensor([[5, 6, 7]])).logits.isfinite().all()


def test_an_unknown_family_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="arch='gpt5' is not one of qwen2, qwen2-tied"):
        TinyModelSpec(arch="gpt5")
