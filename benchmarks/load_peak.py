"""Peak GPU memory while ``from_pretrained`` loads a GPT-OSS-20B-shaped MXFP4 checkpoint (random data, the
Hub's layout: ``*_blocks`` / ``*_scales`` experts, bf16 elsewhere), against the final model's memory.

    python -m benchmarks.load_peak --out load_peak.json            # 24 layers, the GPT-OSS-20B sizes (~13 GB)
    python -m benchmarks.load_peak --layers 2 --small --device cpu # the pipeline only (CI-sized, no GPU)

The checkpoint is written under ``--dir`` (default: a temporary folder, removed after), one safetensors
file per layer plus the index, as the Hub shards it. Printed and written: file bytes, the final model's
allocated bytes, the peak during the load (``torch.cuda.max_memory_allocated``), their ratio (target
≤ 1.1), the experts' bytes and the load time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

#: GPT-OSS-20B (config.json of openai/gpt-oss-20b); --small shrinks every size for a CPU run
GPT_OSS_20B = dict(num_hidden_layers=24, hidden_size=2880, intermediate_size=2880, num_local_experts=32,
                   num_experts_per_tok=4, vocab_size=201088, num_attention_heads=64, num_key_value_heads=8,
                   head_dim=64, sliding_window=128, max_position_embeddings=131072)
SMALL = dict(hidden_size=128, intermediate_size=128, num_local_experts=8, vocab_size=512, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, sliding_window=16)
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                    "model.layers.*.mlp.router",
                                                                    "model.embed_tokens", "lm_head"]}


def write_checkpoint(path: str, sizes: dict, seed: int = 0) -> int:
    """A GPT-OSS MXFP4 folder at ``path`` with random tensors; returns its safetensors bytes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GptOssConfig

    layers = sizes["num_hidden_layers"]
    config = GptOssConfig(**sizes, layer_types=["sliding_attention", "full_attention"] * (layers // 2) +
                          ["sliding_attention"] * (layers % 2))
    with torch.device("meta"):
        shapes = {n: (t.shape, t.dtype) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shards: dict[str, dict] = {}
    for name, (shape, _) in shapes.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        tensors = shards.setdefault(layer, {})
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # HF [E, in, out] -> blocks [E, out, in]
            E, K, N = shape
            tensors[name + "_blocks"] = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=gen)
            tensors[name + "_scales"] = torch.randint(119, 125, (E, N, K // 32), dtype=torch.uint8, generator=gen)
        else:
            tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    os.makedirs(path, exist_ok=True)
    weight_map, total = {}, 0
    for i, (layer, tensors) in enumerate(sorted(shards.items())):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: fname for n in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg = config.to_dict()
    cfg["quantization_config"] = MXFP4_CONFIG
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return total


def measure(path: str, device: str) -> dict:
    """Load ``path`` with ``from_pretrained`` onto ``device``; memory figures on CUDA only."""
    from torch_moe_ops.integrations.transformers import from_pretrained

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    model = from_pretrained(path, device=device, progress=False)
    if cuda:
        torch.cuda.synchronize()
    row = dict(load_s=time.perf_counter() - t0, quant_scheme=model.torch_moe_ops_report.quant_scheme,
               expert_bytes=model.torch_moe_ops_report.expert_bytes_after)
    if cuda:
        final, peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
        row.update(final_bytes=final, peak_bytes=peak, peak_over_final=peak / final)
        ids = torch.randint(0, 100, (1, 8), device=device)
        with torch.no_grad():
            row["logits_finite"] = bool(torch.isfinite(model(ids).logits).all())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--small", action="store_true", help="CPU-sized model (hidden 128, 8 experts)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dir", help="where to write the checkpoint (default: a temporary folder, removed after)")
    p.add_argument("--out", help="JSON file for the result")
    args = p.parse_args(argv)
    sizes = {**GPT_OSS_20B, **(SMALL if args.small else {}), "num_hidden_layers": args.layers}
    path = args.dir or tempfile.mkdtemp(prefix="gpt-oss-mxfp4-")
    try:
        t0 = time.perf_counter()
        file_bytes = write_checkpoint(path, sizes)
        row = dict(sizes=sizes, file_bytes=file_bytes, write_s=time.perf_counter() - t0, device=args.device,
                   gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                   **measure(path, args.device))
    finally:
        if not args.dir:
            shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
