"""Tiny Hugging Face causal LMs and a character tokenizer, built locally.

Nothing can be downloaded here, so tests and the demo build their models from configs and a
character-level tokenizer that round-trips any text over its alphabet. Models and tokenizers
save with the standard ``save_pretrained`` (safetensors). Load the tokenizer with
``PreTrainedTokenizerFast.from_pretrained`` (as ``opd_fast.runner.models`` does): transformers
5's ``AutoTokenizer`` picks the model type's class for a qwen2 directory (``Qwen2Tokenizer``),
which splits this character vocabulary differently.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet`` plus pad/bos/eos/unk (ids 0-3).

    ``vocab_size`` pads the vocabulary with filler tokens that encoding never produces, so a model
    sized for it has a realistic LM head (benchmarks at 32k or 128k vocabularies) over the same text.
    """
    chars = list(dict.fromkeys(alphabet))
    tokens = [*SPECIAL_TOKENS, *chars]
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise ValueError(f"vocab_size={vocab_size} is below the {len(tokens)} tokens of the alphabet and specials")
        tokens += [f"<fill{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.padding_side = "left"  # generation batches are left-padded
    return fast


def tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 256,
    tie_embeddings: bool = False,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialized Llama or Qwen2 causal LM sized for ``tokenizer``."""
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(arch)
    if config_cls is None:
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Save model (safetensors) and tokenizer side by side so ``from_pretrained(path)`` loads both."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
