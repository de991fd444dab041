"""Tiny randomly initialised models of every supported family, with an offline byte-level tokenizer."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    GPTNeoConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 320
HIDDEN = 32
DEPTH = 6
CORPUS = [
    "the movie was great and the actors were wonderful",
    "a dull, boring film with a terrible plot",
    "Review: an absolute delight\nSentiment: positive",
    "Review: a waste of time\nSentiment: negative",
    "translate english to german: the cat sits on the mat",
]


def _config(family: str) -> PretrainedConfig:
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    llama_like = dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=DEPTH,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if family == "llama":
        return LlamaConfig(tie_word_embeddings=True, **llama_like)
    if family == "mistral":
        return MistralConfig(**llama_like)
    if family == "qwen2":
        return Qwen2Config(**llama_like)
    if family == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=DEPTH, n_head=4, n_positions=256, **common)
    if family == "opt":
        return OPTConfig(
            hidden_size=HIDDEN,
            ffn_dim=64,
            num_hidden_layers=DEPTH,
            num_attention_heads=4,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=256,
            **common,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=DEPTH,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        )
    if family == "gpt_neo":
        return GPTNeoConfig(
            hidden_size=HIDDEN,
            num_layers=DEPTH,
            num_heads=4,
            window_size=16,
            attention_types=[[["global", "local"], DEPTH // 2]],
            max_position_embeddings=256,
            **common,
        )
    if family == "bloom":
        return BloomConfig(hidden_size=HIDDEN, n_layer=DEPTH, n_head=4, **common)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt", "gpt_neox", "gpt_neo", "bloom")


@cache
def tokenizer() -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny_model(family: str, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out
