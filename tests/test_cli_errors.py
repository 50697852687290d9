"""Bad input through the real CLI (in-process with click's runner): one line, exit code 2,
nothing written over existing outputs. All of these fail before any worker starts."""
import json
import socket

import pytest
import torch
from click.testing import CliRunner

from engine.cli import main
from engine.worker import oom_advice
from helpers import MRPC, SHAKESPEARE


def launch(*args):
    result = CliRunner().invoke(main, ["launch", "--gpus", "0", *map(str, args)])
    return result.exit_code, result.output.strip()


@pytest.fixture
def clm(tiny_gpt2, tmp_path):
    return ["task=causal_lm", f"model.name_or_path={tiny_gpt2}", f"data.train={SHAKESPEARE}",
            f"output_dir={tmp_path / 'run'}"]


def csv_file(tmp_path, text, name="d.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_one_line_error(code, out, *fragments):
    assert code == 2, out
    assert out.startswith("error: ") and "\n" not in out.splitlines()[-1]
    line = [l for l in out.splitlines() if l.startswith("error: ")][0]
    for f in fragments:
        assert f in line, line


def test_unknown_backend_and_task(clm):
    assert_one_line_error(*launch(*clm, "--backend", "horovod"), "backend.name", "horovod")
    assert_one_line_error(*launch(*clm, "task=translate"), "task must be one of")


def test_unknown_key_did_you_mean(clm):
    assert_one_line_error(*launch(*clm, "train.lr_rate=1"), "train.lr_rate", "did you mean 'lr'")


def test_missing_and_empty_data(clm, tmp_path):
    assert_one_line_error(*launch(*clm, f"data.train={tmp_path / 'nope.txt'}"), "data.train", "not found")
    empty = csv_file(tmp_path, "", "empty.txt")
    assert_one_line_error(*launch(*clm, f"data.train={empty}"), "data.train", "no examples")


def test_missing_text_column(clm, tmp_path):
    data = csv_file(tmp_path, "description\nhello there\n")
    assert_one_line_error(*launch(*clm, f"data.train={data}"), "data.text_column='text'", "description")


def test_csv_with_other_text_column_name_works(clm, tmp_path):
    from engine.config import load_config
    from engine.worker import prepare_run
    data = csv_file(tmp_path, "description\n" + "a long line of words for the model\n" * 200)
    cfg = load_config(None, clm + [f"data.train={data}", "data.text_column=description", "data.block_size=16"])
    assert len(prepare_run(cfg)[2].train) > 10


def test_unreadable_encoding(clm, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert_one_line_error(*launch(*clm, f"data.train={bad}"), "data.train", "not UTF-8")


def test_classification_label_problems(tiny_gpt2, tmp_path):
    base = ["task=classification", f"model.name_or_path={tiny_gpt2}", f"output_dir={tmp_path / 'run'}"]
    no_label = csv_file(tmp_path, "text,stars\nnice,1\n", "a.csv")
    assert_one_line_error(*launch(*base, f"data.train={no_label}"), "data.label_column='label'", "stars")
    words = csv_file(tmp_path, "text,label\nnice,positive\n", "b.csv")
    assert_one_line_error(*launch(*base, f"data.train={words}"), "non-numeric label 'positive'", "row 1")


def test_block_size_above_context(clm):
    assert_one_line_error(*launch(*clm, "data.block_size=4096"), "data.block_size=4096", "context of 128")


def test_more_gpus_than_present(clm):
    result = CliRunner().invoke(main, ["launch", "--gpus", "8", *clm])
    assert_one_line_error(result.exit_code, result.output.strip(), "--gpus 8", "0 GPU")


def test_port_in_use(clm):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_line_error(*launch(*clm, "--master-port", port), f"--master-port {port}", "in use")


def test_finished_run_is_never_overwritten(clm, tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "finished"}))
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 1.0}\n')
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_one_line_error(*launch(*clm), "already holds a finished run")
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_out_of_memory_names_what_would_fit(clm, monkeypatch):
    """An OOM inside the loop ends with advice, not only the CUDA trace."""
    from backends.ddp import DDPBackend
    from engine.config import load_config
    from engine.errors import EngineError
    from engine.worker import run

    def oom(self, batch, sync_grads, return_logits=False):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(DDPBackend, "forward_backward", oom)
    cfg = load_config(None, clm + ["train.micro_batch_size=8", "train.max_steps=2"])
    with pytest.raises(EngineError) as err:
        run(cfg.to_dict())
    message = str(err.value)
    assert "train.micro_batch_size=4 train.grad_accum=2" in message
    assert "gradient_checkpointing=true" in message and "zero_stage=3" in message
    assert message == oom_advice(cfg)


def test_glue_folder_uses_dev_file(tiny_gpt2):
    from engine.config import load_config
    from engine.worker import prepare_run
    cfg = load_config(None, ["task=classification", f"model.name_or_path={tiny_gpt2}", f"data.train={MRPC}",
                             "data.glue_task=mrpc"])
    _, _, data, conf = prepare_run(cfg)
    assert (len(data.train), len(data.eval), data.num_labels) == (3667, 408, 2)
    assert conf.pad_token_id == conf.eos_token_id  # GPT-2 has no pad token: EOS pads
