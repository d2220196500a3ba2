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

TASKS = ("ctr", "topk", "rating", "explanation", "review_rating")
# data.tasks default: the four CKF tasks; "review_rating" (review -> rating, the authors' variant) is opt-in.
DEFAULT_TASKS = ("ctr", "topk", "rating", "explanation")
# data.column_map keys for data.source=generic (canonical name -> column name in the file).
GENERIC_COLUMNS = ("user", "item", "rating", "label", "timestamp", "title", "review")


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


@dataclass
class S3Config:
    """Where ``s3://`` paths live. Empty values fall back to the usual AWS environment variables
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)."""

    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""


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
    # generic: canonical name (user, item, rating | label, timestamp, title, review) -> column in the file;
    # unmapped names use the canonical name itself.
    column_map: dict[str, str] = field(default_factory=dict)
    csv_delimiter: str = ","  # generic CSV files
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
    path: str = ""
    gguf_file: str = ""
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    gradient_checkpointing: bool = False
    seed: int = 0


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


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 64.0
    dropout: float = 0.1
    shared_targets: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "o_proj"])
    task_targets: list[str] = field(default_factory=lambda: ["q_proj"])
    impl: str = "auto"  # auto | torch | triton  (batched per-task LoRA implementation)


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


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {sorted(allowed)}")


def validate(cfg: Config) -> Config:
    """Checks values that type-check but cannot work; raises ConfigError naming the key."""
    _choice("data.source", cfg.data.source,
            {"synthetic", "movielens-100k", "movielens-1m", "amazon-reviews", "recbole", "generic"})
    for key in cfg.data.column_map:
        _choice("data.column_map key", key, set(GENERIC_COLUMNS))
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
    _choice("model.source", cfg.model.source, {"tiny", "hf", "gguf"})
    if cfg.model.source != "tiny" and not cfg.model.path:
        raise ConfigError(f"model.path must be set for model.source={cfg.model.source!r}")
    _choice("model.attn_implementation", cfg.model.attn_implementation, {"sdpa", "eager", "flash_attention_2"})
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
    if not 1 <= cfg.lora.rank <= 64:
        raise ConfigError(f"lora.rank={cfg.lora.rank} must be in 1..64")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout={cfg.lora.dropout} must be in [0, 1)")
    _choice("lora.impl", cfg.lora.impl, {"auto", "torch", "triton"})
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
    if cfg.training.max_minutes < 0:
        raise ConfigError(f"training.max_minutes={cfg.training.max_minutes} must be >= 0 (0 = no time limit)")
    _choice("deepspeed.zero_stage", cfg.deepspeed.zero_stage, {0, 1, 2, 3})
    _choice("deepspeed.precision", cfg.deepspeed.precision, {"auto", "bf16", "fp16", "fp32"})
    _choice("ray.use_gpu", cfg.ray.use_gpu, {"auto", "true", "false"})
    if cfg.ray.num_workers < 1:
        raise ConfigError("ray.num_workers must be >= 1")
    if cfg.checkpoint.every_steps < 1:
        raise ConfigError("checkpoint.every_steps must be >= 1")
    if not cfg.checkpoint.run_name or "/" in cfg.checkpoint.run_name:
        raise ConfigError(f"checkpoint.run_name={cfg.checkpoint.run_name!r} must be a non-empty name without '/'")
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


def _explain(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    if key:
        return ConfigError(f"{origin}: bad key '{key}': {msg}")
    return ConfigError(f"{origin}: {msg}")


def split_args(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """``[--config FILE] [key=value ...]`` -> (yaml path or None, dotlist overrides)."""
    yaml_path = None
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
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
    return validate(obj)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict) -> Config:
    """Rebuilds a Config from ``dataclasses.asdict`` output (how it travels to Ray workers)."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), data)
    return validate(OmegaConf.to_object(cfg))


def resolve_data_path(cfg: Config) -> str:
    if cfg.data.path:
        return cfg.data.path
    return os.path.join(os.path.expanduser("~/.cache/ckf_dist/data"), cfg.data.source)


def resolve_embeddings_path(cfg: Config) -> str:
    if cfg.cf.embeddings_path:
        return cfg.cf.embeddings_path
    return resolve_data_path(cfg).rstrip("/") + "/cf"
