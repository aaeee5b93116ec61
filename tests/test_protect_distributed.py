"""protect() under sharded training: DDP and FSDP2 (`fully_shard`, DTensor parameters), two CPU
processes with gloo (issue 23); DeepSpeed ZeRO-3 partitions are refused.

The test launches this file with torchrun; each rank runs `worker()` for both modes and writes one
JSON file per mode into $DOWSER_RESULTS, which the test reads.
"""

import gc
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from dowser_tool import DowserError, protect

STEPS = 3


def tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=96, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)  # the same weights on every rank
    return AutoModelForCausalLM.from_config(config).float().train()


def masks_for(model):
    """Random masks (75 % protected) over every decoder linear, the same on every rank."""
    gen = torch.Generator().manual_seed(1)
    return {n: torch.rand(p.shape, generator=gen) < 0.75 for n, p in model.named_parameters() if n.endswith("proj.weight")}


def run(mode: str, rank: int, world: int) -> dict:
    import torch.distributed as dist

    model = tiny_llama()
    masks = masks_for(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    handle = protect(wrapped, masks)
    sharded = [g for g in handle._guards if g.mask.numel() < g.param.numel()]  # masks cut to this rank's shard
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1)
    seen = []  # at each step: are the gradients of protected entries zero when the optimizer sees them?
    opt.register_step_pre_hook(lambda o, a, k: seen.append(all(
        not bool(_local(g.param.grad)[g.mask].any()) for g in handle._guards if g.param.grad is not None)))
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own data
    for _ in range(STEPS):
        ids = torch.randint(3, 96, (2, 12), generator=gen)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    changed = handle.changed()
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
    fixed = all(torch.equal(full[n][m].view(torch.int32), before[n][m].view(torch.int32)) for n, m in masks.items())
    moved = min((full[n][~m] != before[n][~m]).float().mean().item() for n, m in masks.items())
    digest = torch.tensor([sum(float(t.double().sum()) for t in full.values())], dtype=torch.float64)
    digests = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(digests, digest)
    return {"mode": mode, "rank": rank, "changed": changed, "protected_fixed": fixed, "trainable_moved": moved,
            "grads_masked": seen, "sharded_masks": len(sharded), "guards": len(handle._guards),
            "ranks_agree": all(torch.equal(d, digests[0]) for d in digests), "trainable": handle.trainable}


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def worker():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for mode in ("ddp", "fsdp2"):
        result = run(mode, rank, world)
        with open(os.path.join(os.environ["DOWSER_RESULTS"], f"{mode}-{rank}.json"), "w") as f:
            json.dump(result, f)
        print(f"rank {rank}: {mode} done", file=sys.stderr, flush=True)  # where a crash happened, if one does
        gc.collect()  # the wrapped model, its optimizer and their pending gloo work go before the group does
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: process group destroyed", file=sys.stderr, flush=True)
    # Skip interpreter finalization: gloo's worker threads can abort the process there (SIGABRT,
    # "terminate called without an active exception", pytorch/pytorch#190489) after all work is done.
    os._exit(0)


GLOO_ABORT = "terminate called without an active exception"  # gloo's threads aborting a rank (pytorch#190489)


def _torchrun(results) -> tuple[int, str]:
    results.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", DOWSER_RESULTS=str(results))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             __file__], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stderr


def test_ddp_and_fsdp2_keep_protected_entries_bit_identical(tmp_path):
    rc, stderr = _torchrun(tmp_path / "1")
    if rc != 0 and GLOO_ABORT in stderr and "Traceback (most recent call last)" not in stderr.split(GLOO_ABORT)[0]:
        # a rank aborted inside gloo with no Python error before it (seen once in CI): one fresh run, same checks
        print(f"first torchrun: a rank aborted in gloo ({GLOO_ABORT!r}); running once more", file=sys.stderr)
        tmp_path = tmp_path / "2"
        rc, stderr = _torchrun(tmp_path)
    else:
        tmp_path = tmp_path / "1"
    assert rc == 0, stderr[-3000:]
    results = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("*.json"))]
    assert sorted((r["mode"], r["rank"]) for r in results) == [("ddp", 0), ("ddp", 1), ("fsdp2", 0), ("fsdp2", 1)]
    expected_trainable = sum(int((~m).sum()) for m in masks_for(tiny_llama()).values())
    for r in results:
        assert r["changed"] == [] and r["protected_fixed"] and r["ranks_agree"], r
        assert r["grads_masked"] == [True] * STEPS, r
        assert r["trainable_moved"] > 0.5, r
        assert r["guards"] == 14 and r["trainable"] == expected_trainable, r
        assert r["sharded_masks"] == (14 if r["mode"] == "fsdp2" else 0), r


def test_deepspeed_zero3_partitions_are_refused():
    model = torch.nn.Linear(4, 4)
    model.weight.ds_id, model.weight.ds_status = 0, "NOT_AVAILABLE"  # what ZeRO-3 puts on a partitioned parameter
    with pytest.raises(DowserError) as e:
        protect(model, {"weight": torch.zeros(4, 4, dtype=torch.bool)})
    assert "is sharded by DeepSpeed ZeRO-3, which protect() does not support" in str(e.value) and "\n" not in str(e.value)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker()
