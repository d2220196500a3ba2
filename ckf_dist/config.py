"""One typed config tree for every ckf_dist job, loaded with OmegaConf.

``load_config(["--config", "configs/x.yaml", "training.max_steps=100"])`` merges, in order: the dataclass
defaults (the embedded CPU default), the YAML file, then CLI dotlist overrides. An unknown or mistyped key
fails at once with a ``ConfigError`` naming the key (OmegaConf's struct mode does the checking); values that
type-check but make no sense (a negative rank, an unknown task) fail in ``validate``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TASKS = ("ctr", "topk", "rating", "explanation", "review_rating", "next_item")
# data.tasks default: the four CKF tasks; "review_rating" (review -> rating, the authors' variant) and
# "next_item" (top-K by the item-prediction head over the whole catalogue, CLLM4Rec) are opt-in.
DEFAULT_TASKS = ("ctr", "topk", "rating", "explanation")
# data.column_map keys for data.source=generic (canonical name -> column name in the file).
GENERIC_COLUMNS = ("user", "item", "rating", "label", "timestamp", "title", "review",
                   "split", "history", "candidates", "cold")


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


@dataclass
class S3Config:
    """Where ``s3://`` paths live. Empty values fall back to the usual AWS environment variables
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION), and
    without keys anywhere to the default AWS credential chain (IRSA web identity, profiles, instance roles):
    ``ckf_dist.data.io``. The two keys go together; temporary credentials come from the environment only."""

    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    retry_attempts: int = 10  # tries per S3 request (AWS standard retry, exponential backoff <= 20 s): ~90 s of outage; 1 = none
    # Before each checkpoint upload a worker waits up to this long for unreachable S3 (probing with backoff and a
    # log line per try) instead of failing; 0 = no wait (an outage longer than the request retries fails the worker).
    outage_wait_s: float = 900.0


@dataclass
class DataConfig:
    # synthetic | movielens-100k | movielens-1m | amazon-reviews | recbole | generic
    source: str = "synthetic"
    # Raw files for real sources: a folder (movielens-*, recbole; e.g. ../shared/data/ml-100k) or a file
    # (amazon-reviews: .json/.jsonl/.gz/.zip or a folder holding one; generic: .csv/.tsv/.parquet).
    raw_path: str = ""
    # Optional item titles: amazon-reviews meta_*.json (asin, title); generic: a CSV/parquet with item + title
    # columns (named through column_map); recbole: the .item file when raw_path holds several.
    meta_path: str = ""
    # generic: canonical name (user, item, rating | label, timestamp, title, review, and the benchmark-protocol
    # columns split, history, candidates, cold) -> column in the file; unmapped names use the canonical name itself.
    column_map: dict[str, str] = field(default_factory=dict)
    csv_delimiter: str = ","  # generic CSV files
    # generic: separator of the item ids inside a history / candidates CSV field ("" in the field = empty list)
    list_delimiter: str = "|"
    # sampled: CTR negatives are sampled never-interacted items (classes balanced); given (generic source with a
    # label and a split column): every row is a CTR row with its label as given, no sampled negatives, and
    # label-0 rows stay out of the interaction log (CF training, histories).
    ctr_labels: str = "sampled"
    max_users: int = 0  # > 0: keep a deterministic sample of this many users (hash of raw id + seed); 0 = all
    # Review sentence used as the explanation answer / review_rating input: the first sentence with at least
    # review_min_words words, cut to review_max_words words.
    review_min_words: int = 4
    review_max_words: int = 40
    # Prepared shards: a local folder or s3://bucket/prefix. "" = ~/.cache/ckf_dist/data/<source>.
    path: str = ""
    prepare_if_missing: bool = True
    # Synthetic generator (planted latent structure).
    num_users: int = 300
    num_items: int = 200
    num_clusters: int = 4
    interactions_per_user: int = 24
    # false: titles and reviews carry no genre word ("green 17", "the user loved it"), so the text says nothing
    # about taste and only the CF knowledge can tell (the fusion's hardest test; same draws otherwise).
    genre_in_text: bool = True
    # Prompt construction.
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    history_len: int = 6  # items of history shown in a prompt (most recent first-cut)
    num_candidates: int = 5  # top-K candidate list size (1 positive + K-1 negatives)
    cold_user_max_interactions: int = 5  # users with <= this many interactions are flagged cold
    test_per_user: int = 1  # last N interactions per user held out for test, the N before for valid
    rows_per_shard: int = 5000
    max_seq_len: int = 192  # tokens; longer prompts are cut from the left of the history, never the answer
    seed: int = 0
    s3: S3Config = field(default_factory=S3Config)


@dataclass
class TinyModelConfig:
    """A random-initialised LLaMA for CPU runs and tests."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 1024  # BPE vocabulary trained on the item titles and prompt templates
    # Std of the frozen random output head. HF's 0.02 caps logits near +-1.3 after the final RMSNorm
    # (|h| ~ sqrt(hidden)), so no adapter could ever make a confident prediction through it; 0.25 gives the
    # frozen head a usable range (a pretrained head has one by training).
    output_init_std: float = 0.25
    # Causal-LM pretraining of the tiny base on the training split's text prompts + answers before CKF
    # training (ckf_dist.model.pretrain; cached per data set under <data.path>/base_models). 0 = a random base.
    pretrain_steps: int = 950
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 32


@dataclass
class ModelConfig:
    source: str = "tiny"  # tiny | hf (local HF folder) | gguf (a .gguf file or a folder holding one)
    # hf: a local HF folder; gguf: a .gguf file or a folder holding one; tiny: "" = a random base, or the folder
    # of a pretrained tiny base (the driver sets it when model.tiny.pretrain_steps > 0; local or s3://).
    # hf and gguf also take s3://bucket/prefix (the folder, or the .gguf file): downloaded once per machine into
    # cache_dir, then loaded from there (ckf_dist.model.llm.local_model_config).
    path: str = ""
    gguf_file: str = ""
    cache_dir: str = ""  # local cache for s3:// models; "" = $CKF_MODEL_CACHE, else ~/.cache/ckf_dist/models
    # flash_attention_2 needs the flash-attn package and a CUDA device, flex_attention (torch's FlexAttention) a
    # CUDA device (it has no backward on CPU); without them the loader logs why and uses sdpa.
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 | flex_attention
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    gradient_checkpointing: bool = False
    seed: int = 0
    # Create the base model partitioned under DeepSpeed ZeRO-3, each rank reading only its share of the weights
    # (ckf_dist.model.zero_load); auto = on for source=hf under ZeRO-3. true needs ZeRO-3 and an hf safetensors folder.
    zero_init: str = "auto"  # auto | true | false
    # How CF knowledge enters the prompts: soft_tokens (CKF: meta-network mapping + projectors) | id_tokens (CLLM4Rec:
    # one trainable token per user and item, initialised from the CF tables through a projector; ckf_dist.model.ckf).
    fusion: str = "soft_tokens"


@dataclass
class CFConfig:
    dim: int = 8
    # Embedding artifact root (local or s3://); "" = <data.path>/cf.
    embeddings_path: str = ""
    model: str = "mf"  # mf | lightgcn (the CF job, issue 4)
    pooling: str = "mean"  # mean | attention
    meta_hidden: int = 32
    meta_activation: str = "none"  # none | relu
    identity_mapping: bool = False  # ablation: W_u = I (no meta-network)
    projector: str = "linear"  # linear (the spec: one Linear d -> hidden) | mlp (Linear, GELU, Linear)
    refresh_check_every_steps: int = 0  # 0 = never look for a newer version during training
    # CF training / refresh job (ckf_dist.cf, ckf_dist.cf_refresh).
    loss: str = "bpr"  # bpr | pointwise (BCE on sampled negatives) | mse (rating MF; reports RMSE)
    epochs: int = 40  # upper bound; early stopping on the valid split usually ends sooner
    lr: float = 0.01  # Adam
    batch_size: int = 2048  # positive interactions per step
    num_negatives: int = 1  # sampled negatives per positive (bpr, pointwise)
    reg: float = 1e-4  # L2 on the embeddings of each batch
    patience: int = 5  # evaluations without improvement before stopping
    early_stop_metric: str = "auto"  # auto (rmse for mse, else auc) | auc | recall@20 | ndcg@20 | rmse
    eval_max_users: int = 2000  # users ranked over all items per evaluation (sampled if more)
    lightgcn_layers: int = 3
    keep_versions: int = 5  # published versions kept; older ones are deleted after a publish
    reader: str = "ray"  # ray (Ray Data) | arrow (pyarrow directly, no Ray; for tests/small sets)
    warm_start: bool = True  # initialise overlapping ids from the latest published version
    seed: int = 0
    # Mutual learning (arXiv 2311.03778; ckf_dist.mutual). Training: export_adapter also writes the LLM side's
    # item representations (item_repr.npy). Refresh: pull the CF item/user vectors toward them (mapped into the
    # CF space by a ridge map refitted every epoch) and record the CF-only metrics before/after.
    mutual: bool = False
    mutual_weight: float = 0.1  # weight of mean ||E[batch rows] - target||^2 (items and users) in the CF loss
    # Where the representations are: "" = the export with the highest step among <run>/adapter and
    # <run>/checkpoint_*/adapter, <run> = checkpoint.storage_path/checkpoint.run_name; or an adapter folder or a
    # run folder (local or s3://).
    mutual_source: str = ""
    mutual_ridge: float = 1.0  # ridge strength of the map, relative to the mean eigenvalue of R^T R (> 0)
    mutual_batch_size: int = 32  # items per forward pass when the representations are exported


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 64.0
    dropout: float = 0.1
    shared_targets: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "o_proj"])
    task_targets: list[str] = field(default_factory=lambda: ["q_proj"])
    # auto | torch | triton | side (batched per-task LoRA: triton = fused base GEMM, side = cuBLAS base + Triton
    # LoRA kernels; auto = kernels/dispatch.py's rules and measured win table, torch off CUDA)
    impl: str = "auto"


@dataclass
class TrainingConfig:
    max_steps: int = 800
    # > 0: also stop after this many minutes of training steps (summed over resumes; set-up, evaluation and
    # checkpoint writes not counted); the lr schedule and curriculum then follow whichever limit comes first.
    max_minutes: float = 0.0
    batch_size: int = 16  # rows (samples) per worker per step, before the text/hybrid doubling
    lr: float = 3e-3  # the LoRAs (and the mapping side when mapping_lr = 0)
    mapping_lr: float = 3e-2  # meta-network, pooling, projectors; 0 = lr
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.05
    grad_clip: float = 0.3
    curriculum: str = "sigmoid"  # sigmoid | constant | two_stage | hybrid_only | text_only
    # How the curriculum's lambda(s) routes the two forms' losses (worker.curriculum_gates, README "Curriculum"):
    # joint: lambda * L_text + (1 - lambda) * L_hybrid trains the LoRAs; the mapping side (reached only by
    #   L_hybrid) has its lr gated by (1 - lambda).
    # spec: L_text trains only the LoRAs, L_hybrid only the mapping side (ckf_method.md section 3); lr gates
    #   LoRAs x lambda, mapping x (1 - lambda). Measured on the default run: hybrid ties text-only (README).
    gradient_routing: str = "joint"
    task_weights: dict[str, float] = field(default_factory=dict)  # missing tasks weigh 1.0
    log_every: int = 20
    # Held-out rows scored before and after training (ckf_dist.heldout): at most eval_rows rows per task of
    # the eval_splits, in every prompt form + the permuted-CF control + CF-only. 0 = no evaluation.
    eval_rows: int = 1000
    eval_splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    shuffle_buffer: int = 512
    # Each step's samples concatenated into rows of at most pack_tokens tokens instead of one padded row each
    # (ckf_dist.data.packing; one task per row, attention never crosses a sample; README "Throughput").
    packing: bool = False
    pack_tokens: int = 0  # tokens per packed row, >= data.max_seq_len; 0 = data.max_seq_len
    # true: Ray Data hands every worker the same rows in the same order on every run (preserve_order; some
    # pipelining lost), so a rerun or a restart after a failure trains bit for bit as an uninterrupted run.
    # false: the split between workers follows the timing of the read tasks and varies from run to run.
    deterministic_data: bool = False
    seed: int = 0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    # Parameters smaller than this stay unpartitioned under ZeRO-3. 0 partitions everything (the tiny CPU
    # default, so that tests exercise real partitioning); DeepSpeed's own default is 100000.
    param_persistence_threshold: int = 0
    # Extra keys merged into the generated DeepSpeed JSON config (e.g. offload settings).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RayConfig:
    address: str = ""  # "" = connect to RAY_ADDRESS if set, else start a local Ray
    num_workers: int = 2
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 0.5  # <1 on a 2-CPU machine: Ray Data needs a CPU too (see engineering notes)
    gpus_per_worker: float = 1.0
    local_num_cpus: int = 0  # logical CPUs for a local Ray; 0 = Ray's own count
    # Worker failures survived in place (Ray Train FailureConfig): the worker group restarts and resumes from the
    # latest checkpoint (steps after it are trained again). 0 = the first failure ends the run; -1 = no limit.
    max_failures: int = 3


@dataclass
class CheckpointConfig:
    storage_path: str = "~/ckf_runs"  # local folder or s3://bucket/prefix
    run_name: str = "ckf-default"
    every_steps: int = 100
    keep: int = 2
    export_adapter: bool = True


@dataclass
class EvalConfig:
    """``python -m ckf_dist.evaluate`` (see its module docstring for the metrics and the ablation switches)."""

    form: str = "hybrid"  # hybrid (soft tokens) | text (titles only, no soft tokens)
    split: str = "test"  # train | valid | test
    tasks: list[str] = field(default_factory=list)  # [] = data.tasks
    groups: list[str] = field(default_factory=lambda: ["all", "warm", "cold"])
    batch_size: int = 16  # samples per inference batch (a top-K sample is num_candidates rows)
    max_rows: int = 0  # per task; 0 = every row of the split
    max_new_tokens: int = 32  # greedy decoding length for explanations (ratings use at most 8)
    topk_score: str = "mean"  # mean | sum: log-prob of a candidate title's tokens (+ eos) given the prompt
    baseline: str = "none"  # none | cf-only (u.v of the CF tables; no checkpoint needed)
    concurrency: int = 0  # inference actors; 0 = one per GPU, else 1
    out: str = ""  # report path ("" = ./eval_report.json); the chart goes beside it (.png)


@dataclass
class ProfileConfig:
    """``python -m ckf_dist.profile``: warm-up + measured steps of the real pipeline, timed per section."""

    enabled: bool = False  # the workers time each step's sections (python -m ckf_dist.profile sets it)
    warmup_steps: int = 2  # steps before the measured ones (allocator, data pipeline and JIT warm-up)
    steps: int = 4  # measured steps (>= 2: one checkpoint is written inside the measured window)
    trace_steps: int = 1  # steps after the measured ones that torch.profiler records on rank 0; 0 = no trace
    # Peak TFLOP/s of one worker's device for the MFU; 0 = the bf16 table by GPU name (A100 312, H100 989,
    # H200 989), else (a CPU, another GPU) a matmul probe measured on each worker.
    peak_tflops: float = 0.0
    out: str = "profile"  # local folder for profile.json, profile.png and trace.json


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cf: CFConfig = field(default_factory=CFConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {sorted(allowed)}")


def validate(cfg: Config) -> Config:
    """Checks values that type-check but cannot work; raises ConfigError naming the key."""
    _choice("data.source", cfg.data.source,
            {"synthetic", "movielens-100k", "movielens-1m", "amazon-reviews", "recbole", "generic"})
    for key in cfg.data.column_map:
        _choice("data.column_map key", key, set(GENERIC_COLUMNS))
    _choice("data.ctr_labels", cfg.data.ctr_labels, {"sampled", "given"})
    if cfg.data.ctr_labels == "given" and cfg.data.source != "generic":
        raise ConfigError(f"data.ctr_labels=given needs data.source=generic (labels come from its label column), "
                          f"not {cfg.data.source!r}")
    if not cfg.data.list_delimiter or cfg.data.list_delimiter == cfg.data.csv_delimiter:
        raise ConfigError(f"data.list_delimiter={cfg.data.list_delimiter!r} must be non-empty and differ from "
                          f"data.csv_delimiter={cfg.data.csv_delimiter!r}")
    if cfg.data.max_users < 0:
        raise ConfigError(f"data.max_users={cfg.data.max_users} must be >= 0 (0 = all users)")
    if not 1 <= cfg.data.review_min_words <= cfg.data.review_max_words:
        raise ConfigError(f"data.review_min_words={cfg.data.review_min_words} and data.review_max_words="
                          f"{cfg.data.review_max_words} must satisfy 1 <= min <= max")
    if not cfg.data.tasks:
        raise ConfigError("data.tasks is empty: name at least one of " + ", ".join(TASKS))
    for task in cfg.data.tasks:
        _choice("data.tasks[]", task, set(TASKS))
    if len(set(cfg.data.tasks)) != len(cfg.data.tasks):
        raise ConfigError(f"data.tasks has duplicates: {cfg.data.tasks}")
    for task in cfg.training.task_weights:
        _choice("training.task_weights key", task, set(TASKS))
    if cfg.data.source != "synthetic" and not cfg.data.raw_path:
        raise ConfigError(f"data.raw_path must name the raw files for data.source={cfg.data.source!r}")
    if cfg.data.num_candidates < 2:
        raise ConfigError("data.num_candidates must be >= 2 (1 positive + negatives)")
    if cfg.data.s3.retry_attempts < 1 or cfg.data.s3.outage_wait_s < 0:
        raise ConfigError(f"data.s3.retry_attempts={cfg.data.s3.retry_attempts} must be >= 1 and "
                          f"data.s3.outage_wait_s={cfg.data.s3.outage_wait_s} >= 0")
    if bool(cfg.data.s3.access_key_id) != bool(cfg.data.s3.secret_access_key):
        raise ConfigError("data.s3.access_key_id and data.s3.secret_access_key go together: set both or neither "
                          "(neither = the environment's AWS_* keys or the default AWS credential chain)")
    _choice("model.source", cfg.model.source, {"tiny", "hf", "gguf"})
    if cfg.model.source != "tiny" and not cfg.model.path:
        raise ConfigError(f"model.path must be set for model.source={cfg.model.source!r}")
    _choice("model.attn_implementation", cfg.model.attn_implementation,
            {"sdpa", "eager", "flash_attention_2", "flex_attention"})
    _choice("model.zero_init", cfg.model.zero_init, {"auto", "true", "false"})
    _choice("model.fusion", cfg.model.fusion, {"soft_tokens", "id_tokens"})
    if cfg.model.zero_init == "true" and (cfg.model.source != "hf" or cfg.deepspeed.zero_stage != 3):
        raise ConfigError(f"model.zero_init=true needs model.source=hf and deepspeed.zero_stage=3 (got "
                          f"{cfg.model.source!r}, {cfg.deepspeed.zero_stage})")
    _choice("cf.model", cfg.cf.model, {"mf", "lightgcn"})
    _choice("cf.pooling", cfg.cf.pooling, {"mean", "attention"})
    _choice("cf.meta_activation", cfg.cf.meta_activation, {"none", "relu"})
    _choice("cf.projector", cfg.cf.projector, {"linear", "mlp"})
    if cfg.cf.dim < 1:
        raise ConfigError("cf.dim must be >= 1")
    _choice("cf.loss", cfg.cf.loss, {"bpr", "pointwise", "mse"})
    _choice("cf.early_stop_metric", cfg.cf.early_stop_metric, {"auto", "auc", "recall@20", "ndcg@20", "rmse"})
    if cfg.cf.early_stop_metric == "rmse" and cfg.cf.loss != "mse":
        raise ConfigError("cf.early_stop_metric=rmse needs cf.loss=mse (rating MF)")
    if cfg.cf.model == "lightgcn" and cfg.cf.loss == "mse":
        raise ConfigError("cf.loss=mse (rating regression) is for cf.model=mf; use bpr or pointwise with lightgcn")
    _choice("cf.reader", cfg.cf.reader, {"ray", "arrow"})
    for key in ("epochs", "batch_size", "num_negatives", "patience", "keep_versions", "eval_max_users"):
        if getattr(cfg.cf, key) < 1:
            raise ConfigError(f"cf.{key} must be >= 1")
    if cfg.cf.lightgcn_layers < 0:
        raise ConfigError("cf.lightgcn_layers must be >= 0")
    if cfg.cf.lr <= 0 or cfg.cf.reg < 0:
        raise ConfigError(f"cf.lr={cfg.cf.lr} must be > 0 and cf.reg={cfg.cf.reg} >= 0")
    if cfg.cf.mutual_weight < 0 or cfg.cf.mutual_ridge <= 0:
        raise ConfigError(f"cf.mutual_weight={cfg.cf.mutual_weight} must be >= 0 and cf.mutual_ridge="
                          f"{cfg.cf.mutual_ridge} > 0")
    if cfg.cf.mutual_batch_size < 1:
        raise ConfigError(f"cf.mutual_batch_size={cfg.cf.mutual_batch_size} must be >= 1")
    if not 1 <= cfg.lora.rank <= 64:
        raise ConfigError(f"lora.rank={cfg.lora.rank} must be in 1..64")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout={cfg.lora.dropout} must be in [0, 1)")
    _choice("lora.impl", cfg.lora.impl, {"auto", "torch", "triton", "side"})
    if not cfg.lora.shared_targets and not cfg.lora.task_targets:
        raise ConfigError("lora.shared_targets and lora.task_targets are both empty: nothing to train")
    _choice("training.curriculum", cfg.training.curriculum,
            {"sigmoid", "constant", "two_stage", "hybrid_only", "text_only"})
    _choice("training.gradient_routing", cfg.training.gradient_routing, {"spec", "joint"})
    if cfg.training.mapping_lr < 0 or cfg.training.lr <= 0:
        raise ConfigError(f"training.lr={cfg.training.lr} must be > 0 and training.mapping_lr="
                          f"{cfg.training.mapping_lr} >= 0 (0 = training.lr)")
    if cfg.training.eval_rows < 0:
        raise ConfigError(f"training.eval_rows={cfg.training.eval_rows} must be >= 0 (0 = no evaluation)")
    if cfg.training.eval_rows and not cfg.training.eval_splits:
        raise ConfigError("training.eval_splits is empty: name valid and/or test (or set training.eval_rows=0)")
    for split in cfg.training.eval_splits:
        _choice("training.eval_splits[]", split, {"valid", "test"})
    if cfg.model.tiny.pretrain_steps < 0 or cfg.model.tiny.pretrain_batch_size < 1:
        raise ConfigError("model.tiny.pretrain_steps must be >= 0 and model.tiny.pretrain_batch_size >= 1")
    for key in ("max_steps", "batch_size"):
        if getattr(cfg.training, key) < 1:
            raise ConfigError(f"training.{key} must be >= 1")
    if cfg.training.pack_tokens < 0:
        raise ConfigError(f"training.pack_tokens={cfg.training.pack_tokens} must be >= 0 (0 = data.max_seq_len)")
    if cfg.training.packing and 0 < cfg.training.pack_tokens < cfg.data.max_seq_len:
        raise ConfigError(f"training.pack_tokens={cfg.training.pack_tokens} is below data.max_seq_len="
                          f"{cfg.data.max_seq_len}: a sample is never split, so every sample must fit one packed row")
    if cfg.training.max_minutes < 0:
        raise ConfigError(f"training.max_minutes={cfg.training.max_minutes} must be >= 0 (0 = no time limit)")
    _choice("deepspeed.zero_stage", cfg.deepspeed.zero_stage, {0, 1, 2, 3})
    _choice("deepspeed.precision", cfg.deepspeed.precision, {"auto", "bf16", "fp16", "fp32"})
    _choice("ray.use_gpu", cfg.ray.use_gpu, {"auto", "true", "false"})
    if cfg.ray.num_workers < 1:
        raise ConfigError("ray.num_workers must be >= 1")
    if cfg.ray.max_failures < -1:
        raise ConfigError(f"ray.max_failures={cfg.ray.max_failures} must be >= 0, or -1 for no limit")
    if cfg.checkpoint.every_steps < 1:
        raise ConfigError("checkpoint.every_steps must be >= 1")
    if not cfg.checkpoint.run_name or "/" in cfg.checkpoint.run_name:
        raise ConfigError(f"checkpoint.run_name={cfg.checkpoint.run_name!r} must be a non-empty name without '/'")
    if cfg.profile.steps < 2:
        raise ConfigError(f"profile.steps={cfg.profile.steps} must be >= 2 (a checkpoint is timed inside the window)")
    for key in ("warmup_steps", "trace_steps"):
        if getattr(cfg.profile, key) < 0:
            raise ConfigError(f"profile.{key} must be >= 0")
    if cfg.profile.peak_tflops < 0:
        raise ConfigError(f"profile.peak_tflops={cfg.profile.peak_tflops} must be >= 0 (0 = table or probe)")
    _choice("eval.form", cfg.eval.form, {"hybrid", "text"})
    _choice("eval.split", cfg.eval.split, {"train", "valid", "test"})
    for task in cfg.eval.tasks:
        _choice("eval.tasks[]", task, set(TASKS))
    for group in cfg.eval.groups:
        _choice("eval.groups[]", group, {"all", "warm", "cold"})
    _choice("eval.topk_score", cfg.eval.topk_score, {"mean", "sum"})
    _choice("eval.baseline", cfg.eval.baseline, {"none", "cf-only"})
    for key in ("batch_size", "max_new_tokens"):
        if getattr(cfg.eval, key) < 1:
            raise ConfigError(f"eval.{key} must be >= 1")
    if cfg.eval.max_rows < 0 or cfg.eval.concurrency < 0:
        raise ConfigError("eval.max_rows and eval.concurrency must be >= 0")
    return cfg


def _load_yaml(path: str) -> DictConfig:
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: say which file
        raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return loaded


# ------------------------------------------------------------------------------------------------ CLI help
# Every entry point (train, data.prepare, cf_refresh, evaluate) takes ``[--config FILE] [key=value ...]`` plus its
# own options, and ``-h``/``--help`` prints ``cli_help``: the usage, the options and every config key with its
# default and its doc. The docs are the comments written beside (or right above) each field in this file, read
# from the source with ``tokenize`` + ``ast``, so the help cannot drift from the definitions.

HELP_FLAGS = ("-h", "--help")
CONFIG_OPTIONS = (
    ("--config FILE, -c FILE", "a YAML file with the same tree as below, merged over the defaults"),
    ("key=value", "set one config key, e.g. training.max_steps=100 (applied after --config; an unknown or "
                  "mistyped key fails naming it)"),
)


class HelpRequested(Exception):
    """``-h``/``--help`` was given: the entry point prints its help and exits 0."""


def wants_help(argv) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def _comments(module) -> tuple[dict[int, str], dict[int, str]]:
    """(comment ending a code line, comment-only line) of a module's source, by line number."""
    import inspect
    import io
    import tokenize

    trailing: dict[int, str] = {}
    alone: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(module)).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (alone if not tok.line[: tok.start[1]].strip() else trailing)[tok.start[0]] = text
    return trailing, alone


def field_docs(cls) -> dict[str, str]:
    """The doc of each field of a config dataclass: the comment at the end of its line, else the comment lines
    right above it (joined), read from the source; "" where it has none (or the source is not available)."""
    import ast
    import inspect
    import sys

    module = sys.modules[cls.__module__]
    try:
        trailing, alone = _comments(module)
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):  # no source shipped: keys and defaults only
        return {}
    docs: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ClassDef) and node.name == cls.__name__):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                doc = next((trailing[r] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in trailing), "")
                if not doc:
                    above, row = [], stmt.lineno - 1
                    while row in alone:
                        above.insert(0, alone[row])
                        row -= 1
                    doc = " ".join(above)
                docs[stmt.target.id] = doc
    return docs


def _cli_value(value) -> str:
    """A default as it would be written in key=value."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_cli_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_cli_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def config_keys(obj: Any = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(group, key, default, doc) for every leaf key of the config tree, group by group (a nested dataclass such
    as ``data.s3`` is a group of its own, listed after its parent's keys)."""
    import dataclasses

    obj = Config() if obj is None else obj
    docs = field_docs(type(obj))
    rows, nested = [], []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f.name, value))
        elif prefix:
            rows.append((prefix, f.name, _cli_value(value), docs.get(f.name, "")))
    for name, value in nested:
        rows += config_keys(value, f"{prefix}.{name}" if prefix else name)
    return rows


def _group_doc(group: str) -> str:
    import dataclasses
    import inspect

    obj: Any = Config()
    for part in group.split("."):
        obj = getattr(obj, part)
    doc = inspect.getdoc(type(obj)) or ""
    if doc.startswith(type(obj).__name__ + "("):  # the dataclass's generated signature, not a docstring
        return ""
    return " ".join(doc.split("\n\n")[0].replace("``", "").split()) if dataclasses.is_dataclass(obj) else ""


def _wrap(text: str, indent: int, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=max(width - indent, 30), break_on_hyphens=False) or [""]


def config_help(width: Optional[int] = None) -> str:
    """Every config group and key with its default and doc (the second half of every entry point's --help)."""
    import shutil

    width = width or min(shutil.get_terminal_size((110, 24)).columns, 120)
    lines = ["config keys (group.key=default  doc); the defaults are the embedded CPU default run:"]
    col = 34
    group = None
    for grp, key, default, doc in config_keys():
        if grp != group:
            group = grp
            gdoc = _group_doc(grp)
            lines.append("")
            lines += _wrap(f"{grp}:" + (f"  {gdoc}" if gdoc else ""), 0, width)
        head = f"  {grp}.{key}={default}"
        if not doc:
            lines.append(head)
            continue
        wrapped = _wrap(doc, col + 2, width)
        if len(head) + 2 <= col:
            lines.append(head.ljust(col) + "  " + wrapped[0])
            wrapped = wrapped[1:]
        else:
            lines.append(head)
        lines += [" " * (col + 2) + w for w in wrapped]
    return "\n".join(lines)


def cli_help(prog: str, summary: str, options=(), usage_tail: str = "[--config FILE] [key=value ...]",
             width: Optional[int] = None) -> str:
    """The --help text of an entry point: usage, what it does, its options (``(flags, doc)`` pairs, shown
    before the shared ``--config``/``key=value`` ones) and every config key (``config_help``)."""
    import shutil

    width = width or min(shutil.get_terminal_size((110, 24)).columns, 120)
    parts, depth, word = [], 0, ""  # the usage's top-level words and [...] groups, never broken inside
    for ch in "[-h] " + " ".join(f"[{f.split(', ')[0]}]" for f, _ in options) + " " + usage_tail:
        depth += (ch == "[") - (ch == "]")
        if ch == " " and depth == 0:
            parts, word = parts + [word] if word else parts, ""
        else:
            word += ch
    parts += [word] if word else []
    out, line = [], f"usage: {prog}"
    for part in parts:
        if len(line) + 1 + len(part) > width and line.strip() != f"usage: {prog}":
            out.append(line)
            line = " " * (len(prog) + 7)
        line += " " + part
    out += [line, ""]
    out += _wrap(" ".join(summary.split()), 0, width)
    out += ["", "options:"]
    for flag, doc in (("-h, --help", "show this help (every config key with its default and doc) and exit"),
                      *options, *CONFIG_OPTIONS):
        wrapped = _wrap(doc, 28, width)
        if len(flag) + 2 <= 26:
            out.append(f"  {flag}".ljust(28) + wrapped[0])
            wrapped = wrapped[1:]
        else:
            out.append(f"  {flag}")
        out += [" " * 28 + w for w in wrapped]
    out += ["", config_help(width)]
    return "\n".join(out)


def show_help(text: str) -> int:
    """Prints a --help text (quietly when the reader closed the pipe, e.g. ``| head``); returns exit code 0."""
    import sys

    try:
        print(text, flush=True)
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing more can be written to the closed pipe
    return 0


def _explain(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    if key:
        return ConfigError(f"{origin}: bad key '{key}': {msg}")
    return ConfigError(f"{origin}: {msg}")


def split_args(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """``[--config FILE] [key=value ...]`` -> (yaml path or None, dotlist overrides). ``-h``/``--help`` raises
    ``HelpRequested`` (the entry points check ``wants_help`` first and print ``cli_help``)."""
    yaml_path = None
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in HELP_FLAGS:
            raise HelpRequested()
        if arg in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path")
            yaml_path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            yaml_path = arg.split("=", 1)[1]
        elif "=" not in arg or arg.startswith("-"):
            raise ConfigError(f"cannot read argument {arg!r}: expected --config FILE or key=value")
        else:
            overrides.append(arg)
        i += 1
    return yaml_path, overrides


def load_config(argv: Optional[list[str]] = None, base_yaml: Optional[str] = None,
                base_origin: str = "base config") -> Config:
    """Builds the config from ``[--config FILE] [key=value ...]``; raises ConfigError naming a bad key.

    Layers, later wins: dataclass defaults, ``base_yaml`` (YAML text, e.g. a checkpoint's config snapshot),
    the ``--config`` file, the dotlist overrides.
    """
    yaml_path, overrides = split_args(list(argv or []))
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    # Free-form mappings: their keys are data, not config keys (DeepSpeed JSON keys, task names checked later).
    OmegaConf.set_struct(cfg.deepspeed.extra, False)
    OmegaConf.set_struct(cfg.training.task_weights, False)
    OmegaConf.set_struct(cfg.data.column_map, False)
    layers = []
    if base_yaml:
        layers.append((lambda: OmegaConf.create(base_yaml), base_origin))
    if yaml_path:
        layers.append((lambda: _load_yaml(yaml_path), yaml_path))
    if overrides:
        layers.append((lambda: OmegaConf.from_dotlist(overrides), "command line"))
    for make_layer, origin in layers:
        try:
            cfg = OmegaConf.merge(cfg, make_layer())
        except OmegaConfBaseException as exc:
            raise _explain(exc, origin) from exc
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, yaml_path or "config") from exc
    # `ray.use_gpu=true` (CLI) or `use_gpu: true` (YAML) is read as a boolean and stored in the str field as "True"
    if obj.ray.use_gpu in ("True", "False"):
        obj.ray.use_gpu = obj.ray.use_gpu.lower()
    if obj.model.zero_init in ("True", "False"):  # the same for model.zero_init
        obj.model.zero_init = obj.model.zero_init.lower()
    return validate(obj)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict) -> Config:
    """Rebuilds a Config from ``dataclasses.asdict`` output (how it travels to Ray workers)."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), data)
    return validate(OmegaConf.to_object(cfg))


def pack_tokens(cfg: Config) -> int:
    """Tokens per packed row of a training step, 0 = no packing (``training.packing`` off)."""
    if not cfg.training.packing:
        return 0
    return cfg.training.pack_tokens or cfg.data.max_seq_len


def resolve_data_path(cfg: Config) -> str:
    if cfg.data.path:
        return cfg.data.path
    return os.path.join(os.path.expanduser("~/.cache/ckf_dist/data"), cfg.data.source)


def resolve_embeddings_path(cfg: Config) -> str:
    if cfg.cf.embeddings_path:
        return cfg.cf.embeddings_path
    return resolve_data_path(cfg).rstrip("/") + "/cf"
