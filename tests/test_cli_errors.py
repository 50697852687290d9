"""Bad input through the real CLI (in-process with click's runner): exit code 2 and stderr is one
`error:` line and nothing else; nothing written over existing outputs. All of these fail before
any worker starts."""
import json
import os
import socket

import pytest
import torch
from click.testing import CliRunner

from launch.cli import main
from engine.worker import oom_advice
from helpers import MRPC, SHAKESPEARE, assert_one_error_line

pytestmark = pytest.mark.fast  # in-process only: the whole module is in the fast tier


def launch(*args, gpus=0):
    # catch_exceptions=False: an exception the CLI did not turn into `error: ...` fails the test
    # with its own traceback instead of becoming exit code 1 in `result`
    return CliRunner().invoke(main, ["launch", "--gpus", str(gpus), *map(str, args)], catch_exceptions=False)


@pytest.fixture
def clm(tiny_gpt2, tmp_path):
    return ["task=causal_lm", f"model.name_or_path={tiny_gpt2}", f"data.train={SHAKESPEARE}",
            f"output_dir={tmp_path / 'run'}"]


def csv_file(tmp_path, text, name="d.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_one_line_error(result, *fragments):
    """The promise: exit code 2 and stderr is exactly one `error: ...` line (no traceback, no
    log lines before it), nothing on stdout; the line names what was wrong."""
    shown = f"exit {result.exit_code}\n--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
    assert result.exit_code == 2, shown
    assert "Traceback" not in result.output, shown
    assert result.stdout == "", shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    for f in fragments:
        assert f in lines[0], shown


def test_unknown_backend_and_task(clm):
    assert_one_line_error(launch(*clm, "--backend", "horovod"), "backend.name", "horovod")
    assert_one_line_error(launch(*clm, "task=translate"), "task must be one of")


def test_unknown_key_did_you_mean(clm):
    assert_one_line_error(launch(*clm, "train.lr_rate=1"), "train.lr_rate", "did you mean 'lr'")


def test_hf_trainer_name_says_the_engine_key(clm, tmp_path):
    assert_one_line_error(launch(*clm, "train.learning_rate=1e-4"),
                          "unknown config key 'train.learning_rate': the HF Trainer's learning_rate is train.lr here")
    assert not (tmp_path / "run").exists()


def test_warmup_steps_beyond_an_epoch_based_run(clm, tmp_path):
    """train.epochs sets the length: the most steps the run can have is known once the data is read
    (64 examples / (micro 8 x accum 1) = 8 steps on one rank; more ranks only make it fewer)."""
    assert_one_line_error(launch(*clm, "data.max_train_samples=64", "data.block_size=32", "train.epochs=1",
                                  "train.micro_batch_size=8", "train.warmup_steps=9"),
                          "train.warmup_steps=9 is more than the run's 8 steps")
    assert not (tmp_path / "run").exists()


def test_missing_and_empty_data(clm, tmp_path):
    assert_one_line_error(launch(*clm, f"data.train={tmp_path / 'nope.txt'}"), "data.train", "not found")
    empty = csv_file(tmp_path, "", "empty.txt")
    assert_one_line_error(launch(*clm, f"data.train={empty}"), "data.train", "no examples")


def test_missing_text_column(clm, tmp_path):
    data = csv_file(tmp_path, "description\nhello there\n")
    assert_one_line_error(launch(*clm, f"data.train={data}"), "data.text_column='text'", "description")


def test_csv_with_other_text_column_name_works(clm, tmp_path):
    from engine.config import load_config
    from engine.worker import prepare_run
    data = csv_file(tmp_path, "description\n" + "a long line of words for the model\n" * 200)
    cfg = load_config(None, clm + [f"data.train={data}", "data.text_column=description", "data.block_size=16"])
    assert len(prepare_run(cfg)[2].train) > 10


def test_unreadable_encoding(clm, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert_one_line_error(launch(*clm, f"data.train={bad}"), "data.train", "not UTF-8")


def test_classification_label_problems(tiny_gpt2, tmp_path):
    base = ["task=classification", f"model.name_or_path={tiny_gpt2}", f"output_dir={tmp_path / 'run'}"]
    no_label = csv_file(tmp_path, "text,stars\nnice,1\n", "a.csv")
    assert_one_line_error(launch(*base, f"data.train={no_label}"), "data.label_column='label'", "stars")
    words = csv_file(tmp_path, "text,label\nnice,positive\n", "b.csv")
    assert_one_line_error(launch(*base, f"data.train={words}"), "non-numeric label 'positive'", "row 1")


def test_block_size_above_context(clm):
    assert_one_line_error(launch(*clm, "data.block_size=4096"), "data.block_size=4096", "context of 128")


def test_more_gpus_than_present(clm):
    assert_one_line_error(launch(*clm, gpus=8), "--gpus 8", "0 GPU")


def test_port_in_use(clm):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_line_error(launch(*clm, "--master-port", port), f"--master-port {port}", "in use")


def test_finished_run_is_never_overwritten(clm, tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "finished"}))
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 1.0}\n')
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_one_line_error(launch(*clm), "already holds a finished run")
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


# -- bad input that used to end in a worker traceback: now one line before any process starts ------
def copy_model(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_corrupt_safetensors_is_one_line_before_anything_is_written(tiny_gpt2, tmp_path):
    model = copy_model(tiny_gpt2, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    out = tmp_path / "run"
    result = launch("task=causal_lm", f"model.name_or_path={model}", f"data.train={SHAKESPEARE}",
                    "data.max_train_samples=16", "data.block_size=32", f"output_dir={out}")
    assert_one_line_error(result, f"error: model '{model}': weights file {weights} is corrupt (tensor ",
                          "lies past the", "re-download or re-save it")
    assert not out.exists()  # no config.yaml left in a new run directory


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b[:5], "shorter than the 8-byte header length"),
    (lambda b: (10 ** 9).to_bytes(8, "little") + b[8:], "header length 1000000000 runs past the end"),
    (lambda b: b[:8] + b"{" * (int.from_bytes(b[:8], "little")) + b[8 + int.from_bytes(b[:8], "little"):],
     "its JSON header does not parse"),
])
def test_corrupt_safetensors_headers(tiny_gpt2, tmp_path, damage, reason):
    from engine.config import load_config
    from engine.errors import EngineError
    from engine.modeling import check_weights
    model = copy_model(tiny_gpt2, tmp_path / "model")
    weights = model / "model.safetensors"
    cfg = load_config(None, [f"model.name_or_path={model}", f"data.train={SHAKESPEARE}"])
    check_weights(cfg)  # the intact file passes
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(EngineError) as err:
        check_weights(cfg)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_sharded_checkpoint_checks_every_shard(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from engine.config import load_config
    from engine.errors import EngineError
    from engine.modeling import check_weights
    model = tmp_path / "sharded"
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_layer=2, n_embd=32, n_head=2, n_positions=64)).save_pretrained(
        model, max_shard_size="100KB")
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) >= 2 and not (model / "model.safetensors").exists()
    cfg = load_config(None, [f"model.name_or_path={model}", f"data.train={SHAKESPEARE}", "tokenizer=gpt2"])
    check_weights(cfg)
    last = shards[-1]
    last.write_bytes(last.read_bytes()[:-4])
    with pytest.raises(EngineError, match=f"weights file {last} is corrupt"):
        check_weights(cfg)
    last.unlink()
    with pytest.raises(EngineError, match=f"shard {last.name} named in model.safetensors.index.json is missing"):
        check_weights(cfg)


def test_output_dir_that_is_a_file(clm, tmp_path):
    run = tmp_path / "run"
    run.write_text("my notes\n")
    assert_one_line_error(launch(*clm), f"output_dir {run} is an existing file, not a directory")
    assert run.read_text() == "my notes\n"


@pytest.mark.parametrize("where, fragment", [
    ("under_file", "is a file, not a directory"),       # a file used as a parent directory
    ("/sys/engine-test/run", "cannot be created or written: "),      # read-only even for root (sysfs)
    ("/proc/engine-test/run", "cannot be created or written: "),     # no directory can be made there
])
def test_output_dir_that_cannot_be_made_or_written(clm, tmp_path, where, fragment):
    if where == "under_file":
        (tmp_path / "a-file").write_text("x")
        where = str(tmp_path / "a-file" / "sub" / "run")
    assert_one_line_error(launch(*clm[:-1], f"output_dir={where}"), f"output_dir {where}", fragment)
    assert not os.path.lexists(where) and not os.path.lexists(os.path.dirname(where))
    assert (tmp_path / "a-file").read_text() == "x" if (tmp_path / "a-file").exists() else True


def test_write_probe_leaves_nothing_behind(tmp_path):
    from engine.checkpoint import check_output_dir
    assert check_output_dir(tmp_path / "a" / "b" / "run") == "new"
    assert list(tmp_path.iterdir()) == []  # the new directory and its new parents are gone again
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "notes.txt").write_text("kept")
    assert check_output_dir(existing) == "new"
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


def test_launchers_of_two_nodes_probe_one_new_output_dir_at_once(tmp_path):
    """Every node's launcher checks the shared output_dir in the same second; each makes it, probes
    it and removes it again under the others. None of them may take that for an unwritable disk
    (CI caught `File exists` from a two-node launch)."""
    import threading
    from engine.checkpoint import check_output_dir
    failures = []
    for trial in range(60):
        run = tmp_path / f"t{trial}" / "a" / "run"
        def probe():
            try:
                check_output_dir(run)
            except Exception as e:  # noqa: BLE001 - any failure is the bug
                failures.append(e)
        threads = [threading.Thread(target=probe) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []


# ------------------------------------------------------------------------------------------------
# Issue 19: what used to pass the checks or fail late, now one line before anything starts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=.nan", "train.max_grad_norm=.inf",
                                      "train.weight_decay=-.inf", "data.validation_split=nan"])
def test_every_float_key_must_be_finite(clm, tmp_path, override):
    key = override.split("=")[0]
    assert_one_line_error(launch(*clm, override), key, "must be a finite number")
    assert not (tmp_path / "run").exists()  # nothing written (no config.yaml in a new run directory)


@pytest.mark.parametrize("override,fragment", [("train.adam_beta2=1.0", "train.adam_beta2 must be in [0, 1)"),
                                               ("train.adam_eps=0", "train.adam_eps must be positive")])
def test_optimizer_floats_in_range(clm, override, fragment):
    assert_one_line_error(launch(*clm, override), fragment)


def test_config_file_problems_say_where(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    assert_one_line_error(launch(folder), f"config file {folder} is a directory")
    tabbed = tmp_path / "tab.yaml"
    tabbed.write_text("train:\n\tlr: 0.001\n")
    assert_one_line_error(launch(tabbed), "line 2, column 1", "YAML indents with spaces, not tabs")
    top = tmp_path / "top.yaml"
    top.write_text("epochs: 3\n")
    assert_one_line_error(launch(top), "unknown config key 'epochs'", "did you mean 'train.epochs'?")


def test_model_folder_without_tokenizer_says_so(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    bare = tmp_path / "bare-model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300)).save_pretrained(bare)
    result = launch(f"model.name_or_path={bare}", f"data.train={SHAKESPEARE}", f"output_dir={tmp_path / 'run'}")
    assert_one_line_error(result, f"model.name_or_path folder {bare} has no tokenizer files", "tokenizer=")


@pytest.fixture
def four_head_gpt2(tmp_path):
    from helpers import tiny_gpt2_dir
    return tiny_gpt2_dir(tmp_path / "models", n_layer=2, n_embd=32, n_head=4)


@pytest.mark.parametrize("options,nproc,fragment", [
    (["backend.colossal.tp_size=3"], 3, "tp_size=3 must divide the model's 4 attention heads"),
    (["backend.colossal.tp_size=2"], 3, "tp_size=2 x pp_size=1 does not divide the 3 processes"),
    (["backend.colossal.pp_size=4", "backend.colossal.microbatches=4"], 4,
     "pp_size=4 is more than the model's 2 layers"),
])
def test_hybrid_layouts_the_model_cannot_take_are_refused_before_spawning(four_head_gpt2, tmp_path, options, nproc,
                                                                          fragment):
    pytest.importorskip("colossalai")
    result = launch("--nproc", nproc, "--backend", "colossal", "backend.colossal.plugin=hybrid", *options,
                    f"model.name_or_path={four_head_gpt2}", f"data.train={SHAKESPEARE}", "data.block_size=32",
                    "data.max_train_samples=32", "train.micro_batch_size=4", f"output_dir={tmp_path / 'run'}")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_a_classification_head_of_another_size_is_reinitialised_with_a_note(tiny_gpt2, tmp_path):
    """STS-B (1-value regression) from a 2-label MRPC model: the head is new, the body loaded."""
    from transformers import AutoModelForSequenceClassification
    from engine.config import load_config
    from engine.modeling import model_builder
    from engine.worker import prepare_run
    mrpc_model = tmp_path / "mrpc-model"
    AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=2).save_pretrained(mrpc_model)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(mrpc_model)
    stsb = tmp_path / "STS-B"
    stsb.mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = "".join(f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\tA man plays a guitar {i}.\tA man plays music {i}.\t{i % 5}.0\n"
                   for i in range(16))
    for name in ("train.tsv", "dev.tsv"):
        (stsb / name).write_text(header + rows)
    cfg = load_config(None, ["task=classification", f"model.name_or_path={mrpc_model}", f"data.train={stsb}",
                             "data.glue_task=stsb", "data.block_size=32", f"output_dir={tmp_path / 'run'}"])
    task, _, data, conf = prepare_run(cfg)
    assert conf.num_labels == 1
    assert [n for n in data.notes if "head is re-initialised" in n] == [
        f"{mrpc_model} has a 2-label classification head; this task needs 1: the head is re-initialised "
        "(the rest of the model is loaded)"]
    model = model_builder(cfg, conf, task.auto_model_class())()
    saved = AutoModelForSequenceClassification.from_pretrained(mrpc_model)
    assert model.score.weight.shape == (1, 32)
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, saved.transformer.h[0].mlp.c_fc.weight)


def test_the_launcher_binds_a_free_port_itself_and_a_clash_names_master_port(clm, monkeypatch):
    """No --master-port on one node: port 0 goes to the rendezvous, whose store binds a free port
    itself (choosing one first and binding it later raced with other jobs); an explicit port taken
    between the check and the bind is one line naming --master-port, not a traceback."""
    from torch.distributed import DistNetworkError
    seen = []

    def elastic_launch(config, entry):
        seen.append(config.rdzv_endpoint)
        if not config.rdzv_endpoint.endswith(":0"):
            raise DistNetworkError(f"The server socket has failed to bind to {config.rdzv_endpoint} "
                                   "(errno: 98 - Address already in use).")
        return lambda cfg: None
    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", elastic_launch)
    result = launch(*clm, "--nproc", "2")
    assert result.exit_code == 0, result.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free when checked, "taken" when the store binds it
    result = launch(*clm, "--nproc", "2", "--master-port", port, f"output_dir={clm[-1].split('=', 1)[1]}-2")
    assert result.exit_code == 2, result.output
    line = assert_one_error_line(result.stderr, "error: --master-port")  # after the run's `new run in` line
    assert f"--master-port {port} is already in use" in line and "leave --master-port out" in line, line
    assert seen == ["127.0.0.1:0", f"127.0.0.1:{port}"]


def test_a_default_run_prints_no_optional_kernel_warning():
    """bitsandbytes (imported through transformers -> peft) warns on CPUs with AVX-512 BF16, from
    this logger, that its optional hub kernel is missing: not what a user of a default run needs."""
    import logging
    import bitsandbytes.backends.cpu.ops as ops
    from engine import warn_once
    warn_once.install()
    assert ops.logger.name in warn_once.QUIET_LOGGERS
    assert not ops.logger.isEnabledFor(logging.WARNING) and ops.logger.isEnabledFor(logging.ERROR)


def test_library_notes_about_optional_extras_are_shown_only_when_verbose(monkeypatch):
    """ColossalAI's import-time tensornvme/apex warnings and DeepSpeed's 'Setting accelerator to CPU'
    record say nothing a run needs: hidden unless ENGINE_VERBOSE=1; other warnings still show once."""
    import logging
    from engine import warn_once
    tensornvme = "Please install the latest tensornvme to use async save. pip install git+https://..."
    apex = "Please install apex from source (https://github.com/NVIDIA/apex) to use the fused RMSNorm kernel"
    accelerator = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."

    def shown(text):
        record = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, text, None, None)
        return warn_once.OncePerMessage().filter(record) and not warn_once._library_noise(text)
    monkeypatch.delenv("ENGINE_VERBOSE", raising=False)
    assert [shown(t) for t in (tensornvme, apex, accelerator, "engine-test: a warning users need")] == \
        [False, False, False, True]
    monkeypatch.setenv("ENGINE_VERBOSE", "1")
    assert [shown(t) for t in (tensornvme, apex, accelerator)] == [True, True, True]


def test_a_job_that_ends_without_saying_so_is_recorded_as_failed(clm, tmp_path, monkeypatch):
    """run.json never claims `running` for a job that has ended: when the workers could not say it
    (killed, crashed), the launcher records it failed, with why."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    run = tmp_path / "run"

    def elastic_launch(config, entry):
        def crash(cfg):
            run.mkdir(exist_ok=True)
            (run / "run.json").write_text(json.dumps({"status": "running", "step": 3, "total_steps": 10}))
            failure = ProcessFailure(local_rank=1, pid=123, exitcode=-9, error_file="/nonexistent")
            raise ChildFailedError("run_and_exit", {1: failure})
        return crash
    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", elastic_launch)
    result = launch(*clm, "--nproc", "2")
    assert result.exit_code == 2, result.output
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "failed" and status["step"] == 3 and "exit code -9" in status["reason"], status


def test_a_hub_name_the_machine_cannot_fetch_is_one_line_before_any_retry(clm, tiny_gpt2, monkeypatch):
    """Without a network, from_pretrained("gpt2") retries for 25-50 s and ends in a traceback: a hub
    name neither local nor cached is refused first, offline mode or an unreachable hub said as such.
    from_pretrained is never reached (it would retry)."""
    import huggingface_hub.constants as hub
    import transformers

    import engine.hub

    name = "engine-test/not-cached"
    real = transformers.AutoConfig.from_pretrained

    def not_for_the_name(path, *args, **kwargs):
        assert str(path) != name, "from_pretrained was called for a name the machine cannot fetch"
        return real(path, *args, **kwargs)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", not_for_the_name)
    tokenizer = f"tokenizer={tiny_gpt2}"
    assert_one_line_error(launch(*clm, f"model.name_or_path={name}", tokenizer),
                          f"model.name_or_path: {name!r} is a hub name that is not in the local cache",
                          "HF_HUB_OFFLINE=1", "give a local folder instead")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(engine.hub, "_reachable", {})
    probed = []

    def no_network(address, timeout):
        probed.append(address)
        raise OSError("[Errno -2] Name or service not known")
    monkeypatch.setattr(engine.hub.socket, "create_connection", no_network)
    assert_one_line_error(launch(*clm, f"model.name_or_path={name}", tokenizer),
                          f"{hub.ENDPOINT} cannot be reached (no network?)", "HF_ENDPOINT")
    assert_one_line_error(launch(*clm, f"tokenizer={name}"), f"tokenizer: {name!r} is a hub name")
    assert len(probed) == 1  # one probe per process, whatever asks next
    result = CliRunner().invoke(main, ["generate", name, "--prompt", "hi"])
    assert result.exit_code == 2 and result.output.startswith(f"error: engine generate: {name!r} is a hub name")


def test_a_launch_sets_the_workers_environment_only_while_they_run(clm, monkeypatch):
    """The launcher gives its workers OMP_NUM_THREADS (cores / processes) and its own variables for the
    agent, and takes them away again: a launch from a Python process (a notebook, the test suite)
    must not change how later work there runs. (A leaked OMP_NUM_THREADS=1 made the suite's resumed
    run use 1 thread against the uninterrupted run's 2, and its weights differ in the last bits.)"""
    import os
    from engine.worker import REPORTS_TO_LAUNCHER
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = dict(os.environ)
    seen = {}

    def elastic_launch(config, entry):
        seen.update({k: os.environ.get(k) for k in ("OMP_NUM_THREADS", REPORTS_TO_LAUNCHER,
                                                     "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")})
        return lambda cfg: None
    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", elastic_launch)
    result = launch(*clm, "--nproc", "2")
    assert result.exit_code == 0, result.output
    assert seen == {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2)), REPORTS_TO_LAUNCHER: "1",
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    assert dict(os.environ) == before
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's own setting wins, and stays
    assert launch(*clm[:-1], f"{clm[-1]}-2", "--nproc", "2").exit_code == 0
    assert seen["OMP_NUM_THREADS"] == "3" and os.environ["OMP_NUM_THREADS"] == "3"
