"""Tiling modes and patch parallelism: exact tiles on every preset's architecture, fast mode's bound,
checkpoints in memory and on disk, and one image's tiles shared by two gloo processes."""

import multiprocessing
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from imagegen import make_photo
from vaekit.codec import inference, tiling
from vaekit.codec.checkpoints import CheckpointStore
from vaekit.eval.metrics import psnr
from vaekit.model import build_preset
from vaekit.model.presets import PRESETS

TOLERANCE = 1e-4  # as in test_tiling.py: float rounding passes, a wrong statistic or a seam does not

pytestmark = pytest.mark.usefixtures("one_thread")


def random_affine(vae, seed=0):
    """Random GroupNorm affines, so that every statistic a tile gets wrong would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
    return vae.eval()


def tiny(seed=0):
    torch.manual_seed(seed)
    return random_affine(build_preset("tiny"), seed)


def photo(width, height, seed=3):
    img = make_photo(width, height, seed=seed)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


def db(reference, y):
    return float(psnr(reference.clamp(-1, 1), y.clamp(-1, 1), max_db=200)[0])


# ---------------------------------------------------------------------------------------------------
# Every preset's architecture, at test width: exact tiles equal untiled, fast tiles stay close


def preset_architectures():
    """One preset per distinct architecture (sdxl is sd's, flux is sd3's)."""
    return [name for name in PRESETS if name not in ("sdxl", "flux", "tiny")]


@pytest.mark.parametrize("name", preset_architectures())
def test_every_preset_architecture_tiles_exactly_in_both_modes(name):
    # The preset's levels, resnets per level, latent channels and quant convs; 32 channels, 8 groups.
    levels = len(PRESETS[name]["block_out_channels"])
    torch.manual_seed(0)
    vae = random_affine(build_preset(name, {"block_out_channels": [32] * levels, "norm_num_groups": 8}))
    tile = tiling.minimum_tile(vae)
    x = photo(tile + 37, 61, seed=1)  # odd sizes, tiled along the width
    mean, logvar = inference.encode(vae, x)
    tiled_mean, tiled_logvar = inference.encode(vae, x, tile=tile)
    assert (tiled_mean - mean).abs().max() < TOLERANCE and (tiled_logvar - logvar).abs().max() < TOLERANCE
    untiled = inference.decode(vae, mean, size=x.shape[-2:])
    assert (inference.decode(vae, mean, tile=tile, size=x.shape[-2:]) - untiled).abs().max() < TOLERANCE
    fast = inference.decode(vae, mean, tile=tile, size=x.shape[-2:], tile_mode="fast")
    assert fast.shape == untiled.shape and db(untiled, fast) > 15  # 4 x 18 latents: statistics from few pixels


# ---------------------------------------------------------------------------------------------------
# Fast mode: one pass with estimated statistics, its bound, and where it drifts


@pytest.fixture(scope="module")
def vae():
    return tiny()


def test_fast_mode_is_close_to_untiled_and_estimates_only_the_full_resolution_stage(vae, monkeypatch):
    x = photo(200, 136)
    mean, _ = inference.encode(vae, x)
    untiled = inference.decode(vae, mean)
    stage_inputs, measured = [], []
    real_stage, real_measure = tiling.run_stage_tiled, tiling.StageRun.measure
    monkeypatch.setattr(tiling, "run_stage_tiled", lambda stage, h, *a, **k: stage_inputs.append((id(stage), h.shape[-2:]))
                        or real_stage(stage, h, *a, **k))
    monkeypatch.setattr(tiling.StageRun, "measure", lambda self, u: measured.append((id(self.stage), self.extent))
                        or real_measure(self, u))
    fast = inference.decode(vae, mean, tile=96, tile_mode="fast")
    # The stage reaching the image's resolution runs its tiles once, its statistics measured on
    # subsampled inputs only; the low-resolution stages are measured on their whole inputs (exact).
    full = dict(stage_inputs)
    last = max(full, key=lambda stage: full[stage].numel())
    assert {stage for stage, _ in measured} == set(full)
    assert all(h * w * 3 <= full[last].numel() for stage, (h, w) in measured if stage == last)
    assert all(shape == full[stage] for stage, shape in measured if stage != last)
    assert fast.shape == untiled.shape and torch.isfinite(fast).all()
    assert (fast - untiled).abs().max() > TOLERANCE  # approximate: not the exact path
    fast_mean, _ = inference.encode(vae, x, tile=96, tile_mode="fast")
    # This model's random GroupNorm affines and 17 x 25 latents are a hard case (docs/tiling.md gives
    # the trained VAE's numbers): fast gets 25 and 28 dB, diffusers' blended tiles 15 and 21.
    assert db(untiled, fast) > 22 and db(mean, fast_mean) > 25
    vae.enable_tiling()
    try:
        vae.tile_sample_min_size, vae.tile_latent_min_size = 96, 12
        with torch.no_grad():
            blended = vae.decode(mean).sample
    finally:
        vae.disable_tiling()
    assert db(untiled, fast) > db(untiled, blended) + 5


def test_fast_mode_drifts_on_pixel_scale_patterns_and_exact_does_not(vae):
    # A 1-pixel checkerboard on half of the image: every other pixel is all the subsampled pass sees.
    x = photo(200, 136)
    x[..., :, 100:] = torch.where((torch.arange(136)[:, None] + torch.arange(100)[None]) % 2 == 0, 1.0, -1.0)
    mean, _ = inference.encode(vae, x)
    exact_mean, _ = inference.encode(vae, x, tile=96)
    fast_mean, _ = inference.encode(vae, x, tile=96, tile_mode="fast")
    assert (exact_mean - mean).abs().max() < TOLERANCE
    smooth = photo(200, 136)
    smooth_mean, _ = inference.encode(vae, smooth)
    smooth_fast, _ = inference.encode(vae, smooth, tile=96, tile_mode="fast")
    assert db(mean, fast_mean) < db(smooth_mean, smooth_fast) - 3  # the documented worst case is worse


def test_extrapolated_statistics_follow_the_trend_across_sampling_steps():
    # Measured at steps 4 and 8: a mean falling by 0.1 an octave and a variance doubling an octave
    # extrapolate to step 1 (two octaves finer); a variance that is zero at either step is kept.
    near = {3: (torch.tensor([[0.5, 1.0]], dtype=torch.float64), torch.tensor([[2.0, 0.0]], dtype=torch.float64))}
    far = {3: (torch.tensor([[0.6, 1.0]], dtype=torch.float64), torch.tensor([[1.0, 1.0]], dtype=torch.float64))}
    mean, var = tiling.extrapolate_stats(near, far, 4)[3]
    assert torch.allclose(mean, torch.tensor([[0.3, 1.0]], dtype=torch.float64))
    assert torch.allclose(var, torch.tensor([[8.0, 0.0]], dtype=torch.float64))


def test_one_tile_is_untiled_in_both_modes(vae):
    x = photo(64, 48)
    mean, _ = inference.encode(vae, x)
    for mode in ("exact", "fast"):
        assert torch.equal(inference.encode(vae, x, tile=96, tile_mode=mode)[0], mean)


def test_tile_mode_is_checked_and_auto_and_budgets_work_in_both_modes(vae):
    from vaekit.errors import VaekitError

    x = photo(200, 136)
    with pytest.raises(VaekitError, match="tile_mode must be 'exact' or 'fast'"):
        inference.encode(vae, x, tile=96, tile_mode="quick")
    mean, _ = inference.encode(vae, x)
    untiled = inference.decode(vae, mean)
    need = inference.memory.estimate_memory(vae, 1, 136, 200, "decode")
    exact = inference.decode(vae, mean, tile="auto", memory_budget=need // 2)
    fast = inference.decode(vae, mean, tile="auto", memory_budget=need // 2, tile_mode="fast")
    assert (exact - untiled).abs().max() < TOLERANCE and db(untiled, fast) > 22


def test_fp16_fallback_in_fast_mode():
    vae = tiny(seed=2)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(2e5)
    reference = build_preset("tiny").eval()
    vae.half()
    reference.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    z = torch.randn(1, 4, 17, 25, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="redoing the batch in float32"):
        images = inference.decode(vae, z, tile=96, tile_mode="fast")
    assert torch.isfinite(images).all()
    assert (images - inference.decode(reference, z, tile=96, tile_mode="fast")).abs().max() < TOLERANCE


# ---------------------------------------------------------------------------------------------------
# Exact mode's checkpoints: memory, spill file, or recomputation give the same bits


@pytest.mark.parametrize("keep_bytes, spill", [(0, False), (1 << 30, False), (200_000, True)])
def test_checkpoints_in_memory_on_disk_or_recomputed_give_the_same_result(vae, keep_bytes, spill, monkeypatch):
    z = inference.encode(vae, photo(200, 136))[0]
    calls, input_held = [], []
    real_finish = tiling.StageRun.finish
    monkeypatch.setattr(tiling.StageRun, "finish", lambda self, last: input_held.append(self.x is not None)
                        or real_finish(self, last))
    conv = vae.decoder.up_blocks[-1].resnets[-1].conv2  # the last unit of the last stage
    hook = conv.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            reference = tiling.decode_untiled(vae, z)
            calls.clear()
            out = tiling.decode_tiled(vae, z, 96, None, tiling.TileOptions("exact", keep_bytes, spill))
    finally:
        hook.remove()
    assert (out - reference).abs().max() < TOLERANCE
    tiles = len(tiling.plan_tiles(*reference.shape[-2:], 96, tiling.decoder_stages(vae)[-1].radius, 1))
    # Resuming from a checkpoint runs a tile's last convolution once per later GroupNorm pass at most;
    # recomputing from the stage input runs it in every pass after it, and in the final one.
    assert len(calls) >= tiles and (keep_bytes or spill or len(calls) > tiles)
    # The last stage's input is let go once every tile has a checkpoint; recomputing still needs it.
    assert input_held[-1] == (not keep_bytes and not spill)


def test_spill_file_that_cannot_be_written_falls_back_to_recomputing(monkeypatch):
    store = CheckpointStore("cpu", 0, spill=True)

    def full_disk(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tempfile.TemporaryFile", full_disk)
    with pytest.warns(UserWarning, match="could not spill"):
        assert store.put(0, (torch.ones(1, 2, 3, 3),)) is False
    assert 0 not in store and store.put(1, (torch.ones(1, 2, 3, 3),)) is False  # spilling stays off
    store.close()


@pytest.mark.parametrize("channels_last", [False, True])
def test_spilled_crops_are_written_in_chunks_and_read_back_exactly(monkeypatch, channels_last):
    monkeypatch.setattr("vaekit.codec.checkpoints.WRITE_CHUNK_BYTES", 256)  # many chunks per tensor
    base = torch.randn(2, 5, 30, 40)
    if channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    crop = base[..., 3:27, 5:38]  # a strided view, as a tile's checkpoint is
    whole = base[:1] if channels_last else None  # a channels-last tensor is written in its own memory order
    with CheckpointStore("cpu", 0, spill=True) as store:
        assert store.put(7, (crop, crop[:, :2]))
        back = store.get(7)
        if whole is not None:
            assert store.put(8, (whole,)) and torch.equal(store.get(8)[0], whole)
            assert store.get(8)[0].is_contiguous(memory_format=torch.channels_last)
        crops = (crop.numel() + crop[:, :2].numel()) * 4
        assert store.bytes_spilled == crops + (whole.numel() * 4 if whole is not None else 0)  # crops, not bases
        assert store.ends[store.current] == store.bytes_spilled
    assert torch.equal(back[0], crop) and torch.equal(back[1], crop[:, :2])


# ---------------------------------------------------------------------------------------------------
# Patch parallelism: two gloo processes share one image's tiles


def parallel_worker(rank, world, store_path, out, mode, die):
    """One process of a 2-process group: encode and decode with the group, save what it gets; then,
    with `die`, a second decode that rank 1 leaves half-way."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
        vae = tiny()
        x = photo(200, 136)
        z = inference.encode(vae, x, tile=96, tile_mode=mode, group=dist.group.WORLD)[0]
        y = inference.decode(vae, z, tile=96, tile_mode=mode, group=dist.group.WORLD)
        assert (y is None) == (rank != 0)
        torch.save({"z": z, "y": y}, Path(out) / f"rank{rank}.pt")
        if die:
            real = tiling.StageRun.measure

            def measure_then_die(self, u):
                if rank == 1 and u > 0:
                    os._exit(3)  # a process lost mid-run: the other must stop with an error, not wait
                return real(self, u)

            tiling.StageRun.measure = measure_then_die
            inference.decode(vae, z, tile=96, tile_mode=mode, group=dist.group.WORLD)
    except Exception as e:
        (Path(out) / f"rank{rank}.error").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")


def run_group(tmp_path, mode, die=False):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=parallel_worker, args=(r, 2, tmp_path / "store", str(tmp_path), mode, die))
                 for r in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=240)
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a process of the group hung"
    return processes


def check_group_equals_one_process(tmp_path, vae, mode):
    x = photo(200, 136)
    z = inference.encode(vae, x, tile=96, tile_mode=mode)[0]
    y = inference.decode(vae, z, tile=96, tile_mode=mode)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert (got["z"] - z).abs().max() <= 1e-6  # every process gets the latents
        assert got["y"] is None if rank else (got["y"] - y).abs().max() <= 1e-6


def test_two_processes_decode_what_one_does_and_a_dying_one_stops_the_other(tmp_path, vae):
    processes = run_group(tmp_path, "exact", die=True)
    check_group_equals_one_process(tmp_path, vae, "exact")
    assert processes[1].exitcode == 3 and not (tmp_path / "rank1.error").exists()
    error = (tmp_path / "rank0.error").read_text()
    assert error.startswith("VaekitError: Tiled inference across 2 processes stopped"), error


@pytest.mark.slow  # two more spawned processes: 7 s
def test_two_processes_decode_what_one_does_in_fast_mode(tmp_path, vae):
    run_group(tmp_path, "fast")
    errors = [p.read_text() for p in tmp_path.glob("*.error")]
    assert not errors, errors[0]
    check_group_equals_one_process(tmp_path, vae, "fast")


@pytest.mark.slow  # torchrun with two processes loading vaekit: ~40 s on 2 cores
def test_torchrun_reconstruct_writes_what_one_process_writes(tmp_path, vae):
    from vaekit.model import save_diffusers

    save_diffusers(vae, tmp_path / "vae")
    make_photo(200, 136, seed=3).save(tmp_path / "a.png")
    common = ["reconstruct", "--vae", str(tmp_path / "vae"), str(tmp_path / "a.png"), "--tile", "96"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "vaekit.cli"] + common
                          + ["--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("PSNR") == 1  # rank 0 reports
    one = subprocess.run([sys.executable, "-m", "vaekit.cli"] + common + ["--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / "a.png")),
                          np.asarray(Image.open(tmp_path / "one" / "a.png")))
