"""Builds the frozen causal LM and its tokenizer: a random-init tiny LLaMA, an HF folder, or a GGUF file.

The tokenizer always gets the dedicated placeholder token ``<cf>`` (added as a special token so text can never
produce it by accident); the LM's embedding table is resized to match. Every base weight is frozen.

``model.path`` may be ``s3://bucket/prefix`` for ``hf`` (the folder) and ``gguf`` (the .gguf file, or a folder
holding it): ``local_model_config`` downloads it once per machine into ``model.cache_dir`` (a node-local cache
shared by the ranks of a node; ``ckf_dist.data.io.cached_copy``: atomic, one downloader under a file lock) and
points ``model.path`` at the copy. The tokenizer alone (the Ray driver) downloads only the non-weight files.
"""
from __future__ import annotations

import dataclasses
import importlib.util
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


# Files that hold weights (in some framework's format); everything else in an HF folder is config/tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot")
_warned: set = set()


def model_cache_dir(cfg: ModelConfig) -> str:
    """Where ``s3://`` models are cached on this machine: ``model.cache_dir``, else ``$CKF_MODEL_CACHE``, else
    ``~/.cache/ckf_dist/models``."""
    return os.path.expanduser(cfg.cache_dir or os.environ.get("CKF_MODEL_CACHE") or "~/.cache/ckf_dist/models")


def hf_files_to_fetch(names: list[str], tokenizer_only: bool = False) -> list[str]:
    """The files of a remote HF folder worth downloading: never ``original/`` (Meta's raw checkpoints); only
    the safetensors weights when the folder has them (not the .bin/.pth duplicates); no weights at all for
    the tokenizer alone."""
    names = [n for n in names if not n.startswith("original/")]
    if tokenizer_only:
        return [n for n in names if not n.endswith(WEIGHT_SUFFIXES)]
    if any(n.endswith(".safetensors") for n in names):
        return [n for n in names if n.endswith(".safetensors") or not n.endswith(WEIGHT_SUFFIXES)]
    return [n for n in names if not n.endswith(".gguf")]


def local_model_config(cfg: ModelConfig, s3_config=None, tokenizer_only: bool = False) -> ModelConfig:
    """``cfg`` with ``model.path`` on this machine: an ``s3://`` path is replaced by its cached local copy
    (downloaded first if this machine has none); anything else is returned unchanged."""
    from ckf_dist.data import io

    if cfg.source == "tiny" or not io.is_s3(cfg.path):
        return cfg
    cache = model_cache_dir(cfg)
    if cfg.source == "gguf":
        if cfg.path.endswith(".gguf"):
            folder = io.cached_copy(cfg.path, cache, s3_config)
            return dataclasses.replace(cfg, path=os.path.join(folder, cfg.path.rstrip("/").rsplit("/", 1)[-1]))

        def one_gguf(names: list[str]) -> list[str]:
            want = cfg.gguf_file or next((n for n in names if n.endswith(".gguf")), "")
            if want not in names:
                raise FileNotFoundError(f"model.path={cfg.path!r}: no {want or '.gguf file'} there "
                                        f"(files: {names[:10]}); set model.gguf_file")
            return [want]

        return dataclasses.replace(cfg, path=io.cached_copy(cfg.path, cache, s3_config, select=one_gguf))
    folder = io.cached_copy(cfg.path, cache, s3_config, select=lambda names: hf_files_to_fetch(names, tokenizer_only))
    return dataclasses.replace(cfg, path=folder)


def resolve_attn_implementation(requested: str) -> str:
    """``requested``, except ``flash_attention_2`` / ``flex_attention`` where it cannot run (no flash-attn package,
    no CUDA device; torch's FlexAttention has no backward on CPU): then ``sdpa``, with the reason logged once per
    process. sdpa takes the same packed batches (a block-diagonal causal mask built from the position ids)."""
    if requested not in ("flash_attention_2", "flex_attention"):
        return requested
    if requested == "flex_attention":
        if torch.cuda.is_available():
            return requested
        reason = "no CUDA device is visible (FlexAttention has no backward on CPU)"
    elif importlib.util.find_spec("flash_attn") is None:
        reason = "the flash-attn package is not installed (the [gpu] extra; cluster/Dockerfile builds it)"
    elif not torch.cuda.is_available():
        reason = "no CUDA device is visible"
    else:
        return requested
    if reason not in _warned:
        _warned.add(reason)
        log.warning("model.attn_implementation=%s but %s: using sdpa instead", requested, reason)
    return "sdpa"


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


def load_pretrained_tokenizer(cfg: ModelConfig, s3_config=None):
    """Tokenizer of an HF folder or GGUF file (local or ``s3://``; ``s3_config`` = ``data.s3``), with ``<cf>``
    added. From S3 only the tokenizer's files of an HF folder are downloaded (no weights)."""
    cfg = local_model_config(cfg, s3_config, tokenizer_only=True)
    if cfg.source == "gguf":
        folder, name = _gguf_location(cfg)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    else:
        if not os.path.isdir(os.path.expanduser(cfg.path)):
            raise FileNotFoundError(f"model.path={cfg.path!r} is not a folder with an HF model")
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(cfg.path))
    return add_placeholder_token(tok)


def add_token_rows(model: torch.nn.Module, vocab_size: int) -> None:
    """Grows the embedding table and the output head to ``vocab_size`` rows, the new rows zero: the <cf> input
    row is never read (soft tokens overwrite its embedding), and a zero output row is the same on every rank and
    in the sharded loader (``zero_load``), where the random rows of ``resize_token_embeddings`` depend on the RNG."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:].zero_()
        out = model.get_output_embeddings()
        if out is not None:
            out.weight[old:].zero_()


def build_llm(cfg: ModelConfig, tokenizer, dtype: torch.dtype = torch.float32, s3_config=None,
              zero3_config: dict | None = None) -> torch.nn.Module:
    """The frozen causal LM with its embedding table sized to ``len(tokenizer)``.

    ``zero3_config`` (a DeepSpeed ZeRO-3 config; ``hf`` models only): the model is created partitioned, each
    rank reading only its share of the weights (``ckf_dist.model.zero_load``), instead of whole on every rank.

    The tiny model is seeded with ``cfg.seed`` so that every rank builds identical base weights (ZeRO-3
    partitions each rank's own copy: different random inits would silently mix); with ``cfg.path`` set it then
    takes the weights of a pretrained tiny base (``ckf_dist.model.pretrain``; ``s3_config`` for s3:// paths).
    An ``s3://`` HF folder or GGUF file is downloaded once per machine first (``local_model_config``).
    """
    if cfg.source == "tiny":
        t = cfg.tiny
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                             num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                             num_key_value_heads=t.num_kv_heads, max_position_embeddings=2048,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
        config._attn_implementation = resolve_attn_implementation(cfg.attn_implementation)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            model = LlamaForCausalLM(config)
            torch.nn.init.normal_(model.lm_head.weight, std=t.output_init_std)
        if cfg.path:  # a pretrained tiny base (ckf_dist.model.pretrain), local or s3://
            from ckf_dist.model.pretrain import load_tiny_weights

            load_tiny_weights(model, cfg.path, s3_config)
        model.to(dtype)
    else:
        cfg = local_model_config(cfg, s3_config)
        kwargs = {"dtype": dtype, "attn_implementation": resolve_attn_implementation(cfg.attn_implementation)}
        if zero3_config is not None:
            if cfg.source != "hf":
                raise ValueError(f"model.zero_init: sharded loading reads HF safetensors folders, not "
                                 f"model.source={cfg.source!r}")
            from ckf_dist.model.zero_load import load_hf_zero3

            model = load_hf_zero3(os.path.expanduser(cfg.path), len(tokenizer), dtype, kwargs["attn_implementation"],
                                  zero3_config)
        elif cfg.source == "gguf":
            folder, name = _gguf_location(cfg)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(cfg.path), **kwargs)
        if zero3_config is None and model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            add_token_rows(model, len(tokenizer))
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model
