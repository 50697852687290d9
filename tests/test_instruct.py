"""Instruction data (issue 22): Alpaca, prompt/completion and chat records rendered with a chat template,
learned on the answers only, packed without cross-talk; bad records refused in one line before any
process starts.

In-process: layouts, labels, templates, packing, collate and errors (`fast`); the packed eval loss
equals the unpacked one on GPT-2 and Llama (sdpa, eager) while a boundary leak would change it.
Multi-process (scenarios of the session's shared 2-process job): packed and unpacked ddp, ZeRO-3
(per-step losses equal ddp's), LoRA, an exact resume; then `engine eval` (in-process) of the packed run
unpacked, and of a model whose config asks for a KV cache, packed and unpacked.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from engine.config import load_config
from engine.errors import EngineError
from engine.tasks import Collective
from engine.tasks.instruct import (ENGINE_CHAT_TEMPLATE, IGNORE, PACKED_MODEL_TYPES, PackedRow, collate_packed,
                                   pack)
from engine.worker import prepare_run
from helpers import losses, metrics

BLOCK = 128  # the tiny GPT-2's context; a few sample conversations are longer (truncated)
STEPS = 4
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def config(model, *extra, out=None):
    return load_config(None, ["task=causal_lm", f"model.name_or_path={model}", "data.train=builtin:instruct",
                              f"data.block_size={BLOCK}", "data.max_train_samples=48", "data.validation_split=0.05",
                              "data.max_eval_samples=16", f"output_dir={out or '/nonexistent/run'}", *extra])


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def learned(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE])


# --------------------------------------------------------------------------------------------
# Layouts, templates, labels (fast)
# --------------------------------------------------------------------------------------------
ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
PROMPT_COMPLETION = [{"prompt": "The sky is", "completion": "blue."}]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Goodbye."}]}]


@pytest.mark.fast
@pytest.mark.parametrize("layout,records,answers,prompt", [
    ("alpaca", ALPACA, ["Blue.", "5"], "### User:\nAdd the numbers.\n\n2 and 3\n\n### Assistant:\n"),
    ("prompt_completion", PROMPT_COMPLETION, ["blue."], "### User:\nThe sky is\n\n### Assistant:\n"),
    ("chat", CHAT, ["Hello.<|endoftext|>Goodbye."],
     "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\n"),
], ids=["alpaca", "prompt_completion", "chat"])
def test_each_layout_is_recognised_and_learned_on_its_answers_only(tiny_gpt2, tmp_path, layout, records, answers,
                                                                    prompt):
    data = write_jsonl(tmp_path / "d.jsonl", records)
    task, tok, prepared, _ = prepare_run(config(tiny_gpt2, f"data.train={data}", "data.packing=false",
                                                "data.validation_split=0"))
    assert prepared.notes[0].startswith(f"data: {layout} layout (records have ")
    assert "the engine's (the tokenizer has none)" in prepared.notes[0]
    got = [learned(tok, e) for e in prepared.train]
    assert got == [a + "<|endoftext|>" for a in answers]  # every answer and its EOS, nothing else
    assert tok.decode(prepared.train[-1].input_ids).startswith(prompt)
    if layout == "chat":  # each assistant turn is learned, as one run of labels each; the rest is not
        labels = torch.tensor(prepared.train[0].labels)
        assert ((labels != IGNORE).int().diff() == 1).sum().item() == 2


@pytest.mark.fast
def test_trl_conversational_prompt_completion_learns_the_completion_only(tiny_gpt2, tmp_path):
    record = {"prompt": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "shot"},
                         {"role": "user", "content": "Q2"}],
              "completion": [{"role": "assistant", "content": "A2"}]}
    data = write_jsonl(tmp_path / "d.jsonl", [record])
    _, tok, prepared, _ = prepare_run(config(tiny_gpt2, f"data.train={data}", "data.packing=false",
                                             "data.validation_split=0"))
    assert [learned(tok, e) for e in prepared.train] == ["A2<|endoftext|>"]  # not the assistant turn of the prompt


@pytest.mark.fast
def test_the_tokenizers_own_chat_template_is_used_unless_the_engines_is_asked_for(tiny_gpt2, tmp_path):
    from transformers import AutoTokenizer
    folder = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    data = write_jsonl(tmp_path / "d.jsonl", CHAT)
    base = [f"data.train={data}", f"tokenizer={folder}", "data.packing=false", "data.validation_split=0"]
    _, tok, prepared, _ = prepare_run(config(tiny_gpt2, *base))
    assert "chat template: the tokenizer's own" in prepared.notes[0]
    assert learned(tok, prepared.train[0]) == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"
    assert tok.decode(prepared.train[0].input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    _, tok, prepared, _ = prepare_run(config(tiny_gpt2, *base, "data.chat_template=engine"))
    assert learned(tok, prepared.train[0]) == "Hello.<|endoftext|>Goodbye.<|endoftext|>"
    assert tok.chat_template == ENGINE_CHAT_TEMPLATE  # what the run's model/ export saves with its tokenizer


@pytest.mark.fast
def test_an_example_never_learns_its_first_token():
    """Packed, an example's first token follows the previous example, whose last token must not learn to
    predict it (a template without role headers could start an answer at the first character)."""
    from engine.tasks.instruct import _labels
    assert _labels([5, 6, 7], [(0, 1), (1, 2), (2, 3)], [(0, 3)]) == [IGNORE, 6, 7]
    assert _labels([5, 6, 7], [(0, 1), (1, 2), (2, 3)], [(1, 2)]) == [IGNORE, 6, IGNORE]


@pytest.mark.fast
def test_auto_keeps_text_data_on_the_run_clm_path(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "word " * 50}] * 20)
    _, _, prepared, _ = prepare_run(config(tiny_gpt2, f"data.train={data}", "data.block_size=16",
                                           "data.validation_split=0", "data.max_train_samples=null"))
    assert isinstance(prepared.train, torch.Tensor) and prepared.train.shape[1] == 16  # blocks, every token learned


def _error(model, *extra) -> str:
    with pytest.raises(EngineError) as err:
        prepare_run(config(model, "data.validation_split=0", *extra))
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.fast
@pytest.mark.parametrize("records,extra,message", [
    ([{"instruction": "Do it.", "input": ""}], [], "record 1 of {data} has no answer: its 'output' is missing"),
    (PROMPT_COMPLETION + [{"prompt": "Hi", "completion": "  "}], [],
     "record 2 of {data} has no answer: its 'completion' is empty"),
    ([{"messages": [{"role": "user", "content": "Hi"}]}], [], "record 1 of {data} has no answer: no assistant message"),
    ([{"messages": [{"role": "assistant", "content": "Welcome."}, {"role": "user", "content": "Hi"}]}], [],
     "record 1 of {data} has no answer: no assistant message with content after the first"),
    ([{"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}], [],
     "message 1 has role 'human', which the engine's chat template does not know (system, user, assistant)"),
    ([{"question": "Hi", "answer": "Yo", "id": 3}], [],
     "no record matches an instruction layout (alpaca: instruction, output; prompt_completion: prompt, completion; "
     "chat: messages); keys found: answer, id, question"),
    (ALPACA, ["data.layout=chat"], "record 1 of {data}: its 'messages' must be a non-empty list"),
], ids=["no output", "empty completion", "no assistant", "assistant only first", "unknown role", "no layout",
        "layout of other keys"])
def test_bad_records_are_one_line_before_any_process_starts(tiny_gpt2, tmp_path, records, extra, message):
    data = write_jsonl(tmp_path / "d.jsonl", records)
    assert message.format(data=data) in _error(tiny_gpt2, f"data.train={data}", *extra)


@pytest.mark.fast
def test_a_role_the_tokenizers_template_refuses_is_one_line(tiny_gpt2, tmp_path):
    from transformers import AutoTokenizer
    folder = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                         "{{ raise_exception('roles must be user or assistant') }}{% endif %}{{ m['content'] }}"
                         "{% endfor %}")
    tok.save_pretrained(folder)
    data = write_jsonl(tmp_path / "d.jsonl", CHAT)
    assert (f"record 1 of {data}: the tokenizer's chat template refused it: roles must be user or assistant"
            in _error(tiny_gpt2, f"data.train={data}", f"tokenizer={folder}"))


@pytest.mark.fast
@pytest.mark.parametrize("override,message", [
    ("data.layout=sharegpt", "data.layout must be one of auto, text, alpaca, prompt_completion, chat"),
    ("data.chat_template=chatml", "data.chat_template must be one of auto, engine"),
])
def test_bad_data_keys_are_one_line(override, message):
    with pytest.raises(EngineError, match=message):
        load_config(None, [override])


@pytest.mark.fast
def test_instruction_layouts_need_a_causal_lm(tiny_gpt2):
    with pytest.raises(EngineError, match="data.layout=alpaca needs task: causal_lm"):
        load_config(None, ["task=classification", f"model.name_or_path={tiny_gpt2}", "data.train=x.jsonl",
                           "data.layout=alpaca"])


@pytest.mark.fast
def test_packing_is_refused_where_examples_would_see_each_other(tiny_gpt2):
    from engine.tasks.instruct import check_packing
    with pytest.raises(EngineError, match="falcon is not one: set data.packing=false"):
        check_packing(load_config(None, ["model.config.model_type=falcon", "tokenizer=builtin:sample",
                                         "data.train=builtin:instruct"]))
    assert "colossal hybrid plugin" in _error(tiny_gpt2, "backend.name=colossal", "backend.colossal.plugin=hybrid")
    prepare_run(config(tiny_gpt2, "data.packing=false", "backend.name=colossal", "backend.colossal.plugin=hybrid"))


# --------------------------------------------------------------------------------------------
# Packing and batches (fast)
# --------------------------------------------------------------------------------------------
@pytest.mark.fast
def test_long_examples_are_truncated_or_dropped_by_the_stated_rule_and_counted(tiny_gpt2, tmp_path):
    long = " ".join(["word"] * 40)
    records = [{"prompt": long, "completion": "short"},      # the prompt alone fills the block: dropped
               {"prompt": "short", "completion": long},      # the answer is cut: truncated
               {"prompt": "short", "completion": "short"}]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    _, _, prepared, _ = prepare_run(config(tiny_gpt2, f"data.train={data}", "data.block_size=16",
                                           "data.validation_split=0"))
    assert ("train: 3 prompt_completion records -> 2 examples (1 truncated to data.block_size=16, answer cut short; "
            "1 dropped, no answer token within the block); packed into 2 rows of <= 16 tokens") in prepared.notes[1]
    lengths = sorted(len(e) for row in prepared.train for e in row.examples)
    assert lengths[-1] == 16 and len(lengths) == 2


@pytest.mark.fast
def test_packing_keeps_every_example_whole_once_within_the_block(tiny_gpt2):
    _, _, unpacked, _ = prepare_run(config(tiny_gpt2, "data.packing=false", "data.max_train_samples=200"))
    rows = pack(unpacked.train, BLOCK)
    assert all(len(r) <= BLOCK for r in rows) and len(rows) < 0.75 * len(unpacked.train)
    assert sorted(id(e) for r in rows for e in r.examples) == sorted(map(id, unpacked.train))
    assert pack(unpacked.train, BLOCK) == rows  # deterministic: every rank packs alike


@pytest.mark.fast
def test_packed_batches_restart_positions_and_count_real_tokens(tiny_gpt2):
    task, _, packed, _ = prepare_run(config(tiny_gpt2))
    _, _, unpacked, _ = prepare_run(config(tiny_gpt2, "data.packing=false"))
    batch = task.collate(packed.train[-3:])  # the last rows are the least full: they end in padding
    assert "attention_mask" not in batch and batch["use_cache"].item() is False
    for i, row in enumerate(packed.train[-3:]):
        starts = [0]
        for e in row.examples[:-1]:
            starts.append(starts[-1] + len(e))
        assert (batch["position_ids"][i] == 0).nonzero().flatten().tolist()[:len(starts)] == starts
        assert batch["labels"][i, starts].eq(IGNORE).all()  # no example's first token is a target
    assert task.tokens_in(batch) == sum(len(r) for r in packed.train[-3:]) < batch["input_ids"].numel()
    # the same real tokens, however they are batched; unpacked rows count their attention mask
    total = lambda data: sum(task.tokens_in(task.collate(data.train[i:i + 4])) for i in range(0, len(data.train), 4))
    assert total(packed) == total(unpacked) == sum(len(e) for e in unpacked.train)


@pytest.mark.fast
def test_bench_specs_take_the_instruction_data_packed_or_not():
    from benchmarks.runner import RunSpec, engine_config, parse_backend
    spec = parse_backend("ddp@data.train=builtin:instruct@data.packing=false")
    raw = engine_config(RunSpec(spec, "tiny", 2, 0, 256, 8, 10, 3, "fp32", 600), Path("/tmp/x"))
    assert raw["data"]["train"] == "builtin:instruct" and raw["data"]["packing"] is False


# --------------------------------------------------------------------------------------------
# No cross-talk: packed eval loss == unpacked (in-process, real model forwards)
# --------------------------------------------------------------------------------------------
def tiny_model(model_type: str, attn: str, vocab: int, init: float = 0.02):
    """A random tiny model of that family (initializer_range 0.5: what a token attends to moves the loss
    enough that a leak shows)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    sizes = {"gpt2": dict(n_layer=2, n_embd=32, n_head=2, n_positions=256),
             "gpt_neo": dict(num_layers=2, hidden_size=32, num_heads=2, attention_types=[[["global"], 2]],
                             max_position_embeddings=256),
             "gptj": dict(n_layer=2, n_embd=32, n_head=2, n_positions=256, rotary_dim=8)}
    llama_like = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64)
    torch.manual_seed(0)
    conf = AutoConfig.for_model(model_type, vocab_size=vocab, initializer_range=init, **sizes.get(model_type, llama_like))
    return AutoModelForCausalLM.from_config(conf, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def eval_sets(tiny_gpt2):
    """builtin:instruct's eval set packed and not, with the sample tokenizer (its 1,000-token vocabulary
    keeps the forwards cheap) and rows of 256 tokens. (task, vocabulary size, packed rows, examples)"""
    small = ["model.name_or_path=null", "model.config.n_positions=256", "tokenizer=builtin:sample",
             "data.block_size=256", "data.max_train_samples=8", "data.max_eval_samples=12"]
    task, tok, packed, _ = prepare_run(config(tiny_gpt2, *small))
    _, _, unpacked, _ = prepare_run(config(tiny_gpt2, *small, "data.packing=false"))
    return task, len(tok), packed.eval, unpacked.eval


def eval_loss(task, model, examples, change=None) -> float:
    """The loop's eval (engine.loop.evaluate_examples) in one process: collate, forward without labels,
    the task's sums."""
    state = task.eval_init()
    for start in range(0, len(examples), 8):
        batch = task.collate(examples[start:start + 8])
        batch = change(batch) if change else batch
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        task.eval_update(state, logits, batch, list(range(start, start + 8)))
    return task.eval_finish(state, Collective(lambda t: t, lambda o: [o]), "cpu")["eval_loss"]


def positions_run_on(batch):
    return {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])}


def with_cache(batch):  # the model's default: transformers then skips its packed-sequence mask
    return {k: v for k, v in batch.items() if k != "use_cache"}


@pytest.mark.parametrize("model_type,attn", [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"),
                                             ("llama", "eager")])
def test_packed_eval_loss_equals_unpacked_and_a_boundary_leak_would_change_it(eval_sets, model_type, attn):
    task, vocab, packed, unpacked = eval_sets
    assert len(packed) < len(unpacked)  # rows really hold several examples
    model = tiny_model(model_type, attn, vocab, init=0.5)
    want = eval_loss(task, model, unpacked)
    assert abs(eval_loss(task, model, packed) - want) <= 1e-5
    assert abs(eval_loss(task, model, packed, positions_run_on) - want) > 1e-3
    assert abs(eval_loss(task, model, packed, with_cache) - want) > 1e-3


@pytest.mark.parametrize("model_type", PACKED_MODEL_TYPES)
def test_every_model_type_allowed_to_pack_masks_packed_examples_apart(model_type):
    """PACKED_MODEL_TYPES is what was verified: a packed row's logits are those of its examples alone."""
    from engine.tasks.instruct import Example
    g = torch.Generator().manual_seed(0)
    a, b = (Example(torch.randint(0, 1000, (n,), generator=g).tolist(), [IGNORE] * n) for n in (7, 9))
    for attn in ("sdpa", "eager"):
        try:
            model = tiny_model(model_type, attn, 1000)
        except ValueError:  # this family has no sdpa path (GPT-Neo): eager only
            continue
        batch = collate_packed([PackedRow((a, b))])
        with torch.no_grad():
            got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
            alone = torch.cat([model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in (a, b)])
            leaky = model(input_ids=batch["input_ids"]).logits[0]
        assert (got - alone).abs().max().item() <= 1e-5, (model_type, attn)
        assert (leaky - alone).abs().max().item() > 1e-3  # the second example sees the first without the mask


# --------------------------------------------------------------------------------------------
# Real runs: scenarios of the session's shared 2-process job
# --------------------------------------------------------------------------------------------
def _run(model, out, *extra) -> dict:
    return config(model, f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.lr=1e-2",
                  "train.warmup_ratio=0", "train.max_grad_norm=0.5", "train.log_every=1", "train.adamw_impl=for_loop",
                  "train.save_every=2", "train.keep_last=5", "train.eval_batch_size=4", *extra, out=out).to_dict()


def context_gpt2(root: Path, tiny_gpt2: Path) -> Path:
    """The tiny GPT-2 (and its real GPT-2 tokenizer) initialised large: a small random model barely
    looks at its context, so a boundary leak would move its eval loss by less than the 1e-5 asked."""
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel
    path = root / "context-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(AutoConfig.from_pretrained(tiny_gpt2, initializer_range=0.5)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(path)
    return path


def shared_scenarios(root: Path, model: Path) -> list[dict]:
    model = context_gpt2(root, model)
    zero3 = ["backend.name=deepspeed", "backend.deepspeed.zero_stage=3"]
    resumed = root / "packed-resumed"  # stopped at step 2 (its checkpoint), relaunched to the end
    return [_run(model, root / "packed"), _run(model, root / "unpacked", "data.packing=false"),
            _run(model, root / "packed-zero3", *zero3),
            _run(model, root / "packed-lora", "model.lora.r=8", "model.lora.dropout=0.0"),
            _run(model, resumed, "train.stop_at_step=2"), _run(model, resumed)]


@pytest.fixture(scope="module")
def job(shared_job):
    return shared_job.root(__name__), shared_job.log


def test_packed_training_is_the_same_on_zero3_and_resumes_exactly(job):
    root, _ = job
    want = losses(root / "packed")
    assert len(want) == STEPS and want[-1] < want[0]
    assert losses(root / "packed-zero3") == pytest.approx(want, rel=1e-6, abs=0)  # fp32 rounding of sums only
    assert losses(root / "packed-resumed") == want
    assert metrics(root / "packed-zero3", "eval")[-1]["eval_loss"] == pytest.approx(
        metrics(root / "packed", "eval")[-1]["eval_loss"], abs=1e-5)


def test_lora_trains_on_packed_instructions(job):
    """PEFT's model passes the packed batch through: LoRA's B starts at zero, so its first loss is the base
    model's on the same packed batch, which it matches only with the same positions and masks."""
    root, _ = job
    got, base = losses(root / "packed-lora"), losses(root / "packed")
    assert len(got) == STEPS and got[0] == pytest.approx(base[0], abs=1e-6) and got[1:] != base[1:]
    from safetensors.torch import load_file
    assert len(load_file(str(root / "packed-lora" / "model" / "adapter_model.safetensors"))) == 4  # A, B x 2 layers
    assert (root / "packed-lora" / "model" / "chat_template.jinja").read_text() == ENGINE_CHAT_TEMPLATE


def _engine_eval(source: Path, out: Path, *args: str) -> dict:
    from launch.cli import main
    result = CliRunner().invoke(main, ["eval", str(source), "--gpus", "0", "--output", str(out), *args])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())["metrics"]


def test_eval_is_answer_only_and_the_same_packed_or_not(job, tmp_path):
    """The packed run's logged eval equals `engine eval` of its model unpacked, and counts exactly the
    eval examples' answer tokens, as the unpacked run's eval does. `engine eval` of a model whose config
    asks for a KV cache (the base model here; hub models, `engine export` folders) gives the same loss
    packed or not: the packed batches turn the cache off, without which transformers would not mask."""
    root, _ = job
    _, _, unpacked, _ = prepare_run(config(root / "context-gpt2", "data.packing=false"))
    answer_tokens = sum(sum(t != IGNORE for t in e.labels) for e in unpacked.eval)
    logged = metrics(root / "packed", "eval")[-1]
    assert logged["eval_tokens"] == metrics(root / "unpacked", "eval")[-1]["eval_tokens"] == answer_tokens
    got = _engine_eval(root / "packed", tmp_path / "run.json", "data.packing=false")
    assert got["eval_tokens"] == answer_tokens and abs(got["eval_loss"] - logged["eval_loss"]) <= 1e-5
    data = ["--data", "builtin:instruct", "data.max_train_samples=4", "data.max_eval_samples=16"]
    packed = _engine_eval(root / "context-gpt2", tmp_path / "packed.json", *data)
    plain = _engine_eval(root / "context-gpt2", tmp_path / "plain.json", *data, "data.packing=false")
    assert packed["eval_tokens"] == plain["eval_tokens"] and abs(packed["eval_loss"] - plain["eval_loss"]) <= 1e-5
