"""``model.path=s3://...`` (issue 13, finding 2): the HF folder (or GGUF file) is downloaded once per machine into
``model.cache_dir`` and loaded from there; concurrent ranks share one download; a failed download leaves nothing
half-written behind. Against the moto S3 server, with a tiny LLaMA saved by ``save_pretrained`` in the test (no
hub download)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid

import pytest
import torch

from ckf_dist.config import ModelConfig
from ckf_dist.data import io
from ckf_dist.model import llm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["<unk>", "<s>", "</s>", "the", "user", "rated", "alpha", "beta", "gamma", "delta", "yes", "no", "4", "5"]


def _save_tiny_hf(folder: str) -> None:
    """A 1-layer LLaMA (hidden 16) and a word-level tokenizer without ``<cf>``, as ``save_pretrained`` writes them,
    plus the files a hub folder often has and the cache must skip: a .bin duplicate and Meta's ``original/``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        f.write(b"a stale duplicate that must not be downloaded")
    os.makedirs(os.path.join(folder, "original"))
    with open(os.path.join(folder, "original", "consolidated.00.pth"), "wb") as f:
        f.write(b"raw checkpoint")


def _upload(folder: str, uri: str) -> None:
    for base, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), folder)
            fs, path = io.get_filesystem(io.join(uri, rel))
            with open(os.path.join(base, name), "rb") as f:
                io.write_bytes(fs, path, f.read())


@pytest.fixture(scope="module")
def tiny_hf(s3_server, tmp_path_factory):
    """(local folder, s3:// URI) of the same tiny HF model."""
    folder = str(tmp_path_factory.mktemp("tiny_hf"))
    _save_tiny_hf(folder)
    uri = f"s3://ckf-test/models/tiny-llama-{uuid.uuid4().hex[:8]}"
    _upload(folder, uri)
    return folder, uri


def _cfg(path: str, cache, **kw) -> ModelConfig:
    return ModelConfig(source=kw.pop("source", "hf"), path=path, cache_dir=str(cache), **kw)


def _entries(cache) -> list[str]:
    return sorted(n for n in os.listdir(cache) if not n.endswith(".lock"))


def _files(folder: str) -> set[str]:
    return {os.path.relpath(os.path.join(b, n), folder) for b, _, ns in os.walk(folder) for n in ns}


def test_hf_model_from_s3_loads_like_the_local_folder(tiny_hf, tmp_path):
    folder, uri = tiny_hf
    cache = tmp_path / "cache"
    tok = llm.load_pretrained_tokenizer(_cfg(uri, cache))
    assert "<cf>" in tok.get_vocab() and tok.pad_token == "</s>"
    (tok_entry,) = _entries(cache)  # the driver's tokenizer: no weights downloaded
    assert not any(f.endswith(llm.WEIGHT_SUFFIXES) for f in _files(os.path.join(cache, tok_entry)))

    model = llm.build_llm(_cfg(uri, cache), tok)
    reference = llm.build_llm(_cfg(folder, cache), llm.load_pretrained_tokenizer(_cfg(folder, cache)))
    ids = torch.tensor([tok("the user rated alpha 4")["input_ids"]])
    with torch.no_grad():  # the <cf> rows (input embedding, output head) are new and randomly initialised
        logits, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.equal(logits[..., :len(WORDS)], want[..., :len(WORDS)])
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == len(WORDS) + 1
    assert all(not p.requires_grad for p in model.parameters())
    full = [e for e in _entries(cache) if e != tok_entry]
    assert len(full) == 1 and full[0].startswith("tiny-llama-")
    got = _files(os.path.join(cache, full[0]))
    assert "model.safetensors" in got and "config.json" in got and "tokenizer.json" in got
    assert "pytorch_model.bin" not in got and not any(f.startswith("original/") for f in got)


def test_a_second_load_reuses_the_copy_and_a_changed_folder_gets_a_new_one(tiny_hf, tmp_path, monkeypatch):
    folder, uri = tiny_hf
    cache = tmp_path / "cache"
    copied = []
    real_copy = io._copy_file
    monkeypatch.setattr(io, "_copy_file", lambda fs, src, dest, size: (copied.append(src), real_copy(fs, src, dest, size)))
    first = llm.local_model_config(_cfg(uri, cache)).path
    n_files = len(copied)
    assert n_files == len(_files(first)) - 1  # every selected file once (+ the completion marker)
    assert llm.local_model_config(_cfg(uri, cache)).path == first and len(copied) == n_files  # cached

    other = f"{uri}-changed"
    _upload(folder, other)
    fs, path = io.get_filesystem(io.join(other, "generation_config.json"))
    io.write_bytes(fs, path, b'{"bos_token_id": 1, "eos_token_id": 2, "max_length": 7}')
    changed = llm.local_model_config(_cfg(other, cache)).path
    assert changed != first and len(copied) == 2 * n_files
    with open(os.path.join(changed, "generation_config.json")) as f:
        assert json.load(f)["max_length"] == 7


CHILD = r"""
import json, os, sys, time
from ckf_dist.data import io
uri, cache, record = sys.argv[1:4]
real_copy = io._copy_file
def slow_copy(fs, src, dest, size):
    with open(record, "a") as f:
        f.write(f"{os.getpid()} {src}\n")
    time.sleep(0.2)  # widen the window in which the other ranks arrive
    real_copy(fs, src, dest, size)
io._copy_file = slow_copy
print(json.dumps(io.cached_copy(uri, cache)))
"""


def test_concurrent_ranks_on_one_machine_download_once(tiny_hf, tmp_path):
    _, uri = tiny_hf
    cache, record = tmp_path / "cache", tmp_path / "copies.txt"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ranks = [subprocess.Popen([sys.executable, "-c", CHILD, uri, str(cache), str(record)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [r.communicate(timeout=240) for r in ranks]
    assert all(r.returncode == 0 for r in ranks), [o[1][-2000:] for o in outs]
    paths = {json.loads(o[0].strip().splitlines()[-1]) for o in outs}
    assert len(paths) == 1
    (path,) = paths
    copies = record.read_text().splitlines()
    assert len({line.split()[0] for line in copies}) == 1  # one process downloaded
    assert len(copies) == len({line.split()[1] for line in copies}) == len(_files(path)) - 1  # each file once
    assert _entries(cache) == [os.path.basename(path)]  # no temporary folder left
    assert os.path.isfile(os.path.join(path, io.CACHE_MARKER))


def test_a_failed_download_leaves_no_entry_and_the_next_call_completes(tiny_hf, tmp_path, monkeypatch):
    _, uri = tiny_hf
    cache = tmp_path / "cache"
    real_copy = io._copy_file
    calls = []

    def flaky(fs, src, dest, size):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("connection reset by peer")
        real_copy(fs, src, dest, size)

    monkeypatch.setattr(io, "_copy_file", flaky)
    with pytest.raises(OSError, match="connection reset"):
        llm.local_model_config(_cfg(uri, cache, source="hf"))
    assert _entries(cache) == []  # neither a partial entry nor its temporary folder
    # A downloader killed mid-way (no chance to clean up) leaves its temporary folder: the next one removes it.
    path = llm.local_model_config(_cfg(uri, cache)).path
    os.makedirs(path + ".tmp-killed/part")
    os.remove(os.path.join(path, io.CACHE_MARKER))  # and an entry without its marker is not trusted
    again = llm.local_model_config(_cfg(uri, cache)).path
    assert again == path and os.path.isfile(os.path.join(again, io.CACHE_MARKER))
    assert _entries(cache) == [os.path.basename(path)]


def test_gguf_from_s3_downloads_only_the_gguf_file(s3_server, tmp_path):
    """A .gguf URI, or a folder URI with or without ``model.gguf_file``: only that file is copied and
    ``model.path`` names its local copy in the form ``_gguf_location`` reads."""
    root = f"s3://ckf-test/models/gguf-{uuid.uuid4().hex[:8]}"
    for rel, data in [("b-model.Q8_0.gguf", b"GGUF-b"), ("a-model.Q4_K_M.gguf", b"GGUF-a"), ("README.md", b"x")]:
        fs, path = io.get_filesystem(io.join(root, rel))
        io.write_bytes(fs, path, data)
    cache = tmp_path / "cache"
    as_file = llm.local_model_config(_cfg(f"{root}/b-model.Q8_0.gguf", cache, source="gguf"))
    assert llm._gguf_location(as_file) == (os.path.dirname(as_file.path), "b-model.Q8_0.gguf")
    assert _files(os.path.dirname(as_file.path)) == {"b-model.Q8_0.gguf", io.CACHE_MARKER}
    named = llm.local_model_config(_cfg(root, cache, source="gguf", gguf_file="b-model.Q8_0.gguf"))
    assert llm._gguf_location(named) == (named.path, "b-model.Q8_0.gguf")
    first = llm.local_model_config(_cfg(root, cache, source="gguf"))  # the first .gguf by name, like a local folder
    assert _files(first.path) == {"a-model.Q4_K_M.gguf", io.CACHE_MARKER}
    with open(os.path.join(*llm._gguf_location(first)), "rb") as f:
        assert f.read() == b"GGUF-a"
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        llm.local_model_config(_cfg(root, cache, source="gguf", gguf_file="missing.gguf"))


def _write_tiny_gguf(path: str) -> None:
    """A 1-layer LLaMA GGUF (f32, hidden 16, 32 sentencepiece-style tokens) written with the ``gguf`` package:
    the same kind of file as SmolLM2's, 16 KB instead of 98 MB."""
    import numpy as np

    gguf = pytest.importorskip("gguf", reason="the [gguf] extra (gguf, accelerate) is not installed")
    vocab, hidden, ffn, heads, kv_heads = 32, 16, 32, 2, 1
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(1)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"\u2581w{i}" for i in range(vocab - 3)])
    w.add_token_scores([0.0] * 3 + [-float(i) for i in range(vocab - 3)])
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    kv = hidden // heads * kv_heads
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.attn_q.weight": (hidden, hidden),
              "blk.0.attn_k.weight": (kv, hidden), "blk.0.attn_v.weight": (kv, hidden),
              "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_model_from_s3_loads_like_the_local_file(s3_server, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    _write_tiny_gguf(str(local / "tiny-f32.gguf"))
    uri = f"s3://ckf-test/models/gguf-tiny-{uuid.uuid4().hex[:8]}"
    _upload(str(local), uri)
    remote = _cfg(uri, tmp_path / "cache", source="gguf")  # a folder holding one .gguf
    tok = llm.load_pretrained_tokenizer(remote)
    assert "<cf>" in tok.get_vocab()
    model = llm.build_llm(remote, tok)
    ref_cfg = _cfg(str(local / "tiny-f32.gguf"), tmp_path, source="gguf")
    reference = llm.build_llm(ref_cfg, llm.load_pretrained_tokenizer(ref_cfg))
    ids = torch.tensor([[1, 4, 5, 9, 30]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits[..., :32], reference(input_ids=ids).logits[..., :32])
    (entry,) = _entries(tmp_path / "cache")  # tokenizer and model share the one download
    assert _files(os.path.join(tmp_path, "cache", entry)) == {"tiny-f32.gguf", io.CACHE_MARKER}


def test_flash_attention_without_flash_attn_falls_back_to_sdpa_and_says_why(tiny_hf, tmp_path, caplog, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        pytest.skip("flash-attn and a CUDA device are both here: flash_attention_2 really runs")
    folder, _ = tiny_hf
    monkeypatch.setattr(llm, "_warned", set())
    cfg = _cfg(folder, tmp_path, attn_implementation="flash_attention_2")
    with caplog.at_level(logging.WARNING, logger="ckf_dist.model.llm"):
        model = llm.build_llm(cfg, llm.load_pretrained_tokenizer(cfg))
    assert model.config._attn_implementation == "sdpa"
    (warning,) = [r.getMessage() for r in caplog.records if "flash_attention_2" in r.getMessage()]
    assert "using sdpa" in warning and ("flash-attn package is not installed" in warning or "no CUDA" in warning)
