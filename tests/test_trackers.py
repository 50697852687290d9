"""Experiment trackers (train.report_to) with their real libraries, read back with each one's own
reader and compared with metrics.jsonl, the source of truth: TensorBoard (EventAccumulator), W&B
offline (the run's .wandb transaction log, parsed with wandb's own protobuf records) and MLflow
(MlflowClient on the run's sqlite store)."""
import json
import struct

import pytest

from engine.config import load_config
from engine.errors import EngineError
from engine.worker import run
from helpers import MRPC, metrics

STEPS = 4


def job_args(model, out, *extra) -> list[str]:
    return ["task=classification", f"model.name_or_path={model}", f"data.train={MRPC}", "data.glue_task=mrpc",
            "data.block_size=64", "data.max_train_samples=64", "data.max_eval_samples=16",
            "train.micro_batch_size=4", f"train.max_steps={STEPS}", "train.lr=3e-3", "train.log_every=1",
            "train.eval_every=2", "train.save_final=false", f"output_dir={out}", *extra]


def job(model, out, *extra):
    return load_config(None, job_args(model, out, *extra))


@pytest.fixture(scope="module")
def tracked_run(tiny_gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mp.setenv("WANDB_MODE", "offline")  # never the network, whatever login this machine has
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(root / "wandb-home"))
        out = root / "run"
        run(job(tiny_gpt2, out, "train.report_to=[tensorboard, wandb, mlflow]").to_dict())
    return out


def jsonl_series(out, event: str, key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in metrics(out, event) if key in e]


def expected(out) -> dict[str, list[tuple[int, float]]]:
    """Every number of every train and eval event in metrics.jsonl, under its tracker name (the
    event's own prefix dropped: train + train_accuracy -> train/accuracy), as (step, value) series."""
    series: dict[str, list[tuple[int, float]]] = {}
    for event in ("train", "eval"):
        for record in metrics(out, event):
            for key, value in record.items():
                if key in ("event", "step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                name = f"{event}/{key.removeprefix(event + '_')}"
                series.setdefault(name, []).append((record["step"], float(value)))
    assert {"train/loss", "train/lr", "train/grad_norm", "train/accuracy", "train/tokens_per_s",
            "train/samples_per_s", "train/host_rss_mb", "eval/loss", "eval/accuracy", "eval/f1"} <= set(series)
    assert len(series["train/loss"]) == STEPS and len(series["train/accuracy"]) == STEPS
    assert [s for s, _ in series["eval/loss"]] == [2, STEPS]
    return series


def test_tensorboard_events_equal_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tracked_run / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(expected(tracked_run))  # every series, nothing else
    for key, want in expected(tracked_run).items():
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        # TensorBoard stores scalars as float32
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-12), key
    assert "config/text_summary" in acc.Tags()["tensors"]  # the resolved config, as text


def _wandb_records(path):
    """The .wandb transaction log: a 7-byte header (':W&B', magic, version), then LevelDB-log
    style 32 KiB blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of a block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    out = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


def test_wandb_offline_history_equals_metrics_jsonl(tracked_run):
    runs = list((tracked_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history = []
    for record in _wandb_records(runs[0]):
        if record.WhichOneof("record_type") == "history":
            row = {("/".join(item.nested_key) or item.key): json.loads(item.value_json) for item in record.history.item}
            history.append(row)
    assert history
    assert {k for row in history for k in row if not k.startswith("_")} == set(expected(tracked_run))
    for key, want in expected(tracked_run).items():
        got = [(row["_step"], row[key]) for row in history if key in row]
        assert got == want, key  # JSON doubles: exact
    config = [r for r in _wandb_records(runs[0]) if r.WhichOneof("record_type") == "config"]
    logged = {item.key: json.loads(item.value_json) for r in config for item in r.config.update}
    assert logged["train"]["report_to"] == ["tensorboard", "wandb", "mlflow"]
    started = [r.run for r in _wandb_records(runs[0]) if r.WhichOneof("record_type") == "run"]
    assert started and started[0].display_name == tracked_run.name and started[0].project == "engine"


def test_mlflow_metrics_equal_metrics_jsonl(tracked_run):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run / 'mlflow.db'}")
    run_id = json.loads((tracked_run / "trackers.json").read_text())["mlflow"]
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == tracked_run.name
    assert mlrun.data.params["train.max_steps"] == str(STEPS)
    assert set(mlrun.data.metrics) == set(expected(tracked_run))
    for key, want in expected(tracked_run).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert got == want, key


def test_trackers_are_off_unless_configured(tiny_gpt2, tmp_path):
    run(job(tiny_gpt2, tmp_path / "plain", "train.max_steps=1").to_dict())
    written = {p.name for p in (tmp_path / "plain").iterdir()}
    assert not written & {"tensorboard", "wandb", "mlflow.db", "trackers.json"}, written


def test_unknown_or_missing_tracker_is_one_line_before_running(tiny_gpt2, tmp_path, monkeypatch):
    with pytest.raises(EngineError, match=r"train.report_to must be one of tensorboard, wandb, mlflow; "
                                          r"got 'tensorbord' \(did you mean 'tensorboard'\?\)"):
        job(tiny_gpt2, tmp_path / "x", "train.report_to=[tensorbord]")
    # a tracker whose library is missing: named with the pip package to install
    from engine import trackers
    monkeypatch.setitem(trackers.TRACKERS, "wandb", (("wandb_absent_for_this_test",), "wandb"))
    with pytest.raises(EngineError, match="train.report_to includes wandb, but wandb_absent_for_this_test is "
                                          "not installed: pip install wandb"):
        job(tiny_gpt2, tmp_path / "x", "train.report_to=[wandb]")
    assert not (tmp_path / "x").exists()


TWO_PROCS = ("train.max_steps=3", "train.eval_every=0", "train.report_to=[tensorboard]")


def shared_scenarios(root, model) -> list[dict]:
    """The 2-process run, in the session's shared job (conftest.py)."""
    return [job(model, root / "two", *TWO_PROCS).to_dict()]


def test_two_processes_reduce_accuracy_over_ranks_and_only_rank0_reports(tiny_gpt2, tmp_path, shared_job):
    """2 CPU processes x micro-batch 4 against 1 process x grad_accum 2: the same examples per step,
    so the same train_accuracy (summed over both ranks, not rank 0's half); one TensorBoard writer."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    two, one = shared_job.root(__name__) / "two", tmp_path / "one"
    run(job(tiny_gpt2, one, *TWO_PROCS, "train.grad_accum=2").to_dict())
    got, ref = jsonl_series(two, "train", "train_accuracy"), jsonl_series(one, "train", "train_accuracy")
    assert len(got) == 3 and got == ref
    assert all(round(a * 8) == a * 8 for _, a in got)  # a count out of the global batch of 8
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(two / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/accuracy")] == got  # eighths: exact in float32


def test_a_resumed_run_continues_the_same_tracker_runs(tiny_gpt2, tmp_path, monkeypatch):
    """Relaunched in the same output_dir: MLflow goes on in the same run when the previous session
    stopped at a checkpoint, starts a new one when it logged past its last checkpoint; TensorBoard's
    series (old event files included) always equals metrics.jsonl's."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, extra = tmp_path / "run", ("train.report_to=[tensorboard, mlflow]", "train.eval_every=0")
    # a session that logged steps 1-3 but checkpointed only step 2 (as after a crash): its step 3
    # is redone, so MLflow starts a second run; TensorBoard purges the old step 3
    run(job(tiny_gpt2, out, *extra, "train.save_every=2", "train.stop_at_step=3").to_dict())
    crashed_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    # a clean stop at step 3 (final checkpoint there): the relaunch goes on in the same run
    run(job(tiny_gpt2, out, *extra, "train.save_every=2", "train.save_final=true", "train.stop_at_step=3").to_dict())
    first_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert first_id != crashed_id
    run(job(tiny_gpt2, out, *extra, "train.save_final=true").to_dict())
    assert json.loads((out / "trackers.json").read_text()) == {"mlflow": first_id, "logged_step": 4}
    want = jsonl_series(out, "train", "loss")
    assert [s for s, _ in want] == [1, 2, 3, 4]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("engine").experiment_id])) == 2
    assert sorted((m.step, m.value) for m in client.get_metric_history(first_id, "train/loss")) == want[2:]
    assert client.get_run(first_id).info.status == "FINISHED"
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


@pytest.mark.fast
def test_report_to_takes_the_hf_string_forms(tiny_gpt2):
    """HF's TrainingArguments take report_to as a name, a comma list or "none", as well as a list."""
    base = [f"model.name_or_path={tiny_gpt2}", f"data.train={MRPC}", "task=classification", "data.glue_task=mrpc"]
    assert load_config(None, base + ["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]
    assert load_config(None, base + ["train.report_to=tensorboard,mlflow"]).train.report_to == ["tensorboard", "mlflow"]
    assert load_config(None, base + ["train.report_to=none"]).train.report_to == []
    assert load_config(None, base + ["train.report_to=[wandb]"]).train.report_to == ["wandb"]
    with pytest.raises(EngineError, match="train.report_to must be a list, got 3"):
        load_config(None, base + ["train.report_to=3"])
