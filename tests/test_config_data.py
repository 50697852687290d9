"""Single-process logic: config loading/validation, data readers, metrics, the progress ETA."""
import csv
import json

import numpy as np
import pytest

from engine.config import apply_override, load_config
from engine.data import read_rows
from engine.errors import EngineError
from engine.loop import step_batches
from engine.metrics import Progress
from engine.tasks.glue import GLUE_TASKS, compute_metrics
from helpers import MRPC, SHAKESPEARE

pytestmark = pytest.mark.fast  # in-process only: the whole module is in the fast tier


def write_yaml(path, text):
    path.write_text(text)
    return path


def test_overrides_reach_typed_fields(tmp_path):
    cfg_file = write_yaml(tmp_path / "c.yaml", f"task: causal_lm\nmodel: {{name_or_path: x}}\n"
                                                f"data: {{train: {SHAKESPEARE}}}\ntrain: {{lr: 1e-3}}\n")
    cfg = load_config(cfg_file, ["train.max_steps=20", "train.precision=bf16", "backend.ddp.bucket_cap_mb=50",
                                 "data.block_size=64"])
    assert cfg.train.max_steps == 20 and cfg.train.lr == 1e-3  # YAML reads 1e-3 as a string
    assert cfg.train.precision == "bf16" and cfg.data.block_size == 64
    assert cfg.backend_options().bucket_cap_mb == 50
    assert cfg.to_dict()["backend"]["ddp"] == {"bucket_cap_mb": 50}


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown config key 'train.max_step' (did you mean 'max_steps'?)"),
    ("trian.lr=1", "unknown config key 'trian' (did you mean 'train'?)"),
    ("train.micro_batch_size=two", "train.micro_batch_size must be an integer"),
    ("train.precision=fp8", "train.precision must be one of fp32, bf16, fp16"),
    ("task=summarize", "task must be one of causal_lm, classification"),
    ("backend.name=horovod", "backend.name must be one of"),
    ("backend.ddp.bucket_cap=3", "unknown config key 'backend.ddp.bucket_cap' (did you mean 'bucket_cap_mb'?)"),
    ("data.glue_task=mrcp", "data.glue_task must be one of"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio must be in [0, 1)"),
])
def test_bad_config_is_one_clear_line(override, message):
    with pytest.raises(EngineError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_override_syntax_error():
    with pytest.raises(EngineError, match="is not KEY=VALUE"):
        apply_override({}, "train.max_steps")


def test_csv_text_column_round_trips_newlines_commas_quotes(tmp_path):
    texts = ['line one\nline two, with comma', 'say "hi"\n\n"quoted", really', "plain"]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["description", "other"])
        for t in texts:
            w.writerow([t, "x"])
    rows = read_rows(str(tmp_path / "d.csv"), "data.train")
    assert [r["description"] for r in rows] == texts


def test_mrpc_tsv_quoting_and_bom():
    train = read_rows(str(MRPC), "data.train")
    dev = read_rows(str(MRPC), "data.validation", split="validation")
    assert len(train) == 3667 and len(dev) == 408  # quotes do not merge or split rows
    assert "Quality" in train[0]  # the BOM is not part of the first column's name
    assert all(r["Quality"] in ("0", "1") for r in train + dev)


def test_jsonl_and_txt_folder(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a\nb"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    assert [r["text"] for r in read_rows(str(tmp_path / "a.jsonl"), "f")] == ["a\nb", "c"]
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "1.txt").write_text("first line\nsecond\n")
    (folder / "2.txt").write_text("third\n")
    assert [r["text"] for r in read_rows(str(folder), "f")] == ["first line\n", "second\n", "third\n"]


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "data file not found"),
    (lambda p: p.write_text(""), "holds no examples"),
    (lambda p: p.write_bytes(b"text\n\xff\xfe bad\n"), "is not UTF-8 text"),
])
def test_bad_data_files(tmp_path, setup, message):
    path = tmp_path / "d.csv"
    setup(path)
    with pytest.raises(EngineError, match=message):
        read_rows(str(path), "data.train")


def test_glue_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    from scipy.stats import pearsonr, spearmanr
    rng = np.random.default_rng(0)
    preds, labels = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    got = compute_metrics(("accuracy", "f1", "matthews_correlation"), preds, labels)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert got["f1"] == pytest.approx(f1_score(labels, preds))
    assert got["matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, preds))
    x, y = rng.normal(size=100), rng.normal(size=100)
    got = compute_metrics(GLUE_TASKS["stsb"].metrics, x, y)
    assert got["pearson"] == pytest.approx(pearsonr(x, y)[0]) and got["spearmanr"] == pytest.approx(spearmanr(x, y)[0])


def test_step_batches_cover_each_example_once_per_epoch():
    steps = [step_batches(103, 10, seed=1, epoch=0, step_in_epoch=s) for s in range(10)]
    flat = [i for s in steps for i in s]
    assert len(flat) == len(set(flat)) == 100
    assert steps[0] != step_batches(103, 10, seed=1, epoch=1, step_in_epoch=0)  # reshuffled per epoch


def test_progress_eta_ignores_warmup_steps():
    p = Progress(total=10, initial=0, enabled=False)
    for seconds in (30.0, 20.0, 1.0, 1.0):  # two slow warm-up steps, then 1 s steps
        p.update(seconds)
    assert p.eta_seconds() == pytest.approx(6.0)


def test_hub_dataset_path_through_datasets_load_dataset(tmp_path):
    """The hub branch (datasets.load_dataset) exercised on a local dataset folder, since no hub
    is reachable here; an unknown name is a one-line error, not a traceback."""
    from engine.data import _rows_from_hub
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.csv").write_text("text,label\nhello world,1\nbye now,0\n")
    rows = _rows_from_hub(str(tmp_path / "ds"), "data.train", "train", None)
    assert [r["text"] for r in rows] == ["hello world", "bye now"]
    with pytest.raises(EngineError, match="could not load hub dataset 'no-such-org/no-such-dataset'"):
        _rows_from_hub("no-such-org/no-such-dataset", "data.train", "train", None)


# -- names users bring from the HF Trainer ------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1e-4", "unknown config key 'train.learning_rate': the HF Trainer's learning_rate is train.lr here"),
    ("learning_rate=1e-4", "unknown config key 'learning_rate': the HF Trainer's learning_rate is train.lr here"),
    ("train.num_train_epochs=3", "the HF Trainer's num_train_epochs is train.epochs here"),
    ("per_device_train_batch_size=8", "the HF Trainer's per_device_train_batch_size is train.micro_batch_size here"),
    ("train.gradient_accumulation_steps=4", "the HF Trainer's gradient_accumulation_steps is train.grad_accum here"),
    ("train.adam_epsilon=1e-6", "the HF Trainer's adam_epsilon is train.adam_eps here"),
    ("train.lr_scheduler_type=cosine", "the HF Trainer's lr_scheduler_type is train.scheduler here"),
    ("bf16=true", "unknown config key 'bf16': the HF Trainer's bf16 is train.precision=bf16 here"),
    ("train.output_dir=x", "the HF Trainer's output_dir is output_dir here"),
    ("model_name_or_path=gpt2", "the HF Trainer's model_name_or_path is model.name_or_path here"),
    ("data.train_file=a.txt", "unknown config key 'data.train_file': the HF Trainer's train_file is data.train here"),
    ("seed=1", "unknown config key 'seed': the HF Trainer's seed is train.seed here"),
])
def test_hf_trainer_names_say_the_engine_key(override, message):
    with pytest.raises(EngineError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_hf_trainer_names_in_a_yaml_file(tmp_path):
    cfg_file = write_yaml(tmp_path / "c.yaml", "model: {name_or_path: x}\ndata: {train: a.txt}\n"
                                                "train:\n  learning_rate: 2.0e-5\n  max_steps: 10\n")
    with pytest.raises(EngineError) as err:
        load_config(cfg_file)
    assert str(err.value) == "unknown config key 'train.learning_rate': the HF Trainer's learning_rate is train.lr here"


def test_warmup_steps_is_an_absolute_count():
    cfg = load_config(None, ["train.warmup_steps=30", "train.max_steps=100"])
    assert cfg.train.warmup_steps == 30 and cfg.train.warmup_ratio == 0.0  # the sample job's ratio gives way
    assert cfg.train.warmup_for(100) == 30
    ratio = load_config(None, ["train.warmup_ratio=0.25", "train.max_steps=100"]).train
    assert ratio.warmup_steps == 0 and ratio.warmup_for(100) == 25  # 0 = the ratio, as before
    with pytest.raises(EngineError, match=r"^train.warmup_steps=30 is more than the run's 20 steps$"):
        cfg.train.warmup_for(20)  # epoch-based totals are checked when the run is planned


@pytest.mark.parametrize("overrides, message", [
    (["train.warmup_steps=10", "train.warmup_ratio=0.1"],
     "set train.warmup_steps (10) or train.warmup_ratio (0.1), not both"),
    (["train.warmup_steps=50", "train.max_steps=20"], "train.warmup_steps=50 is more than the run's 20 steps"),
    (["train.warmup_steps=-1"], "train.warmup_steps must not be negative, got -1"),
])
def test_warmup_steps_errors(overrides, message, tmp_path):
    cfg_file = write_yaml(tmp_path / "c.yaml", f"model: {{name_or_path: x}}\ndata: {{train: {SHAKESPEARE}}}\n")
    with pytest.raises(EngineError) as err:
        load_config(cfg_file, overrides)
    assert str(err.value) == message


def test_warmup_steps_drive_the_scheduler(tiny_gpt2, tmp_path):
    """The loop's scheduler warms up over train.warmup_steps: linear, lr 0 -> peak over 2 steps."""
    from engine.worker import run
    from helpers import metrics
    cfg = load_config(None, ["task=causal_lm", f"model.name_or_path={tiny_gpt2}", f"data.train={SHAKESPEARE}",
                             "data.block_size=32", "data.max_train_samples=32", "train.micro_batch_size=4",
                             "train.max_steps=4", "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=1",
                             f"output_dir={tmp_path / 'run'}"])
    run(cfg.to_dict())
    assert [r["lr"] for r in metrics(tmp_path / "run")] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


# -- data.format and GLUE files whatever their extension -------------------------------------------
@pytest.fixture
def mrpc_dev_txt(tmp_path):
    """GLUE's own MRPC distribution ships labelled splits as tab-separated .txt files."""
    path = tmp_path / "msr_paraphrase_dev.txt"
    path.write_bytes((MRPC / "dev.tsv").read_bytes())
    return path


def test_glue_task_reads_a_txt_file_as_glue_tsv(mrpc_dev_txt):
    rows = read_rows(str(mrpc_dev_txt), "data.train", glue=True)
    assert len(rows) == 408 and set(rows[0]) == {"Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"}
    assert rows == read_rows(str(MRPC), "data.validation", split="validation")  # as the .tsv reads
    assert set(read_rows(str(mrpc_dev_txt), "data.train")[0]) == {"text"}  # no GLUE task: plain text


def test_glue_txt_file_trains_through_prepare_run(tiny_gpt2, mrpc_dev_txt):
    from engine.worker import prepare_run
    cfg = load_config(None, ["task=classification", f"model.name_or_path={tiny_gpt2}", f"data.train={mrpc_dev_txt}",
                             f"data.validation={mrpc_dev_txt}", "data.glue_task=mrpc", "data.block_size=64"])
    _, _, data, _ = prepare_run(cfg)
    assert (len(data.train), len(data.eval), data.num_labels) == (408, 408, 2)


def test_data_format_overrides_the_extension(tmp_path, mrpc_dev_txt):
    assert len(read_rows(str(mrpc_dev_txt), "data.train", fmt="tsv")) == 408  # no GLUE task needed
    csv_as_text = tmp_path / "notes.csv"
    csv_as_text.write_text("a, b, c\nd, e\n")
    assert [r["text"] for r in read_rows(str(csv_as_text), "data.train", fmt="text")] == ["a, b, c\n", "d, e\n"]
    dat = tmp_path / "export.dat"
    dat.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert [r["text"] for r in read_rows(str(dat), "data.train", fmt="jsonl")] == ["one", "two"]
    with pytest.raises(EngineError) as err:
        read_rows(str(dat), "data.train")
    assert "unsupported file type '.dat'" in str(err.value) and "set data.format" in str(err.value)
    with pytest.raises(EngineError, match="is a folder .* data.format=csv needs a file"):
        read_rows(str(tmp_path), "data.train", fmt="csv")
    with pytest.raises(EngineError, match="data.format must be one of auto, text, csv, tsv, jsonl, json; got 'xml'"):
        load_config(None, ["data.format=xml"])


def test_data_format_reaches_the_task(tiny_gpt2, mrpc_dev_txt):
    """data.format=tsv for a classification file that is not GLUE: the columns are the user's."""
    from engine.worker import prepare_run
    cfg = load_config(None, ["task=classification", f"model.name_or_path={tiny_gpt2}", f"data.train={mrpc_dev_txt}",
                             "data.format=tsv", "data.text_column='#1 String'", "data.text_pair_column='#2 String'",
                             "data.label_column=Quality", "data.block_size=64"])
    _, _, data, _ = prepare_run(cfg)
    assert len(data.train) == 408 and data.num_labels == 2


def tiny_gpt_neo_dir(root):
    """A tiny GPT-Neo (random init, local + global attention) + the real GPT-2 tokenizer, as an HF folder."""
    import torch
    from transformers import GPT2Tokenizer, GPTNeoConfig, GPTNeoForCausalLM
    from helpers import GPT2_TOKENIZER
    path = root / "tiny-gpt-neo"
    tok = GPT2Tokenizer.from_pretrained(str(GPT2_TOKENIZER))
    conf = GPTNeoConfig(vocab_size=len(tok), max_position_embeddings=128, hidden_size=32, num_layers=2, num_heads=2,
                        attention_types=[[["global", "local"], 1]], window_size=16, intermediate_size=64,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPTNeoForCausalLM(conf).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_hf_trainer_gpt_neo_recipe_csv_description_column(tmp_path):
    """The HF Trainer + GPT-Neo recipe: a CSV whose text is in `description`, through
    data.text_column=description, trains a couple of steps in-process."""
    from engine.worker import run
    from helpers import metrics
    model = tiny_gpt_neo_dir(tmp_path)
    data = tmp_path / "products.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "description"])
        for i in range(60):
            w.writerow([f"item {i}", f"A sturdy, handy thing number {i}, with \"quotes\" and a comma."])
    cfg = load_config(None, ["task=causal_lm", f"model.name_or_path={model}", f"data.train={data}",
                             "data.text_column=description", "data.block_size=32", "train.micro_batch_size=4",
                             "train.max_steps=2", "train.lr=1e-3", "train.log_every=1", f"output_dir={tmp_path / 'run'}"])
    result = run(cfg.to_dict())
    logged = metrics(tmp_path / "run")
    assert result["finished"] and [r["step"] for r in logged] == [1, 2] and all(r["loss"] > 0 for r in logged)
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(tmp_path / "run" / "model").model_type == "gpt_neo"
