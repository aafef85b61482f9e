"""The HF demo's printed table (``format_table``): one line per model, then what each column measured."""
from __future__ import annotations

MIB = 2**20

#: (title, width) of every column, in order; the tests read the titles from here.
COLUMNS = (("model", 17), ("SQNR dB", 7), ("vs fp32", 7), ("=ref", 5), ("tok/s", 6), ("compiled", 8),
           ("=eager", 6), ("compile s", 9), ("load s", 6), ("MiB", 6), ("load peak", 9), ("peak/bf16", 9))


def _num(value, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, fmt) + suffix


def _cells(row, ref_bytes: int, n: int) -> list[str]:
    peak = row.peak_bytes
    return [row.name, "ref" if row.sqnr_db is None else _num(row.sqnr_db, ".1f"), _num(row.sqnr_fp32_db, ".1f"),
            f"{row.same_tokens}/{n}", _num(row.eager_tps, ".1f"), _num(row.compiled_tps, ".1f"),
            _num(row.compiled_same_tokens, "d", f"/{n}"), _num(row.compile_s, ".1f"), f"{row.load_s:.2f}",
            f"{row.weights_bytes / MIB:.2f}", _num(None if peak is None else peak / MIB, ".2f"),
            _num(None if peak is None else peak / ref_bytes, ".2f", "x")]


def _line(cells, widths) -> str:
    return " ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))


def format_table(result) -> list[str]:
    """The lines to print for an ``HFResult``: its header, the table, the footnotes."""
    rows, n = result.rows, result.new_tokens
    ref_bytes = rows[0].weights_bytes
    cells = [_cells(row, ref_bytes, n) for row in rows]
    widths = [max([w] + [len(c[i]) for c in cells]) for i, (_, w) in enumerate(COLUMNS)]  # a slow run's wide cell
    head = _line([t for t, _ in COLUMNS], widths)
    lines = ["", *result.header, "", head, "-" * len(head)]
    lines += [_line(c, widths) for c in cells]
    lines += ["",
              "SQNR dB: the prompt's logits vs transformers bf16; vs fp32: vs transformers in fp32 on the same "
              "bf16 weights (bf16's own error, for scale).",
              f"=ref: leading tokens of the {n} greedy ones equal to transformers bf16's (random weights: near-flat "
              "logits, a small error can flip one).",
              f"tok/s: steady decode tokens/s of model.generate (greedy, batch 1, KV cache): (n - 1) / (t(generate "
              f"n) - t(generate 1)), n = {n}, after a warm-up; compiled: the same with transformers' compile path,",
              "  static cache + CompileConfig(fullgraph=True, dynamic=False, mode='default', "
              f"backend={result.backend!r}) (prefill eager, each decode step compiled); =eager: leading compiled",
              "  tokens equal to the eager ones; compile s: the first compiled generate (trace, codegen, its tokens).",
              f"MiB: weights and buffers; load peak (MiB): {result.peak_label}; peak/bf16: load peak / the "
              f"transformers bf16 weights ({ref_bytes / MIB:.2f} MiB)."]
    compiled = [r for r in rows if r.compiled_tps is not None]
    if compiled:
        graphs = ", ".join(f"{r.key} {r.graphs}" for r in compiled)
        lines.append(f"graphs compiled per model (the decode step): {graphs}.")
    skipped = [r.key for r in rows if r.compiled_tps is None]
    if skipped:
        lines.append(f"not compiled: {', '.join(skipped)} (--compile all compiles every row; Inductor takes 5-30 s "
                     "per model on a 2-core CPU).")
    configs = [f"{r.key} = {r.config}" for r in rows[1:] if r.config != "None"]
    if configs:
        lines.append("quant configs: " + "; ".join(configs) + ".")
    lines += [f"from_pretrained: {r.replaced} ({r.name})." for r in rows[1:2] if r.replaced]
    return lines
