"""Make tiny random-init checkpoints of the model families RL starts from, with a real byte-level
BPE tokenizer and a ChatML chat template with tool calls (no model hub needed).

Tests, the demo and benchmarks use them: they load in both vLLM and transformers, and their logits
are spread wide enough (see `LOGIT_STD`) that temperature and top-k visibly change the logprobs, so
a test can tell processed from raw logprobs. `ARCHS` is the zoo the push tests run over: one entry
per family and per naming quirk a trainer's `state_dict()` brings (tied embeddings, fused experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
# Starts a chat turn (chat_template.jinja); the end-of-sequence token ends one.
TURN_TOKEN = "<|im_start|>"
# Std of the logits at init. Transformers' default init (std 0.02) gives near-uniform logits over
# the vocabulary, where temperature barely matters; ~3 gives a peaked, still diverse distribution.
LOGIT_STD = 3.0
# A tied model's head is its embedding, and a random-init model's final hidden state is mostly its
# input embedding (the layers add little), so the logit of "repeat the input token" is about
# sqrt(hidden) x the other logits' std. At LOGIT_STD that token has probability ~1 and logprob 0.0
# whatever the other weights are, and a logprob comparison could not tell two models apart. This
# std (of each logit but the repeat one) leaves the repeat token ~5 % on a 2,048 vocabulary.
TIED_LOGIT_STD = 0.3


@dataclass(frozen=True)
class Arch:
    """A transformers model family: its config class, the config fields that make it the family
    RL runs start from, and whether the LM head is the embedding (`tie_word_embeddings`)."""

    config_class: str
    model_class: str
    tied: bool
    config: dict = field(default_factory=dict)
    description: str = ""


ARCHS: dict[str, Arch] = {
    "qwen2": Arch("Qwen2Config", "Qwen2ForCausalLM", False, description="Qwen2/2.5 (7B and up: separate LM head)"),
    "qwen2-tied": Arch("Qwen2Config", "Qwen2ForCausalLM", True, description="Qwen2.5 0.5B-3B (tied embeddings)"),
    "qwen3": Arch("Qwen3Config", "Qwen3ForCausalLM", True, {"head_dim": 64}, "Qwen3 0.6B-4B (tied, q/k norms)"),
    "llama": Arch(
        "LlamaConfig", "LlamaForCausalLM", True,
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 512}},
        "Llama 3.2 1B/3B (tied, llama3 RoPE scaling)",
    ),
    "mistral": Arch("MistralConfig", "MistralForCausalLM", False, {"head_dim": 64}, "Mistral 7B"),
    "gemma2": Arch(
        "Gemma2Config", "Gemma2ForCausalLM", True,
        {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 128, "hidden_activation": "gelu_pytorch_tanh"},
        "Gemma 2 (tied, logit soft-capping, sliding window)",
    ),
    "qwen3-moe": Arch(
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM", False,
        {"head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "norm_topk_prob": True},
        "Qwen3-MoE (4 experts, 2 per token, expert width hidden/2)",
    ),
}


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model; the defaults are the ones the test suite and demo use."""

    layers: int = 4
    hidden: int = 256
    vocab: int = 2048
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 2048
    seed: int = 0
    arch: str = "qwen2"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be divisible by kv_heads={self.kv_heads}")
        if self.vocab < 300:
            raise ValueError(f"vocab={self.vocab} must be at least 300 (256 bytes + merges + specials)")
        if self.layers < 1:
            raise ValueError(f"layers={self.layers} must be at least 1")


def _train_tokenizer(vocab: int):
    """Byte-level BPE trained on the corpus shipped in this package, padded to exactly `vocab` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS_TOKEN, TURN_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = resources.files("rollout_service.models").joinpath("corpus.txt").read_text().splitlines()
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    # Chat completions (/v1/chat/completions) render messages with it.
    fast.chat_template = resources.files("rollout_service.models").joinpath("chat_template.jinja").read_text()
    # The corpus may run out of merges before `vocab`: pad with plain tokens so that every id the
    # model can sample decodes to text.
    missing = vocab - len(fast)
    if missing > 0:
        fast.add_tokens([f"<|extra_{i}|>" for i in range(missing)])
    assert len(fast) == vocab, (len(fast), vocab)
    return fast


def make_tiny_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write config.json, model.safetensors and tokenizer files to `out_dir`; return it."""
    import torch
    import transformers

    arch = ARCHS[spec.arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(spec.vocab)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = getattr(transformers, arch.config_class)(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.hidden * 2,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=arch.tied,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        torch_dtype="bfloat16",
        # An expert narrower than the model, so a transposed expert layout cannot pass a shape check.
        **({"moe_intermediate_size": spec.hidden // 2} if "num_experts" in arch.config else {}),
        **arch.config,
    )
    torch.manual_seed(spec.seed)
    model = getattr(transformers, arch.model_class)(config)
    with torch.no_grad():
        # The final norm emits ~unit-scale features, so logit std = sqrt(hidden) * weight std.
        std = TIED_LOGIT_STD if arch.tied else LOGIT_STD
        model.get_output_embeddings().weight.normal_(0.0, std / spec.hidden**0.5)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    # vLLM would otherwise take default sampling parameters from this file; the service's
    # sampling parameters must be exactly the request's.
    (out / "generation_config.json").unlink(missing_ok=True)
    tokenizer.save_pretrained(out)
    return out
