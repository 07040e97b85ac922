"""Telemetry numbers are sane against known timings, and land in the step's MLflow run."""
from __future__ import annotations

import mmap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from jobs.telemetry import Telemetry, peak_rss_mb
from pipeline.tracking import step_run, tracking_uri
from tests.fixtures.config import make_cfg

CPU = torch.device("cpu")


class SlowDataset(Dataset):
    """Each item takes `delay` seconds to produce, like a starved input pipeline."""

    def __init__(self, n: int, delay: float):
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        time.sleep(self.delay)
        return torch.randn(16), torch.randn(1)


def train_epoch(tel: Telemetry, loader, model, opt, compute_delay: float = 0.0) -> None:
    it = iter(loader)
    while True:
        with tel.waiting():
            batch = next(it, None)
        if batch is None:
            break
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(compute_delay)
        tel.step(x.shape[0])


def tiny_model():
    model = torch.nn.Linear(16, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def test_slow_loader_gives_high_data_wait_share():
    tel = Telemetry(CPU)
    model, opt = tiny_model()
    train_epoch(tel, DataLoader(SlowDataset(24, 0.01), batch_size=4), model, opt)
    metrics = tel.epoch_metrics()
    assert metrics["data_wait_share"] > 0.8
    assert 0.0 <= metrics["data_wait_share"] <= 1.0


def test_slow_steps_give_low_data_wait_share():
    tel = Telemetry(CPU)
    model, opt = tiny_model()
    train_epoch(tel, DataLoader(SlowDataset(24, 0.0), batch_size=4), model, opt,
                compute_delay=0.03)
    assert tel.epoch_metrics()["data_wait_share"] < 0.2


def test_samples_per_s_matches_known_count_and_time():
    tel = Telemetry(CPU)
    steps, batch, delay = 10, 8, 0.02
    begin = time.perf_counter()
    for _ in range(steps):
        with tel.waiting():
            time.sleep(delay / 2)
        time.sleep(delay / 2)
        tel.step(batch)
    wall = time.perf_counter() - begin
    rate = tel.epoch_metrics()["samples_per_s"]
    # the telemetry window lies inside the measured wall time and spans every sleep
    assert steps * batch / wall <= rate <= steps * batch / (steps * delay)
    assert rate == pytest.approx(steps * batch / wall, rel=0.1)


def test_epoch_metrics_reset_counters():
    tel = Telemetry(CPU)
    with tel.waiting():
        time.sleep(0.01)
    tel.step(4)
    time.sleep(0.01)
    tel.step(4)
    first = tel.epoch_metrics()
    assert first["samples_per_s"] > 0 and 0 < first["data_wait_share"] < 1
    second = tel.epoch_metrics()
    assert second["samples_per_s"] == 0.0 and second["data_wait_share"] == 0.0


def test_peak_mem_positive_and_per_epoch():
    tel = Telemetry(CPU)
    tel.epoch_metrics()
    base = peak_rss_mb()
    # 300 MiB mapped and touched, then unmapped: an explicit mmap, since the training and
    # encode steps tell glibc (pipeline.malloc) to keep freed heap memory in this process
    block = mmap.mmap(-1, 300 * 2**20)
    np.frombuffer(block, dtype=np.uint8)[:] = 1
    tel.step(1)
    block.close()
    big = tel.epoch_metrics()["peak_mem_mb"]
    tel.step(1)
    after = tel.epoch_metrics()["peak_mem_mb"]
    assert base > 0 and after > 0
    assert big >= base + 250
    if Path("/proc/self/clear_refs").exists():  # Linux resets the peak mark per epoch
        assert after < big - 250


@pytest.mark.usefixtures("empty_store")
def test_telemetry_metrics_appear_in_the_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    cfg = make_cfg(tmp_path)
    run_dir = Path(cfg.run.root) / cfg.run.name
    tel = Telemetry(CPU)
    model, opt = tiny_model()
    logged = {}
    with step_run(cfg, run_dir, "stage1") as tracker:
        for epoch in (1, 2):
            train_epoch(tel, DataLoader(SlowDataset(8, 0.002), batch_size=4), model, opt)
            logged[epoch] = tel.epoch_metrics()
            tracker.log_metrics(logged[epoch], step=epoch)
        run_id = tracker.run_id
    client = MlflowClient(tracking_uri(cfg))
    for name in ("samples_per_s", "data_wait_share", "peak_mem_mb"):   # under system/
        history = sorted(client.get_metric_history(run_id, f"system/{name}"), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2]
        assert [m.value for m in history] == pytest.approx([logged[1][name], logged[2][name]])
    assert client.get_run(run_id).info.status == "FINISHED"
