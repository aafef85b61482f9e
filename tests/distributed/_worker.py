"""One rank of a multi-process test (gloo on 127.0.0.1). Run by ``test_distributed.py``:

    python tests/distributed/_worker.py RANK WORLD PORT SUITE OUTDIR

Writes ``OUTDIR/rank{RANK}.json`` = {case: "ok" | "FAIL: ..."}; each case compares the distributed layer with
the single-process ``FusedMoE`` on the same checkpoint.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta

import torch

K, H = 2, 32
E = 8  #: logical experts; see set_world


def set_world(world: int) -> None:
    """E = 8 at world 2; E = 6 at world 4 (E + 2 redundant = 8 divides over 4 ranks; without redundancy
    6 experts over 4 ranks exercises uneven linear placement: 2, 2, 1, 1)."""
    global E
    E = 8 if world <= 2 else 6
TOKENS = (1, 5, 64)
SCHEMES = ("bf16", "fp8_block")  #: every case runs with these; int4 runs a subset (see cases)


def quant(scheme):
    from torch_moe_ops import Fp8Config, Int4Config, Mxfp4Config

    configs = {"bf16": None, "fp8_block": Fp8Config("block", block_shape=(16, 16)), "int4": Int4Config(group_size=32),
               "mxfp4": Mxfp4Config()}
    return configs[scheme]


def inter(world):
    return 32 * world  # I/tp = 32 for tp = world: a multiple of the (16, 16) fp8 block and of the int4 / mxfp4 group 32


def checkpoint(I, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for e in range(E):
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            sd[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = (torch.randn(shape, generator=g) * 0.1).to(torch.bfloat16)
            if bias:
                sd[f"model.layers.0.mlp.experts.{e}.{proj}.bias"] = (torch.randn(shape[0], generator=g) * 0.1).to(torch.bfloat16)
    return sd


def reference(sd, I, scheme, **kw):
    from torch_moe_ops import FusedMoE, finalize_loading, load_checkpoint

    ref = FusedMoE(E, K, H, I, quant_config=quant(scheme), **kw)
    load_checkpoint(ref, sd, progress=False)
    finalize_loading(ref)
    return ref


def build(sd, I, scheme, pc, **kw):
    from torch_moe_ops import FusedMoE, finalize_loading, load_checkpoint

    layer = FusedMoE(E, K, H, I, quant_config=quant(scheme), parallel=pc, **kw)
    load_checkpoint(layer, sd, progress=False)
    finalize_loading(layer)
    return layer


def inputs(T, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, H, generator=g) / 2).to(torch.bfloat16)
    logits = torch.randn(T, E, generator=g).to(torch.bfloat16)
    if skew:  # every token to experts 0 and 1: the other ranks receive nothing
        logits[:, :2] += 20
    return x, logits


def tol(scheme):
    """fp8_block quantizes activations per rank's slice / batch; bf16 and int4 (w4a16, the same quantized
    weights as the reference: slices fall on group boundaries) differ only by summation order."""
    return dict(atol=6.5e-2, rtol=6.5e-2) if scheme == "fp8_block" else dict(atol=2e-2, rtol=2e-2)


def check_forward(layer, ref, scheme, rank, *, dp, tokens=TOKENS, fn=None):
    fn = layer if fn is None else fn
    for T in tokens:
        for skew in (False, True):
            x, logits = inputs(T, 1000 + (rank if dp else 0) + T, skew)
            with torch.no_grad():
                out, want = fn(x, logits), ref(x, logits)
            torch.testing.assert_close(out, want, **tol(scheme), msg=lambda m: f"T={T} skew={skew}: {m}")


# ------------------------------------------------------------------------------------------ cases
def case_forward(rank, world, kind, scheme, mode="all_to_all", R=0, bias=False):
    from torch_moe_ops import ParallelConfig

    I = inter(world)
    sd = checkpoint(I, bias=bias)
    if kind == "tp":
        pc = ParallelConfig(tp_size=world, tp_rank=rank)
    elif kind == "ep":
        pc = ParallelConfig(ep_size=world, ep_rank=rank, num_redundant_experts=R, mode=mode)
    else:  # tp2 x ep
        pc = ParallelConfig.from_group(tp_size=2, num_redundant_experts=R, mode="all_gather")
    layer = build(sd, I, scheme, pc, has_bias=bias)
    ref = reference(sd, I, scheme, has_bias=bias)
    n_local = layer.num_local_experts
    # full_precision: the logical [E, H, I/tp] (int4 storage packs two per byte along I)
    assert layer.w13_weight.shape[0] == n_local and layer.full_precision["w2_weight"].shape[2] == I // pc.tp_size, layer
    check_forward(layer, ref, scheme, rank, dp=kind != "tp")
    loads = layer.expert_load.clone()
    torch.distributed.all_reduce(loads)
    assert int(loads.sum()) > 0


def case_loading(rank, world, kind, scheme, outdir):
    """safetensors checkpoint -> online quantized load of only the local shards; reload keeps storage."""
    from torch_moe_ops import FusedMoE, ParallelConfig, reload_weights

    I = inter(world)
    pc = (ParallelConfig(tp_size=world, tp_rank=rank) if kind == "tp"
          else ParallelConfig(ep_size=world, ep_rank=rank, num_redundant_experts=2))
    path_a, path_b = (os.path.join(outdir, f"ckpt_{n}_{world}.safetensors") for n in "ab")
    layer = build(path_a, I, scheme, pc)
    assert layer.is_loaded
    # only local shards are expected: 3 pieces (w1, w3, w2) per local physical expert (a fresh layer misses all)
    required = FusedMoE(E, K, H, I, quant_config=quant(scheme), parallel=pc).missing_weights()
    assert len(required) == 3 * layer.num_local_experts, required
    # non-local experts are skipped: the loader copies nothing, says so, and records no piece
    w = checkpoint(I)["model.layers.0.mlp.experts.0.down_proj.weight"]
    nonlocal_ids = [p for p, slot in enumerate(layer.placement.local_slots) if slot < 0]
    assert len(nonlocal_ids) == layer.num_physical_experts - layer.num_local_experts
    for p in nonlocal_ids:
        assert layer.weight_loader("w2_weight", w, "w2", p, return_success=True) is False
    assert layer.load_state == "loaded"  # a recorded probe would have started a reload round
    check_forward(layer, reference(checkpoint(I), I, scheme), scheme, rank, dp=kind == "ep", tokens=(5,))
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    report = reload_weights(layer, path_b)
    assert report.layer_status and all(s == "reloaded" for s in report.layer_status.values()), report.layer_status
    assert ptrs == {n: p.data_ptr() for n, p in layer.named_parameters()}, "reload moved storage"
    check_forward(layer, reference(checkpoint(I, seed=1), I, scheme), scheme, rank, dp=kind == "ep", tokens=(5,))


def case_rebalance(rank, world, scheme, mode):
    from torch_moe_ops import ParallelConfig, reload_weights
    from torch_moe_ops.distributed import tables_from_physical_to_logical

    I = inter(world)
    R = 2
    pc = ParallelConfig(ep_size=world, ep_rank=rank, num_redundant_experts=R, mode=mode)
    sd = checkpoint(I)
    layer = build(sd, I, scheme, pc)
    ref = reference(sd, I, scheme)
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    # new layout: replicate logical 3 and E-2 instead of 0 and 1, shuffled over all slots and ranks
    g = torch.Generator().manual_seed(7)
    logical = torch.tensor(list(range(E)) + [3, E - 2])
    new_p2l = logical[torch.randperm(E + R, generator=g)]
    l2p, _ = tables_from_physical_to_logical(new_p2l, E)
    layer.rebalance(l2p)
    assert torch.equal(layer.physical_to_logical, new_p2l)
    assert ptrs == {n: p.data_ptr() for n, p in layer.named_parameters()}, "rebalance moved storage"
    start, end = layer.local_expert_range
    for p in range(start, end):
        l = int(new_p2l[p])
        for n in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
            t = getattr(layer, n)
            if t is not None:
                a, b = t[p - start], getattr(ref, n)[l]
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{n} slot {p} != logical {l}"
    check_forward(layer, ref, scheme, rank, dp=True)
    # reload after a rebalance: names address logical experts, every replica is refilled
    sd_b = checkpoint(I, seed=1)
    reload_weights(layer, sd_b)
    check_forward(layer, reference(sd_b, I, scheme), scheme, rank, dp=True, tokens=(5, 64))


def case_compile(rank, world, kind, mode="all_gather"):
    from torch_moe_ops import ParallelConfig

    torch._dynamo.reset()
    I = inter(world)
    sd = checkpoint(I)
    pc = (ParallelConfig(tp_size=world, tp_rank=rank) if kind == "tp"
          else ParallelConfig(ep_size=world, ep_rank=rank, num_redundant_experts=2, mode=mode))
    layer = build(sd, I, "bf16", pc)
    ref = reference(sd, I, "bf16")
    compiled = torch.compile(layer, fullgraph=True, backend=os.environ.get("MOE_TEST_COMPILE_BACKEND", "inductor"), dynamic=False)
    check_forward(layer, ref, "bf16", rank, dp=kind == "ep", tokens=(5,), fn=compiled)


def case_invariant(rank, world, kind, scheme, mode="all_to_all"):
    """Batch-invariant mode (docs/batch-invariance.md): every rank's rows at T = 1, 7 and 64 shuffled are
    bitwise its rows of the T = 64 batch, and close to the single-process layer."""
    from torch_moe_ops import ParallelConfig

    I = inter(world)
    sd = checkpoint(I)
    if kind == "tp":
        pc = ParallelConfig(tp_size=world, tp_rank=rank)
    elif kind == "ep":  # 2 replicas: picked by token content in this mode, not by position
        pc = ParallelConfig(ep_size=world, ep_rank=rank, num_redundant_experts=2, mode=mode)
    else:  # tp2 x ep
        pc = ParallelConfig.from_group(tp_size=2, num_redundant_experts=2, mode="all_gather")
    layer = build(sd, I, scheme, pc, batch_invariant=True)
    ref = reference(sd, I, scheme)
    x, logits = inputs(64, 2000 + (rank if kind != "tp" else 0))
    with torch.no_grad():
        full = layer(x, logits)
        torch.testing.assert_close(full, ref(x, logits), **tol(scheme))
        g = torch.Generator().manual_seed(7)  # the same subsets on every rank (all_gather: same T everywhere)
        for idx in (torch.tensor([5]), torch.randperm(64, generator=g)[:7], torch.randperm(64, generator=g)):
            got = layer(x[idx], logits[idx])
            assert torch.equal(got.view(torch.int16), full[idx].view(torch.int16)), f"rows {idx.tolist()[:8]} differ"


def cases(world: int) -> dict:
    out = {}
    for s in SCHEMES:
        out[f"tp-{s}"] = lambda r, w, o, s=s: case_forward(r, w, "tp", s)
        for mode in ("all_to_all", "all_gather"):
            for R in (0, 2):
                out[f"ep-{mode}-R{R}-{s}"] = lambda r, w, o, s=s, m=mode, R=R: case_forward(r, w, "ep", s, m, R)
        out[f"load-ep-{s}"] = lambda r, w, o, s=s: case_loading(r, w, "ep", s, o)
        out[f"load-tp-{s}"] = lambda r, w, o, s=s: case_loading(r, w, "tp", s, o)
    out["tp-bias-bf16"] = lambda r, w, o: case_forward(r, w, "tp", "bf16", bias=True)
    out["ep-all_to_all-R2-bias-bf16"] = lambda r, w, o: case_forward(r, w, "ep", "bf16", "all_to_all", 2, bias=True)
    out["ep-all_gather-R2-bias-fp8_block"] = lambda r, w, o: case_forward(r, w, "ep", "fp8_block", "all_gather", 2,
                                                                         bias=True)
    if world == 4:
        out["invariant-tp2xep2-bf16"] = lambda r, w, o: case_invariant(r, w, "tpxep", "bf16")
        out["tp2xep2-all_gather-bf16"] = lambda r, w, o: case_forward(r, w, "tpxep", "bf16")
        out["tp2xep2-all_gather-R2-fp8_block"] = lambda r, w, o: case_forward(r, w, "tpxep", "fp8_block", R=2)
        out["tp2xep2-all_gather-bias-bf16"] = lambda r, w, o: case_forward(r, w, "tpxep", "bf16", bias=True)
        out["tp2xep2-all_gather-R2-int4"] = lambda r, w, o: case_forward(r, w, "tpxep", "int4", R=2)
    # int4 (group 32): TP slices on group boundaries, EP both modes with replicas, loading, a rebalance
    out["tp-int4"] = lambda r, w, o: case_forward(r, w, "tp", "int4")
    out["tp-bias-int4"] = lambda r, w, o: case_forward(r, w, "tp", "int4", bias=True)
    out["ep-all_to_all-R2-int4"] = lambda r, w, o: case_forward(r, w, "ep", "int4", "all_to_all", 2)
    out["ep-all_gather-R0-int4"] = lambda r, w, o: case_forward(r, w, "ep", "int4", "all_gather", 0)
    out["load-ep-int4"] = lambda r, w, o: case_loading(r, w, "ep", "int4", o)
    out["load-tp-int4"] = lambda r, w, o: case_loading(r, w, "tp", "int4", o)
    out["rebalance-all_to_all-int4"] = lambda r, w, o: case_rebalance(r, w, "int4", "all_to_all")
    # mxfp4 (E8M0 uint8 scales, group 32): TP slices in storage units, EP with replicas, loading, a rebalance
    out["tp-mxfp4"] = lambda r, w, o: case_forward(r, w, "tp", "mxfp4")
    out["ep-all_to_all-R2-mxfp4"] = lambda r, w, o: case_forward(r, w, "ep", "mxfp4", "all_to_all", 2)
    out["load-tp-mxfp4"] = lambda r, w, o: case_loading(r, w, "tp", "mxfp4", o)
    out["rebalance-all_gather-mxfp4"] = lambda r, w, o: case_rebalance(r, w, "mxfp4", "all_gather")
    for s in SCHEMES:
        for mode in ("all_to_all", "all_gather"):
            out[f"rebalance-{mode}-{s}"] = lambda r, w, o, s=s, m=mode: case_rebalance(r, w, s, m)
    for s in ("bf16", "fp8_block"):
        out[f"invariant-tp-{s}"] = lambda r, w, o, s=s: case_invariant(r, w, "tp", s)
        for mode in ("all_to_all", "all_gather"):
            out[f"invariant-ep-{mode}-{s}"] = lambda r, w, o, s=s, m=mode: case_invariant(r, w, "ep", s, m)
    out["compile-tp"] = lambda r, w, o: case_compile(r, w, "tp")
    out["compile-ep-all_gather"] = lambda r, w, o: case_compile(r, w, "ep")
    out["compile-ep-all_to_all"] = lambda r, w, o: case_compile(r, w, "ep", "all_to_all")
    return out


def case_names(world: int) -> list[str]:
    return list(cases(world))


def errors(rank, world):
    """Bad configs raise a clear error on every rank (no collective is entered)."""
    from torch_moe_ops import Fp8Config, FusedMoE, Int4Config, ParallelConfig

    res = {}
    for name, make, match in (
        ("tp_ep_ne_world", lambda: FusedMoE(E, K, H, 32, parallel=ParallelConfig(ep_size=world + 1, ep_rank=rank)),
         "process group has"),
        ("wrong_rank", lambda: FusedMoE(E, K, H, 32, parallel=ParallelConfig(ep_size=world, ep_rank=(rank + 1) % world)),
         "group rank"),
        ("eplb_not_divisible", lambda: FusedMoE(E, K, H, 32, parallel=ParallelConfig(
            ep_size=world, ep_rank=rank, num_redundant_experts=1)), "EPLB needs"),
        ("tp_not_divisible", lambda: FusedMoE(E, K, H, 33, parallel=ParallelConfig(tp_size=world, tp_rank=rank)),
         "not divisible by tp_size"),
        ("fp8_block_boundary", lambda: FusedMoE(E, K, H, 32, quant_config=Fp8Config("block", block_shape=(32, 32)),
                                                parallel=ParallelConfig(tp_size=world, tp_rank=rank)), "block"),
        ("int4_group_boundary", lambda: FusedMoE(E, K, H, 32 * world, quant_config=Int4Config(group_size=64),
                                                 parallel=ParallelConfig(tp_size=world, tp_rank=rank)),
         "I/tp = 32 to be a multiple of its scale tile (1, 64)"),
        ("int4_ep_full_i", lambda: FusedMoE(E, K, H, 48, quant_config=Int4Config(group_size=32),
                                            parallel=ParallelConfig(ep_size=world, ep_rank=rank)),
         "intermediate_size's K = 48 is not divisible by the group size 32"),
        ("a2a_with_tp", lambda: ParallelConfig(tp_size=2, ep_size=2, mode="all_to_all"), "all_to_all"),
    ):
        try:
            make()
            res[name] = "FAIL: no error"
        except (ValueError, RuntimeError) as exc:
            res[name] = "ok" if match in str(exc) else f"FAIL: unexpected message: {exc}"
    return res


def dead_rank(rank, world):
    """The last rank dies before the forward; the others must get an error, not hang."""
    import time

    from torch_moe_ops import ParallelConfig

    I = inter(world)
    layer = build(checkpoint(I), I, "bf16", ParallelConfig(ep_size=world, ep_rank=rank))
    torch.distributed.barrier()
    if rank == world - 1:
        os._exit(17)
    time.sleep(0.5)
    x, logits = inputs(5, rank)
    t0 = time.time()
    try:
        layer(x, logits)
    except Exception as exc:  # gloo: connection closed by peer, or the group timeout
        return {"dead_rank": f"ok ({type(exc).__name__} after {time.time() - t0:.1f}s)"}
    return {"dead_rank": "FAIL: forward succeeded with a dead rank"}


def main():
    rank, world, port, suite, outdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    set_world(world)
    timeout = timedelta(seconds=15 if suite == "dead_rank" else 60)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timeout)
    results = {}

    def dump():
        with open(os.path.join(outdir, f"{suite}-rank{rank}.json"), "w") as f:
            json.dump(results, f)

    if suite == "errors":
        results.update(errors(rank, world))
    elif suite == "dead_rank":
        results.update(dead_rank(rank, world))
    else:
        only = suite.split(":", 1)[1].split(",") if ":" in suite else None
        for name, fn in cases(world).items():
            if only and name not in only:
                continue
            try:
                fn(rank, world, outdir)
                results[name] = "ok"
            except Exception as exc:
                results[name] = f"FAIL: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            dump()
            torch.distributed.barrier()
    dump()
    if suite != "dead_rank":
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
