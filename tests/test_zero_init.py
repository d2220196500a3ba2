"""Sharded model loading (``model.zero_init``, ckf_dist.model.zero_load) on 2 CPU ranks (torch.distributed gloo,
DeepSpeed ZeRO-3): a real HF LLaMA folder of about 104 MB of fp32 weights, written by the test, loaded both ways
in the same 2 processes (sharded first; the peak RSS is reset before each). Sharded, each rank's memory grows by
about half the base weights (its partition) where the whole-model load grows by all of them; the losses before
and after one training step are the same both ways, bit for bit."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

TEXTS = ["The user liked red comet; blue river. Will the user enjoy green hill? Answer Yes or No.",
         "Yes", "No", "1", "2", "3", "4", "5", "How will the user rate dark noir 17? Answer 1 to 5."] * 10
# hidden 512, 8 layers of 3.2M parameters, a vocabulary of ~300: 26M parameters, 104 MB in fp32
SHAPE = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 8}
WORLD = 2


def _tokenizer():
    from ckf_dist.model.llm import build_tiny_tokenizer

    return build_tiny_tokenizer(TEXTS, vocab_size=300)


def _write_model(folder: str) -> int:
    """A random LLaMA (seeded) saved as safetensors, with one token fewer than the tokenizer: loading adds the
    <cf> row to the embedding table and the output head. Returns the bytes of its weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok) - 1, max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **SHAPE)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _batch(ph: int, num_tasks: int) -> dict:
    from ckf_dist.data.collate import collate_prompts

    rng = np.random.default_rng(0)
    n = 6
    col = lambda: np.empty(n, dtype=object)  # noqa: E731
    text, hyb, ans, hist, targ = col(), col(), col(), col(), col()
    for i in range(n):
        words = rng.integers(5, 250, size=int(rng.integers(5, 30)))
        text[i] = np.concatenate([[1], words])
        hyb[i] = np.concatenate([[1], words, [ph, ph]])
        ans[i] = rng.integers(5, 250, size=2)
        hist[i] = rng.integers(0, 9, size=3)
        targ[i] = rng.integers(0, 9, size=1)
    cols = {"task_id": (np.arange(n) % num_tasks).astype(np.int8), "user_id": rng.integers(0, 7, size=n),
            "label": rng.random(n).astype(np.float32), "text_prompt_ids": text, "hybrid_prompt_ids": hyb,
            "answer_ids": ans, "history_item_ids": hist, "target_item_ids": targ}
    return collate_prompts(cols, 0, num_tasks)


def _reset_peak_rss() -> None:
    """Resets the process's peak RSS (VmHWM, ru_maxrss) to its current RSS (Linux >= 4.0): the peak then
    measures what happens after this call, not the imports' or the tokenizer's transient peaks before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_rss_kb() -> int:
    """VmHWM: this process's peak RSS since the last reset (not ru_maxrss: a spawned child's ru_maxrss starts
    at the RSS of the process it was forked from, here the test's, which has just written the model)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _rank(rank: int, folder: str, port: int, out: str) -> None:
    """One rank: builds the CKF model sharded (``model.zero_init=true``), then whole, each time measuring the growth
    of its peak RSS over construction, then training two steps under a ZeRO-3 engine (losses recorded)."""
    import gc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from ckf_dist.config import load_config
    from ckf_dist.data.schema import PLACEHOLDER, TASK_IDS
    from ckf_dist.worker import build_ckf_model, build_deepspeed_config, parameter_groups, zero_init_config

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    tok = _tokenizer()
    users, items = torch.randn(8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(
        10, 8, generator=torch.Generator().manual_seed(2))
    batch = _batch(tok.convert_tokens_to_ids(PLACEHOLDER), len(TASK_IDS))
    result = {}
    for mode in ("true", "false"):
        cfg = load_config(["model.source=hf", f"model.path={folder}", f"model.zero_init={mode}",
                           "training.batch_size=6", "lora.dropout=0"])
        ds_config = build_deepspeed_config(cfg, WORLD, use_gpu=False)
        gc.collect()
        _reset_peak_rss()
        before = _rss_kb()
        model = build_ckf_model(cfg, tok, users, items, zero3_config=zero_init_config(cfg, ds_config))
        # every weight this rank holds, read once: the whole load's tensors are memory-mapped from the file and
        # only become resident when read (deepspeed.initialize reads them all to partition them); a ZeRO-3
        # parameter's own tensor is empty, its partition (ds_tensor) was written by the sharded loader
        held = sum(float(p.detach().sum()) for p in model.parameters())
        growth = _peak_rss_kb() - before
        assert held == held  # not NaN: no uninitialised memory read
        optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=1e-2)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        loss = engine(batch, text_weight=0.5)["loss"]
        engine.backward(loss)
        engine.step()
        result[mode] = {"rss_growth_kb": growth, "losses": [loss.item(), engine(batch, text_weight=0.5)["loss"].item()]}
        engine.destroy()
        del engine, model, optimizer, loss
        gc.collect()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_sharded_load_holds_a_partition_per_rank_and_trains_the_same(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    # A fixed malloc mmap threshold (glibc's own default before it adapts) returns every freed tensor buffer
    # of 128 kB or more to the system at once: RSS then follows the live tensors. With the adaptive threshold
    # the full-size tensors zero.Init creates and partitions module by module stay in the heap as free, reusable
    # memory that RSS still counts (up to +25 MB more here, varying with the allocation order).
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))

    folder = str(tmp_path / "llama")
    base_bytes = _write_model(folder)
    assert base_bytes > 100e6
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(folder, port, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    res = {mode: [g[mode] for g in got] for mode in ("true", "false")}
    for r in range(WORLD):
        sharded, whole = res["true"][r]["rss_growth_kb"] * 1024, res["false"][r]["rss_growth_kb"] * 1024
        # whole: every rank holds all the base weights (measured: base + 6 MB, the CKF side: 1M adapter
        # parameters, module objects). Sharded: its 1/2 partition, the same CKF side, DeepSpeed's partition
        # bookkeeping and transient buffers of about one module (an MLP weight is 2.9 MB): measured base / 2 +
        # 22 MB (2026-11-27, 2-core x86_64, deepspeed 0.19.8) -> bound base / 2 + 25%.
        assert whole >= base_bytes, (r, whole, base_bytes)
        assert sharded <= (1 / WORLD + 0.25) * base_bytes, (r, sharded, base_bytes)
        # the same weights, the same adapters' init: the same losses, bit for bit (fp32, the same reductions)
        assert res["true"][r]["losses"] == res["false"][r]["losses"], res
    losses = res["true"][0]["losses"]
    assert losses == res["true"][1]["losses"] and losses[1] != losses[0]  # and the step trained something
