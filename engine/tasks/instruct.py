"""Instruction data for causal-LM fine-tuning: records in the Alpaca, prompt/completion or chat
(`messages`) layout, rendered with a chat template, learned on the answers only, and optionally
packed into block_size rows with no attention or position leaking between examples.

Which tokens are the answer: each conversation is rendered with the chat template prefix by prefix
(everything before an assistant turn plus the generation prompt, then everything through that turn),
which gives the characters of every answer in the rendering of the whole conversation; the whole
rendering is tokenized once and a token is learned when it overlaps an answer's characters. This
works with any chat template, while transformers' `return_assistant_tokens_mask` needs a template
written with `{% generation %}` markers (few are). A template that renders a turn differently once
later turns follow (so the prefixes are not prefixes) is refused in one line.

Packing without cross-talk is transformers' own packed-sequence masking: with `position_ids` that
restart at 0 for every example and no 2-D attention mask, `transformers.masking_utils` builds the
block-diagonal causal mask (sdpa, eager; flash-attention takes the same position ids as varlen
boundaries). It does so only when the forward makes no KV cache, so packed batches carry
`use_cache=False` (see `collate_packed`)."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from engine.errors import EngineError

IGNORE = -100  # the label of a token that is not learned (torch's cross-entropy ignore_index)
ROLES = ("system", "user", "assistant")
# each layout's keys; data.layout=auto recognises it by the first (the prompt side), in this order
LAYOUT_KEYS = {"chat": ("messages",), "alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion")}
# model types whose packed forward (restarting position_ids, no 2-D mask, no cache) is block-diagonal in
# transformers 5 on sdpa and eager: checked for each by tests/test_instruct.py
PACKED_MODEL_TYPES = ("gpt2", "gpt_neo", "gptj", "llama", "mistral", "qwen2")

# The engine's own chat template, for tokenizers that have none (GPT-2's, builtin:sample's) or
# data.chat_template=engine. Markdown-style role headers, turns separated by a blank line, every
# assistant turn ending with the tokenizer's EOS (so the model learns to stop):
#   ### System:\n{system}\n\n### User:\n{question}\n\n### Assistant:\n{answer}<eos>\n\n### User:\n...
ENGINE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{- '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ ('\\n\\n' if messages else '') + '### Assistant:\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Example:
    """One tokenized record: labels are the input ids on answer tokens and IGNORE elsewhere."""
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class PackedRow:
    """Whole examples sharing one row of at most block_size tokens."""
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return sum(len(e) for e in self.examples)


@dataclass
class Prepared:
    """One split's examples, and what happened to its records on the way (for the log)."""
    records: int
    examples: list[Example] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    packed: list[PackedRow] | None = None  # data.packing: the rows the examples went into

    @property
    def items(self) -> list:
        """What the loop indexes: packed rows, or one example per row."""
        return self.packed if self.packed is not None else self.examples


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------
def choose_layout(rows: list[dict], layout: str, text_column: str, source: str) -> tuple[str, str]:
    """(layout, why) for data.layout; `auto` goes by the keys of the records."""
    if layout != "auto":
        return layout, f"data.layout={layout}"
    if text_column != "text" and text_column in rows[0]:
        return "text", f"records have the data.text_column {text_column!r}"
    for row in rows:
        for name, keys in LAYOUT_KEYS.items():
            if keys[0] in row:  # the prompt side names the layout; a missing answer is then said per record
                also = "; they also have 'text' (data.layout=text learns every token of it)" if "text" in row else ""
                return name, f"records have {keys[0]!r}{also}"
        if text_column in row:
            return "text", f"records have {text_column!r}"
    found = sorted({str(k) for row in rows for k in row})
    hint = ("; ShareGPT's conversations/from/value is the chat layout as messages/role/content"
            if "conversations" in found else "")
    raise EngineError(f"data.text_column={text_column!r} not found in {source}, and no record matches an instruction "
                      f"layout (alpaca: instruction, output; prompt_completion: prompt, completion; chat: messages); "
                      f"keys found: {', '.join(found[:12])}{' ...' if len(found) > 12 else ''}{hint}")


def _string(record: dict, key: str, where: str, *, answer: bool = False, optional: bool = False) -> str:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise EngineError(f"{where}: its {key!r} must be a string, got {type(value).__name__}")
    if optional:
        return value or ""
    if not value or not value.strip():
        state = "missing" if key not in record else "empty"
        raise EngineError(f"{where} has no answer: its {key!r} is {state}" if answer else
                          f"{where}: its {key!r} is {state}")
    return value


def _messages(value, key: str, where: str, roles_known: bool) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise EngineError(f"{where}: its {key!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for n, m in enumerate(value, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise EngineError(f"{where}: message {n} of {key!r} must be a {{role, content}} object with string values")
        if roles_known and m["role"] not in ROLES:
            raise EngineError(f"{where}: message {n} has role {m['role']!r}, which the engine's chat template does not "
                              f"know ({', '.join(ROLES)})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def to_conversation(record: dict, layout: str, where: str, engine_template: bool) -> tuple[list[dict], list[bool]]:
    """A record as chat messages and which of them are learned (the answers)."""
    if layout == "alpaca":
        instruction = _string(record, "instruction", where)
        extra = _string(record, "input", where, optional=True)
        system = _string(record, "system", where, optional=True)
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _string(record, "output", where, answer=True)}]
        return messages, [False] * (len(messages) - 1) + [True]
    if layout == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational form: lists of messages
            before = _messages(prompt, "prompt", where, engine_template)
            after = _messages(completion, "completion", where, engine_template)
            learn = [m["role"] == "assistant" and bool(m["content"].strip()) for m in after]
            if not any(learn):
                raise EngineError(f"{where} has no answer: its 'completion' holds no assistant message with content")
            return before + after, [False] * len(before) + learn
        messages = [{"role": "user", "content": _string(record, "prompt", where)},
                    {"role": "assistant", "content": _string(record, "completion", where, answer=True)}]
        return messages, [False, True]
    messages = _messages(record.get("messages"), "messages", where, engine_template)
    # an opening assistant message answers nothing (and chat templates cannot render the empty prefix before it)
    learn = [i > 0 and m["role"] == "assistant" and bool(m["content"].strip()) for i, m in enumerate(messages)]
    if not any(learn):
        raise EngineError(f"{where} has no answer: no assistant message with content after the first in 'messages'")
    return messages, learn


# --------------------------------------------------------------------------------------------
# Rendering and tokenizing
# --------------------------------------------------------------------------------------------
def template_for(tokenizer, choice: str) -> tuple[str | None, str]:
    """(the chat template to render with (None: the tokenizer's own), what to call it in the log)."""
    if choice == "auto" and tokenizer.chat_template:
        return None, "the tokenizer's own"
    return ENGINE_CHAT_TEMPLATE, ("the engine's (data.chat_template=engine)" if choice == "engine"
                                  else "the engine's (the tokenizer has none)")


def _render(tokenizer, template, messages, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's TemplateError (raise_exception in the template) and its kin
        which = "the engine's" if template is not None else "the tokenizer's"
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EngineError(f"{where}: {which} chat template refused it: {why}") from None


def answer_spans(tokenizer, template, messages: list[dict], learn: list[bool], where: str) -> tuple[str, list]:
    """The rendered conversation and the character spans of its learned turns, found prefix by prefix."""
    text = _render(tokenizer, template, messages, False, where)
    spans = []
    for i, learned in enumerate(learn):
        if not learned:
            continue
        before = _render(tokenizer, template, messages[:i], True, where)
        through = _render(tokenizer, template, messages[: i + 1], False, where)
        if not (text.startswith(through) and through.startswith(before) and len(through) > len(before)):
            raise EngineError(f"{where}: the chat template renders turn {i + 1} differently once later turns follow, "
                              "so its answer cannot be located in the conversation; set data.chat_template=engine")
        spans.append((len(before), len(through)))
    return text, spans


def _labels(ids: list[int], offsets: list, spans: list[tuple[int, int]]) -> list[int]:
    """ids on the tokens that overlap an answer span, IGNORE elsewhere. The first token is never a target:
    packed, it follows the previous example, which must not learn to predict it."""
    labels, k = [], 0
    for token, (start, end) in zip(ids, offsets):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        inside = k < len(spans) and end > start and start < spans[k][1] and end > spans[k][0]
        labels.append(token if inside else IGNORE)
    if labels:
        labels[0] = IGNORE
    return labels


def tokenize_records(records: list[dict], layout: str, tokenizer, template, block_size: int, field: str,
                     source: str) -> Prepared:
    """Examples of every record; one longer than block_size keeps its first block_size tokens (the prompt
    comes first) and is dropped when no answer token is left in them."""
    if not getattr(tokenizer, "is_fast", False):
        raise EngineError(f"{field}: instruction data needs a fast tokenizer (token offsets locate the answers); "
                          f"{type(tokenizer).__name__} is not one")
    texts, spans = [], []
    for n, record in enumerate(records, 1):
        where = f"{field}: record {n} of {source}"
        messages, learn = to_conversation(record, layout, where, template is not None)
        text, found = answer_spans(tokenizer, template, messages, learn, where)
        texts.append(text)
        spans.append(found)
    # the template writes the special tokens itself (as apply_chat_template(tokenize=True) does)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = Prepared(len(records))
    for ids, offsets, found in zip(enc["input_ids"], enc["offset_mapping"], spans):
        labels = _labels(ids, offsets, found)
        if len(ids) > block_size:
            ids, labels = ids[:block_size], labels[:block_size]
            if all(x == IGNORE for x in labels):
                out.dropped += 1
                continue
            out.truncated += 1
        out.examples.append(Example(ids, labels))
    if not out.examples:
        raise EngineError(f"{field}: no example of {source} keeps an answer token within data.block_size={block_size}")
    return out


# --------------------------------------------------------------------------------------------
# Packing and batches
# --------------------------------------------------------------------------------------------
def pack(examples: list[Example], block_size: int) -> list[PackedRow]:
    """Best-fit decreasing: longest example first, each into the row with the least room that still
    takes it whole (a new row when none does). Deterministic; no example is split."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = len(examples[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            room, row = block_size - n, len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return [PackedRow(tuple(examples[i] for i in sorted(row))) for row in rows]


def collate_examples(examples: list[Example]) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest; padding is masked and not learned."""
    width = max(len(e) for e in examples)
    input_ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE)
    mask = torch.zeros_like(input_ids)
    for i, e in enumerate(examples):
        input_ids[i, : len(e)] = torch.tensor(e.input_ids)
        labels[i, : len(e)] = torch.tensor(e.labels)
        mask[i, : len(e)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_packed(rows: list[PackedRow]) -> dict[str, torch.Tensor]:
    """Packed rows, right-padded to the longest. position_ids restart at 0 for every example and there
    is no 2-D attention mask: transformers then masks attention block-diagonally, one block per example.
    The padding tail is a block of its own (positions from 0 again, no labels), so no real token sees it.
    use_cache=False: transformers skips that packed-sequence masking when the forward makes a KV cache,
    which `config.use_cache` (true by default) asks for. The engine's model builder turns it off for
    training, but `engine eval` loads a model with its saved config, which asks for one in hub models and
    `engine export` folders: so the batch says it (as a tensor: batches hold tensors only)."""
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE)
    position_ids = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        at = 0
        for e in row.examples:
            n = len(e)
            input_ids[i, at: at + n] = torch.tensor(e.input_ids)
            labels[i, at: at + n] = torch.tensor(e.labels)
            position_ids[i, at: at + n] = torch.arange(n)
            at += n
        position_ids[i, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": torch.tensor(False)}


def packed_tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a packed batch: all but each row's padding tail, the last block of
    the row when it has no label (every example keeps at least one answer label)."""
    block = (batch["position_ids"] == 0).cumsum(1)
    last = block == block[:, -1:]
    padded = ~((batch["labels"] != IGNORE) & last).any(1)
    return int(batch["input_ids"].numel() - (last & padded[:, None]).sum())


# --------------------------------------------------------------------------------------------
# Preparing a causal-LM task's data
# --------------------------------------------------------------------------------------------
def check_packing(cfg) -> None:
    """Packing is refused, in one line, where examples would see each other."""
    model_type = cfg.model.config.get("model_type")
    if cfg.model.name_or_path:
        from transformers import AutoConfig
        try:
            model_type = AutoConfig.from_pretrained(cfg.model.name_or_path,
                                                    trust_remote_code=cfg.model.trust_remote_code).model_type
        except (OSError, ValueError):
            return  # said in one line by the model checks that follow
    if (model_type or "gpt2") not in PACKED_MODEL_TYPES:
        raise EngineError(f"data.packing with instruction data needs a model whose attention transformers masks per "
                          f"packed example (verified: {', '.join(PACKED_MODEL_TYPES)}); {model_type} is not one: "
                          "set data.packing=false")
    # ColossalAI's hybrid plugin runs the engine's forwards (backends/colossal/*_policy.py), which make
    # position_ids from the block: packed examples would attend to each other there
    if cfg.backend.name == "colossal" and getattr(cfg.backend_options(), "plugin", None) == "hybrid":
        raise EngineError("data.packing with instruction data is not supported by the colossal hybrid plugin (its "
                          "forwards drop position_ids, so packed examples would see each other): set "
                          "data.packing=false")


def prepare_split(records: list[dict], cfg, tokenizer, layout: str, template, field: str, source: str) -> Prepared:
    out = tokenize_records(records, layout, tokenizer, template, cfg.data.block_size, field, source)
    if cfg.data.packing:
        out.packed = pack(out.examples, cfg.data.block_size)
    return out


def describe(split: str, p: Prepared, layout: str, block_size: int) -> str:
    line = (f"{split}: {p.records} {layout} records -> {len(p.examples)} examples ({p.truncated} truncated to "
            f"data.block_size={block_size}, answer cut short; {p.dropped} dropped, no answer token within the block)")
    if p.packed is None:
        return line + "; one example per row"
    fill = sum(len(e) for e in p.examples) / (len(p.packed) * block_size)
    return (line + f"; packed into {len(p.packed)} rows of <= {block_size} tokens, {fill:.1%} filled (position ids "
            "restart per example, attention stays inside it)")
