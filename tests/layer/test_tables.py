"""``FusedMoE`` under expert parallelism in one process (``layer/tables.py``, docs/design.md §5): a one-rank
``ParallelConfig`` with EPLB replicas runs through the same layer paths as the gloo tests (tests/distributed), so
its placement tables and EPLB's in-place rebalance are checked here without a process group."""
import pytest
import torch

from torch_moe_ops import Fp8Config, FusedMoE, Int4Config, ParallelConfig
from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint
from torch_moe_ops.distributed import tables_from_physical_to_logical

from tests.moe_models import hf_checkpoint

E, K, H, I, R = 6, 2, 64, 64, 2
CONFIGS = {"none": None, "fp8_block": Fp8Config("block", block_shape=(32, 32)), "int4": Int4Config(32)}


def _sd(seed=0):
    return {k: v for k, v in hf_checkpoint(1, E, H, I, seed=seed, router=False).items()}


def _layers(qc, seed=0):
    """(one-rank EPLB layer with R replicas, the plain layer), both loaded from the same checkpoint."""
    sd = _sd(seed)
    out = []
    for pc in (ParallelConfig(num_redundant_experts=R), None):
        layer = FusedMoE(E, K, H, I, quant_config=qc, parallel=pc)
        load_checkpoint(layer, sd, progress=False)
        finalize_loading(layer)
        out.append(layer)
    return out


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_one_rank_with_replicas_matches_the_plain_layer(scheme):
    layer, ref = _layers(CONFIGS[scheme])
    assert layer.w13_weight.shape[0] == E + R and layer.expert_map is None
    # replicas hold the same bytes as their logical expert (slot E + j holds logical j)
    for j in range(R):
        assert torch.equal(layer.w13_weight[E + j], ref.w13_weight[j])
        assert torch.equal(layer.w2_weight[E + j], ref.w2_weight[j])
    x, logits = torch.randn(33, H, dtype=torch.bfloat16) / 2, torch.randn(33, E)
    torch.testing.assert_close(layer(x, logits), ref(x, logits), atol=1e-2, rtol=1e-2)
    assert int(layer.expert_load.sum()) == 33 * K and int(layer.expert_load[E:].sum()) > 0  # replicas got pairs


@pytest.mark.parametrize("scheme", ["fp8_block", "int4"])
def test_rebalance_in_one_process_moves_rows_in_place(scheme):
    layer, ref = _layers(CONFIGS[scheme])
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    new_p2l = torch.tensor([5, 3, 1, 0, 4, 2, 3, 4])  # replicate 3 and 4 instead of 0 and 1, shuffled
    l2p, _ = tables_from_physical_to_logical(new_p2l, E)
    layer.rebalance(l2p)
    assert torch.equal(layer.physical_to_logical, new_p2l) and int(layer.expert_load.sum()) == 0
    assert ptrs == {n: p.data_ptr() for n, p in layer.named_parameters()}
    for p, l in enumerate(new_p2l.tolist()):
        for n in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
            assert torch.equal(getattr(layer, n)[p], getattr(ref, n)[l]), (n, p, l)
    x, logits = torch.randn(17, H, dtype=torch.bfloat16) / 2, torch.randn(17, E)
    torch.testing.assert_close(layer(x, logits), ref(x, logits), atol=1e-2, rtol=1e-2)
