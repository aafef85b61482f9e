"""What static tools see = what runs. The public ``fused_experts``, ``fused_moe`` and ``topk_route`` are generated
at import (``Signature.wrapper``), so type checkers and IDEs read the plain stubs under ``if TYPE_CHECKING:`` in
their modules instead. Those stubs are parsed here (``ast``, never executed) and must equal the generated
functions' ``inspect.signature``: names, order, kinds, defaults, annotations (the generator's, which come from
the schema types through signature.py's table). Adding, removing, reordering or retyping an argument of a
``Signature`` without its stub fails here."""
from __future__ import annotations

import ast
import importlib
import itertools
import inspect
import pkgutil
import textwrap
from pathlib import Path

import pytest

import torch_moe_ops
import torch_moe_ops.ops
from torch_moe_ops.ops.signature import _ANNOTATIONS, Signature

_P = inspect.Parameter
_NO_DEFAULT = "<required>"
#: the modules whose public functions are generated, and those functions
STUBBED = {"torch_moe_ops.ops.fused_moe": ("fused_experts", "fused_moe"), "torch_moe_ops.ops.routing": ("topk_route",)}


def _text(annotation: str) -> str:
    """An annotation's text, normalised (``torch.Tensor|None`` -> ``torch.Tensor | None``)."""
    return ast.unparse(ast.parse(annotation, mode="eval"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def type_checking_stubs(source: str) -> dict[str, ast.FunctionDef]:
    """The functions defined directly under a module-level ``if TYPE_CHECKING:``, by name."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                if isinstance(stmt, ast.FunctionDef):
                    assert stmt.name not in out, f"two stubs named {stmt.name}"
                    out[stmt.name] = stmt
    return out


def runtime_names(source: str) -> set[str]:
    """Module-level names bound outside the ``TYPE_CHECKING`` branches (what runs): each stub's name must be one."""
    names = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)

    visit(ast.parse(source).body)
    return names


def stub_parameters(fn: ast.FunctionDef) -> list[tuple[str, object, object, str | None]]:
    """``(name, kind, default, annotation text)`` per parameter of a parsed ``def``; defaults by
    ``ast.literal_eval`` (``_NO_DEFAULT`` when there is none)."""
    a = fn.args
    positional = [(p, _P.POSITIONAL_ONLY) for p in a.posonlyargs] + [(p, _P.POSITIONAL_OR_KEYWORD) for p in a.args]
    defaults = [_NO_DEFAULT] * (len(positional) - len(a.defaults)) + [ast.literal_eval(d) for d in a.defaults]
    params = [(p, kind, d) for (p, kind), d in zip(positional, defaults)]
    if a.vararg:
        params.append((a.vararg, _P.VAR_POSITIONAL, _NO_DEFAULT))
    params += [(p, _P.KEYWORD_ONLY, _NO_DEFAULT if d is None else ast.literal_eval(d))
               for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        params.append((a.kwarg, _P.VAR_KEYWORD, _NO_DEFAULT))
    return [(p.arg, kind, d, None if p.annotation is None else ast.unparse(p.annotation)) for p, kind, d in params]


def runtime_parameters(fn) -> list[tuple[str, object, object, str | None]]:
    """The same tuples from a function object's ``inspect.signature`` (the generator's annotations are text)."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        ann = None if p.annotation is _P.empty else _text(p.annotation)
        out.append((p.name, p.kind, _NO_DEFAULT if p.default is _P.empty else p.default, ann))
    return out


def _typed(params):
    """Defaults compared with their types (``True == 1 == 1.0`` would hide ``bool``/``int``/``float`` slips)."""
    return [(n, k, (type(d).__name__, d), a) for n, k, d, a in params]


def mismatches(stub: ast.FunctionDef, fn, sig: Signature) -> list[str]:
    """Every way the stub differs from the generated function ``fn`` of ``sig`` (empty: equal)."""
    problems = []
    static, runtime = stub_parameters(stub), runtime_parameters(fn)
    if [p[0] for p in static] != [p[0] for p in runtime]:
        problems.append(f"names: stub {[p[0] for p in static]} != generated {[p[0] for p in runtime]}")
    if _typed(static) != _typed(runtime):
        diff = [f"{s} != {r}" for s, r in itertools.zip_longest(_typed(static), _typed(runtime)) if s != r]
        problems.append("parameters, stub != generated:\n  " + "\n  ".join(diff))
    # the generator's annotations are signature.py's table of the schema types: check that link too
    by_name = {a.name: a for a in sig.args}
    for name, _, default, ann in static:
        resolved = name == "batch_invariant" and default is None  # the wrapper resolves None (Signature.wrapper)
        if name in by_name and ann != _text(_ANNOTATIONS[by_name[name].type] + (" | None" if resolved else "")):
            problems.append(f"{name}: annotation {ann!r}, schema type {by_name[name].type!r} -> "
                            f"{_ANNOTATIONS[by_name[name].type]!r}")
    static_ret = None if stub.returns is None else ast.unparse(stub.returns)
    runtime_ret = inspect.signature(fn).return_annotation
    runtime_ret = None if runtime_ret is inspect.Signature.empty else _text(runtime_ret)
    if static_ret != runtime_ret:
        problems.append(f"return annotation: stub {static_ret!r} != generated {runtime_ret!r}")
    return problems


def _signature_of(module, name: str) -> Signature:
    sigs = [v for v in vars(module).values() if isinstance(v, Signature) and v.name == name]
    assert len(sigs) == 1, f"{module.__name__}: no single Signature named {name!r}"
    return sigs[0]


def _generated_public_functions() -> dict[str, set[str]]:
    """Every public function of a ``torch_moe_ops.ops`` module that ``Signature`` generated (it carries the
    ``__source__`` the generator sets), by module."""
    found: dict[str, set[str]] = {}
    for info in pkgutil.iter_modules(torch_moe_ops.ops.__path__, "torch_moe_ops.ops."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (not name.startswith("_") and inspect.isfunction(value) and hasattr(value, "__source__")
                    and value.__module__ == module.__name__ and value.__name__ == name):
                found.setdefault(module.__name__, set()).add(name)
    return found


def test_every_generated_public_function_has_a_stub():
    """A new generated public function without a stub would again be parameterless to static tools."""
    assert _generated_public_functions() == {m: set(names) for m, names in STUBBED.items()}
    for module_name, names in STUBBED.items():
        module = importlib.import_module(module_name)
        source = Path(module.__file__).read_text()
        assert set(type_checking_stubs(source)) == set(names), module_name
        assert set(names) <= runtime_names(source), f"{module_name}: a stub without its runtime definition"


@pytest.mark.parametrize("module_name, name", [(m, n) for m, names in STUBBED.items() for n in names],
                         ids=[n for names in STUBBED.values() for n in names])
def test_stub_equals_generated_signature(module_name, name):
    module = importlib.import_module(module_name)
    stub = type_checking_stubs(Path(module.__file__).read_text())[name]
    fn = getattr(module, name)
    assert hasattr(fn, "__source__"), f"{module_name}.{name} at runtime is not the generated function"
    assert getattr(torch_moe_ops, name) is fn
    problems = mismatches(stub, fn, _signature_of(module, name))
    assert not problems, f"{module_name}: the TYPE_CHECKING stub of {name} differs from the generated function " \
                         "(update the stub):\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------------ the check itself
_SIG = Signature("_static_demo", torch_moe_ops.ops.signature.args(
    "Tensor x, int k, bool flag=True, Tensor? bias=None, *, float scale=1.0"), "Tensor")
_FN = _SIG.wrapper(2, "demo", __name__)
_GOOD = """
if TYPE_CHECKING:
    def _static_demo(x: torch.Tensor, k: int, *, flag: bool = True, bias: torch.Tensor | None = None,
                     scale: float = 1.0) -> torch.Tensor: ...
"""


@pytest.mark.parametrize("edit", [
    None,
    ("k: int, *", "*"),                                            # an argument removed
    ("scale: float = 1.0", "scale: float = 1.0, extra: int = 0"),  # an argument added
    ("flag: bool = True, bias: torch.Tensor | None = None", "bias: torch.Tensor | None = None, flag: bool = True"),
    ("k: int, *, flag: bool = True,", "k: int, flag: bool = True, *,"),  # keyword-only -> positional
    ("scale: float = 1.0", "scale: float = 1"),                    # default of another type
    ("flag: bool = True", "flag: bool = False"),                   # another default
    ("bias: torch.Tensor | None", "bias: torch.Tensor"),           # another annotation
    ("-> torch.Tensor", "-> tuple[torch.Tensor, torch.Tensor]"),   # another return annotation
], ids=["same", "removed", "added", "reordered", "kind", "default-type", "default", "annotation", "returns"])
def test_the_check_catches_each_difference(edit):
    source = textwrap.dedent(_GOOD) if edit is None else textwrap.dedent(_GOOD).replace(*edit)
    assert edit is None or source != textwrap.dedent(_GOOD), "the edit did not apply"
    stub = type_checking_stubs(source)["_static_demo"]
    assert (mismatches(stub, _FN, _SIG) == []) == (edit is None)
