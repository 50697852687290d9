"""Tensor and pipeline parallelism for GPT-Neo and GPT-J under transformers 5, given to
`HybridParallelPlugin(custom_policy=...)`.

ColossalAI 0.5.0 has no GPT-Neo policy, and its GPT-J policy cannot be imported under transformers 5
(its modeling module imports `get_embed_positions`, gone) and would swap in 4.51 forwards. Both models
are GPT-2's layout (wte, a stack `h` of blocks, ln_f, a head) with separate q/k/v projections
(Linear, not GPT-2's fused Conv1D) and no fused kernels to keep, so one policy describes both from the
table below and shards them as Megatron does: q/k/v and the MLP's input projection column-parallel,
the attention output and the MLP's output projection row-parallel, the vocabulary-parallel embedding
and head (padded to a multiple of 64: GPT-2's 50257-token vocabulary under tp=2), the heads split
over the ranks (each rank's attention module told its share). Everything else runs transformers' own
code: the blocks and attention, GPT-Neo's local-attention windows (a per-layer buffer), GPT-J's
partial rotary embedding.

The forwards are gpt2_policy's: the causal LM's loss by `dist_cross_entropy` over the
vocabulary-parallel logits, and the pipeline stages' (first stage embeds, every stage builds the
mask and runs its blocks, the last applies ln_f and the head). Dropouts on activations every TP rank
holds in full draw the same mask on every rank (`DropoutForReplicatedInput`), as in gpt2_policy.
"""
from __future__ import annotations

import importlib
from functools import partial

from backends.colossal.gpt2_policy import PeftAware, classification_forward_pp, lm_forward
from backends.errors import EngineError

# model_type -> where its modules are and what they are called (transformers 5.17 and 5.2x alike)
FAMILIES = {
    "gpt_neo": {"module": "gpt_neo", "prefix": "GPTNeo", "attention": "attn.attention", "heads": "num_heads",
                "mlp": ("mlp.c_fc", "mlp.c_proj"),
                "dropouts": ("attn.attention.attn_dropout", "attn.attention.resid_dropout", "mlp.dropout")},
    # transformers 5.2x's GPT-J has no attn_dropout module (a float), 5.17's has: replaced where it exists
    "gptj": {"module": "gptj", "prefix": "GPTJ", "attention": "attn", "heads": "num_attention_heads",
             "mlp": ("mlp.fc_in", "mlp.fc_out"),
             "dropouts": ("attn.attn_dropout", "attn.resid_dropout", "mlp.dropout")},
}


def policy_for(task: str, model_type: str):
    """A fresh policy instance for the engine task and model type (the plugin keeps and mutates it)."""
    if model_type not in FAMILIES:
        raise EngineError(f"no tensor-parallel policy for model_type {model_type!r}")
    if task not in ("causal_lm", "classification"):
        raise EngineError(f"backend.colossal.plugin=hybrid has no {model_type} policy for task {task!r}")
    return _policy_class()(task, FAMILIES[model_type])


def _policy_class():
    """Defined on first use: importing colossalai is not cheap and this module must stay importable."""
    import colossalai.shardformer.layer as col_nn
    from colossalai.shardformer.policies.base_policy import (ModulePolicyDescription, Policy,
                                                             SubModuleReplacementDescription)

    class NeoJLayout(Policy):
        def __init__(self, task: str, family: dict):
            super().__init__()
            self.task, self.family = task, family

        def config_sanity_check(self):
            pass

        def preprocess(self):
            self.tie_weight = self.tie_weight_check()
            return self.model

        def postprocess(self):
            return self.model

        def _classes(self):
            f = self.family
            modeling = importlib.import_module(f"transformers.models.{f['module']}.modeling_{f['module']}")
            head = "ForCausalLM" if self.task == "causal_lm" else "ForSequenceClassification"
            return (getattr(modeling, f"{f['prefix']}Model"), getattr(modeling, f"{f['prefix']}Block"),
                    getattr(modeling, f"{f['prefix']}{head}"))

        def module_policy(self):
            base_cls, block_cls, top_cls = self._classes()
            f, conf, shard = self.family, self.model.config, self.shard_config
            tp = shard.enable_tensor_parallelism
            policy = {}
            if tp:
                size = shard.tensor_parallel_size

                def sub(suffix, target, **options):
                    return SubModuleReplacementDescription(suffix=suffix, target_module=target, **options)

                attention = f["attention"]
                mlp_in, mlp_out = f["mlp"]
                policy[base_cls] = ModulePolicyDescription(
                    sub_module_replacement=[sub("drop", col_nn.DropoutForReplicatedInput)])
                policy[block_cls] = ModulePolicyDescription(
                    attribute_replacement={f"{attention}.embed_dim": conf.hidden_size // size,
                                           f"{attention}.{f['heads']}": conf.num_attention_heads // size},
                    sub_module_replacement=[
                        *(sub(f"{attention}.{name}", col_nn.Linear1D_Col) for name in ("q_proj", "k_proj", "v_proj")),
                        sub(f"{attention}.out_proj", col_nn.Linear1D_Row),
                        sub(mlp_in, col_nn.Linear1D_Col), sub(mlp_out, col_nn.Linear1D_Row),
                        *(sub(name, col_nn.DropoutForReplicatedInput, ignore_if_not_exist=True)
                          for name in f["dropouts"])])
            vocab = {"make_vocab_size_divisible_by": shard.make_vocab_size_divisible_by}
            embedding = col_nn.VocabParallelEmbedding1D if tp else col_nn.PaddingEmbedding if self.tie_weight else None
            if embedding is not None:
                self.append_or_create_submodule_replacement(
                    description=SubModuleReplacementDescription(suffix="wte", target_module=embedding, kwargs=vocab),
                    policy=policy, target_key=base_cls)
            if self.task == "causal_lm":
                # vocabulary-parallel and padded as the GPT-2 policy's (GPT-J's head has a bias: padded alike)
                head = (col_nn.VocabParallelLMHead1D, {**vocab, "gather_output": False}) if tp else \
                    (col_nn.PaddingLMHead, vocab)
                self.append_or_create_submodule_replacement(
                    description=SubModuleReplacementDescription(suffix="lm_head", target_module=head[0],
                                                                kwargs=head[1]),
                    policy=policy, target_key=top_cls)
            if self.pipeline_stage_manager is not None:
                forward = lm_forward if self.task == "causal_lm" else classification_forward_pp
                self.append_or_create_method_replacement(
                    description={"forward": partial(forward, stage_manager=self.pipeline_stage_manager,
                                                    stage_index=self._stage_index(), shard_config=shard)},
                    policy=policy, target_key=top_cls)
            elif self.task == "causal_lm":
                self.append_or_create_method_replacement(
                    description={"forward": partial(lm_forward, shard_config=shard)}, policy=policy, target_key=top_cls)
            # classification without PP: transformers' own forward (the score head is replicated)
            return policy

        def _stage_index(self):
            stages = self.pipeline_stage_manager
            return stages.get_stage_index(stages.distribute_layers(len(self.model.transformer.h)))

        def get_held_layers(self):
            stages, t = self.pipeline_stage_manager, self.model.transformer
            held = []
            if stages.is_first_stage():
                held += [t.wte, *([t.wpe] if hasattr(t, "wpe") else []), t.drop]
            if hasattr(t, "rotary_emb"):  # GPT-J 5.2x: its sin/cos table (a buffer) serves every stage's layers
                held.append(t.rotary_emb)
            start, end = self._stage_index()
            held += t.h[start:end]
            if stages.is_last_stage():
                held += [t.ln_f, self.model.lm_head if self.task == "causal_lm" else self.model.score]
            return held

        def get_shared_params(self):
            """GPT-Neo ties its head to the embedding: the first and the last stage hold one copy each."""
            stages, model = self.pipeline_stage_manager, self.model
            if (stages is not None and stages.num_stages > 1 and self.task == "causal_lm"
                    and model.transformer.wte.weight is model.lm_head.weight):
                return [{0: model.transformer.wte.weight, stages.num_stages - 1: model.lm_head.weight}]
            return []

    class NeoJPolicy(PeftAware, NeoJLayout):  # LoRA's wrapper and frozen tied weights over the layout above
        pass

    return NeoJPolicy
