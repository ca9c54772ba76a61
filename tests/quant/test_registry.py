"""The format table is what the quantizer, the checkpoint config, the profile reader, the config's
choices and FlashRL's names all follow."""

from typing import get_args

import torch

from rollout_service.config import Quantization
from rollout_service.config_sources import FLASHRL_FN
from rollout_service.quant.formats import quantize_weight
from rollout_service.quant.profile import checkpoint_format
from rollout_service.quant.recipe import quantization_config
from rollout_service.quant.registry import FORMATS


def test_each_format_quantizes_and_reads_back_as_its_row_says():
    w = torch.randn(6, 10, dtype=torch.bfloat16)
    for spec in FORMATS.values():
        q, scale = quantize_weight(w, spec.name)
        assert q.dtype == (torch.int8 if spec.number == "int" else torch.float8_e4m3fn), spec.name
        assert scale.shape == ((6, 1) if spec.strategy == "channel" else (1,)), spec.name
        written = {"quantization_config": quantization_config(spec.name)}
        assert checkpoint_format(written, "config.json") == (spec.name, ("lm_head",))


def test_every_format_is_a_quantization_choice_and_a_flashrl_name():
    assert get_args(Quantization) == ("none", *FORMATS)
    assert set(FLASHRL_FN.values()) == {"none", *FORMATS}
