"""A shardformer policy for transformers-5 GPT-2, given to `HybridParallelPlugin(custom_policy=...)`.

ColossalAI 0.5.0's stock GPT-2 policy and pipeline forwards were written for transformers 4.51:
they call `GPT2Model.get_head_mask` (gone), index block outputs with `outputs[0]` (blocks now
return a Tensor, so that silently takes the first batch row), build 4.51-style masks, and the
LM policy swaps in its own 4.51-era forward whenever `parallel_output=True`. This module keeps
the stock policy's module replacements (they fit transformers 5: attention reshapes by a fixed
`head_dim`, so the stock block and attention forwards run unchanged under TP with per-rank
`split_size`/`num_heads`) and supplies:

- causal LM: a forward computing the loss with ColossalAI's `dist_cross_entropy` (vocab-parallel
  under TP, vocabulary padded to a multiple of 64), returning full, un-padded logits in eval;
- pipeline forwards (LM head and sequence classification) per stage: the first stage embeds,
  every stage builds the mask with `create_causal_mask` and runs its blocks (Tensor out), the last
  applies `ln_f` and the head; classification pools the rightmost non-pad token as transformers 5;
- dropout wrappers for replicated activations (`DropoutForReplicatedInput`): the stock policy's
  `DropoutForParallelInput` draws a different mask on each TP rank for activations every rank
  holds in full, so replicated parameters would drift apart with dropout > 0.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from backends.errors import EngineError


def policy_for(task: str):
    """A fresh policy instance for the engine task (the plugin keeps and mutates it)."""
    _define()
    if task == "causal_lm":
        return EngineGPT2LMHeadPolicy()
    if task == "classification":
        return EngineGPT2SequenceClassificationPolicy()
    raise EngineError(f"backend.colossal.plugin=hybrid has no GPT-2 policy for task {task!r}")


# the GPT-2 family: GPT-2 here; GPT-Neo and GPT-J by neo_j_policy.py, with this module's forwards
GPT2_FAMILY = ("gpt2", "gpt_neo", "gptj")
HYBRID_MODELS = "GPT-2, GPT-Neo, GPT-J, Llama, Qwen2, Qwen3 and Mistral"


def check_config(conf, task: str, tp_size: int, pp_size: int) -> None:
    """What the hybrid plugin needs of the model, from its config alone (before any process starts)."""
    if getattr(conf, "model_type", None) not in GPT2_FAMILY:
        model_type = getattr(conf, "model_type", "?")
        raise EngineError(f"backend.colossal.plugin=hybrid supports {HYBRID_MODELS} models; "
                          f"got model_type {model_type!r} (use plugin=torch_ddp or low_level_zero for other "
                          "architectures)")
    heads, layers = conf.num_attention_heads, conf.num_hidden_layers
    if heads % tp_size:
        raise EngineError(f"backend.colossal.tp_size={tp_size} must divide the model's {heads} attention heads "
                          f"(try tp_size in {[d for d in range(1, heads + 1) if heads % d == 0]})")
    if pp_size > layers:
        raise EngineError(f"backend.colossal.pp_size={pp_size} is more than the model's {layers} layers: every "
                          f"pipeline stage needs at least one (use pp_size <= {layers})")


class PeftAware:
    """Mixed into every engine policy, for LoRA runs (PEFT's wrapper, pipeline stages without TP):
    - the policy addresses the transformers model inside the wrapper (`transformer.h`, `model.layers`,
      `lm_head`); the plugin still shards the wrapper, whose forward reaches the replaced one inside;
    - a tied embedding/head the run does not train (LoRA's frozen base) is not a shared parameter for
      the stages to sync: it has no gradient to all-reduce, and it never changes."""

    def set_model(self, model):
        from peft import PeftModel
        super().set_model(model.get_base_model() if isinstance(model, PeftModel) else model)

    def get_shared_params(self):
        return [shared for shared in super().get_shared_params() if all(p.requires_grad for p in shared.values())]


# --------------------------------------------------------------------------------------------
# forwards
# --------------------------------------------------------------------------------------------
def _transformer_stage(t, input_ids, attention_mask, hidden_states, stage_manager=None, stage_index=None):
    """The GPT-2 family's base-model forward (GPT2Model, GPTNeoModel, GPTJModel) for the blocks this
    stage holds (all of them without PP)."""
    from transformers.masking_utils import create_causal_mask

    first = stage_manager is None or stage_manager.is_first_stage()
    last = stage_manager is None or stage_manager.is_last_stage()
    if first:
        hidden_states = t.wte(input_ids)
    batch, length = hidden_states.shape[:2]
    position_ids = torch.arange(length, device=hidden_states.device).unsqueeze(0)
    if first:
        if hasattr(t, "wpe"):  # GPT-J has none: its layers rotate queries and keys instead
            hidden_states = hidden_states + t.wpe(position_ids)
        hidden_states = t.drop(hidden_states)
    if attention_mask is not None and attention_mask.ndim < 4:
        attention_mask = attention_mask.view(batch, -1)
    # no cache, passed by position: transformers 5.2x renamed that argument past_key_values -> cache
    mask = create_causal_mask(t.config, hidden_states, attention_mask, None, position_ids=position_ids)
    extra = {}
    if hasattr(t, "rotary_emb"):  # GPT-J since transformers 5.2x: sin/cos made once by the model, not per layer
        extra["position_embeddings"] = t.rotary_emb(hidden_states, position_ids)
    start, end = stage_index if stage_index is not None else (0, len(t.h))
    for block in t.h[start:end]:
        hidden_states = block(hidden_states, attention_mask=mask, position_ids=position_ids, use_cache=False, **extra)
        if isinstance(hidden_states, tuple):  # GPT-Neo's blocks (and older GPT-2/GPT-J ones) return tuples
            hidden_states = hidden_states[0]
    if last:
        hidden_states = t.ln_f(hidden_states)
    return hidden_states


def full_logits(lm_head, logits: torch.Tensor, shard_config) -> torch.Tensor:
    """Vocab-parallel logits -> the full, un-padded vocabulary on every TP rank (eval only)."""
    if not (shard_config.enable_tensor_parallelism and shard_config.parallel_output):
        return logits  # PaddingLMHead already cut the padding
    group = shard_config.tensor_parallel_process_group
    world = dist.get_world_size(group)
    per_rank = lm_head.new_num_embeddings // world
    logits = F.pad(logits, (0, per_rank - logits.shape[-1])).contiguous()
    parts = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(parts, logits, group=group)
    return torch.cat(parts, dim=-1)[..., : lm_head.old_num_embeddings]


def lm_head_and_loss(model, hidden, labels, shard_config):
    from colossalai.shardformer.layer import dist_cross_entropy
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    logits = model.lm_head(hidden)
    loss = None
    if labels is not None:
        # fp32 loss whatever the compute dtype, as transformers' own causal-LM loss does
        loss = dist_cross_entropy(labels, logits.float(), shard_config, model.lm_head.out_features, torch.float32)
    if not model.training:
        logits = full_logits(model.lm_head, logits, shard_config)
    return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits)


def lm_forward(self, input_ids=None, attention_mask=None, labels=None, hidden_states=None,
               stage_manager=None, stage_index=None, shard_config=None, **_):
    """GPT2LMHeadModel.forward for the whole model (no stage_manager) or one pipeline stage."""
    hidden = _transformer_stage(self.transformer, input_ids, attention_mask, hidden_states,
                                stage_manager, stage_index)
    if stage_manager is not None and not stage_manager.is_last_stage():
        return {"hidden_states": hidden}
    return lm_head_and_loss(self, hidden, labels, shard_config)


def classification_forward_pp(self, input_ids=None, attention_mask=None, labels=None, hidden_states=None,
                              stage_manager=None, stage_index=None, shard_config=None, **_):
    hidden = _transformer_stage(self.transformer, input_ids, attention_mask, hidden_states,
                                stage_manager, stage_index)
    if not stage_manager.is_last_stage():
        return {"hidden_states": hidden}
    return pool_and_classify(self, self.score(hidden), input_ids, labels)


def pool_and_classify(model, logits, input_ids, labels):
    """A sequence-classification head's output from its per-token logits, as transformers 5 pools them:
    the rightmost token that is not the pad token (left or right padding), the loss by problem type."""
    from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    batch, length = input_ids.shape[:2]
    if model.config.pad_token_id is None:
        last = torch.full((batch,), length - 1, device=logits.device)
    else:
        non_pad = (input_ids != model.config.pad_token_id).to(logits.device, torch.int32)
        last = (torch.arange(length, device=logits.device, dtype=torch.int32) * non_pad).argmax(-1)
    pooled = logits[torch.arange(batch, device=logits.device), last]
    loss = None
    if labels is not None:
        if model.num_labels == 1:
            loss = MSELoss()(pooled.squeeze(), labels.squeeze())
        elif labels.dtype in (torch.long, torch.int):
            loss = CrossEntropyLoss()(pooled.view(-1, model.num_labels), labels.view(-1))
        else:
            loss = BCEWithLogitsLoss()(pooled, labels)
    return SequenceClassifierOutputWithPast(loss=loss, logits=pooled)


# --------------------------------------------------------------------------------------------
# policies (defined lazily: importing colossalai is not cheap and the module must stay importable)
# --------------------------------------------------------------------------------------------
EngineGPT2LMHeadPolicy = None
EngineGPT2SequenceClassificationPolicy = None


def _define() -> None:
    global EngineGPT2LMHeadPolicy, EngineGPT2SequenceClassificationPolicy
    if EngineGPT2LMHeadPolicy is not None:
        return
    from functools import partial

    import colossalai.shardformer.layer as col_nn
    from colossalai.shardformer.policies.base_policy import SubModuleReplacementDescription
    from colossalai.shardformer.policies.gpt2 import (GPT2ForSequenceClassificationPolicy, GPT2LMHeadModelPolicy,
                                                      GPT2Policy)

    def base_policy(policy_self) -> dict:
        policy = GPT2Policy.module_policy(policy_self)
        for description in policy.values():
            for sub in description.sub_module_replacement or []:
                if sub.target_module is col_nn.DropoutForParallelInput:
                    sub.target_module = col_nn.DropoutForReplicatedInput
        return policy

    class _LM(PeftAware, GPT2LMHeadModelPolicy):
        def module_policy(self):
            from transformers.models.gpt2.modeling_gpt2 import GPT2LMHeadModel

            policy = base_policy(self)
            tp = self.shard_config.enable_tensor_parallelism
            head = col_nn.VocabParallelLMHead1D if tp else col_nn.PaddingLMHead
            kwargs = {"make_vocab_size_divisible_by": self.shard_config.make_vocab_size_divisible_by}
            if tp:
                kwargs["gather_output"] = False
            self.append_or_create_submodule_replacement(
                description=SubModuleReplacementDescription(suffix="lm_head", target_module=head, kwargs=kwargs),
                policy=policy, target_key=GPT2LMHeadModel)
            if self.pipeline_stage_manager is not None:
                self.set_pipeline_forward(model_cls=GPT2LMHeadModel, new_forward=lm_forward, policy=policy)
            else:
                self.append_or_create_method_replacement(
                    description={"forward": partial(lm_forward, shard_config=self.shard_config)},
                    policy=policy, target_key=GPT2LMHeadModel)
            return policy

    class _Cls(PeftAware, GPT2ForSequenceClassificationPolicy):
        def module_policy(self):
            from transformers.models.gpt2.modeling_gpt2 import GPT2ForSequenceClassification

            policy = base_policy(self)
            if self.pipeline_stage_manager is not None:
                self.set_pipeline_forward(model_cls=GPT2ForSequenceClassification,
                                          new_forward=classification_forward_pp, policy=policy)
            # without PP transformers 5's own forward runs: the score head is replicated
            return policy

    EngineGPT2LMHeadPolicy = _LM
    EngineGPT2SequenceClassificationPolicy = _Cls
