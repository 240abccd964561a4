"""Tracking: wandb offline runs hold the config, tags, group and final metrics; CSV is default."""

import csv
import json
import logging
import socket
import struct
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2

from grid.cli import main
from grid.errors import GridError
from grid.tracking import log_final, make_logger, wandb_mode
from tests.test_resume import sasrec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    """No API key anywhere and wandb's own folders in tmp; WANDB_MODE unset."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "GRID_SWEEP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("GRID_CACHE", str(tmp_path / "cache"))


def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's .wandb file (a LevelDB-style log of protobufs)."""
    (path,) = run_dir.glob("run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def items(updates) -> dict:
    return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}


def summary(records: list) -> dict:
    """The run's summary as its updates leave it (the final values of every metric)."""
    out = {}
    for update in of_type(records, "summary"):
        out.update(items(update.update))
    return out


@pytest.mark.slow
def test_wandb_offline_run_holds_config_metrics_and_tags(small_beauty, tmp_path, no_wandb_key):
    out = tmp_path / "run"
    overrides = sasrec(
        small_beauty,
        "trainer.logger=wandb",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",  # validates after steps 2 and 4
        "trainer.wandb_group=ablation-a",
        "trainer.log_every_n_steps=1",
    )
    assert main(["run", *overrides, "--out", str(out)]) == 0
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)

    (run,) = of_type(records, "run")
    assert run.project == "grid" and run.run_group == "ablation-a"
    assert list(run.tags) == ["custom", "sasrec"]  # SASRec reads no SIDs: no tokenizer tag
    config = items(run.config.update)
    assert config["generator.hidden"] == 16 and config["trainer.max_steps"] == 4
    assert config["data.path"] == str(small_beauty) and config["seed"] == 42

    history = [items(h.item) for h in of_type(records, "history")]
    validations = [h for h in history if "valid/ndcg@10" in h and "test/ndcg@10" not in h]
    assert [h["trainer/global_step"] for h in validations[:2]] == [1, 3]  # after steps 2 and 4
    assert [h["trainer/global_step"] for h in history if "train/loss" in h] == [0, 1, 2, 3]

    metrics = json.loads((out / "metrics.json").read_text())
    final = summary(records)
    for name in ("test/recall@10", "test/ndcg@10", "valid/recall@10", "infer/users_per_s"):
        assert final[name] == pytest.approx(metrics[name])
    assert metrics["train/samples_per_s"] > 0
    assert final["train/samples_per_s"] == pytest.approx(metrics["train/samples_per_s"])
    assert final["infer/devices"] == metrics["infer/devices"] == 1
    assert final["test/warm_users/users"] + final["test/cold_users/users"] == 400
    assert of_type(records, "exit")[0].exit_code == 0


def test_wandb_online_without_key_logs_offline_with_a_warning(
    small_beauty, tmp_path, no_wandb_key, monkeypatch, caplog
):
    monkeypatch.setenv("GRID_SWEEP", "sweep-7")
    out = tmp_path / "run"
    args = ["data=custom", f"data.path={small_beauty}", "generator=popularity"]
    args += ["trainer.logger=wandb", "trainer.wandb_mode=online", "trainer.progress_bar=false"]
    with caplog.at_level(logging.WARNING, logger="grid.tracking"):
        assert main(["run", *args, "--out", str(out)]) == 0
    warnings = [r for r in caplog.records if r.name == "grid.tracking"]
    assert len(warnings) == 1 and "offline" in warnings[0].getMessage()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    assert of_type(records, "run")[0].run_group == "sweep-7"  # the sweep's group
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary(records)["test/recall@10"] == pytest.approx(metrics["test/recall@10"])


def test_wandb_mode_follows_config_env_and_key(tmp_path, no_wandb_key, monkeypatch, caplog):
    def mode(value: str) -> str:
        return wandb_mode(OmegaConf.create({"trainer": {"wandb_mode": value}}))

    with caplog.at_level(logging.WARNING, logger="grid.tracking"):
        assert mode("auto") == "offline" and mode("offline") == "offline"
        assert not caplog.records
        monkeypatch.setenv("WANDB_MODE", "online")
        assert mode("auto") == "offline" and len(caplog.records) == 1
        monkeypatch.setenv("WANDB_MODE", "disabled")
        assert mode("auto") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    server = socket.create_server(("127.0.0.1", 0))  # a wandb server that answers
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    (tmp_path / "netrc").write_text("machine 127.0.0.1 login user password " + "k" * 40)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # what `wandb login` writes
    assert mode("auto") == "online" and mode("offline") == "offline"
    server.close()
    with pytest.raises(GridError, match="wandb_mode"):
        mode("cloud")


def test_csv_logger_is_the_default_and_writes_no_wandb_folder(small_beauty, tmp_path, no_wandb_key):
    out = tmp_path / "run"
    args = ["data=custom", f"data.path={small_beauty}", "generator=popularity"]
    assert main(["run", *args, "trainer.progress_bar=false", "--out", str(out)]) == 0
    assert not (out / "wandb").exists() and not (tmp_path / "wandb").exists()
    logged = (out / "logs" / "metrics.csv").read_text().splitlines()
    assert "test/recall@10" in logged[0].split(",")


def test_tensorboard_logger_without_tensorboard_is_one_line(
    small_beauty, tmp_path, no_wandb_key, monkeypatch, capsys
):
    import importlib.util

    find_spec = importlib.util.find_spec
    missing = {"tensorboard", "tensorboardX"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name)
    )
    out = tmp_path / "run"
    args = ["data=custom", f"data.path={small_beauty}", "generator=popularity"]
    assert main(["run", *args, "trainer.logger=tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install tensorboard" in err[0]
    assert not (out / "metrics.json").exists()


def test_final_metrics_and_tokenizer_quality_reach_the_csv_log(tmp_path):
    cfg = OmegaConf.create({"trainer": {"logger": "csv"}})
    logger = make_logger(cfg, tmp_path)
    report = {"collision_rate": 0.25, "codes_used": 300, "deduplicated": True, "name": "rkmeans"}
    log_final(logger, {"test/recall@10": 0.5, "infer/devices": 1.0}, report)
    rows = list(csv.DictReader((tmp_path / "logs" / "metrics.csv").open()))
    assert len(rows) == 1 and float(rows[0]["test/recall@10"]) == 0.5
    assert float(rows[0]["tokenizer/collision_rate"]) == 0.25
    assert float(rows[0]["tokenizer/codes_used"]) == 300
    assert "tokenizer/deduplicated" not in rows[0] and "tokenizer/name" not in rows[0]
