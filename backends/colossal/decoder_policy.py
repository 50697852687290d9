"""Tensor parallelism for today's decoder families (Llama, Qwen2, Mistral) under transformers 5,
given to `HybridParallelPlugin(custom_policy=...)`.

ColossalAI 0.5.0's stock policies for these families shard the right modules (q/k/v, gate/up as
column-parallel, o/down as row-parallel, the vocabulary-parallel embedding and head) but also swap
in their transformers-4.51 forwards for the base model, the attention and the causal-LM head. Under
transformers 5 the families' own forwards already run sharded: attention reshapes with
`(-1, head_dim)`, so it follows the per-rank head count, and `num_key_value_groups` (query heads
per key/value head) is the same on every rank when tp divides both. So this module keeps the stock
module replacements, drops every forward replacement, and gives the causal LM the forward the GPT-2
policy uses: the loss by `dist_cross_entropy` over the vocabulary-parallel logits. Pipeline
parallelism for these families is not here (the engine refuses pp_size > 1 for them before launch).
"""
from __future__ import annotations

from backends.colossal.gpt2_policy import lm_head_and_loss
from backends.errors import EngineError

FAMILIES = ("llama", "qwen2", "mistral")


def lm_forward(self, input_ids=None, attention_mask=None, labels=None, shard_config=None, **_):
    """The family's CausalLM forward: its own (sharded) base model, then the vocabulary-parallel head and loss."""
    hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return lm_head_and_loss(self, hidden, labels, shard_config)


def policy_for(task: str, model_type: str):
    """A fresh policy instance for a family model under tensor parallelism."""
    import importlib
    from functools import partial

    names = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
    if model_type not in names:
        raise EngineError(f"no tensor-parallel policy for model_type {model_type!r}")
    stock = importlib.import_module(f"colossalai.shardformer.policies.{model_type}")
    classes = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    kind = "ForCausalLM" if task == "causal_lm" else "ForSequenceClassification"
    base = getattr(stock, f"{names[model_type]}{kind}Policy")
    model_cls = getattr(classes, f"{names[model_type]}{kind}")

    class Policy(base):
        def module_policy(self):  # tensor parallel only: check_config refuses pipeline stages
            policy = super().module_policy()
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
                self.append_or_create_method_replacement(
                    description={"forward": partial(lm_forward, shard_config=self.shard_config)},
                    policy=policy, target_key=key)
            return policy

    return Policy()


def check_config(conf, tp_size: int, pp_size: int) -> None:
    """What tensor parallelism needs of a family model, from its config (before any process starts)."""
    family = conf.model_type
    if pp_size > 1:
        raise EngineError(f"backend.colossal.pp_size={pp_size}: pipeline parallelism supports GPT-2 models here; "
                          f"got model_type {family!r} (use tp_size for {family}, or plugin=low_level_zero)")
    heads = conf.num_attention_heads
    kv = getattr(conf, "num_key_value_heads", None) or heads
    if heads % tp_size or kv % tp_size:
        divisors = [d for d in range(1, kv + 1) if heads % d == 0 and kv % d == 0]
        raise EngineError(f"backend.colossal.tp_size={tp_size} must divide the model's {heads} attention heads and "
                          f"its {kv} key/value heads (grouped-query attention; try tp_size in {divisors})")
