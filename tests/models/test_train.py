"""Training: windows and statistics, loss decrease, checkpoints, resume, TOML, DDP."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import models
from models.checkpoint import save as save_checkpoint
from models.physics import Lorenz96
from models.train import (
    TrainConfig,
    WindowDataModule,
    WorldModule,
    build_world,
    export_lightning,
    fit,
    train_world,
    validation_pairs,
)

ROOT = Path(__file__).resolve().parents[2]
N_GRID = 8


@pytest.fixture(scope="module")
def l96_data() -> xr.DataArray:
    """600 steps of an 8-variable Lorenz-96 trajectory (dt 0.05) after spin-up."""
    sim = Lorenz96(N_GRID)
    g = torch.Generator().manual_seed(123)
    traj = sim.integrate(sim.random_state(1, g), 600, spinup=300)[:, 0]
    return xr.DataArray(
        traj.numpy(),
        dims=("time", "x"),
        coords={"time": np.arange(600) * 0.05},
        name="state",
    )


def tiny_config(tmp_path, **kw) -> TrainConfig:
    base = dict(
        out=str(tmp_path / "w.pt"),
        backbone="resnet1d",
        backbone_kwargs=dict(width=16, depth=1),
        steps=60,
        batch_size=32,
        lr=3e-3,
        progress=False,
        log_dir=str(tmp_path / "logs"),
        accelerator="cpu",
        val_fraction=0.2,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_windows_and_train_split_statistics(l96_data, tmp_path):
    cfg = tiny_config(tmp_path, history=2, normalise="pointwise")
    dm = WindowDataModule(cfg, l96_data)
    dm.setup()
    v = l96_data.values
    n_train = 480  # round(600 * 0.8)
    assert len(dm.train_set) == n_train - 2 and len(dm.val_set) == 600 - n_train - 2
    hist, nxt = dm.train_set[5]
    np.testing.assert_array_equal(hist.numpy(), v[5:7].astype(np.float32))
    np.testing.assert_array_equal(nxt.numpy(), v[7].astype(np.float32))
    hist, nxt = dm.val_set[0]
    np.testing.assert_array_equal(nxt.numpy(), v[n_train + 2].astype(np.float32))
    inc = np.diff(v[:n_train], axis=0)
    np.testing.assert_allclose(dm.stats["target_mean"], inc.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dm.stats["target_std"], inc.std(0), rtol=1e-5)
    np.testing.assert_allclose(dm.stats["state_mean"], v[:n_train].mean(0), rtol=1e-5)
    assert dm.dt == pytest.approx(0.05)


def test_lazy_dask_windows_equal_in_memory(l96_data, tmp_path):
    path = tmp_path / "traj.nc"
    l96_data.to_dataset().to_netcdf(path)
    eager = WindowDataModule(tiny_config(tmp_path, data=str(path)))
    lazy = WindowDataModule(tiny_config(tmp_path, data=str(path), max_in_memory_mb=0))
    eager.setup()
    lazy.setup()
    assert lazy.da.chunks is not None and eager.da.chunks is None
    for i in (0, 17, len(lazy.train_set) - 1):
        for a, b in zip(eager.train_set[i], lazy.train_set[i], strict=True):
            assert torch.equal(a, b)
    for k in eager.stats:
        torch.testing.assert_close(eager.stats[k], lazy.stats[k])


def test_loss_decreases_within_sixty_steps(l96_data, tmp_path):
    """Fixed evaluation (same noise, same t on 256 validation windows) before and after
    60 AdamW steps: the loss must drop by more than a third (lr = 0 would not)."""
    cfg = tiny_config(tmp_path)
    dm = WindowDataModule(cfg, l96_data)
    dm.setup()
    torch.manual_seed(0)
    module = WorldModule(build_world(cfg, dm), cfg.lr, cfg.weight_decay, 0.0)
    hist, nxt = zip(*(dm.train_set[i] for i in range(0, 256)), strict=True)
    z0, cond = module.world.encode_pair(torch.stack(hist), torch.stack(nxt))
    t = torch.linspace(0.2, 0.9, z0.shape[0])

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(module.world.denoiser.loss(z0, cond, torch.Generator().manual_seed(0), t))

    before = fixed_loss()
    opt = module.configure_optimizers()
    loader = dm.train_dataloader()
    batches = iter(loader)
    for _ in range(60):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        opt.zero_grad()
        module._loss(batch).backward()
        opt.step()
    assert fixed_loss() < 0.67 * before


def test_checkpoint_round_trip_reproduces_the_trained_world(l96_data, tmp_path, gen):
    """The world in memory after training and the one ``models.load`` rebuilds give
    bit-identical forecasts with the same generator (weights, EMA, statistics, table)."""
    cfg = tiny_config(tmp_path, steps=10, ema_decay=0.9)
    module, trainer, dm = fit(cfg, l96_data)
    trained = module.export_world().cpu().eval()
    trained.calibrate(*validation_pairs(dm))
    path = save_checkpoint(trained, tmp_path / "w.pt", meta={"note": "test"})
    loaded = models.load(path, device="cpu")
    assert loaded.meta == {"note": "test"} and not torch.isnan(loaded.cal_mse).any()
    x0 = torch.as_tensor(l96_data.values[-1], dtype=torch.float32)
    fa = trained.forecast(x0, 3, members=4, generator=gen(5))
    fb = loaded.forecast(x0, 3, members=4, generator=gen(5))
    assert torch.equal(fa, fb)
    world2 = models.load(path).configure(q=0.2, steps=2)  # inference options, no retraining
    assert world2.transition_sampler(x0[None]).times.numel() == 3


def test_train_world_writes_a_loadable_checkpoint(l96_data, tmp_path):
    path = train_world(tiny_config(tmp_path, steps=10), l96_data)
    payload = torch.load(path, weights_only=True)
    assert payload["spec"]["variable"] == "state" and payload["spec"]["state_shape"] == [N_GRID]
    assert payload["spec"]["backbone"] == "resnet1d" and payload["meta"]["global_steps"] == 10
    world = models.load(path)
    for k, v in world.state_dict().items():
        assert torch.equal(v, payload["state_dict"][k]), k
    assert world.dt == pytest.approx(0.05)


def test_checkpoint_mismatch_and_bad_files_are_clear_errors(l96_data, tmp_path):
    path = train_world(tiny_config(tmp_path, steps=2, calibrate=False), l96_data)
    world = models.load(path)
    with pytest.raises(ValueError, match=r"grid shape \(40,\).*\(8,\)"):
        world.check_data(shape=(40,))
    with pytest.raises(ValueError, match="'psi'.*'state'"):
        world.check_data(variable="psi")
    with pytest.raises(ValueError, match="does not exist"):
        models.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"hello": 1}, bad)
    with pytest.raises(ValueError, match="not an assim world checkpoint"):
        models.load(bad)


def test_export_lightning_equals_the_trained_world(l96_data, tmp_path):
    """A run's ``last.ckpt`` exported afterwards gives the world ``train_world`` wrote:
    the same weights, statistics and calibration table (the recovery path of a run
    stopped before its export)."""
    cfg = tiny_config(tmp_path, steps=8, ema_decay=0.9)
    path = train_world(cfg, l96_data)
    last = next((tmp_path / "logs").rglob("last.ckpt"))
    out = export_lightning(dataclasses.replace(cfg, out=str(tmp_path / "x.pt")), last, l96_data)
    a, b = (torch.load(p, weights_only=True) for p in (path, out))
    assert a["state_dict"].keys() == b["state_dict"].keys() and b["meta"]["global_steps"] == 8
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert torch.isfinite(a["state_dict"]["cal_mse"]).all()


def test_resume_continues_the_step_count(l96_data, tmp_path):
    cfg = tiny_config(tmp_path, steps=6, calibrate=False)
    train_world(cfg, l96_data)
    last = next((tmp_path / "logs").rglob("last.ckpt"))
    cfg2 = dataclasses.replace(cfg, steps=9, ckpt_path=str(last), out=str(tmp_path / "w2.pt"))
    path = train_world(cfg2, l96_data)
    assert torch.load(path, weights_only=True)["meta"]["global_steps"] == 9


def test_toml_config_overrides_and_unknown_keys(tmp_path):
    good = tmp_path / "c.toml"
    good.write_text('target = "state"\nbatch_size = 8\n[backbone_kwargs]\nwidth = 4\n')
    cfg = TrainConfig.from_toml(good, batch_size=16, lr=None)
    assert cfg.target == "state" and cfg.batch_size == 16 and cfg.backbone_kwargs == {"width": 4}
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_sise = 8\n")
    with pytest.raises(ValueError, match="batch_sise"):
        TrainConfig.from_toml(bad)
    with pytest.raises(ValueError, match="target"):
        TrainConfig(target="delta")


def test_missing_variable_and_short_data_errors(l96_data, tmp_path):
    with pytest.raises(ValueError, match="'y' not in dataset"):
        WindowDataModule(tiny_config(tmp_path, variable="y"), l96_data.to_dataset()).setup()
    with pytest.raises(ValueError, match="too few"):
        WindowDataModule(tiny_config(tmp_path), l96_data.isel(time=slice(0, 5))).setup()


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    """Lightning DDP (gloo, 2 CPU processes, 4 steps): each rank dumps its weights."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "models" / "ddp_job.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    init = torch.load(tmp_path / "init0.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:  # bit-identical (the uncalibrated table is NaN on both ranks)
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert any(not torch.equal(w0[k], init[k]) for k in w0)  # training moved the weights


def test_cli_train_and_forecast_write_cf_files(l96_data, tmp_path, capsys):
    """``assim train`` on a netCDF file, then ``assim forecast`` from it: CF forecast file,
    same seed => same values, wrong grid => exit 2 naming both shapes."""
    from assim.cli import main
    from assim.io import trajectory_dataset, write_dataset

    data = tmp_path / "traj.nc"
    write_dataset(trajectory_dataset(l96_data.values, l96_data.time.values, ["x"]), data)
    cfg = tmp_path / "c.toml"
    cfg.write_text('backbone = "resnet1d"\n[backbone_kwargs]\nwidth = 8\ndepth = 1\n')
    ckpt = tmp_path / "w.pt"
    args = ["train", "--data", str(data), "--config", str(cfg), "--steps", "3", "--out", str(ckpt)]
    assert main([*args, "--no-progress", "--device", "cpu"]) == 0
    assert models.load(ckpt).dt == pytest.approx(0.05)  # from the CF model_time

    def forecast(out, world=str(ckpt), init=data, seed=0):
        return main(
            [
                "forecast",
                "--world",
                world,
                "--init",
                str(init),
                "--steps",
                "4",
                "--members",
                "3",
                "--out",
                str(out),
                "--seed",
                str(seed),
                "--device",
                "cpu",
            ]
        )

    assert forecast(tmp_path / "a.nc") == 0 and forecast(tmp_path / "b.nc") == 0
    a, b = xr.open_dataset(tmp_path / "a.nc"), xr.open_dataset(tmp_path / "b.nc")
    assert a["state"].dims == ("time", "member", "x") and a["state"].shape == (4, 3, N_GRID)
    assert a["member"].attrs["standard_name"] == "realization"
    assert "forecast_reference_time" in a.coords and "forecast_period" in a.coords
    np.testing.assert_array_equal(a["state"].values, b["state"].values)
    assert float(a["model_time"][0]) == pytest.approx(float(l96_data.time[-1]) + 0.05)
    assert forecast(tmp_path / "p.nc", world="physical:l96") == 2  # 40 vars vs 8 in the file
    assert "grid" in capsys.readouterr().err
    wide = tmp_path / "wide.nc"
    write_dataset(trajectory_dataset(np.zeros((2, 9)), [0.0, 0.05], ["x"]), wide)
    assert forecast(tmp_path / "c.nc", init=wide) == 2
    err = capsys.readouterr().err
    assert "(8,)" in err and "9" in err and not (tmp_path / "c.nc").exists()
