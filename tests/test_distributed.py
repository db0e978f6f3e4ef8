"""lmfast inside training runs: a patched model trained under torch.distributed DDP and FSDP2
(gloo, two processes on this machine) matches the unpatched model under DDP within the error budget (the
unpatched model in float64 is the oracle, in float32 the eager yardstick), and a patched model
saved mid-training (torch.save of model and optimizer state; Hugging Face save_pretrained /
from_pretrained) resumes exactly where it left off."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lmfast
from lmfast.testing import assert_within_budget

# Run by each of two processes (gloo): three copies of one small model (a pre-norm
# TransformerEncoderLayer: LayerNorm + nn.MultiheadAttention; or a Llama: RMSNorm + GQA
# attention; lmfast.patch replaces both kinds), trained 3 SGD steps on rank-dependent batches;
# rank 0 saves every step's loss and the final gradients.
DDP_SCRIPT = textwrap.dedent('''
    import copy, faulthandler, os, sys
    faulthandler.enable()  # a crash in C++ prints every thread's Python stack (see run's end)
    sys.path = [p for p in sys.path if p not in ("", os.getcwd())]  # the installed lmfast
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch.nn.parallel import DistributedDataParallel as DDP
    import lmfast

    def wrap(model, mode):
        if mode == "ddp":
            return DDP(model)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        return fully_shard(model, mesh=init_device_mesh("cpu", (2,)))

    def full(grad):  # FSDP2's gradients are shards (DTensors)
        return grad.full_tensor() if hasattr(grad, "full_tensor") else grad

    def make(kind):
        if kind == "encoder":
            return torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True,
                                                    norm_first=True)
        # a Llama-architecture model: RMSNorm, rotary embeddings, grouped-query attention (4 heads, 2 kv)
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                            attn_implementation="eager"))

    def step_loss(ddp, kind, g, dtype):
        if kind == "encoder":
            x = torch.randn(4, 9, 32, generator=g).to(dtype)
            mask = torch.ones(9, 9, dtype=torch.bool).tril()  # causal, as a boolean keep-mask
            return ddp(x, src_mask=~mask).square().mean()
        ids = torch.randint(0, 64, (4, 9), generator=g)
        return ddp(input_ids=ids, labels=ids).loss

    def run(rank, out, mode, kind):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
        dist.init_process_group("gloo", rank=rank, world_size=2)
        torch.set_num_threads(1)
        torch.manual_seed(0)
        base = make(kind)
        results = {}
        for name, dtype, patched in (("ref64", torch.float64, False), ("eager", torch.float32, False),
                                     ("lmfast", torch.float32, True)):
            model = copy.deepcopy(base).to(dtype)
            if patched:
                report = lmfast.patch(model)
                swapped = sum(report.swapped.values())
                # encoder: 2 LayerNorms, 1 attention; llama: 5 RMSNorms, 2 attentions
                assert swapped == (3 if kind == "encoder" else 7), str(report)
            ddp = wrap(model, mode)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            g = torch.Generator().manual_seed(100 + rank)
            losses = []
            for step in range(3):
                loss = step_loss(ddp, kind, g, dtype)
                opt.zero_grad()
                loss.backward()
                losses.append(loss.detach())
                if step < 2:
                    opt.step()
            grads = torch.cat([full(p.grad).reshape(-1) for p in ddp.parameters()])
            results[name] = (torch.stack(losses), grads)
        if rank == 0:
            torch.save(results, out)
        # Both ranks reach teardown together. Twice in ~40 CI runs, under CI's parallel load, a
        # rank died in std::terminate ("terminate called without an active exception", no Python
        # traceback; not reproduced in 30+ runs here): the barrier rules out one candidate, a
        # rank tearing gloo down while the other still saves. The other candidate is process
        # exit, where C++ static destructors run while gloo's threads may still be joinable;
        # os._exit skips them, once the results are on disk and the group is destroyed.
        # (faulthandler, above, says where the next one happens, if it does.)
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    if __name__ == "__main__":
        mp.spawn(run, args=(sys.argv[1], sys.argv[2], sys.argv[3]), nprocs=2)
''')


@pytest.mark.parametrize("mode,kind", [("ddp", "encoder"), ("fsdp2", "encoder"), ("ddp", "llama")])
def test_distributed_training_matches_unpatched(mode, kind, tmp_path):
    """DDP, and FSDP2's fully_shard (which this torch runs on the CPU with gloo), on a
    TransformerEncoderLayer; DDP on a small Llama-architecture model (random weights)."""
    if kind == "llama":
        pytest.importorskip("transformers", reason="the Llama model comes from transformers (the [test] extra)")
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "results.pt"
    port = str(29500 + os.getpid() % 1000 + {"encoder": 0, "llama": 250}[kind] + (500 if mode == "fsdp2" else 0))
    proc = subprocess.run([sys.executable, str(script), str(out), mode, kind], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, "PORT": port, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(out)
    (loss64, grad64), (loss32, grad32), (ours_loss, ours_grad) = (results[k] for k in ("ref64", "eager", "lmfast"))
    assert_within_budget(ours_loss, loss64, loss32, f"{mode} {kind} losses (3 steps)")
    assert_within_budget(ours_grad, grad64, grad32, f"{mode} {kind} gradients after 2 steps")


def _train(model, opt, steps: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 9, 32, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _encoder():
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True)
    report = lmfast.patch(model)
    assert sum(report.swapped.values()) == 3, str(report)  # 2 LayerNorms, 1 attention
    return model


def test_torch_save_and_load_mid_training_resumes_exactly(tmp_path):
    model = _encoder()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 3, seed=1)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    uninterrupted = _train(model, opt, 3, seed=2)

    resumed = _encoder()
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    state = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["opt"])
    assert _train(resumed, resumed_opt, 3, seed=2) == uninterrupted  # bit for bit


def test_save_pretrained_round_trip_of_a_patched_model(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs transformers (the test extras install it)")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    lmfast.patch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "gpt2")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    lmfast.patch(loaded)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
