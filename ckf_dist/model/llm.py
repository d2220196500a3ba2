"""Builds the frozen causal LM and its tokenizer: a random-init tiny LLaMA, a local HF folder, or a GGUF file.

The tokenizer always gets the dedicated placeholder token ``<cf>`` (added as a special token so text can never
produce it by accident); the LM's embedding table is resized to match. Every base weight is frozen.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

import torch
from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ckf_dist.config import ModelConfig
from ckf_dist.data.schema import PLACEHOLDER

log = logging.getLogger(__name__)

TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on ``texts`` (item titles, prompts and answers of the data set).

    Deterministic for the same texts in the same order, so every process that builds it gets the same ids.
    Byte-level means any later text (new titles) still tokenises, never to ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    return add_placeholder_token(fast)


def add_placeholder_token(tokenizer):
    """Adds ``<cf>`` as a special token and a pad token when the tokenizer has none (pad = eos then)."""
    # lstrip: the placeholder absorbs the space before it ("title <cf>" -> [..., "title", "<cf>"]); without it
    # every placeholder also left a lone space token ("Ġ" / "▁") in the hybrid prompt that no text prompt has.
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(PLACEHOLDER, lstrip=True, special=True)]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _gguf_location(cfg: ModelConfig) -> tuple[str, str]:
    """(folder, gguf file name) from model.path (a .gguf file or a folder) and model.gguf_file."""
    path = os.path.expanduser(cfg.path)
    if path.endswith(".gguf"):
        return os.path.dirname(path), os.path.basename(path)
    if cfg.gguf_file:
        return path, cfg.gguf_file
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf")) if os.path.isdir(path) else []
    if not found:
        raise FileNotFoundError(f"model.path={cfg.path!r}: no .gguf file there (set model.gguf_file)")
    return path, found[0]


def load_pretrained_tokenizer(cfg: ModelConfig):
    """Tokenizer of an HF folder or GGUF file, with ``<cf>`` added."""
    if cfg.source == "gguf":
        folder, name = _gguf_location(cfg)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    else:
        if not os.path.isdir(os.path.expanduser(cfg.path)):
            raise FileNotFoundError(f"model.path={cfg.path!r} is not a folder with an HF model")
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(cfg.path))
    return add_placeholder_token(tok)


def build_llm(cfg: ModelConfig, tokenizer, dtype: torch.dtype = torch.float32, s3_config=None) -> torch.nn.Module:
    """The frozen causal LM with its embedding table sized to ``len(tokenizer)``.

    The tiny model is seeded with ``cfg.seed`` so that every rank builds identical base weights (ZeRO-3
    partitions each rank's own copy: different random inits would silently mix); with ``cfg.path`` set it then
    takes the weights of a pretrained tiny base (``ckf_dist.model.pretrain``; ``s3_config`` for s3:// paths).
    """
    if cfg.source == "tiny":
        t = cfg.tiny
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                             num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                             num_key_value_heads=t.num_kv_heads, max_position_embeddings=2048,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
        config._attn_implementation = cfg.attn_implementation
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            model = LlamaForCausalLM(config)
            torch.nn.init.normal_(model.lm_head.weight, std=t.output_init_std)
        if cfg.path:  # a pretrained tiny base (ckf_dist.model.pretrain), local or s3://
            from ckf_dist.model.pretrain import load_tiny_weights

            load_tiny_weights(model, cfg.path, s3_config)
        model.to(dtype)
    else:
        kwargs = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
        if cfg.source == "gguf":
            folder, name = _gguf_location(cfg)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(cfg.path), **kwargs)
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            # The new <cf> row is never read (its embedding is overwritten by soft tokens), so any init will do.
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model
