"""Side-by-side sampling from several HF model folders (e.g. base vs fine-tuned)."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import EngineError


def load_for_generation(name_or_path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.hub import check_hub_name
    check_hub_name(name_or_path, "engine generate")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        where = "folder" if Path(name_or_path).exists() else "hub id"
        raise EngineError(f"cannot load model {name_or_path!r} ({where}): {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model.eval()


def generate_side_by_side(models: list[str], prompts: list[str], *, max_new_tokens: int = 40,
                          temperature: float = 0.8, top_k: int = 50, seed: int = 0, greedy: bool = False):
    loaded = [(m, *load_for_generation(m)) for m in models]
    for prompt in prompts:
        outputs = []
        for name, tok, model in loaded:
            torch.manual_seed(seed)  # same sampling noise for every model
            enc = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=not greedy,
                                     temperature=temperature if not greedy else None,
                                     top_k=top_k if not greedy else None, pad_token_id=tok.pad_token_id)
            outputs.append((name, tok.decode(out[0], skip_special_tokens=True)))
        yield prompt, outputs
