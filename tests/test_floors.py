"""The package's floors (docs/design.md §14): what each layer of the package may import. ``layer/loading/``,
``distributed/`` and ``errors.py`` sit below the layer's module, the checkpoint pipeline above it."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "torch_moe_ops"


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
