"""The distributed pieces in one process (docs/design.md §5, §14): ``plan`` / ``comm`` / ``eplb`` take plain
data and tensors, never a layer; a one-rank ``ParallelConfig`` with EPLB replicas runs through the same
layer paths as the gloo tests (tests/distributed), so they are checked here without a process group."""
import ast
import pathlib

import pytest
import torch

from torch_moe_ops import Fp8Config, FusedMoE, Int4Config, ParallelConfig
from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint
from torch_moe_ops.distributed import comm, eplb, plan, tables_from_physical_to_logical

from tests.moe_models import hf_checkpoint

E, K, H, I, R = 6, 2, 64, 64, 2
PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "torch_moe_ops"
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


def test_plan_is_plain_data():
    pc = ParallelConfig(ep_size=4, ep_rank=1, num_redundant_experts=2)
    p = plan(pc, 6, 128)  # pure: no process group needed
    assert (p.num_physical, p.num_local, p.local_range, p.intermediate) == (8, 2, (2, 4), 128)
    assert p.local_slots == (-1, -1, 0, 1, -1, -1, -1, -1)
    t = p.initial_tables()
    assert t["expert_map"].tolist() == [-1, -1, 0, 1, -1, -1, -1, -1]
    assert t["physical_to_logical"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert t["logical_to_physical"].tolist() == [[0, 6, -1], [1, 7, -1], [2, -1, -1], [3, -1, -1], [4, -1, -1],
                                                 [5, -1, -1]]
    assert t["replica_count"].tolist() == [2, 2, 1, 1, 1, 1] and t["expert_owner"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert plan(ParallelConfig(tp_size=2, tp_rank=1), 6, 128).initial_tables()["expert_map"] is None
    with pytest.raises(ValueError, match="not divisible by tp_size"):
        plan(ParallelConfig(tp_size=2, tp_rank=0), 6, 127)


def test_parallel_forward_runs_the_callers_experts():
    """World size 1: the caller's ``run_experts`` runs once on the inputs as given (weights made contiguous)."""
    calls = []

    def run(x, w, ids):
        calls.append((x, w, ids))
        return x * 2

    x, w, ids = torch.randn(5, H), torch.rand(2, 5).t(), torch.zeros(5, 2, dtype=torch.int32)
    out = comm.parallel_forward(x, w, ids, ParallelConfig(), torch.zeros(E, dtype=torch.int64), run)
    assert torch.equal(out, x * 2) and len(calls) == 1
    assert calls[0][0] is x and calls[0][2] is ids and calls[0][1].is_contiguous() and torch.equal(calls[0][1], w)


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


def test_eplb_takes_tensors_and_tables():
    """``eplb.rebalance`` on plain tensors (no layer): rows and tables are filled in place."""
    E_log, E_g = 3, 4
    pl = plan(ParallelConfig(num_redundant_experts=1), E_log, 8)
    t = pl.initial_tables()
    tables = eplb.EplbTables(t["physical_to_logical"], t["logical_to_physical"], t["replica_count"], t["expert_owner"])
    rows = torch.arange(E_g * 2, dtype=torch.float32).view(E_g, 2)  # row p = the data of logical p2l[p]
    rows[3] = rows[0]
    other = rows.to(torch.int8).clone()
    new_p2l = torch.tensor([2, 0, 1, 2])
    eplb.rebalance([rows, other], tables_from_physical_to_logical(new_p2l, E_log)[0], tables, ParallelConfig(),
                   pl.local_slots)
    assert rows.tolist() == [[4, 5], [0, 1], [2, 3], [4, 5]] and torch.equal(other, rows.to(torch.int8))
    assert tables.physical_to_logical.tolist() == new_p2l.tolist()
    assert tables.logical_to_physical.tolist() == [[1, -1], [2, -1], [0, 3]]
    assert tables.replica_count.tolist() == [1, 1, 2]


def _package_imports(path: pathlib.Path) -> set[str]:
    """Modules of the package a file imports, as dotted names relative to ``torch_moe_ops``."""
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    here = list(rel[:-1])  # the package a relative import starts from
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                mod = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("torch_moe_ops"):
                mod = node.module.removeprefix("torch_moe_ops").lstrip(".")
            else:
                continue
            out.add(mod)
            out.update(f"{mod}.{a.name}".lstrip(".") for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("torch_moe_ops.") for a in node.names if a.name.startswith("torch_moe_ops"))
    return out


def test_floors_below_the_layer_do_not_import_it():
    """layer/loading/, distributed/ and errors.py sit below the layer's module; the checkpoint pipeline
    (checkpoint/) above the layer. No file below imports the layer's module or the checkpoint
    functions (so layer -> layer.loading is never answered by layer.loading -> layer), the layer imports nothing
    of the pipeline, and ParallelConfig imports nothing that imports it."""
    pipeline = {"checkpoint", "integrations"}

    def above_loader(m: str) -> bool:
        return m.split(".")[0] in pipeline or (m.split(".")[0] == "layer" and not m.startswith("layer.loading"))

    below = [*sorted((PACKAGE / "layer" / "loading").glob("*.py")), *sorted((PACKAGE / "distributed").glob("*.py")),
             PACKAGE / "errors.py"]
    for path in below:
        hits = {m for m in _package_imports(path) if above_loader(m)}
        assert not hits, f"{path.relative_to(PACKAGE)} imports {hits}"
    assert _package_imports(PACKAGE / "distributed" / "config.py") == set()
    assert _package_imports(PACKAGE / "errors.py") == set()
    for path in sorted((PACKAGE / "layer").rglob("*.py")):
        hits = {m for m in _package_imports(path) if m.split(".")[0] in pipeline}
        assert not hits, f"{path.relative_to(PACKAGE)} imports {hits}"
