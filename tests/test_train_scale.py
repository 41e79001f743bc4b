"""Training at scale through real processes on a CPU (gloo): start-up agreement, refused sharding, split
validation, streamed WebDataset shards and their resume.
"""

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import imagegen
from test_train import write_config as write_tiny_config
from vaekit.cli import main

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six small photo-like PNGs."""
    folder = tmp_path_factory.mktemp("photos")
    imagegen.write_photos(folder, 6, size=(48, 40))
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four gzip-compressed WebDataset shards of four PNGs each, keys s{shard}-i{sample}."""
    folder = tmp_path_factory.mktemp("shards")
    for s in range(4):
        with tarfile.open(folder / f"shard-{s:03d}.tar.gz", "w:gz") as tar:
            for i in range(4):
                data = imagegen.encode(imagegen.make_photo(40, 36, seed=100 * s + i), "PNG")
                info = tarfile.TarInfo(f"s{s}-i{i}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


@pytest.fixture(scope="module")
def lpips_backbone(tmp_path_factory):
    """A randomly initialised AlexNet saved as a torchvision state dict: a valid LPIPS backbone file, offline."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "alexnet-random.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def pipe_spec(folder):
    """The shards as a `pipe:` command over a brace pattern, as a remote store would be read."""
    return f"pipe:cat {folder}/shard-{{000..003}}.tar.gz"


def write_config(path, out_dir, data_path, **sections):
    """The tiny-model config of the trainer's tests, with every trained sample key logged."""
    log = {"sample_keys": True, **sections.pop("log", {})}
    return write_tiny_config(path, out_dir, data_path, log=log, **sections)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config, processes=2, timeout=240):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), "-m", "vaekit.cli", "train", "--config", str(config)]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=config.parent)


def sample_keys(out_dir, rank=0):
    """[(step, epoch, key)] a process trained on, from log.sample_keys."""
    lines = (Path(out_dir) / "sample_keys" / f"rank-{rank:05d}.tsv").read_text().splitlines()
    return [(int(step), int(epoch), key) for step, epoch, key in (line.split("\t") for line in lines)]


# ------------------------------------------------------------------------------------------------
# Start-up: every process checks, all agree


def test_a_process_without_its_data_or_lpips_weights_stops_every_process_at_once(tmp_path, photos, lpips_backbone):
    """Two nodes of one job, each with its own config: node 1 lacks the model, the data and the LPIPS weights.

    Both exit with the same one-line message naming rank 1 and its problems, within seconds,
    although a process that waited in DDP's set-up would wait train.timeout_s (here 5 minutes).
    """
    port = free_port()
    procs = []
    started = time.monotonic()
    nodes = [(photos, lpips_backbone, "preset:tiny"), (tmp_path / "no-data", tmp_path / "no.pth", tmp_path / "no-model")]
    for rank, (data, weights, model) in enumerate(nodes):
        cfg = write_config(tmp_path / f"node{rank}.yaml", tmp_path / f"run{rank}", data, model={"source": str(model)},
                           loss={"perceptual_weight": 0.1, "perceptual_net": "alex", "lpips_path": str(weights)},
                           train={"steps": 2, "batch_size": 2, "timeout_s": 300})
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", "vaekit.cli", "train", "--config", str(cfg)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - started
    messages = []
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 2, err[-3000:]
        lines = [line for line in err.splitlines() if "processes cannot start" in line]
        assert len(lines) == 1, err[-3000:]
        messages.append(lines[0])
    assert messages[0] == messages[1]
    assert "1 of 2 processes cannot start" in messages[0] and "rank 1: " in messages[0]
    assert "rank 0" not in messages[0]
    for problem in ("model: ", "no-model", "data: ", "no-data", "LPIPS: ", "no.pth"):  # all of node 1's, in one message
        assert problem in messages[0], problem
    assert "Traceback" not in outputs[0][1] + outputs[1][1]
    assert elapsed < 100
    assert not list((tmp_path / "run0").glob("checkpoint-*"))


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_fsdp_and_deepspeed_are_refused_before_anything_is_built(tmp_path, photos, variable, monkeypatch, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", photos)
    monkeypatch.setenv(variable, "true")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "not supported by vaekit train" in err and "DDP" in err and variable in err
    assert "state dict" in err and "EMA" in err and "last-layer" in err and "two optimizers" in err
    assert not (tmp_path / "run").exists()  # refused before the run folder, the data or the models


def test_sharded_distributed_types_are_refused():
    from accelerate.utils import DistributedType

    from vaekit.errors import VaekitError
    from vaekit.train.preflight import refuse_sharding

    refuse_sharding(DistributedType.MULTI_CPU)
    for kind, name in ((DistributedType.FSDP, "FSDP"), (DistributedType.DEEPSPEED, "DeepSpeed")):
        with pytest.raises(VaekitError, match=f"^{name} is not supported"):
            refuse_sharding(kind)


# ------------------------------------------------------------------------------------------------
# Streamed shards on two processes; validation split across them


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_each_epoch_reads_every_shard_once_across_processes_and_workers(world, workers):
    from vaekit.data.streaming import epoch_shards

    for epoch in range(3):
        read = [i for r in range(world) for k in range(workers) for i in epoch_shards(13, 7, epoch, r, world, k, workers)]
        assert sorted(read) == list(range(13))
    assert epoch_shards(13, 7, 0, 0, world, 0, workers) != epoch_shards(13, 7, 1, 0, world, 0, workers)


def test_two_processes_stream_each_sample_once_per_epoch_and_split_validation_matches_one_process(
        tmp_path, shards, lpips_backbone):
    """torchrun, 2 CPU processes, .tar.gz shards read through `pipe:cat`.

    In epoch 0 the processes train on disjoint sets of whole shards that together hold every
    training sample once; the held-out samples (first 2 of the last shard) are never trained on;
    the metrics the two processes computed on their halves equal one process scoring all images.
    """
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", out, pipe_spec(shards), train={"steps": 5, "batch_size": 2,
                                                                           "checkpoint_every": 5},
                       loss={"lpips_path": str(lpips_backbone)})
    done = torchrun(cfg)
    assert done.returncode == 0, done.stderr[-3000:]
    held = {"s3-i0", "s3-i1"}
    everything = {f"s{s}-i{i}" for s in range(4) for i in range(4)} - held
    seen = [sample_keys(out, rank) for rank in range(2)]
    assert all(len(keys) == 5 * 2 for keys in seen)  # steps x batch, on each process
    epoch0 = [[k for _, e, k in keys if e == 0] for keys in seen]
    assert all(len(set(keys)) == len(keys) for keys in epoch0)  # nothing twice within the epoch
    assert not set(epoch0[0]) & set(epoch0[1])  # nothing on both processes
    assert set(epoch0[0]) | set(epoch0[1]) == everything  # every training sample, none held out
    assert not held & {k for keys in seen for _, _, k in keys}
    shards_of = [{k.split("-")[0] for k in keys} for keys in epoch0]
    assert len(shards_of[0]) == len(shards_of[1]) == 2  # whole shards per process

    meta = json.loads((out / "checkpoint-000005" / "meta.json").read_text())
    streams = meta["data"]["streams"]
    assert len(streams) == 2 and [s["batches"] for s in streams] == [5, 5]
    assert meta["replica_fingerprints"][0] == meta["replica_fingerprints"][1]

    # One process scoring all held-out images with the exported weights gives the same metrics.
    from vaekit.config import load_config
    from vaekit.model import load_vae
    from vaekit.pretrained.backbones import load_lpips
    from vaekit.train import TrainConfig
    from vaekit.train.validation import take_images, validate
    from vaekit.data.training import build_train_val

    config = load_config(TrainConfig, out / "config.yaml")
    _, val = build_train_val(config.data)
    images, keys, _ = take_images(val, 2)
    assert keys == ["s3-i0", "s3-i1"]
    single, _, _ = validate(load_vae(out / "vae"), images, load_lpips("alex", path=lpips_backbone), batch_size=4)
    split = json.loads((out / "metrics.json").read_text())
    assert split["images"] == single["images"] == 2
    for name in ("psnr", "ssim", "lpips"):
        assert split[name] == pytest.approx(single[name], rel=1e-5, abs=1e-6), name


# ------------------------------------------------------------------------------------------------
# Resume of a streamed run


def test_a_resumed_stream_trains_on_the_samples_of_an_uninterrupted_run(tmp_path, shards):
    """Two DataLoader workers, each its own stream; stop after 3 steps (mid-shard, odd batch count), resume to 8.

    The resumed run takes exactly the samples, in the same steps and epochs, of a run to 8 in one go
    (crossing into epoch 1), and ends with the same weights, bit for bit.
    """
    sections = dict(data={"num_workers": 2}, train={"steps": 8, "batch_size": 2, "checkpoint_every": 3})
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--config", str(write_config(tmp_path / "a.yaml", full, pipe_spec(shards), **sections))]) == 0
    cfg = write_config(tmp_path / "b.yaml", split, pipe_spec(shards), **sections)
    assert main(["train", "--config", str(cfg), "train.steps=3"]) == 0
    first = sample_keys(split)
    assert main(["train", "--config", str(cfg), "--resume", "latest"]) == 0

    expected = sample_keys(full)
    assert len(expected) == 16 and {e for _, e, _ in expected} == {0, 1}  # 14 training samples per epoch
    assert first == expected[:6]
    assert sample_keys(split) == expected
    epoch0 = [k for _, e, k in expected if e == 0]
    assert len(epoch0) == len(set(epoch0)) == 14
    meta = json.loads((split / "checkpoint-000008" / "meta.json").read_text())
    assert meta["data"]["streams"][0]["workers"] == 2 and meta["data"]["streams"][0]["batches"] == 8
    a = load_file(str(full / "checkpoint-000008" / "vae.safetensors"))
    b = load_file(str(split / "checkpoint-000008" / "vae.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stream_resumed_with_other_workers_starts_the_next_epoch(tmp_path, shards):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", pipe_spec(shards),
                       data={"num_workers": 0}, train={"steps": 2, "batch_size": 2})
    assert main(["train", "--config", str(cfg)]) == 0
    assert main(["train", "--config", str(cfg), "train.steps=3", "data.num_workers=2", "--resume", "latest"]) == 0
    keys = sample_keys(tmp_path / "run")
    assert [e for s, e, _ in keys if s <= 2] == [0] * 4 and [e for s, e, _ in keys if s == 3] == [1, 1]


def test_streamed_holdout_must_be_a_count(tmp_path, shards, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", pipe_spec(shards), data={"holdout": 0.05})
    assert main(["train", "--config", str(cfg)]) == 2
    assert "data.holdout=0.05 is a fraction" in capsys.readouterr().err
