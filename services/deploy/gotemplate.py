"""The subset of Go's text/template (as consul-template, Nomad's ``template`` renderer, extends it) that Chiron's
Nomad job files use, rendered locally.

Grammar (https://pkg.go.dev/text/template): text and ``{{ action }}`` (``{{-`` / ``-}}`` trim the white space
beside them); actions ``range PIPELINE``, ``range $x := PIPELINE``, ``range $i, $x := PIPELINE``, ``if``,
``with``, ``else``, ``end``, and output of a pipeline. Terms: ``.``, ``.Field.Sub``, ``$``, ``$x``, ``$x.Field``,
string literals (``"..."`` with Go escapes, or `` `raw` ``), integers, ``( pipeline )``; ``a | f b`` passes ``a``
as ``f``'s last argument.

Functions: ``env "NAME"`` (the task's environment; "" when unset, as consul-template's ``env``), ``service
"NAME"`` (the healthy instances of a Consul service, each with ``Address``, ``Port``, ``Name``, ``ID``,
``Tags``; https://developer.hashicorp.com/nomad/docs/job-specification/template#consul-integration), ``eq``,
``ne``, ``printf`` (``%s``, ``%d``, ``%v``), ``len``. Any other function (``pkiCert``, ``secret``, ``nomadVar``,
…) raises :class:`TemplateError` naming it: those need Vault or Nomad variables, which a local rehearsal does not
have.

``service`` look-ups go through a callable: consul-template blocks a template until the service it lists has
healthy instances; the callable models that by raising :class:`ServiceNotReady` (the caller retries).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.deploy.lexing import tokens


class TemplateError(ValueError):
    """A template this renderer cannot parse or evaluate (the message says what and where)."""


class ServiceNotReady(Exception):
    """``service "NAME"`` has no healthy instance yet; ``name`` is the service."""

    def __init__(self, name: str) -> None:
        super().__init__(f"service {name!r} has no healthy instance yet")
        self.name = name


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TERM = re.compile(r"""\s*(?:
    (?P<str>"(?:[^"\\]|\\.)*") | (?P<raw>`[^`]*`) |
    (?P<num>-?\d+) |
    (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*) |
    (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.) |
    (?P<op>:=|[|(),=]) |
    (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
)""", re.VERBOSE)


@dataclass
class _Node:
    kind: str  # text | out | range | if | with
    text: str = ""
    pipeline: list[tuple[str, str]] = field(default_factory=list)
    decl: list[str] = field(default_factory=list)
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


def _lex(expr: str) -> list[tuple[str, str]]:
    expr = expr.strip()
    return tokens(_TERM, expr, lambda pos: TemplateError(f"cannot read {expr[pos:pos + 20]!r} in {{{{ {expr} }}}}"))


def parse(text: str) -> list[_Node]:
    """Parse a template into its node tree. Raises :class:`TemplateError`."""
    items: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(text):
        chunk = text[pos:m.start()]
        if m.group(1):
            chunk = chunk.rstrip()
        if items and items[-1][0] == "trim-right":
            items.pop()
            chunk = chunk.lstrip()
        items.append(("text", chunk))
        items.append(("action", m.group(2).strip()))
        if m.group(3):
            items.append(("trim-right", ""))
        pos = m.end()
    tail = text[pos:]
    if items and items[-1][0] == "trim-right":
        items.pop()
        tail = tail.lstrip()
    items.append(("text", tail))
    if "{{" in tail:
        raise TemplateError(f"unclosed action: {tail[tail.index('{{'):][:40]!r}")

    root: list[_Node] = []
    stack: list[tuple[_Node | None, list[_Node]]] = [(None, root)]
    for kind, body in items:
        current = stack[-1][1]
        if kind == "text":
            if body:
                current.append(_Node("text", text=body))
            continue
        if body.startswith("/*"):
            continue  # a comment
        word = body.split(None, 1)[0] if body else ""
        rest = body[len(word):].strip()
        if word in ("range", "if", "with"):
            toks = _lex(rest)
            decl: list[str] = []
            if word == "range" and any(t == ":=" for _, t in toks):
                i = [t for _, t in toks].index(":=")
                decl = [t for k, t in toks[:i] if k == "var"]
                toks = toks[i + 1:]
            node = _Node(word, pipeline=toks, decl=decl)
            current.append(node)
            stack.append((node, node.body))
        elif word == "else":
            node = stack[-1][0]
            if node is None:
                raise TemplateError("{{ else }} outside range/if/with")
            stack[-1] = (node, node.orelse)
        elif word == "end":
            if len(stack) == 1:
                raise TemplateError("{{ end }} without range/if/with")
            stack.pop()
        else:
            current.append(_Node("out", pipeline=_lex(body)))
    if len(stack) != 1:
        raise TemplateError(f"{{{{ {stack[-1][0].kind if stack[-1][0] else ''} }}}} without {{{{ end }}}}")
    return root


@dataclass
class Context:
    """What a template sees: ``env`` (the task's environment) and ``service`` (name → instances, or raises
    :class:`ServiceNotReady`)."""

    env: Mapping[str, str]
    service: Callable[[str], Sequence[Mapping[str, Any]]]


def _go_unquote(s: str) -> str:
    return s[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in s else s[1:-1]


def _printf(fmt: str, *args: Any) -> str:
    it = iter(args)
    return re.sub(r"%[svd%]", lambda m: "%" if m.group(0) == "%%" else str(next(it, "")), fmt)


def _field(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        if name not in value:
            raise TemplateError(f"no field {name!r} (fields: {', '.join(map(str, value))})")
        return value[name]
    try:
        return getattr(value, name)
    except AttributeError:
        raise TemplateError(f"no field {name!r} on {type(value).__name__}") from None


class _Eval:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.funcs: dict[str, Callable[..., Any]] = {
            "env": lambda name: ctx.env.get(str(name), ""),
            "service": lambda name: list(ctx.service(str(name))),
            "eq": lambda a, *bs: any(a == b for b in bs),
            "ne": lambda a, b: a != b,
            "printf": _printf,
            "len": len,
        }

    def term(self, tok: tuple[str, str], dot: Any, scope: Mapping[str, Any]) -> Any:
        kind, t = tok
        if kind == "str":
            return _go_unquote(t)
        if kind == "raw":
            return t[1:-1]
        if kind == "num":
            return int(t)
        if kind == "field":
            v = dot
            for name in filter(None, t.split(".")):
                v = _field(v, name)
            return v
        if kind == "var":
            name, *path = t.split(".")
            if name not in scope:
                raise TemplateError(f"undefined variable {name}")
            v = scope[name]
            for p in path:
                v = _field(v, p)
            return v
        if kind == "ident":
            if t in ("true", "false"):
                return t == "true"
            raise TemplateError(f"function {t!r} used as a value")
        raise TemplateError(f"unexpected {t!r}")

    def pipeline(self, toks: list[tuple[str, str]], dot: Any, scope: Mapping[str, Any]) -> Any:
        # Split on top-level '|'; each command: function + args, or a single term.
        commands: list[list[tuple[str, str]]] = [[]]
        depth = 0
        for tok in toks:
            if tok[1] == "(":
                depth += 1
            elif tok[1] == ")":
                depth -= 1
            if tok[1] == "|" and depth == 0:
                commands.append([])
            else:
                commands[-1].append(tok)
        value: Any = None
        for i, cmd in enumerate(commands):
            value = self.command(cmd, dot, scope, piped=(value,) if i else ())
        return value

    def args(self, toks: list[tuple[str, str]], dot: Any, scope: Mapping[str, Any]) -> list[Any]:
        out, i = [], 0
        while i < len(toks):
            if toks[i][1] == "(":
                depth, j = 1, i + 1
                while depth:
                    if j >= len(toks):
                        raise TemplateError("unbalanced parentheses")
                    depth += {"(": 1, ")": -1}.get(toks[j][1], 0)
                    j += 1
                out.append(self.pipeline(toks[i + 1:j - 1], dot, scope))
                i = j
            else:
                out.append(self.term(toks[i], dot, scope))
                i += 1
        return out

    def command(self, toks: list[tuple[str, str]], dot: Any, scope: Mapping[str, Any], piped: tuple = ()) -> Any:
        if not toks:
            raise TemplateError("empty command")
        kind, name = toks[0]
        if kind == "ident" and name not in ("true", "false"):
            fn = self.funcs.get(name)
            if fn is None:
                raise TemplateError(f"template function {name!r} is not available here (it needs Vault, Nomad "
                                    f"variables or another service the local rehearsal does not provide)")
            try:
                return fn(*self.args(toks[1:], dot, scope), *piped)
            except TypeError as e:
                raise TemplateError(f"{name}: {e}") from None
        vals = self.args(toks, dot, scope)
        if len(vals) != 1 or piped:
            raise TemplateError(f"cannot call a non-function ({toks[0][1]!r})")
        return vals[0]

    def run(self, nodes: list[_Node], dot: Any, scope: dict[str, Any], out: list[str]) -> None:
        for n in nodes:
            if n.kind == "text":
                out.append(n.text)
            elif n.kind == "out":
                v = self.pipeline(n.pipeline, dot, scope)
                out.append("" if v is None else str(v))
            elif n.kind in ("if", "with"):
                v = self.pipeline(n.pipeline, dot, scope)
                if v:
                    self.run(n.body, v if n.kind == "with" else dot, dict(scope), out)
                else:
                    self.run(n.orelse, dot, dict(scope), out)
            elif n.kind == "range":
                v = self.pipeline(n.pipeline, dot, scope)
                items = list(v.items()) if isinstance(v, Mapping) else list(enumerate(v or []))
                if not items:
                    self.run(n.orelse, dot, dict(scope), out)
                for k, item in items:
                    inner = dict(scope)
                    if len(n.decl) == 1:
                        inner[n.decl[0]] = item
                    elif len(n.decl) == 2:
                        inner[n.decl[0]], inner[n.decl[1]] = k, item
                    self.run(n.body, item, inner, out)


def render(text: str, ctx: Context) -> str:
    """Render ``text`` with ``ctx``. Raises :class:`TemplateError` (syntax, unknown function or field) or
    :class:`ServiceNotReady` (a listed service has no healthy instance yet)."""
    out: list[str] = []
    ev = _Eval(ctx)
    ev.run(parse(text), None, {"$": None}, out)
    return "".join(out)


def services_used(text: str) -> list[str]:
    """The Consul services ``text`` looks up with ``service "NAME"`` (literal names)."""
    return re.findall(r'\bservice\s+"([^"]+)"', text)


def parse_env_file(text: str) -> dict[str, str]:
    """A rendered ``env = true`` template read as Nomad reads it: ``KEY=VALUE`` lines, blank lines and ``#``
    comments skipped, surrounding quotes of a value removed
    (https://developer.hashicorp.com/nomad/docs/job-specification/template#environment-variables).
    Raises :class:`TemplateError` for a line without ``=``."""
    env: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].strip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise TemplateError(f"line {n} of an env template is not KEY=VALUE: {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env
