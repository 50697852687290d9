"""Tensor and pipeline parallelism for today's decoder families (Llama, Qwen2, Qwen3, Mistral) under
transformers 5, given to `HybridParallelPlugin(custom_policy=...)`.

ColossalAI 0.5.0's stock policies for these families shard the right modules (q/k/v, gate/up as
column-parallel, o/down as row-parallel, the vocabulary-parallel embedding and head) but also swap
in their transformers-4.51 forwards for the base model, the attention and the causal-LM head. Under
transformers 5 the families' own forwards already run sharded: attention reshapes with
`(-1, head_dim)`, so it follows the per-rank head count, and `num_key_value_groups` (query heads
per key/value head) is the same on every rank when tp divides both. So this module keeps the stock
module replacements, drops every forward replacement, and gives the causal LM the forward the GPT-2
policy uses: the loss by `dist_cross_entropy` over the vocabulary-parallel logits.

Pipeline stages keep the stock policies' layer split, held layers and tied-embedding sharing, with
the stage forward here (`_decoder_stage`) in place of ColossalAI's 4.51 one: the first stage embeds,
every stage builds the masks its layers need (full causal, or a sliding window: Mistral's for every
layer when `sliding_window` is set, Qwen2's and Qwen3's per layer from `config.layer_types`, by the
layer's index in the whole model) and the rotary embeddings, runs its layers, and the last applies
the final norm and the head. It calls the layers and mask builders with the arguments transformers
5.17 and 5.24+ name alike (no cache, passed by position).
"""
from __future__ import annotations

import torch

from backends.colossal.gpt2_policy import PeftAware, lm_head_and_loss, pool_and_classify
from backends.errors import EngineError

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def attention_kind(config, index: int) -> str:
    """Which mask layer `index` of the whole model attends with, as the family's own model forward decides."""
    if config.model_type in ("qwen2", "qwen3"):
        return config.layer_types[index]
    if config.model_type == "mistral" and config.sliding_window is not None:
        return "sliding_attention"
    return "full_attention"


def _decoder_stage(base, input_ids, attention_mask, hidden_states, stage_manager, stage_index):
    """The family's base-model forward for the layers this pipeline stage holds."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    if stage_manager.is_first_stage():
        hidden_states = base.embed_tokens(input_ids)
    batch, length = hidden_states.shape[:2]
    position_ids = torch.arange(length, device=hidden_states.device).unsqueeze(0)
    if attention_mask is not None and attention_mask.ndim < 4:
        attention_mask = attention_mask.view(batch, -1)
    start, end = stage_index
    kinds = [attention_kind(base.config, i) for i in range(start, end)]
    builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {kind: builders[kind](base.config, hidden_states, attention_mask, None, position_ids=position_ids)
             for kind in set(kinds)}
    position_embeddings = base.rotary_emb(hidden_states, position_ids)
    for layer, kind in zip(base.layers[start:end], kinds):
        hidden_states = layer(hidden_states, attention_mask=masks[kind], position_ids=position_ids,
                              position_embeddings=position_embeddings)
    if stage_manager.is_last_stage():
        hidden_states = base.norm(hidden_states)
    return hidden_states


def lm_forward(self, input_ids=None, attention_mask=None, labels=None, hidden_states=None, stage_manager=None,
               stage_index=None, shard_config=None, **_):
    """The family's CausalLM forward, whole (its own sharded base model) or one pipeline stage, then the
    vocabulary-parallel head and loss."""
    if stage_manager is None:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    else:
        hidden = _decoder_stage(self.model, input_ids, attention_mask, hidden_states, stage_manager, stage_index)
        if not stage_manager.is_last_stage():
            return {"hidden_states": hidden}
    return lm_head_and_loss(self, hidden, labels, shard_config)


def classification_forward_pp(self, input_ids=None, attention_mask=None, labels=None, hidden_states=None,
                              stage_manager=None, stage_index=None, **_):
    """The family's SequenceClassification forward for one pipeline stage (without stages its own runs)."""
    hidden = _decoder_stage(self.model, input_ids, attention_mask, hidden_states, stage_manager, stage_index)
    if not stage_manager.is_last_stage():
        return {"hidden_states": hidden}
    return pool_and_classify(self, self.score(hidden), input_ids, labels)


def policy_for(task: str, model_type: str):
    """A fresh policy instance for a family model under tensor parallelism."""
    import importlib
    from functools import partial

    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}
    if model_type not in names:
        raise EngineError(f"no tensor-parallel policy for model_type {model_type!r}")
    # ColossalAI 0.5 has no Qwen3 policy: Qwen3 is Qwen2's architecture plus a per-head RMSNorm on the
    # queries and keys (q_norm/k_norm over head_dim: whole on every rank), so Qwen2's policy serves,
    # its entries renamed to Qwen3's classes
    stock_type = "qwen2" if model_type == "qwen3" else model_type
    stock = importlib.import_module(f"colossalai.shardformer.policies.{stock_type}")
    classes = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    kind = "ForCausalLM" if task == "causal_lm" else "ForSequenceClassification"
    base = getattr(stock, f"{names[stock_type]}{kind}Policy")
    model_cls = getattr(classes, f"{names[model_type]}{kind}")

    def renamed(key):
        if stock_type == model_type:
            return key
        return (key if isinstance(key, str) else key.__name__).replace(names[stock_type], names[model_type], 1)

    class Policy(PeftAware, base):
        def module_policy(self):
            policy = {renamed(key): description for key, description in super().module_policy().items()}
            for description in policy.values():  # transformers 5's own forwards run sharded as they are
                description.method_replacement = None
            # the stock Qwen2 policy keys its entries by class name (its import of transformers-4 attention
            # classes fails under transformers 5, so it falls back to names): add to the entry that exists
            key = model_cls if model_cls in policy or model_cls.__name__ not in policy else model_cls.__name__
            if task == "causal_lm":
                # the head as the GPT-2 policy has it: vocabulary-parallel and padded to a multiple of 64
                # (the stock Qwen2 policy makes it a Linear1D_Col, which needs tp to divide the vocabulary)
                import colossalai.shardformer.layer as col_nn
                from colossalai.shardformer.policies.base_policy import SubModuleReplacementDescription
                tp = self.shard_config.enable_tensor_parallelism
                description = policy.get(key)
                if description is not None:
                    description.sub_module_replacement = [d for d in description.sub_module_replacement or []
                                                          if d.suffix != "lm_head"]
                kwargs = {"make_vocab_size_divisible_by": self.shard_config.make_vocab_size_divisible_by}
                if tp:
                    kwargs["gather_output"] = False
                self.append_or_create_submodule_replacement(
                    description=SubModuleReplacementDescription(
                        suffix="lm_head", target_module=col_nn.VocabParallelLMHead1D if tp else col_nn.PaddingLMHead,
                        kwargs=kwargs),
                    policy=policy, target_key=key)
            if self.pipeline_stage_manager is not None:  # the stock split into stages, with this module's forward
                forward = lm_forward if task == "causal_lm" else classification_forward_pp
                self.set_pipeline_forward(model_cls=key, new_forward=forward, policy=policy)
            elif task == "causal_lm":
                self.append_or_create_method_replacement(
                    description={"forward": partial(lm_forward, shard_config=self.shard_config)},
                    policy=policy, target_key=key)
            return policy

        def postprocess(self):
            model = super().postprocess()
            if self.shard_config.enable_tensor_parallelism:
                sum_head_norm_grads(model, self.shard_config.tensor_parallel_process_group)
            return model

    return Policy()


def sum_head_norm_grads(model, tp_group) -> None:
    """Qwen3's q_norm/k_norm weights (one head_dim vector, whole on every rank) normalise every head,
    and each tensor-parallel rank holds only its share of the heads: the gradient a rank computes is
    its heads' part. Summing it over the group (a hook on each weight, during backward) gives every
    rank the full gradient, so the copies stay equal and equal the unsharded model's; without it the
    losses drifted from DDP's by 7e-6 in 3 steps."""
    import torch.distributed as dist

    def summed(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=tp_group)
        return grad

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_norm", "k_norm"):
            module.weight.register_hook(summed)


def check_config(conf, tp_size: int, pp_size: int) -> None:
    """What tensor and pipeline parallelism need of a family model, from its config (before any process starts)."""
    layers = conf.num_hidden_layers
    if pp_size > layers:
        raise EngineError(f"backend.colossal.pp_size={pp_size} is more than the model's {layers} layers: every "
                          f"pipeline stage needs at least one (use pp_size <= {layers})")
    heads = conf.num_attention_heads
    kv = getattr(conf, "num_key_value_heads", None) or heads
    if heads % tp_size or kv % tp_size:
        divisors = [d for d in range(1, kv + 1) if heads % d == 0 and kv % d == 0]
        raise EngineError(f"backend.colossal.tp_size={tp_size} must divide the model's {heads} attention heads and "
                          f"its {kv} key/value heads (grouped-query attention; try tp_size in {divisors})")
