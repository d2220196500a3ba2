"""A communication model of one CKF training step under DeepSpeed ZeRO: per-GPU all-gather / reduce-scatter volumes
from the model shape, compute time from FLOPs at an assumed MFU, NVLink / InfiniBand bandwidths, overlap, and the
expected scaling efficiency on 1 x 8 and 8 x 8 A100s (or --nodes / --gpus-per-node). A model, not a measurement:
every assumption is printed with the table.

    python benchmarks/comm_model.py --config configs/llama7b_8xa100_zero3.yaml
    python benchmarks/comm_model.py --config configs/llama7b_8xa100_zero3.yaml deepspeed.zero_stage=2 --overlap 0.5

What moves per step and GPU (ring collectives: each GPU sends and receives (N - 1) / N of the buffer):

* ZeRO-3: every partitioned parameter is all-gathered before its module's forward and again for its backward (with
  gradient checkpointing the one backward gather serves the recomputed forward too). The base is frozen, so these
  are 2 x (N - 1) / N x (partitioned parameters) x (bytes per parameter): the dominant traffic. Parameters with
  fewer than ``deepspeed.param_persistence_threshold`` elements stay whole on every GPU and are never gathered.
* Every stage: the trainable parameters' gradients are reduce-scattered and the updated partitions all-gathered
  (stage 0's all-reduce moves the same 2 x (N - 1) / N x bytes). Only LoRA + mapping side: a few tens of MB.
* ZeRO-0/1/2 keep the frozen base whole on every GPU (13.5 GB for a 7B base in bf16, which fits an 80 GB A100):
  no parameter all-gathers at all.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source tree

from ckf_dist.config import Config, ConfigError, load_config  # noqa: E402
from ckf_dist.data.schema import TASK_IDS  # noqa: E402

NUM_TASKS = len(TASK_IDS)  # CKFModel stacks one task adapter per known task (worker.build_ckf_model)

# Shapes of models named by model.path (an HF folder's config.json is read when the folder is local).
# (hidden, layers, intermediate, vocab, heads, kv_heads)
KNOWN_SHAPES = {
    "llama-2-7b": (4096, 32, 11008, 32000, 32, 32),
    "llama-2-13b": (5120, 40, 13824, 32000, 40, 40),
    "llama-3-8b": (4096, 32, 14336, 128256, 32, 8),
    "llama-3.1-8b": (4096, 32, 14336, 128256, 32, 8),
}
PEAK_BF16_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0}


@dataclass
class Shape:
    """A LLaMA-architecture decoder (untied output head, SwiGLU MLP, no biases)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int  # including the added <cf> token
    heads: int
    kv_heads: int
    source: str = ""  # where the shape came from


@dataclass
class Assumptions:
    gpu: str = "a100"
    peak_tflops: float = PEAK_BF16_TFLOPS["a100"]  # dense bf16 per GPU
    mfu: float = 0.40  # model FLOPs utilisation of the compute (what the GPU sustains on our kernels)
    nvlink_gbs: float = 300.0  # GB/s per direction per GPU (A100 SXM NVLink 3: 600 GB/s bidirectional)
    nic_gbps: float = 200.0  # Gb/s per GPU between nodes (DGX A100: 8 x 200 Gb/s HDR InfiniBand per node)
    link_efficiency: float = 0.80  # achieved NCCL bus bandwidth / link bandwidth
    overlap: float = 0.80  # fraction of the communication ZeRO's prefetching hides behind compute (<= compute)
    bytes_per_param: int = 2  # bf16 parameters and gradients on the wire
    tokens_per_sample: int = 0  # 0 = data.max_seq_len (every sample padded to the longest allowed)
    answer_tokens: int = 4  # answer tokens per sample (the output head runs only there)


def shape_from_config(cfg: Config, tokens_added: int = 1) -> Shape:
    """The LLM shape ``cfg`` trains: model.tiny for the tiny model, an HF folder's config.json when local, else a
    known name in model.path (KNOWN_SHAPES). ``tokens_added``: the ``<cf>`` placeholder grows the vocabulary."""
    m = cfg.model
    if m.source == "tiny":
        t = m.tiny
        return Shape(t.hidden_size, t.num_layers, t.intermediate_size, t.vocab_size + tokens_added, t.num_heads,
                     t.num_kv_heads, "model.tiny (vocab: the BPE size + <cf>; the trained tokenizer may be smaller)")
    local = os.path.join(os.path.expanduser(m.path), "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            c = json.load(f)
        return Shape(c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"] + tokens_added,
                     c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"]), local)
    name = m.path.lower().rstrip("/")
    for key in sorted(KNOWN_SHAPES, key=len, reverse=True):
        if key in name:
            h, n, i, v, a, kv = KNOWN_SHAPES[key]
            return Shape(h, n, i, v + tokens_added, a, kv, f"{key} (from model.path={m.path})")
    raise ConfigError(f"model.path={m.path!r}: shape unknown (not a local HF folder, no known name among "
                      f"{sorted(KNOWN_SHAPES)}); pass --hidden --layers --intermediate --vocab --heads --kv-heads")


def param_tensors(shape: Shape, cfg: Config) -> list[tuple[str, int, bool]]:
    """(name, elements, trainable) of every parameter tensor of the CKF model: the frozen LLaMA base with the
    Multi-LoRA parameters of ``cfg.lora`` and the mapping side of ``cfg.cf`` (tests/test_comm_model.py checks
    this list against a real CKFModel)."""
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    head_dim = h // shape.heads
    kv = shape.kv_heads * head_dim
    linears = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
               "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # (in, out)
    r = cfg.lora.rank
    out = [("embed_tokens", v * h, False), ("lm_head", v * h, False), ("norm", h, False)]
    for layer in range(shape.layers):
        p = f"layers.{layer}."
        out += [(p + "input_layernorm", h, False), (p + "post_attention_layernorm", h, False)]
        for name, (d_in, d_out) in linears.items():
            out.append((p + name + ".weight", d_in * d_out, False))
            if name in cfg.lora.shared_targets:
                out += [(p + name + ".shared_a", r * d_in, True), (p + name + ".shared_b", d_out * r, True)]
            if name in cfg.lora.task_targets:
                out += [(p + name + ".task_a", NUM_TASKS * r * d_in, True),
                        (p + name + ".task_b", NUM_TASKS * d_out * r, True)]
    d, mh = cfg.cf.dim, cfg.cf.meta_hidden
    out += [("meta_net.0.weight", d * mh, True), ("meta_net.0.bias", mh, True),
            ("meta_net.2.weight", mh * d * d, True), ("meta_net.2.bias", d * d, True)]
    for proj in ("user_proj", "item_proj"):
        if cfg.cf.projector == "linear":
            out += [(proj + ".weight", d * h, True), (proj + ".bias", h, True)]
        else:  # mlp: Linear(d, h) -> GELU -> Linear(h, h)
            out += [(proj + ".0.weight", d * h, True), (proj + ".0.bias", h, True),
                    (proj + ".2.weight", h * h, True), (proj + ".2.bias", h, True)]
    if cfg.cf.pooling == "attention":  # nn.MultiheadAttention(d, 1 head)
        out += [("pooling.in_proj_weight", 3 * d * d, True), ("pooling.in_proj_bias", 3 * d, True),
                ("pooling.out_proj.weight", d * d, True), ("pooling.out_proj.bias", d, True)]
    return out


def step_volumes(tensors, n_gpus: int, zero_stage: int, persistence_threshold: int, bytes_per_param: int) -> dict:
    """Bytes each GPU receives (= sends) per step in ring collectives.

    param_allgather: ZeRO-3 only, forward + backward re-gather of the partitioned parameters (numel >= threshold)
    that are frozen; trainable: reduce-scatter of the trainable gradients + all-gather of their updated partitions
    (for ZeRO-3 the trainable partitioned ones are gathered for forward and backward as well).
    """
    ring = (n_gpus - 1) / n_gpus
    partitioned = [(n, t) for _, n, t in tensors if zero_stage == 3 and n >= persistence_threshold]
    frozen_part = sum(n for n, t in partitioned if not t)
    train_part = sum(n for n, t in partitioned if t)
    trainable = sum(n for _, n, t in tensors if t)
    return {
        "param_allgather": 2 * ring * (frozen_part + train_part) * bytes_per_param,
        "grad_reduce_scatter": ring * trainable * bytes_per_param,
        "trainable_allgather": ring * trainable * bytes_per_param,
        "partitioned_frozen_params": frozen_part,
        "partitioned_trainable_params": train_part,
        "trainable_params": trainable,
        "total_params": sum(n for _, n, _ in tensors),
    }


def step_flops(shape: Shape, tensors, tokens: float, tokens_per_sample: float, answer_tokens: float,
               gradient_checkpointing: bool) -> dict:
    """FLOPs of one step on ``tokens`` tokens (samples of ``tokens_per_sample``; attention never crosses a sample).

    Frozen base matmuls (every linear but the output head): 2 per weight per token forward, 2 backward (input
    gradient only: no weight gradient for a frozen weight), 2 more for the recomputed forward with gradient
    checkpointing. LoRA: 2 forward + 4 backward per weight a token passes (the shared adapter and its task's
    one); the mapping side runs once per sample (negligible, not counted). Output head: only on answer tokens
    (forward + input gradient). Attention (causal, per layer): 2 x 2 x s/2 x hidden per token forward (QK^T, AV),
    twice that backward, once more with checkpointing.
    """
    recompute = 1 if gradient_checkpointing else 0
    base = sum(n for name, n, t in tensors if not t and name.startswith("layers.") and name.endswith(".weight"))
    # a token passes the shared adapter and its own task's adapter (1 of NUM_TASKS stacked ones)
    lora = sum(n / (NUM_TASKS if ".task_" in name else 1) for name, n, t in tensors if t and name.startswith("layers."))
    head = next(n for name, n, _ in tensors if name == "lm_head")
    samples = tokens / tokens_per_sample
    matmul = tokens * (2 * (2 + recompute) * base + 6 * lora) + samples * answer_tokens * 4 * head
    attn_fwd = shape.layers * tokens * 2 * 2 * (tokens_per_sample / 2) * shape.hidden
    attention = attn_fwd * (1 + 2 + recompute)
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def scenario(shape: Shape, cfg: Config, a: Assumptions, nodes: int, gpus_per_node: int) -> dict:
    """One row of the table: volumes, times and the scaling efficiency for nodes x gpus_per_node GPUs (weak scaling:
    the per-GPU batch is ``training.batch_size`` samples x 2 forms whatever the GPU count)."""
    n = nodes * gpus_per_node
    tensors = param_tensors(shape, cfg)
    vol = step_volumes(tensors, n, cfg.deepspeed.zero_stage, cfg.deepspeed.param_persistence_threshold,
                       a.bytes_per_param)
    tps = a.tokens_per_sample or cfg.data.max_seq_len
    tokens = cfg.training.batch_size * 2 * tps
    fl = step_flops(shape, tensors, tokens, tps, a.answer_tokens, cfg.model.gradient_checkpointing)
    link_gbs = a.nvlink_gbs if nodes == 1 else min(a.nvlink_gbs, a.nic_gbps / 8)
    bus = link_gbs * 1e9 * a.link_efficiency  # bytes/s
    comm_bytes = vol["param_allgather"] + vol["grad_reduce_scatter"] + vol["trainable_allgather"]
    t_comm = comm_bytes / bus if n > 1 else 0.0
    t_compute = fl["total"] / (a.peak_tflops * 1e12 * a.mfu)
    hidden = min(a.overlap * t_comm, t_compute)
    t_step = t_compute + t_comm - hidden
    return {"gpus": f"{nodes}x{gpus_per_node}", "n_gpus": n, "zero_stage": cfg.deepspeed.zero_stage,
            "link": "NVLink" if nodes == 1 else "InfiniBand", "bus_gbs": bus / 1e9, **vol,
            "tokens_per_gpu_step": tokens, "flops_per_gpu_step": fl["total"], "compute_s": t_compute,
            "comm_s": t_comm, "exposed_comm_s": t_comm - hidden, "step_s": t_step,
            "scaling_efficiency": t_compute / t_step, "tokens_per_s": n * tokens / t_step}


def parse_args(argv) -> tuple[argparse.Namespace, Config, Shape, Assumptions]:
    """(options with ``overrides``, config, model shape, assumptions) without computing anything; a bad option or
    config key exits through argparse / raises ConfigError naming it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Trailing key=value pairs are config overrides (ckf_dist.config).")
    p.add_argument("--config", default=None, help="a config YAML (e.g. configs/llama7b_8xa100_zero3.yaml)")
    p.add_argument("--layout", default="1x8,8x8", help="comma list of NODESxGPUS_PER_NODE")
    for name in ("hidden", "layers", "intermediate", "vocab", "heads", "kv-heads"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"model {name} (overrides the config's model)")
    d = Assumptions()
    p.add_argument("--gpu", default=d.gpu, choices=sorted(PEAK_BF16_TFLOPS), help="peak bf16 TFLOP/s from a table")
    p.add_argument("--peak-tflops", type=float, default=None, help="overrides the --gpu table's peak")
    p.add_argument("--mfu", type=float, default=d.mfu)
    p.add_argument("--nvlink-gbs", type=float, default=d.nvlink_gbs, help="GB/s per direction per GPU")
    p.add_argument("--nic-gbps", type=float, default=d.nic_gbps, help="inter-node Gb/s per GPU")
    p.add_argument("--link-efficiency", type=float, default=d.link_efficiency)
    p.add_argument("--overlap", type=float, default=d.overlap)
    p.add_argument("--tokens-per-sample", type=int, default=d.tokens_per_sample,
                   help="0 = data.max_seq_len (padded worst case)")
    p.add_argument("--answer-tokens", type=int, default=d.answer_tokens)
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = overrides
    for layout in args.layout.split(","):
        parts = layout.split("x")
        if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
            p.error(f"--layout {layout!r}: expected NODESxGPUS_PER_NODE, e.g. 8x8")
    for name in ("mfu", "link_efficiency", "overlap"):
        if not 0 <= getattr(args, name) <= 1 or (name == "mfu" and args.mfu == 0):
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be in (0, 1]")
    cfg = load_config((["--config", args.config] if args.config else []) + overrides)
    explicit = {k: getattr(args, k.replace("-", "_")) for k in ("hidden", "layers", "intermediate", "vocab", "heads",
                                                                   "kv-heads")}
    if all(v is not None for v in explicit.values()):
        shape = Shape(*explicit.values(), source="command line")
    else:
        shape = shape_from_config(cfg)
        for k, v in explicit.items():
            if v is not None:
                setattr(shape, k.replace("-", "_"), v)
                shape.source += f"; --{k} {v}"
    a = Assumptions(gpu=args.gpu, peak_tflops=args.peak_tflops or PEAK_BF16_TFLOPS[args.gpu], mfu=args.mfu,
                    nvlink_gbs=args.nvlink_gbs, nic_gbps=args.nic_gbps, link_efficiency=args.link_efficiency,
                    overlap=args.overlap, tokens_per_sample=args.tokens_per_sample, answer_tokens=args.answer_tokens)
    return args, cfg, shape, a


def format_table(rows: list[dict]) -> str:
    head = ("| GPUs | ZeRO | link (bus GB/s) | param all-gather GB | grad RS + trainable AG GB | compute s | comm s | "
            "exposed s | step s | scaling eff. | tokens/s |")
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['zero_stage']} | {r['link']} ({r['bus_gbs']:.0f}) | "
                     f"{r['param_allgather'] / 1e9:.2f} | "
                     f"{(r['grad_reduce_scatter'] + r['trainable_allgather']) / 1e9:.3f} | {r['compute_s']:.3f} | "
                     f"{r['comm_s']:.3f} | {r['exposed_comm_s']:.3f} | {r['step_s']:.3f} | "
                     f"{100 * r['scaling_efficiency']:.1f}% | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args, cfg, shape, a = parse_args(sys.argv[1:] if argv is None else argv)
    rows = []
    for layout in args.layout.split(","):
        nodes, per_node = (int(x) for x in layout.split("x"))
        rows.append(scenario(shape, cfg, a, nodes, per_node))
    r0 = rows[0]
    tps = a.tokens_per_sample or cfg.data.max_seq_len
    print("CKF step communication model (a model, not a measurement)")
    print(f"model shape: {asdict(shape)}")
    print(f"parameters: {r0['total_params'] / 1e9:.3f}B total, {r0['trainable_params'] / 1e6:.2f}M trainable (LoRA "
          f"rank {cfg.lora.rank} shared {list(cfg.lora.shared_targets)} task {list(cfg.lora.task_targets)} x "
          f"{NUM_TASKS} tasks + mapping side), partitioned frozen (ZeRO-3, >= "
          f"{cfg.deepspeed.param_persistence_threshold} elements): {r0['partitioned_frozen_params'] / 1e9:.3f}B")
    print(f"per GPU and step: {cfg.training.batch_size} samples x 2 forms x {tps} tokens = "
          f"{r0['tokens_per_gpu_step']:,} tokens, {r0['flops_per_gpu_step'] / 1e12:.1f} TFLOP (gradient "
          f"checkpointing {cfg.model.gradient_checkpointing}, output head on {a.answer_tokens} answer tokens/sample)")
    print("assumptions: " + ", ".join(f"{k}={v}" for k, v in asdict(a).items()))
    print("  intra-node: NVLink bus bandwidth = nvlink_gbs x link_efficiency; across nodes: the ring crosses one NIC "
          "per GPU, bus bandwidth = min(nvlink, nic_gbps / 8) x link_efficiency")
    print("  ring collectives: (N - 1) / N of the buffer per GPU; ZeRO-3 gathers every partitioned parameter for "
          "forward and again for backward; trainable gradients reduce-scattered + updated partitions all-gathered")
    print("  exposed comm = comm - min(overlap x comm, compute); step = compute + exposed comm; scaling efficiency = "
          "compute / step (weak scaling, per-GPU batch fixed); per-collective latency ignored")
    print(format_table(rows))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
