"""DistributedDataParallel on CPU (gloo): two processes train one tiny model and save one checkpoint."""
import json
import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from nft.data.core import DatasetSplits, ImageData
    from nft.runtime import Runtime
    from nft.trainer import TrainConfig, finish_distributed, manifest_for, save_run, train_model

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 1, 12, 12), generator=g, dtype=torch.uint8)
    y = torch.arange(96) % 4
    data = DatasetSplits("fake", ImageData(x, y), ImageData(x[:8], y[:8]), ImageData(x[:16], y[:16]), 4, (0.5,),
                         (0.25,), "none")
    rt = Runtime(device="cpu", seed=0, progress=False)
    assert rt.world_size == world and rt.rank == rank
    cfg = TrainConfig(arch="smallcnn", arch_kwargs={"width": 4}, epochs=2, batch_size=8, lr=0.05)
    model, info = train_model(data, cfg, rt)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save(flat, os.path.join(out_dir, f"params-{rank}.pt"))
    if rt.is_main:
        save_run(os.path.join(out_dir, "run"), model, manifest_for(data, cfg, rt), history=info["history"])
    finish_distributed()


def test_ddp_two_cpu_processes_train_in_sync(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    p0, p1 = (torch.load(tmp_path / f"params-{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(p0, p1)  # DDP kept the replicas identical
    assert sorted(os.listdir(tmp_path)) == ["params-0.pt", "params-1.pt", "run"]
    assert os.path.isfile(tmp_path / "run" / "model.safetensors")
    # 96 images, 2 ranks x 8 per rank = 16 per global batch -> 6 steps per epoch, 12 steps in all
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert hist[-1]["step"] == 12


def test_torchrun_cli_saves_one_checkpoint(tmp_path):
    out = tmp_path / "runs" / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nft", "train",
           "--dataset", "mnist10k", "--model", "smallcnn", "--width", "4", "--epochs", "0.1", "--attack", "badnets",
           "--threads", "1", "--no-progress", "--device", "cpu", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.listdir(tmp_path / "runs") == ["ddp"]  # one run directory, no leftover staging dirs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert proc.stdout.count('"out"') == 1  # only rank 0 reports
