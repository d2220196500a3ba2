"""The pretrained tiny base (ckf_dist.model.pretrain): trained on the training split only, cached per data set,
loaded exactly, refused when it does not fit."""
import dataclasses

import pytest
import torch

from ckf_dist.config import load_config
from ckf_dist.data.prepare import prepare
from ckf_dist.data.streaming import tokenizer_corpus
from ckf_dist.model import pretrain as P
from ckf_dist.model.llm import build_llm, build_tiny_tokenizer

SMALL = ["data.num_users=40", "data.num_items=30", "data.interactions_per_user=10", "model.tiny.hidden_size=32",
         "model.tiny.intermediate_size=64", "model.tiny.vocab_size=400", "model.tiny.pretrain_steps=40",
         "model.tiny.pretrain_batch_size=8"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain") / "data"
    cfg = load_config(SMALL + [f"data.path={root}"])
    manifest = prepare(cfg, progress=lambda m: None)
    tok = build_tiny_tokenizer(tokenizer_corpus(cfg), cfg.model.tiny.vocab_size)
    return cfg, manifest, tok


def _lm_loss(model, seqs, pad):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss)


def test_pretrains_on_the_train_split_once_and_loads_exactly(prepared):
    cfg, manifest, tok = prepared
    seqs = P.train_sequences(cfg, tok)
    import pyarrow.parquet as pq

    train_rows = pq.read_table(f"{cfg.data.path}/prompts/train").num_rows
    assert len(seqs) == train_rows  # every training prompt, nothing from valid/test
    lines = []
    path = P.ensure_tiny_base(cfg, tok, manifest, progress=lines.append)
    assert path.startswith(f"{cfg.data.path}/base_models/tiny-") and "pretraining the tiny base" in lines[0]
    record = __import__("json").load(open(f"{path}/{P.RECORD}"))
    assert record["split"] == "train" and record["rows"] == train_rows and record["steps"] == 40
    assert record["final_loss"] < record["first_loss"] - 1.0
    # cached: the second call trains nothing
    again = []
    assert P.ensure_tiny_base(cfg, tok, manifest, progress=again.append) == path
    assert len(again) == 1 and again[0].startswith("pretrained tiny base")
    # build_llm with model.path loads exactly those weights; the random model is worse on the training text
    loaded = build_llm(dataclasses.replace(cfg.model, path=path), tok)
    from safetensors.torch import load_file

    saved = load_file(f"{path}/{P.WEIGHTS}")
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, saved[name]), name
    assert not any(p.requires_grad for p in loaded.parameters())
    random = build_llm(cfg.model, tok)
    sample = seqs[:64]
    assert _lm_loss(loaded, sample, tok.pad_token_id) < _lm_loss(random, sample, tok.pad_token_id) - 1.0


def test_another_data_set_or_shape_gets_its_own_base(prepared, tmp_path):
    cfg, manifest, tok = prepared
    key = P.base_model_key(cfg, tok, manifest)
    assert P.base_model_key(cfg, tok, dict(manifest, created_at="another preparation")) != key
    wider = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, tiny=dataclasses.replace(cfg.model.tiny, hidden_size=48)))
    assert P.base_model_key(wider, tok, manifest) != key
    assert P.base_model_key(cfg, tok, manifest) == key  # deterministic


def test_refuses_an_incomplete_or_mismatched_base(prepared, tmp_path):
    cfg, manifest, tok = prepared
    with pytest.raises(FileNotFoundError, match="pretrain.json"):
        build_llm(dataclasses.replace(cfg.model, path=str(tmp_path)), tok)
    path = P.ensure_tiny_base(cfg, tok, manifest, progress=lambda m: None)
    wider = dataclasses.replace(cfg.model, path=path, tiny=dataclasses.replace(cfg.model.tiny, hidden_size=48,
                                                                               num_heads=4, num_kv_heads=2))
    with pytest.raises(ValueError, match="does not fit model.tiny"):
        build_llm(wider, tok)
