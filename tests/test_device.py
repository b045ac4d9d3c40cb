"""The device path: resolving --device, one-line errors for devices that are not there, dtypes and
training precisions checked on the device, the device recorded in every result; GPU runs marked gpu."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exitbench.benchmarks import device as dev
from exitbench.core.errors import UserError


def test_auto_is_cuda_when_present_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu") and dev.resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device("auto") == torch.device("cuda")
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("spec, cuda, count, message", [
    ("gpu", False, 0, r"^--device: 'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps$"),
    ("cuda", False, 0, r"^--device: cuda requested but this machine has .*; use --device cpu or auto$"),
    ("cuda:7", True, 1, r"^--device: cuda:7 requested but this machine has 1 CUDA device \(cuda:0\); pick one"),
    ("cuda:2", True, 2, r"has 2 CUDA devices \(cuda:0 to cuda:1\)"),
])
def test_devices_that_are_not_there_are_one_line_errors(monkeypatch, spec, cuda, count, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(UserError, match=message):
        dev.resolve_device(spec)


def test_mps_off_apple_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="mps is not available here"):
        dev.resolve_device("mps")


def test_a_dtype_is_tried_on_the_device_before_timing():
    cpu = torch.device("cpu")
    assert dev.check_dtype(nn.Linear(4, 2), torch.randn(3, 4), "float32", cpu) is torch.float32

    class Float32Only(nn.Module):
        def forward(self, x):
            if x.dtype != torch.float32:
                raise RuntimeError("\"addmm\" not implemented for 'Half'")
            return x

    with pytest.raises(UserError, match=r"^evaluation.dtype: float16 does not run on cpu for this network \("):
        dev.check_dtype(Float32Only(), torch.randn(3, 4), "float16", cpu)
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        dev.check_dtype(Float32Only(), torch.randn(3, 4), "fp8", cpu)
    m = nn.Linear(4, 2)
    if _bf16_linear_works():  # whether a dtype runs depends on the torch build: only the contract is asserted
        assert dev.check_dtype(m, torch.randn(3, 4), "bfloat16", cpu) is torch.bfloat16
    assert m.weight.dtype == torch.float32  # put back after the trial


def _bf16_linear_works() -> bool:
    try:
        nn.Linear(2, 2).to(torch.bfloat16)(torch.randn(1, 2, dtype=torch.bfloat16))
        return True
    except RuntimeError:
        return False


def test_training_precision_is_checked_and_recorded():
    from exitbench.benchmarks.training import fit
    from exitbench.methods.base import Budget

    with pytest.raises(UserError, match="fp16 training needs CUDA"):
        dev.check_precision("fp16", torch.device("cpu"), "precision")
    with pytest.raises(UserError, match="unknown precision 'fp8'"):
        dev.check_precision("fp8", torch.device("cpu"), "precision")
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    stats = fit(model, lambda out, y, m: nn.functional.cross_entropy(out.float(), y), list(model.parameters()),
                {"train": data}, Budget(epochs=2, precision="bf16"))
    assert stats["budget"]["precision"] == "bf16" and all(torch.isfinite(torch.tensor(stats["loss_per_epoch"])))


def test_the_run_refuses_a_missing_device_before_anything_runs(tmp_path, capsys, monkeypatch):
    from exitbench.cli import main
    from tests.test_runner import TINY, _write

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert main(["run", _write(tmp_path, TINY), "--out", str(out), "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exitbench: error: --device: cuda requested") and "\n" not in err
    assert not list(out.glob("cells/*.json"))  # nothing written
    bad = {**TINY, "evaluation": {**TINY["evaluation"], "device": "gpu0"}}
    assert main(["validate", _write(tmp_path, bad, "b.yaml")]) == 2
    assert "evaluation.device: 'gpu0' is not a device" in capsys.readouterr().err


def test_results_record_their_device_and_dtype():
    from exitbench.benchmarks.env import env_fingerprint

    env = env_fingerprint(torch.device("cpu"), 2, "float32")
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["threads"] == 2
    # the precision flags that move fp32 logits on CUDA (TF32) are recorded everywhere
    assert env["tf32_matmul"] == torch.backends.cuda.matmul.allow_tf32 and "tf32_cudnn" in env
    assert env["float32_matmul_precision"] == torch.get_float32_matmul_precision()


def test_the_timed_region_changes_nothing_on_the_cpu():
    from exitbench.benchmarks.latency import on_device

    before = torch.backends.cudnn.benchmark
    with on_device(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark == before
    assert torch.backends.cudnn.benchmark == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_timed_region_is_on_the_cells_device_without_autotuning():
    from exitbench.benchmarks.latency import on_device

    last = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.backends.cudnn.benchmark = True
    with on_device(last):
        assert torch.cuda.current_device() == last.index and torch.backends.cudnn.benchmark is False
    assert torch.backends.cudnn.benchmark is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_goes_through_the_device_loader():
    from exitbench.benchmarks import data

    s = data.load_splits("digits", seed=0)
    loader = data.make_loader(s.train, 64, True, device=torch.device("cuda"))
    assert isinstance(loader, data.DeviceLoader)
    x, y = next(iter(loader))
    assert x.is_cuda and y.is_cuda and x.shape == (64, 3, 32, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_tiny_cell_runs_on_cuda(tmp_path):
    from exitbench.benchmarks.config import expand
    from exitbench.benchmarks.runner import run_cell
    from tests.test_runner import TINY

    cell = expand({**TINY, "evaluation": {**TINY["evaluation"], "device": "cuda"}})[0]
    r = run_cell(cell, tmp_path / "out", tmp_path / "cache")
    assert r.ok and r.env["device"].startswith("cuda") and r.env["device_name"] and r.env["cuda"]
    assert {x.device for x in r.latency} == {"cuda:0"} and r.env["cudnn_benchmark"] is True
    assert all(x.cudnn_benchmark is False for x in r.latency)  # no shape autotuning while timed
    assert r.training["data_path"].startswith("device-resident")


def test_the_gpu_protocol_warms_up_longer_and_repeats_more_within_a_time_bound():
    from exitbench.benchmarks import latency

    asked = latency.TimingProtocol(repeats=5, warmup=2)
    assert asked.on(torch.device("cpu")) == (5, 2, None)  # the CPU protocol as asked
    repeats, warmup, bound = asked.on(torch.device("cuda"))
    assert repeats >= 100 and warmup >= 20 and bound is not None and bound > 0
    assert latency.TimingProtocol(repeats=500, warmup=50).on(torch.device("cuda"))[:2] == (500, 50)  # more is allowed
    assert latency.default_batch_sizes(torch.device("cpu")) == (1, 32, 256)
    assert latency.default_batch_sizes(torch.device("cuda")) == (1, 64, 256, 1024)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_uses_events_and_the_gpu_protocol():
    from exitbench.benchmarks.latency import TimingProtocol, measure_latency
    from exitbench.methods.policies import ThresholdPolicy
    from tests.test_syncs import _net

    net = _net(3).cuda()
    backbone = nn.Sequential(*net.stages, net.heads[-1])
    x = torch.randn(64, 3, 16, 16, device="cuda")
    recs = measure_latency(backbone, net, ThresholdPolicy("max_softmax", (0.6, 0.6, 0.6)), x, [0.3, 0.5, 0.8, 1.1],
                           TimingProtocol(batch_sizes=(1, 64), repeats=5, warmup=2)).records
    assert recs and all(r.timer == "cuda events" and r.warmup >= 20 and r.repeats >= 5 for r in recs)
    assert all(r.device.startswith("cuda") for r in recs)


def test_doctor_runs_a_small_matrix_and_prints_every_variant(tmp_path, capsys, monkeypatch):
    from exitbench.benchmarks import config
    from exitbench.cli import main
    from tests.test_runner import TINY

    tiny = {**TINY, "name": "gpu_check", "methods": [{"name": "sdn", "hparams": {"epochs": 1, "n_exits": 2,
                                                                                 "placement": "linear"}}]}
    monkeypatch.setattr(config, "load_matrix", lambda name: tiny)  # the tiny matrix instead of gpu_check
    assert main(["doctor", "--device", "cpu", "--out", str(tmp_path / "d"), "--cache", str(tmp_path / "c"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "exitbench doctor: {'device': 'cpu'" in out and "1 cells ok, 0 errors" in out
    for v in ("compaction", "masking", "batch-uniform", "full+select", "per-stage-ideal"):
        assert v in out
    assert "simulation" in out and "1 (ref)" in out


def test_the_gpu_check_matrix_is_valid_offline():
    from exitbench.benchmarks.config import expand, load_matrix

    cells = expand(load_matrix("gpu_check"))
    assert len(cells) == 2 and all(c.evaluation.latency_batch_sizes == () for c in cells)  # the device's sizes


def test_a_model_is_timed_in_another_dtype_as_a_copy():
    model = torch.nn.Linear(4, 3)
    w = model.weight.detach().clone()
    assert dev.in_dtype(model, torch.device("cpu"), torch.float32) is model
    low = dev.in_dtype(model, torch.device("cpu"), torch.bfloat16)
    assert low is not model and low.weight.dtype == torch.bfloat16
    assert model.weight.dtype == torch.float32 and torch.equal(model.weight, w)  # not rounded through bf16
