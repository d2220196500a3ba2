"""The CKF model (single-device code; DeepSpeed and Ray wrap it from outside).

KFM: history pooling -> meta-network per-user mapping W_u -> personalised user vector -> projectors into the
LLM's hidden size -> soft tokens written over the ``<cf>`` placeholders with one scatter.
MTM: the LLM's target linears are ``MultiLoRALinear`` layers routed by the batch's task segments.
Loss: causal-LM cross-entropy on answer tokens, averaged per (form, task), tasks weighted, and the
curriculum weight ``lam`` mixing text-only and hybrid losses.

Two switches from CKF's neighbours (``ckf_method.md`` section 5, CLLM4Rec):

* ``model.fusion=id_tokens``: instead of the mapping side, one trainable vocabulary token per user and per item
  (``user_tokens`` [U + 1, hidden], ``item_tokens`` [I + 1, hidden], the last row the fallback for ids the table
  does not cover), initialised from the CF tables through a linear projector (the soft token each would get
  without the meta-network) and trained while the base stays frozen. They go where the soft tokens go: the
  ``<cf>`` slot of the user and of each target item, so prompts, placeholder checks, packing and evaluation are
  the same. The tokens are addressed by id, not spelled in the tokenizer: a tokenizer holding 100k added
  strings is slow to load and match, and the placeholder's slot already names the user or item. Under ZeRO-3
  they are parameters like any other, partitioned across ranks.
* the ``next_item`` task's item-prediction head: the hidden state at the answer position scored against every
  item of the catalogue, ``h @ E_items^T`` [I], tied to the item embeddings (the items' soft tokens
  ``item_proj(E_V)``, or the item ID tokens), trained with the multinomial likelihood (softmax cross-entropy over
  the catalogue) of the true next item; no candidate list, no decoding, no item that does not exist.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ckf_dist.config import CFConfig, LoRAConfig
from ckf_dist.model.multi_lora import TaskSegments, inject_multi_lora

IGNORE = -100
FUSIONS = ("soft_tokens", "id_tokens")


class HistoryPooling(nn.Module):
    """p_u = pool(E_V[h]) over the sample's own history: masked mean, or single-head self-attention then mean."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        self.attn = nn.MultiheadAttention(dim, num_heads=1, batch_first=True) if mode == "attention" else None

    def forward(self, hist_emb: torch.Tensor, hist_mask: torch.Tensor) -> torch.Tensor:
        """hist_emb: [B, H, d], hist_mask: [B, H] bool (True = real item) -> [B, d] (zeros for empty history)."""
        if self.attn is not None and hist_emb.shape[1] > 0:
            # Rows with no history would make every key masked (NaN softmax): let them attend to padding, then
            # the masked mean below zeroes them anyway.
            key_pad = ~hist_mask & hist_mask.any(dim=1, keepdim=True)
            hist_emb, _ = self.attn(hist_emb, hist_emb, hist_emb, key_padding_mask=key_pad, need_weights=False)
        m = hist_mask.unsqueeze(-1).to(hist_emb.dtype)
        return (hist_emb * m).sum(1) / m.sum(1).clamp_min(1.0)


class CKFModel(nn.Module):
    """LLM with Multi-LoRA + the KFM mapping side, over frozen CF tables.

    Buffers (frozen, not in state_dict; reloaded from the embedding version named in the checkpoint):
        user_table [U + 1, d], item_table [I + 1, d]: rows by data-set id; the last row is the fallback vector
        used for ids the current embedding version does not cover.
    """

    def __init__(self, llm: nn.Module, user_table: torch.Tensor, item_table: torch.Tensor, placeholder_id: int,
                 num_tasks: int, cf: CFConfig, lora: LoRAConfig, fusion: str = "soft_tokens",
                 next_item_task: Optional[int] = None):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"model.fusion={fusion!r} is not one of {list(FUSIONS)}")
        self.llm = llm
        self.placeholder_id = placeholder_id
        self.num_tasks = num_tasks
        self.dim = cf.dim
        self.identity_mapping = cf.identity_mapping
        self.fusion = fusion
        self.next_item_task = next_item_task  # task id whose rows are scored by the item head (None = none)
        # (user order [U + 1], item order [I + 1]) or None: when set, id i reads row order[i] of every CF table,
        # ID-token table and the item head (the held-out evaluation's permuted-CF control; fallback row kept).
        self.cf_permutation: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        hidden = llm.config.hidden_size
        dtype = llm.get_input_embeddings().weight.dtype
        self.register_buffer("user_table", user_table.to(dtype), persistent=False)
        self.register_buffer("item_table", item_table.to(dtype), persistent=False)
        if fusion == "soft_tokens":
            self.pooling = HistoryPooling(cf.dim, cf.pooling).to(dtype)
            act = nn.ReLU() if cf.meta_activation == "relu" else nn.Identity()
            # Meta-network g: d -> meta_hidden -> d*d (the reference used no activation in between).
            self.meta_net = nn.Sequential(nn.Linear(cf.dim, cf.meta_hidden), act,
                                          nn.Linear(cf.meta_hidden, cf.dim * cf.dim)).to(dtype)
            self.user_proj = build_projector(cf.projector, cf.dim, hidden).to(dtype)
            self.item_proj = build_projector(cf.projector, cf.dim, hidden).to(dtype)
        else:
            self.user_tokens = id_token_table(user_table, hidden, dtype)
            self.item_tokens = id_token_table(item_table, hidden, dtype)
        self.segments = TaskSegments()
        self.lora_layers = inject_multi_lora(llm, self.segments, num_tasks, lora.rank, lora.alpha, lora.dropout,
                                             list(lora.shared_targets), list(lora.task_targets), lora.impl)

    # ----------------------------------------------------------------------------------------- CF tables
    def set_cf_tables(self, user_table: torch.Tensor, item_table: torch.Tensor) -> None:
        """Swaps in a new embedding version ([U'+1, d], [I'+1, d], last row fallback); sizes may grow."""
        if user_table.shape[1] != self.dim or item_table.shape[1] != self.dim:
            raise ValueError(f"embedding dim {user_table.shape[1]}/{item_table.shape[1]} != cf.dim {self.dim}")
        dev, dt = self.user_table.device, self.user_table.dtype
        self.user_table = user_table.to(device=dev, dtype=dt)
        self.item_table = item_table.to(device=dev, dtype=dt)

    @staticmethod
    def _lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``table`` for ``ids``; ids outside the table (new users/items) take the fallback last row."""
        return table[CKFModel._safe_ids(ids, table.shape[0])]

    @staticmethod
    def _safe_ids(ids: torch.Tensor, rows: int) -> torch.Tensor:
        """``ids`` with every id outside 0..rows-2 replaced by the fallback row rows - 1."""
        fallback = rows - 1
        return torch.where((ids >= 0) & (ids < fallback), ids, torch.full_like(ids, fallback))

    def _rows(self, kind: int, ids: torch.Tensor, rows: int) -> torch.Tensor:
        """Row indices for user (``kind`` 0) or item (1) ``ids`` in a table of ``rows`` rows: fallback for ids it
        does not cover, then the permuted-CF control's order when set."""
        safe = self._safe_ids(ids, rows)
        if self.cf_permutation is not None:
            order = self.cf_permutation[kind]
            if order.shape[0] != rows:
                raise ValueError(f"cf_permutation covers {order.shape[0]} rows, the table has {rows}")
            safe = order.to(safe.device)[safe]
        return safe

    def _user_cf(self, ids: torch.Tensor) -> torch.Tensor:
        return self.user_table[self._rows(0, ids, self.user_table.shape[0])]

    def _item_cf(self, ids: torch.Tensor) -> torch.Tensor:
        return self.item_table[self._rows(1, ids, self.item_table.shape[0])]

    # ------------------------------------------------------------------------------------------- KFM
    def soft_tokens(self, user_ids: torch.Tensor, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """user_ids [B], history [B, H] (-1 pad), targets [B, K] (-1 pad) -> [B, 1 + K, hidden]:
        t_u then t_v of each target/candidate item, in order. ``model.fusion=id_tokens``: the user's and the
        items' ID tokens instead (the history then plays no part)."""
        if self.fusion == "id_tokens":
            t_u = self.user_tokens(self._rows(0, user_ids, self.user_tokens.num_embeddings)).unsqueeze(1)
            t_v = self.item_tokens(self._rows(1, targets, self.item_tokens.num_embeddings))  # [B, K, hidden]
            return torch.cat([t_u, t_v], dim=1)
        e_u = self._user_cf(user_ids)  # [B, d]
        hist_mask = history >= 0
        p_u = self.pooling(self._item_cf(history), hist_mask)  # [B, d]
        if self.identity_mapping:
            e_user = e_u
        else:
            w_u = self.meta_net(p_u).view(-1, self.dim, self.dim)  # [B, d, d]
            e_user = torch.bmm(e_u.unsqueeze(1), w_u).squeeze(1)  # e'_u = E_U[u] @ W_u
        t_u = self.user_proj(e_user).unsqueeze(1)  # [B, 1, hidden]
        t_v = self.item_proj(self._item_cf(targets))  # [B, K, hidden]
        return torch.cat([t_u, t_v], dim=1)

    def item_embeddings(self) -> torch.Tensor:
        """[I, hidden]: every catalogue item's embedding on the LLM side (the fallback row excluded), the weights
        of the item-prediction head: the items' soft tokens ``item_proj(E_V)``, or their ID tokens. Called as
        modules (not read as ``.weight``) so that ZeRO-3 gathers the partitioned parameters."""
        if self.fusion == "id_tokens":
            n = self.item_tokens.num_embeddings - 1
            return self.item_tokens(self._rows(1, torch.arange(n, device=self.item_table.device), n + 1))
        n = self.item_table.shape[0] - 1
        return self.item_proj(self._item_cf(torch.arange(n, device=self.item_table.device)))


    def embed_with_soft_tokens(self, input_ids: torch.Tensor, n_targets: torch.Tensor, user_ids: torch.Tensor,
                               history: torch.Tensor, targets: torch.Tensor, is_hybrid: torch.Tensor,
                               seq_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with every ``<cf>`` replaced by its soft token, in one vectorised scatter.

        input_ids [R, L]; per sample: n_targets [S], user_ids [S], history [S, H], targets [S, K], is_hybrid [S]
        bool. Padded layout (``seq_ids`` None): row r is sample r (R = S). Packed layout
        (``ckf_dist.data.packing``): ``seq_ids`` [R, L] names each token's sample (-1 = padding); a sample's
        tokens are contiguous within one row. Hybrid samples must hold exactly 1 + n_targets placeholders and
        text samples none; a mismatch raises ValueError naming the (padded batch) rows.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)  # [R, L, hidden]
        n_samples = n_targets.shape[0]
        is_ph = input_ids == self.placeholder_id
        row, pos = is_ph.nonzero(as_tuple=True)  # [P] row-major: a sample's placeholders in order, consecutive
        sample = row if seq_ids is None else seq_ids[row, pos]
        if bool((sample < 0).any()):
            raise ValueError("a <cf> placeholder sits on a padding position of a packed batch")
        counts = torch.bincount(sample, minlength=n_samples)
        expected = torch.where(is_hybrid, n_targets + 1, torch.zeros_like(n_targets))
        if not torch.equal(counts, expected):
            bad = (counts != expected).nonzero().flatten()[:5].tolist()
            raise ValueError(f"placeholder count mismatch in batch rows {bad}: found {counts[bad].tolist()}, "
                             f"expected {expected[bad].tolist()} (1 + targets for hybrid rows, 0 for text rows)")
        if not bool(is_hybrid.any()):
            return embeds
        hyb = is_hybrid.nonzero().flatten()
        soft = self.soft_tokens(user_ids[hyb], history[hyb], targets[hyb]).to(embeds.dtype)  # [Sh, 1+K, hidden]
        entry = torch.arange(sample.numel(), device=input_ids.device)
        first = torch.full((n_samples,), sample.numel(), dtype=torch.long, device=input_ids.device)
        first = first.scatter_reduce(0, sample, entry, reduce="amin")  # each sample's first placeholder entry
        slot = entry - first[sample]  # k-th placeholder of its sample
        hyb_index = torch.full((n_samples,), -1, dtype=torch.long, device=input_ids.device)
        hyb_index[hyb] = torch.arange(hyb.numel(), device=input_ids.device)
        return embeds.index_put((row, pos), soft[hyb_index[sample], slot])

    # ------------------------------------------------------------------------------------------ loss
    def forward(self, batch: dict, text_weight: float = 0.5, task_weights: Optional[torch.Tensor] = None,
                route_gradients: bool = False) -> dict:
        """One step's loss over a collated batch (``ckf_dist.data.collate``), padded (one sample per row, B rows)
        or packed (``ckf_dist.data.packing``: several samples of one task per row; same per-sample
        columns, same loss and gradients up to summation order).

        Returns {"loss": scalar, "row_loss": [B] mean answer-token CE per sample (detached), "answer_logits":
        [B, V] the logits that predict each sample's answer token number ``batch["score_pos"]`` (0 = the first)
        (zeros for a sample without an answer)}; B = the padded batch's rows (samples) in both layouts.
        ``text_weight`` = lambda of the curriculum: loss = lam * L_text + (1 - lam) * L_hybrid, each the
        task-weighted mean of per-task mean row losses over the rows of that form present in the batch.

        The output head runs only on the N positions that predict an answer token (a few per row), not on
        all B x L: with SmolLM2's 49k vocabulary, 32 rows x 384 tokens of fp32 logits alone would be 2.4 GB
        (plus their log-softmax and gradient), the same in every step and for no use.
        """
        # Gradient routing (ckf_method.md section 3): only text-form rows train the LoRAs; hybrid rows still
        # back-propagate through them to the soft tokens, so the hybrid loss trains the mapping side only.
        packed = "seq_ids" in batch  # ckf_dist.data.packing: rows hold several samples of one task
        route = route_gradients and self.training
        if packed:  # a packed row may hold both forms: route per token (padding tokens carry no gradient)
            grad_tokens = ~batch["is_hybrid"][batch["seq_ids"].clamp_min(0)] if route else None
            self.segments.set(batch["row_offsets"], param_grad_tokens=grad_tokens)
        else:
            self.segments.set(batch["row_offsets"], param_grad_rows=~batch["is_hybrid"] if route else None)
        embeds = self.embed_with_soft_tokens(batch["input_ids"], batch["n_targets"], batch["user_ids"],
                                             batch["history"], batch["targets"], batch["is_hybrid"],
                                             seq_ids=batch.get("seq_ids"))
        decoder = self.llm.get_decoder()
        if packed:
            # No attention mask: transformers derives the per-sample causal (document) mask from the restarting
            # position ids; flash_attention_2 gets the varlen boundaries directly.
            hidden = decoder(inputs_embeds=embeds, attention_mask=None, position_ids=batch["position_ids"],
                             use_cache=False, **packed_attention_kwargs(self.llm.config, batch["position_ids"])
                             ).last_hidden_state  # [R, L, hidden]
        else:
            hidden = decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                             use_cache=False).last_hidden_state  # [B, L, hidden]
        labels = batch["labels"]
        n_samples = batch["task_ids"].shape[0]
        predicts_answer = labels[:, 1:] != IGNORE  # [R, L-1]: position p predicts token p + 1
        row, pos = predicts_answer.nonzero(as_tuple=True)  # [N] each, row-major
        if packed:
            # entries grouped by sample (stable: a sample's answer positions stay in order)
            sample = batch["seq_ids"][row, pos + 1]
            order = torch.argsort(sample, stable=True)
            row, pos, sample = row[order], pos[order], sample[order]
            n_tok = torch.bincount(sample, minlength=n_samples)  # [S]
        else:
            sample = row
            n_tok = predicts_answer.sum(1)  # [B]
        logits = self.llm.get_output_embeddings()(hidden[row, pos])  # [N, V]
        tok_loss = F.cross_entropy(logits.float(), labels[row, pos + 1], reduction="none")  # [N]
        row_loss = tok_loss.new_zeros(n_samples).index_add(0, sample, tok_loss) / n_tok.clamp_min(1)
        first = torch.cumsum(n_tok, 0) - n_tok  # [S] each sample's first answer entry
        extra, head_anchor = {}, None
        if self.next_item_task is not None:
            row_loss, extra, head_anchor = self._next_item_loss(batch, hidden, row, pos, n_tok, first, row_loss)
        loss = self.combine_losses(row_loss, batch["task_ids"], batch["is_hybrid"], text_weight, task_weights)
        if head_anchor is not None:
            loss = loss + head_anchor
        # A row's k-th answer position is entry first + k of the row-major selection; k = batch["score_pos"]
        # (default 0): the answer token where the scored alternatives first differ (scoring.answer_token_ids),
        # e.g. 1 for a sentencepiece digit "4" -> ["▁", "4"].
        if row.numel():
            k = batch.get("score_pos")
            k = torch.zeros_like(n_tok) if k is None else torch.minimum(k.to(n_tok), (n_tok - 1).clamp_min(0))
            answer_logits = logits.detach()[(first + k).clamp_max(row.numel() - 1)] * (n_tok > 0)[:, None]
        else:
            answer_logits = logits.new_zeros(n_samples, logits.shape[-1])
        return {"loss": loss, "row_loss": row_loss.detach(), "answer_logits": answer_logits, **extra}

    def _next_item_loss(self, batch: dict, hidden: torch.Tensor, row: torch.Tensor, pos: torch.Tensor,
                        n_tok: torch.Tensor, first: torch.Tensor, row_loss: torch.Tensor) -> tuple:
        """The item-prediction head on the ``next_item`` samples: catalogue scores from the hidden state that
        predicts the first answer token (the last prompt position), softmax cross-entropy against the true item
        (``batch["label"]``) replacing those samples' token loss. Returns (row_loss [S], {"next_item_rows" [Sn]
        sample indices, "item_logits" [Sn, I] detached fp32} ({} without next_item samples), anchor).

        The head's weights are computed on every forward pass, with or without next_item samples, and ``anchor``
        (0 x their sum, added to the loss) gives every backward pass a gradient path into them: under ZeRO-3 each
        module call gathers parameters collectively and each gradient is reduce-scattered, so all ranks must call
        the same modules and produce the same gradients whatever rows their batch holds (a rank without
        next_item rows skipping the head deadlocked or aborted the other rank's gathers)."""
        weights = self.item_embeddings()  # [I, hidden]
        anchor = 0.0 * weights.float().sum() if torch.is_grad_enabled() else None
        is_next = (batch["task_ids"] == self.next_item_task) & (n_tok > 0)
        if not bool(is_next.any()):
            return row_loss, {}, anchor
        samples = is_next.nonzero().flatten()  # [Sn]
        entry = first[samples]
        scores = hidden[row[entry], pos[entry]].float() @ weights.float().t()  # [Sn, I]
        target = batch["label"][samples].long()
        bad = (target < 0) | (target >= scores.shape[1])
        if bool(bad.any()):
            raise ValueError(f"next_item labels {target[bad][:5].tolist()} outside the catalogue of the item head "
                             f"(0..{scores.shape[1] - 1}: the CF tables' items)")
        item_loss = F.cross_entropy(scores, target, reduction="none")  # [Sn]
        row_loss = row_loss.index_put((samples,), item_loss.to(row_loss.dtype))
        return row_loss, {"next_item_rows": samples, "item_logits": scores.detach()}, anchor

    def combine_losses(self, row_loss: torch.Tensor, task_ids: torch.Tensor, is_hybrid: torch.Tensor,
                       text_weight: float, task_weights: Optional[torch.Tensor]) -> torch.Tensor:
        """lam * L_text + (1-lam) * L_hybrid with L_form = sum_t w_t mean_rows(task t, form) / sum_t w_t over the
        tasks present (a task absent from this batch does not dilute the others)."""
        if task_weights is None:
            task_weights = torch.ones(self.num_tasks, device=row_loss.device)
        total = row_loss.new_zeros(())
        for form_is_hybrid, weight in ((False, text_weight), (True, 1.0 - text_weight)):
            if weight == 0.0:
                continue
            sel = is_hybrid == form_is_hybrid
            if not bool(sel.any()):
                continue
            idx = task_ids[sel].long()
            sums = torch.zeros(self.num_tasks, device=row_loss.device, dtype=row_loss.dtype).index_add(0, idx, row_loss[sel])
            cnt = torch.bincount(idx, minlength=self.num_tasks).to(row_loss.dtype)
            present = cnt > 0
            w = task_weights.to(row_loss.dtype) * present
            form_loss = (w * sums / cnt.clamp_min(1)).sum() / w.sum().clamp_min(1e-12)
            total = total + weight * form_loss
        return total

    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]


def packed_attention_kwargs(config, position_ids: torch.Tensor) -> dict:
    """Extra decoder kwargs for a packed batch: flash_attention_2's varlen boundaries (``cu_seq_lens_q/k``
    [n_sequences + 1] int32 over the flattened [R * L] tokens, ``max_length_q/k``) from position_ids [R, L]
    (each sequence restarts at 0); nothing for sdpa / eager / flex_attention, whose masks transformers builds
    from the position ids itself (``masking_utils.find_packed_sequence_indices``)."""
    if not str(getattr(config, "_attn_implementation", "")).startswith("flash_attention"):
        return {}
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    return {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": int(max_q), "max_length_k": int(max_k)}


def id_token_table(cf_table: torch.Tensor, hidden: int, dtype: torch.dtype) -> nn.Embedding:
    """ID tokens [n + 1, hidden] (last row: the fallback) initialised from the CF table [n + 1, d] through a
    fresh linear projector: each token starts as the soft token its CF vector would give without the
    meta-network (same projector family and scale), then learns on its own."""
    proj = nn.Linear(cf_table.shape[1], hidden)
    with torch.no_grad():
        init = proj(cf_table.float())
    table = nn.Embedding(cf_table.shape[0], hidden).to(dtype)
    with torch.no_grad():
        table.weight.copy_(init.to(dtype))
    return table


def build_projector(kind: str, dim: int, hidden: int) -> nn.Module:
    """CF vector [.., d] -> LLM hidden [.., hidden]. ``linear`` is the spec's projector (d * hidden + hidden
    parameters); ``mlp`` = Linear(d, hidden) -> GELU -> Linear(hidden, hidden) (+hidden^2: 16.8M parameters per
    projector at hidden 4096)."""
    if kind == "linear":
        return nn.Linear(dim, hidden)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    raise ValueError(f"cf.projector={kind!r} is not one of ['linear', 'mlp']")


def curriculum_text_weight(schedule: str, step: int, total_steps: int) -> float:
    """lambda(s) of the text-only loss at step s of S.

    sigmoid: 1 / (1 + exp(8 (s - S/2) / (S/2))) (1 -> 0 around S/2); constant: 0.5; two_stage: 1 for the first
    half, 0 after; text_only: 1; hybrid_only: 0.
    """
    if schedule == "sigmoid":
        half = max(total_steps / 2.0, 1e-9)
        z = 8.0 * (step - half) / half
        return float(1.0 / (1.0 + np.exp(np.clip(z, -60, 60))))
    if schedule == "constant":
        return 0.5
    if schedule == "two_stage":
        return 1.0 if step < total_steps / 2.0 else 0.0
    if schedule == "text_only":
        return 1.0
    if schedule == "hybrid_only":
        return 0.0
    raise ValueError(f"unknown curriculum schedule {schedule!r}")
