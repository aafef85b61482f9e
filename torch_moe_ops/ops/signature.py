"""Op signatures, each written once (docs/design.md §8.3): the arguments of an op, in the schema language,
and everything derived from them.

``Signature(name, args("Tensor x, str activation=\\"silu\\", *, float? alpha=None"), "Tensor")`` gives:

- ``schema``: the string registered with ``torch.library`` (pinned by tests/ops/test_signature.py);
- ``Args``: a namedtuple of the arguments in schema order, the one object that the op's kernels, fake,
  checks and autograd formula receive (``a.w13``; ``tuple(a)`` is the schema order);
- ``define(cuda=, cpu=, fake=)``: the custom op, with each implementation a function of ``Args`` behind a
  generated function that has the schema's exact Python parameters (the dispatcher passes keyword-only
  arguments by name and drops trailing defaults, so the parameters must carry the defaults);
- ``wrapper(positional, doc)``: the public Python function: the first ``positional`` arguments positional,
  the rest keyword-only with the schema's defaults; it calls ``torch.ops.moe.<name>``;
- ``plan_key(tensor_key, device)``: a generated ``a -> (key, inputs)`` for launch plans;
- ``define_inference`` / ``inference_args(a)``: the lean twin for compiled graphs, its compact schema (every tensor
  positional, the other arguments in one ``str options``) and the arguments of a call to it;
- ``call(a, **named)``: the op called with arguments picked by name;
- for ``register_autograd``: ``bind`` (setup_context's inputs -> ``Args``), ``save`` / ``saved``,
  ``needs_input_grad`` (by name) and ``grads`` (a dict of gradients by name -> the positional tuple).

The generated functions are compiled once, at import; a call does no name binding or introspection.
"""
from __future__ import annotations

import ast
import collections
import functools
import json
import linecache
import re
from dataclasses import dataclass

import torch

from ._registry import NAMESPACE, define as define_op, define_inference, direct_call_ok, mark_traced

_REQUIRED = object()
#: schema type -> the public wrapper's annotation
_ANNOTATIONS = {"Tensor": "torch.Tensor", "Tensor?": "torch.Tensor | None", "int": "int", "int[]?": "list[int] | None",
                "float": "float", "float?": "float | None", "str": "str", "bool": "bool", "bool[]": "list[bool]"}
_ARG = re.compile(r"(?P<type>[\w\[\]?]+) (?P<name>\w+)(?:=(?P<default>.+))?$")


@dataclass(frozen=True)
class Arg:
    """One schema argument: ``type`` in the schema language (``Tensor?``, ``int[]?``), ``default`` the schema's
    text of the default (None: required), ``kw_only`` after the ``*``."""

    type: str
    name: str
    default: str | None = None
    kw_only: bool = False

    @property
    def tensor(self) -> bool:
        return self.type.startswith("Tensor")

    @property
    def sequence(self) -> bool:
        return "[]" in self.type

    @property
    def value(self):
        """The default as a Python value (``_REQUIRED`` when there is none)."""
        return _REQUIRED if self.default is None else ast.literal_eval(self.default)

    def text(self) -> str:
        return f"{self.type} {self.name}" + ("" if self.default is None else f"={self.default}")

    def required(self) -> Arg:
        """The same argument, positional and without a default (the backward op's form of an option)."""
        return Arg(self.type, self.name)


def args(text: str) -> tuple[Arg, ...]:
    """``"Tensor x, int[]? b=None, *, bool c=False"`` -> Args; the defaults are simple literals (no commas)."""
    out, kw_only = [], False
    for part in (p.strip() for p in text.split(",")):
        if part == "*":
            kw_only = True
            continue
        m = _ARG.match(part)
        if m is None or m["type"] not in _ANNOTATIONS:
            raise ValueError(f"not a schema argument: {part!r}")
        out.append(Arg(m["type"], m["name"], m["default"], kw_only))
    return tuple(out)


def _concrete(v):
    """A symbolic scalar guarded to its value (Python's int / float / bool of it); anything else as it is."""
    for sym, cast in ((torch.SymBool, bool), (torch.SymInt, int), (torch.SymFloat, float)):
        if isinstance(v, sym):
            return cast(v)
    return v


def _typed(arg: Arg, v):
    """A decoded option as the dispatcher would pass it (a JSON number that is a float argument is a float; a
    list an immutable tuple, since the decoded values are cached and shared)."""
    if v is None:
        return v
    return tuple(v) if arg.sequence else float(v) if arg.type.startswith("float") else v


class Signature:
    """An op's arguments and returns; see the module docstring."""

    def __init__(self, name: str, arguments, returns: str):
        self.name, self.args, self.returns = name, tuple(arguments), returns
        self.names = tuple(a.name for a in self.args)
        self.positional = tuple(a.name for a in self.args if not a.kw_only)
        self.keyword_only = self.names[len(self.positional):]
        assert all(a.kw_only for a in self.args[len(self.positional):]), f"{name}: a positional argument after '*'"
        self.tensors = tuple(a.name for a in self.args if a.tensor)
        parts = [a.text() for a in self.args[:len(self.positional)]]
        parts += ["*"] + [a.text() for a in self.args[len(self.positional):]] if self.keyword_only else []
        self.schema = f"({', '.join(parts)}) -> {returns}"
        self.Args = collections.namedtuple(f"{name.lstrip('_')}_args", self.names)
        self.Args.__doc__ = f"The arguments of moe::{name}{self.schema}"

    def __repr__(self) -> str:
        return f"Signature(moe::{self.name}{self.schema})"

    # -------------------------------------------------------------------------------------- generated code
    def _params(self, positional: int, annotate: bool = False, resolved=()) -> str:
        """Python parameters: the first ``positional`` names positional, the rest keyword-only; ``resolved``
        names default to None (the wrapper resolves them at call time)."""
        out = []
        for i, a in enumerate(self.args):
            if i == positional:
                out.append("*")
            ann = _ANNOTATIONS[a.type] + (" | None" if a.name in resolved else "")
            p = f"{a.name}: {ann!r}" if annotate else a.name
            default = None if a.name in resolved else a.value
            out.append(p if default is _REQUIRED else f"{p}={default!r}")
        return ", ".join(out)

    def _compile(self, source: str, fname: str, module: str, **env):
        namespace = dict(env, torch=torch, _Args=self.Args, _new=tuple.__new__)
        filename = f"<moe::{self.name} {fname}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show it
        exec(compile(source, filename, "exec", dont_inherit=True), namespace)
        fn = namespace[fname]
        fn.__module__, fn.__source__ = module, source
        return fn

    def function(self, impl, role: str):
        """``impl(a: Args)`` behind a function with the schema's Python parameters (for torch.library)."""
        fname = f"_{self.name.lstrip('_')}_{role}"
        source = (f"def {fname}({self._params(len(self.positional))}):\n"
                  f"    return _impl(_new(_Args, ({', '.join(self.names)},)))\n")
        fn = self._compile(source, fname, impl.__module__, _impl=impl)
        fn.__doc__ = impl.__doc__
        return fn

    def define(self, *, cuda, cpu, fake):
        """Register ``moe::<name>``: ``cuda``, ``cpu`` and ``fake`` are functions of ``Args``."""
        op = define_op(self.name, self.schema)(self.function(cuda, "cuda"))
        op.register_kernel("cpu")(self.function(cpu, "cpu"))
        op.register_fake(self.function(fake, "fake"))
        return op

    # -------------------------------------------------------------------------------------- the lean twin
    @functools.cached_property
    def inference_schema(self) -> str:
        """``(Tensor a, Tensor? b, ..., str options) -> <returns>``: the tensor arguments in schema order, none with
        a default, then every other argument in one string (``inference_args``). Inductor passes an argument that
        has a default by keyword, and the dispatcher matches keywords by name on every call: with the public
        schema a compiled call paid that for ~19 keywords (docs/host-overhead.md, "The lean op's schema")."""
        assert "options" not in self.names, f"moe::{self.name}: an argument is named 'options'"
        parts = [f"{a.type} {a.name}" for a in self.args if a.tensor]
        return f"({', '.join(parts + ['str options'])}) -> {self.returns}"

    def inference_args(self, a) -> tuple:
        """``Args`` -> the lean twin's arguments: the tensors, then ``options``, the other arguments as a JSON object
        in schema order (lists as lists; floats exact, NaN and infinities included). Symbolic values are guarded
        to their values here (they pick kernels, as the sizes do); the string is a constant of the graph, so a
        graph loaded from torch's caches in another process still says everything."""
        options = {}
        for arg in self.args:
            if not arg.tensor:
                v = getattr(a, arg.name)
                options[arg.name] = [_concrete(x) for x in v] if arg.sequence and v is not None else _concrete(v)
        return (*(getattr(a, n) for n in self.tensors), json.dumps(options, separators=(",", ":")))

    @functools.cached_property
    def decode_options(self):
        """``options`` -> the other arguments' values in schema order (cached per string)."""
        others = tuple(a for a in self.args if not a.tensor)

        @functools.lru_cache(maxsize=1024)
        def decode(options: str) -> tuple:
            try:
                values = json.loads(options)
            except ValueError:
                values = None
            names = tuple(a.name for a in others)
            if not isinstance(values, dict) or tuple(values) != names:
                got = list(values) if isinstance(values, dict) else f"{options[:80]!r}, not a JSON object"
                raise RuntimeError(f"moe::_{self.name.lstrip('_')}_inference: options must name {list(names)} in "
                                   f"that order, got {got} (a graph compiled by another version of torch_moe_ops? "
                                   "removing torch's compile cache, TORCHINDUCTOR_CACHE_DIR, rebuilds it)")
            return tuple(_typed(a, values[a.name]) for a in others)

        return decode

    def inference_function(self, impl, role: str):
        """``impl(a: Args)`` behind a function with the lean twin's parameters."""
        fname = f"_{self.name.lstrip('_')}_{role}"
        others = [a.name for a in self.args if not a.tensor]
        source = (f"def {fname}({', '.join(self.tensors)}, options):\n"
                  f"    {', '.join(others)}, = _decode(options)\n"
                  f"    return _impl(_new(_Args, ({', '.join(self.names)},)))\n")
        fn = self._compile(source, fname, impl.__module__, _impl=impl, _decode=self.decode_options)
        fn.__doc__ = impl.__doc__
        return fn

    def define_inference(self, *, cuda, fake):
        """The lean inference twin ``moe::_<name>_inference`` (``inference_schema``; CUDA kernel and fake only:
        see ``_registry.define_inference``); returns its ``OpOverload``."""
        name = f"_{self.name.lstrip('_')}_inference"
        return define_inference(name, self.inference_schema, self.inference_function(cuda, "cuda_inference"),
                                self.inference_function(fake, "fake_inference"))

    def wrapper(self, positional: int, doc: str, module: str, cuda=None, resolve=None):
        """The public function ``name(<positional args>, *, <the rest>)`` calling ``torch.ops.moe.<name>``.
        ``cuda`` (the op's CUDA kernel, a function of ``Args``) is called directly, skipping the dispatcher,
        when ``_registry.direct_call_ok`` says the dispatcher would do nothing else. ``resolve``: {argument
        name: function}; those arguments default to None in the wrapper and pass through the function first
        (``batch_invariant``: None follows the process-wide switch, read in code Dynamo traces and guards)."""
        resolve = dict(resolve or {})
        assert set(resolve) <= set(self.names), f"moe::{self.name}: resolve names {sorted(resolve)}"
        pos, kw = self.positional, self.keyword_only
        call = ", ".join([*pos, *(f"{n}={n}" for n in kw)])
        n_out = self.returns.count("Tensor")
        ret = "torch.Tensor" if self.returns == "Tensor" else f"tuple[{', '.join(['torch.Tensor'] * n_out)}]"
        direct = ""
        if cuda is not None:
            direct = (f"    if _direct_ok({', '.join(self.tensors)}):\n"
                      f"        return _cuda(_new(_Args, ({', '.join(self.names)},)))\n")
        pre = "".join(f"    {n} = _resolve_{n}({n})\n" for n in resolve)
        source = (f"def {self.name}({self._params(positional, annotate=True, resolved=resolve)}) -> {ret!r}:\n"
                  f"{pre}{direct}    if _compiling():\n        _mark()\n"
                  f"    return torch.ops.{NAMESPACE}.{self.name}({call})\n")
        fn = self._compile(source, self.name, module, _cuda=cuda, _direct_ok=direct_call_ok,
                           _compiling=torch.compiler.is_compiling, _mark=mark_traced,
                           **{f"_resolve_{n}": f for n, f in resolve.items()})
        fn.__doc__ = doc
        return fn

    def plan_key(self, tensor_key, device):
        """A generated ``a -> (key, inputs)``: ``inputs`` the tensor arguments in schema order (None where
        absent), ``key`` = (name, ``tensor_key`` of each input, every other argument in schema order (lists
        as tuples), ``device()``)."""
        others = [f"None if {a.name} is None else tuple({a.name})" if a.sequence else a.name
                  for a in self.args if not a.tensor]
        key = [repr(self.name), *(f"_tensor_key({n})" for n in self.tensors), *others, "_device()"]
        source = (f"def plan_key(a):\n"
                  f"    {', '.join(self.names)}, = a\n"
                  f"    return ({', '.join(key)}), [{', '.join(self.tensors)}]\n")
        return self._compile(source, "plan_key", __name__, _tensor_key=tensor_key, _device=device)

    # -------------------------------------------------------------------------------------- calls by name
    def call(self, a, **named):
        """``torch.ops.moe.<name>`` with each argument from ``named``, else ``a``'s attribute of that name."""
        pick = [named[n] if n in named else getattr(a, n) for n in self.names]
        n = len(self.positional)
        return getattr(getattr(torch.ops, NAMESPACE), self.name)(*pick[:n], **dict(zip(self.keyword_only, pick[n:])))

    # -------------------------------------------------------------------------------------- autograd
    def bind(self, inputs, keyword_only_inputs) -> tuple:
        """setup_context's ``inputs`` (every positional argument, defaults filled) and
        ``keyword_only_inputs`` -> ``Args``."""
        return self.Args(*inputs, *(keyword_only_inputs[n] for n in self.keyword_only))

    def save(self, ctx, a, *extra) -> None:
        """``save_for_backward`` of every tensor argument (then ``extra``); the others stay on ``ctx``."""
        ctx.save_for_backward(*(getattr(a, n) for n in self.tensors), *extra)
        ctx.op_args = a._replace(**dict.fromkeys(self.tensors))

    def saved(self, ctx) -> tuple:
        """-> (``Args`` with the saved tensors back, the saved ``extra`` tensors)."""
        saved = ctx.saved_tensors
        n = len(self.tensors)
        return ctx.op_args._replace(**dict(zip(self.tensors, saved[:n]))), saved[n:]

    def needs_input_grad(self, ctx) -> dict[str, bool]:
        """``ctx.needs_input_grad`` by name. The dispatcher drops trailing positional arguments equal to
        their defaults; those (None tensors, scalars) need no gradient."""
        n = tuple(ctx.needs_input_grad)
        return dict(zip(self.positional, n + (False,) * (len(self.positional) - len(n))))

    def grads(self, grads: dict) -> tuple:
        """Gradients by name -> one per positional argument (None where absent); the extra ones for
        arguments the dispatcher dropped are ignored by autograd."""
        unknown = set(grads) - set(self.positional)
        assert not unknown, f"moe::{self.name} has no positional argument {sorted(unknown)}"
        return tuple(grads.get(n) for n in self.positional)
