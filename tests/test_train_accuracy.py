"""Training-set accuracy per log window (task: classification), checked against an independent
recomputation: the weights each step's forward used (the initial model for step 1, the checkpoint
of step s-1 for step s) scored on that step's examples, outside the loop and the backend."""
import pytest
import torch

from engine.config import load_config
from engine.worker import prepare_run, run
from helpers import MRPC, metrics

MICRO, ACCUM, STEPS = 4, 2, 4


def job(model, out, *extra):
    return load_config(None, ["task=classification", f"model.name_or_path={model}", f"data.train={MRPC}",
                              "data.glue_task=mrpc", "data.block_size=64", "data.max_train_samples=64",
                              "data.max_eval_samples=8", f"train.micro_batch_size={MICRO}",
                              f"train.grad_accum={ACCUM}", f"train.max_steps={STEPS}", "train.lr=3e-3",
                              "train.log_every=2", "train.save_every=1", "train.keep_last=10",
                              f"output_dir={out}", *extra])


def test_train_accuracy_is_that_of_the_weights_each_step_used(tiny_gpt2, tmp_path):
    from safetensors.torch import load_model

    from engine.loop import step_batches
    from engine.modeling import model_builder

    cfg = job(tiny_gpt2, tmp_path / "run")
    run(cfg.to_dict())
    events = metrics(tmp_path / "run")
    assert [e["step"] for e in events] == [2, 4]

    task, _, data, conf = prepare_run(cfg)
    model = model_builder(cfg, conf, task.auto_model_class())()  # what step 1's forward used
    model.eval()
    global_batch = MICRO * ACCUM
    correct, predicted = [], set()
    for step in range(1, STEPS + 1):
        if step > 1:
            load_model(model, str(tmp_path / "run" / "checkpoints" / f"step-{step - 1}" / "model.safetensors"))
        indices = step_batches(len(data.train), global_batch, cfg.train.seed, 0, step - 1)
        hits = 0
        for k in range(ACCUM):  # the loop's micro-batches: same padding, same numbers
            batch = task.collate([data.train[i] for i in indices[k * MICRO:(k + 1) * MICRO]])
            with torch.no_grad():
                preds = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
            hits += int((preds == batch["labels"]).sum())
            predicted.update(preds.tolist())
        correct.append(hits)
    expected = [(correct[0] + correct[1]) / (2 * global_batch), (correct[2] + correct[3]) / (2 * global_batch)]
    got = [e["train_accuracy"] for e in events]
    assert got == pytest.approx(expected, abs=1e-12)
    assert all(0 <= a <= 1 for a in got)
    # the check discriminates: both classes were predicted (a constant head would hide which
    # examples were counted)
    assert predicted == {0, 1}, predicted


def test_regression_and_causal_lm_report_no_train_accuracy(tiny_gpt2, tmp_path):
    """num_labels=1 (STS-B style regression) has no accuracy: the key is absent, not 0."""
    rows = tmp_path / "scores.jsonl"
    rows.write_text("".join('{"text": "%s", "label": %s}\n' % ("word " * (n % 7 + 1), n % 5 / 4)
                            for n in range(32)))
    cfg = load_config(None, ["task=classification", f"model.name_or_path={tiny_gpt2}", f"data.train={rows}",
                             "model.num_labels=1", "data.block_size=16", "train.micro_batch_size=4",
                             "train.max_steps=2", "train.log_every=1", "train.save_final=false",
                             f"output_dir={tmp_path / 'reg'}"])
    run(cfg.to_dict())
    events = metrics(tmp_path / "reg")
    assert len(events) == 2 and all("train_accuracy" not in e and e["loss"] > 0 for e in events)
