"""Nomad job files (HCL2) read and rendered the way ``nomad job run`` renders them, for the subset Chiron's job
files use (``deploy/nomad/*.nomad.hcl``).

Parsing is python-hcl2's (:func:`load_job_spec`; the same library ``tests/test_nomad.py`` uses); this module then
evaluates what Nomad's HCL2 front end evaluates at submission
(https://developer.hashicorp.com/nomad/docs/job-specification/hcl2):

* ``variable`` blocks: the ``default``, replaced by ``-var NAME=VALUE`` overrides (:func:`render_job_file`'s
  ``variables``), converted to the variable's ``type`` (``string``, ``number``, ``bool``, ``list(...)``) as the
  ``-var`` flag does; a variable with neither is an error, and so is an override of an undeclared variable;
* ``locals`` (in order, each may use variables and earlier locals);
* expressions in ``${...}``: ``var.X``, ``local.X``, a dynamic block's iterator (``template.value.X``,
  ``template.key``), literals (strings, numbers, ``true``/``false``, lists), ``==``/``!=``, ``!``, ``&&``/``||``
  and the conditional ``c ? a : b``; an expression that is a whole string keeps its type, one inside a string is
  written into it;
* ``dynamic "LABEL" { for_each = ...; labels = [...]; content { ... } }`` blocks, expanded into ``LABEL``
  blocks (named by ``labels`` where given, e.g. ``group`` blocks).

References Nomad leaves for the client (runtime interpolation,
https://developer.hashicorp.com/nomad/docs/runtime/interpolation) stay in the text as ``${NAME}``:
``${NOMAD_PORT_grpc}``, ``${NOMAD_ALLOC_ID}``, variables that ``env = true`` templates define, and node
attributes such as ``${device.model}``. :func:`interpolate_runtime` replaces them once an allocation's
environment is known.

The rendered job is a tree of small dataclasses (:class:`JobSpec` → :class:`GroupSpec` → :class:`TaskSpec`).
Errors are :class:`JobFileError` with the file and, where there is one, the group and task.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
from hcl2 import SerializationOptions

from services.deploy.lexing import tokens

_HCL_OPTIONS = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_RUNTIME_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.\-\[\]\"]*)\}")


class JobFileError(ValueError):
    """A job file that cannot be read, parsed or rendered. ``file``, ``group``, ``task``: where; ``reason``:
    why (one line). ``str()`` names all of them."""

    def __init__(self, file: str | Path, reason: str, *, group: str | None = None, task: str | None = None) -> None:
        self.file, self.reason, self.group, self.task = str(file), reason, group, task
        where = self.file + (f", group {group!r}" if group else "") + (f", task {task!r}" if task else "")
        super().__init__(f"{where}: {reason}")


class ExpressionError(ValueError):
    """An HCL expression this renderer cannot evaluate (syntax, unknown reference)."""


def load_job_spec(path: str | Path) -> dict[str, Any]:
    """Parse a Nomad job file with python-hcl2 into a dict (``variable``, ``locals`` and ``job`` lists of blocks).
    Raises whatever python-hcl2 raises for a file that does not parse."""
    with open(path, encoding="utf-8") as f:
        return hcl2.load(f, serialization_options=_HCL_OPTIONS)


def variable_defaults(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: default}`` of the file's ``variable`` blocks (those without a default are left out)."""
    out: dict[str, Any] = {}
    for block in spec.get("variable", []):
        for name, body in block.items():
            if "default" in body:
                out[name] = body["default"]
    return out


def parse_duration_s(text: Any) -> float:
    """A Go duration (``"45s"``, ``"1m30s"``, ``"500ms"``) in seconds. Raises ValueError."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text) / 1e9  # a bare number in a Nomad duration field is nanoseconds
    s = str(text).strip()
    parts = _DURATION.findall(s)
    if not s or "".join(n + u for n, u in parts) != s:
        raise ValueError(f"not a duration: {text!r} (e.g. '30s', '1m30s')")
    return sum(float(n) * _DURATION_S[u] for n, u in parts)


# ------------------------------------------------------------------------------------------------ expressions

_TOKEN = re.compile(r"""\s*(?:
    (?P<num>\d+(?:\.\d+)?) |
    (?P<str>"(?:[^"\\]|\\.)*") |
    (?P<op>==|!=|&&|\|\||[?:\[\](),!.]) |
    (?P<name>[A-Za-z_][A-Za-z0-9_\-]*)
)""", re.VERBOSE)


def _tokens(text: str) -> list[tuple[str, str]]:
    text = text.strip()
    return tokens(_TOKEN, text, lambda pos: ExpressionError(f"cannot read {text[pos:pos + 20]!r} in expression {text!r}"))


class _Unresolved(Exception):
    """A reference this stage leaves alone (runtime interpolation: ``${NOMAD_PORT_grpc}``, ``${device.model}``)."""


class _Parser:
    """Recursive descent over the tokens of one ``${...}`` expression, evaluating as it goes."""

    def __init__(self, text: str, scope: Mapping[str, Any]) -> None:
        self.text, self.toks, self.i, self.scope = text, _tokens(text), 0, scope

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self, expect: str | None = None) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise ExpressionError(f"unexpected end of expression {self.text!r}")
        tok = self.toks[self.i]
        if expect is not None and tok[1] != expect:
            raise ExpressionError(f"expected {expect!r}, got {tok[1]!r} in expression {self.text!r}")
        self.i += 1
        return tok

    def parse(self) -> Any:
        v = self.conditional()
        if self.i != len(self.toks):
            raise ExpressionError(f"unexpected {self.peek()!r} in expression {self.text!r}")
        return v

    def conditional(self) -> Any:
        cond = self.or_()
        if self.peek() == "?":
            self.take("?")
            a = self.conditional()
            self.take(":")
            b = self.conditional()
            if not isinstance(cond, bool):
                raise ExpressionError(f"condition is not a bool ({cond!r}) in expression {self.text!r}")
            return a if cond else b
        return cond

    def or_(self) -> Any:
        v = self.and_()
        while self.peek() == "||":
            self.take()
            w = self.and_()
            v = bool(v) or bool(w)
        return v

    def and_(self) -> Any:
        v = self.equality()
        while self.peek() == "&&":
            self.take()
            w = self.equality()
            v = bool(v) and bool(w)
        return v

    def equality(self) -> Any:
        v = self.unary()
        while self.peek() in ("==", "!="):
            op = self.take()[1]
            w = self.unary()
            v = (v == w) if op == "==" else (v != w)
        return v

    def unary(self) -> Any:
        if self.peek() == "!":
            self.take()
            return not self.unary()
        return self.primary()

    def primary(self) -> Any:
        kind, tok = self.take()
        if kind == "num":
            return float(tok) if "." in tok else int(tok)
        if kind == "str":
            return _unquote_hcl(tok[1:-1], self.scope)
        if tok == "(":
            v = self.conditional()
            self.take(")")
            return v
        if tok == "[":
            items = []
            while self.peek() != "]":
                items.append(self.conditional())
                if self.peek() == ",":
                    self.take(",")
            self.take("]")
            return items
        if kind == "name":
            if tok in ("true", "false"):
                return tok == "true"
            if tok == "null":
                return None
            return self.reference(tok)
        raise ExpressionError(f"unexpected {tok!r} in expression {self.text!r}")

    def reference(self, root: str) -> Any:
        path = [root]
        while self.peek() in (".", "["):
            if self.take()[1] == ".":
                path.append(self.take()[1])
            else:
                path.append(self.conditional())
                self.take("]")
        if root not in self.scope:
            raise _Unresolved(".".join(map(str, path)))
        value: Any = self.scope[root]
        for i, key in enumerate(path[1:], start=1):
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                raise ExpressionError(f"{'.'.join(map(str, path[:i + 1]))} is not defined "
                                      f"(in expression {self.text!r})") from None
        return value


def _unquote_hcl(body: str, scope: Mapping[str, Any]) -> str:
    """The value of a quoted HCL string literal inside an expression: escapes, then its own interpolations."""
    text = body.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in body else body
    return interpolate(text, scope)


def _split_interpolations(text: str) -> list[tuple[str, str]]:
    """``[("text", ...), ("expr", ...)]`` for a template string: ``${...}`` sequences (matching braces and quotes)
    and literal text; ``$${`` is a literal ``${``."""
    parts: list[tuple[str, str]] = []
    buf, i = [], 0
    while i < len(text):
        if text.startswith("$${", i):
            buf.append("${")
            i += 3
            continue
        if text.startswith("${", i):
            depth, j, quote = 1, i + 2, False
            while j < len(text) and depth:
                c = text[j]
                if quote:
                    if c == "\\":
                        j += 1
                    elif c == '"':
                        quote = False
                elif c == '"':
                    quote = True
                elif c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                j += 1
            if depth:
                raise ExpressionError(f"unterminated ${{ in {text!r}")
            if buf:
                parts.append(("text", "".join(buf)))
                buf = []
            parts.append(("expr", text[i + 2:j - 1]))
            i = j
            continue
        buf.append(text[i])
        i += 1
    if buf:
        parts.append(("text", "".join(buf)))
    return parts


def _stringify(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, list | dict):
        raise ExpressionError(f"cannot write a {type(v).__name__} into a string")
    return str(v)


def interpolate(text: str, scope: Mapping[str, Any]) -> Any:
    """Evaluate the ``${...}`` expressions of ``text`` that ``scope`` resolves (roots: ``var``, ``local``,
    iterators). A string that is exactly one expression evaluates to its typed value; references outside
    ``scope`` (runtime interpolation) are kept verbatim. Raises :class:`ExpressionError`."""
    parts = _split_interpolations(text)
    if len(parts) == 1 and parts[0][0] == "expr":
        try:
            return _Parser(parts[0][1], scope).parse()
        except _Unresolved:
            return text
    out = []
    for kind, body in parts:
        if kind == "text":
            out.append(body)
            continue
        try:
            out.append(_stringify(_Parser(body, scope).parse()))
        except _Unresolved:
            out.append("${" + body + "}")
    return "".join(out)


def evaluate(value: Any, scope: Mapping[str, Any]) -> Any:
    """Evaluate every string of a parsed HCL body (dicts and lists, recursively) and expand its ``dynamic``
    blocks (:func:`interpolate`)."""
    if isinstance(value, str):
        return interpolate(value, scope)
    if isinstance(value, list):
        return [evaluate(v, scope) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, v in value.items():
            if key == "dynamic":
                for block in v:
                    for label, body in block.items():
                        out.setdefault(label, []).extend(_expand_dynamic(label, body, scope))
                continue
            ev = evaluate(v, scope)
            if isinstance(out.get(key), list) and isinstance(ev, list):
                out[key] = ev + out[key]  # static blocks and those a dynamic block made
            else:
                out[key] = ev
        return out
    return value


def _expand_dynamic(label: str, body: Mapping[str, Any], scope: Mapping[str, Any]) -> list[Any]:
    """The ``label`` blocks a ``dynamic "label"`` block generates: ``content`` once per ``for_each`` element,
    with the iterator (``iterator``, default the label) bound to ``{key, value}``; ``labels`` (evaluated with the
    iterator) name each generated block, as a labeled block's names (``group "NAME"``)."""
    items = interpolate(body["for_each"], scope) if isinstance(body.get("for_each"), str) else body.get("for_each")
    if isinstance(items, str):
        raise ExpressionError(f"dynamic {label!r}: for_each {body.get('for_each')!r} does not evaluate here")
    if isinstance(items, dict):
        pairs = list(items.items())
    elif isinstance(items, list):
        pairs = list(enumerate(items))
    else:
        raise ExpressionError(f"dynamic {label!r}: for_each must be a list or map, got {items!r}")
    iterator = body.get("iterator", label)
    contents = body.get("content") or [{}]
    out = []
    for key, item in pairs:
        inner = {**scope, iterator: {"key": key, "value": item}}
        names = [_stringify(interpolate(n, inner)) for n in body.get("labels", [])]
        for content in contents:
            block = evaluate(content, inner)
            for name in reversed(names):
                block = {name: block}
            out.append(block)
    return out


# ------------------------------------------------------------------------------------------------ variables

def _convert_var(name: str, type_expr: Any, raw: str) -> Any:
    """A ``-var NAME=VALUE`` string converted to the variable's declared type, as ``nomad job run -var`` does."""
    t = str(type_expr or "string").replace("${", "").replace("}", "").strip()
    if t == "string":
        return raw
    if t == "number":
        try:
            f = float(raw)
        except ValueError:
            raise ExpressionError(f"variable {name!r} is a number; got {raw!r}") from None
        return int(f) if f.is_integer() and "." not in raw else f
    if t == "bool":
        if raw not in ("true", "false"):
            raise ExpressionError(f"variable {name!r} is a bool (true or false); got {raw!r}")
        return raw == "true"
    try:  # list(string), map(...): an HCL expression
        return _Parser(raw, {}).parse()
    except (ExpressionError, _Unresolved) as e:
        raise ExpressionError(f"variable {name!r} of type {t}: cannot read {raw!r}: {e}") from None


def resolve_variables(spec: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The file's variables: defaults, replaced by ``overrides`` (strings are converted to the declared type; other
    values are taken as they are). Raises :class:`ExpressionError` for an override of an undeclared variable or a
    variable left without a value."""
    declared: dict[str, Mapping[str, Any]] = {}
    for block in spec.get("variable", []):
        declared.update(block)
    values: dict[str, Any] = {}
    for name, body in declared.items():
        if "default" in body:
            values[name] = evaluate(body["default"], {})
    for name, raw in (overrides or {}).items():
        if name not in declared:
            raise ExpressionError(f"-var {name}: no variable {name!r} is declared in this file")
        values[name] = _convert_var(name, declared[name].get("type"), raw) if isinstance(raw, str) else raw
    missing = sorted(set(declared) - set(values))
    if missing:
        raise ExpressionError(f"variable(s) {', '.join(missing)} have no default and were not set (-var NAME=VALUE)")
    return values


def resolve_locals(spec: Mapping[str, Any], variables: Mapping[str, Any]) -> dict[str, Any]:
    """The file's ``locals``, evaluated in order."""
    local: dict[str, Any] = {}
    for block in spec.get("locals", []):
        for name, value in block.items():
            local[name] = evaluate(value, {"var": variables, "local": local})
    return local


# ------------------------------------------------------------------------------------------------ rendered jobs

@dataclass
class CheckSpec:
    """A service check. ``type``: grpc, http or tcp; ``port``: port label; ``path`` (http), ``grpc_service``
    (grpc); ``interval_s`` and ``timeout_s`` [s]."""

    type: str
    port: str
    path: str = "/"
    protocol: str = "http"
    grpc_service: str = ""
    interval_s: float = 10.0
    timeout_s: float = 2.0


@dataclass
class ServiceSpec:
    """A ``service`` block: ``name`` (the Consul service), ``port`` label, ``tags``, ``checks``."""

    name: str
    port: str
    tags: list[str] = field(default_factory=list)
    checks: list[CheckSpec] = field(default_factory=list)


@dataclass
class TemplateSpec:
    """A ``template`` block: ``data`` (Go template text), ``destination`` (relative to the task directory),
    ``env`` (the rendered file is read as ``KEY=VALUE`` lines into the task's environment)."""

    data: str
    destination: str
    env: bool = False
    change_mode: str = "restart"


@dataclass
class TaskSpec:
    """A rendered task. ``command`` and ``args``: the driver config (runtime references still ``${...}``);
    ``env``: the ``env`` block; ``kill_signal``; ``kill_timeout_s`` and ``shutdown_delay_s`` [s] (Nomad's
    defaults: 5 s and 0 s, https://developer.hashicorp.com/nomad/docs/job-specification/task);
    ``identity_env``: ``identity { env = true }`` (a workload-identity token in ``NOMAD_TOKEN``)."""

    name: str
    driver: str
    command: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    templates: list[TemplateSpec] = field(default_factory=list)
    services: list[ServiceSpec] = field(default_factory=list)
    kill_signal: str = "SIGINT"
    kill_timeout_s: float = 5.0
    shutdown_delay_s: float = 0.0
    identity_env: bool = False

    def command_line(self) -> list[str]:
        return [self.command, *self.args]

    def runtime_command(self, env: Mapping[str, str]) -> tuple[list[str], list[str]]:
        """The command line with Nomad's runtime references filled from ``env`` (:func:`interpolate_runtime`):
        ``(argv, names of the references env does not define)``."""
        argv, missing = [], []
        for part in self.command_line():
            text, miss = interpolate_runtime(part, env)
            argv.append(text)
            missing += miss
        return argv, missing


@dataclass
class GroupSpec:
    """A task group: ``count``, ``scaling`` ``(min, max, enabled)`` or None, ``ports`` (label → static port, or
    None for a dynamic one), group-level ``services``, ``tasks``, ``shutdown_delay_s`` [s]."""

    name: str
    count: int
    scaling: tuple[int, int, bool] | None
    ports: dict[str, int | None]
    services: list[ServiceSpec]
    tasks: list[TaskSpec]
    shutdown_delay_s: float = 0.0


@dataclass
class JobSpec:
    """A rendered job: ``id``, ``file`` it came from, ``variables`` it was rendered with, ``groups``."""

    id: str
    file: str
    variables: dict[str, Any]
    groups: dict[str, GroupSpec]
    type: str = "service"


def _blocks(body: Mapping[str, Any], key: str) -> list[Any]:
    v = body.get(key, [])
    return v if isinstance(v, list) else [v]


def _labeled(body: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {name: b for block in _blocks(body, key) for name, b in block.items()}


def _dynamic_groups(raw_job: Mapping[str, Any], scope: Mapping[str, Any]) -> dict[str, Any]:
    """The job's ``dynamic "group"`` blocks expanded: group name (its ``labels``) -> evaluated group body."""
    made: dict[str, Any] = {}
    for block in _blocks(raw_job, "dynamic"):
        if "group" in block:
            for group in _expand_dynamic("group", block["group"], scope):
                made.update(group)
    return made


def _service(s: Mapping[str, Any]) -> ServiceSpec:
    checks = []
    for c in _blocks(s, "check"):
        checks.append(CheckSpec(type=str(c.get("type", "tcp")), port=str(c.get("port", s.get("port", ""))),
                                path=str(c.get("path", "/")), protocol=str(c.get("protocol", "http")),
                                grpc_service=str(c.get("grpc_service", "")),
                                interval_s=parse_duration_s(c.get("interval", "10s")),
                                timeout_s=parse_duration_s(c.get("timeout", "2s"))))
    return ServiceSpec(name=str(s["name"]), port=str(s.get("port", "")), tags=[str(t) for t in s.get("tags", [])],
                       checks=checks)


def _task(name: str, t: Mapping[str, Any]) -> TaskSpec:
    config = (_blocks(t, "config") or [{}])[0]
    if "command" not in config:
        raise ValueError("config has no command")
    env: dict[str, str] = {}
    for block in _blocks(t, "env"):
        env.update({str(k): _stringify(v) for k, v in block.items()})
    templates = [TemplateSpec(data=str(tp.get("data", "")), destination=str(tp.get("destination", "")),
                              env=bool(tp.get("env", False)), change_mode=str(tp.get("change_mode", "restart")))
                 for tp in _blocks(t, "template")]
    identity = [i for i in _blocks(t, "identity") if isinstance(i, dict)]
    return TaskSpec(
        name=name, driver=str(t.get("driver", "")), command=_stringify(config["command"]),
        args=[_stringify(a) for a in config.get("args", [])], env=env, templates=templates,
        services=[_service(s) for s in _blocks(t, "service")],
        kill_signal=str(t.get("kill_signal", "SIGINT")), kill_timeout_s=parse_duration_s(t.get("kill_timeout", "5s")),
        shutdown_delay_s=parse_duration_s(t.get("shutdown_delay", "0s")),
        identity_env=any(bool(i.get("env", False)) for i in identity))


def render_job_file(path: str | Path, variables: Mapping[str, Any] | None = None) -> list[JobSpec]:
    """Parse ``path`` and render its jobs with ``variables`` (``-var`` overrides: strings as on the command line,
    or typed values). Raises :class:`JobFileError` naming the file (and group and task) and the reason."""
    path = Path(path)
    try:
        spec = load_job_spec(path)
    except OSError as e:
        raise JobFileError(path, f"cannot read: {e}") from e
    except Exception as e:  # python-hcl2 raises lark errors of several kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobFileError(path, f"does not parse as HCL: {first}") from e
    try:
        var = resolve_variables(spec, variables)
        local = resolve_locals(spec, var)
    except ExpressionError as e:
        raise JobFileError(path, str(e)) from e
    scope = {"var": var, "local": local}
    jobs = []
    for job_block in _blocks(spec, "job"):
        for job_id, raw_job in job_block.items():
            groups: dict[str, GroupSpec] = {}
            try:
                made = _dynamic_groups(raw_job, scope)
            except ExpressionError as e:
                raise JobFileError(path, str(e)) from e
            for gname, raw_group in [*_labeled(raw_job, "group").items(), *made.items()]:
                try:
                    g = made[gname] if gname in made else evaluate(raw_group, scope)
                except ExpressionError as e:
                    raise JobFileError(path, str(e), group=gname) from e
                tasks = []
                for tname, raw_task in _labeled(g, "task").items():
                    try:
                        tasks.append(_task(tname, raw_task))
                    except (ValueError, KeyError, TypeError) as e:
                        raise JobFileError(path, str(e), group=gname, task=tname) from e
                try:
                    count = int(g.get("count", 1))
                    scaling = None
                    for sc in _blocks(g, "scaling"):
                        if isinstance(sc, dict) and "max" in sc:  # the horizontal (group-level) block
                            scaling = (int(sc.get("min", count)), int(sc["max"]), bool(sc.get("enabled", True)))
                    ports: dict[str, int | None] = {}
                    for net in _blocks(g, "network"):
                        for label, body in _labeled(net, "port").items():
                            static = (body or {}).get("static")
                            ports[label] = int(static) if static is not None else None
                    groups[gname] = GroupSpec(name=gname, count=count, scaling=scaling, ports=ports,
                                              services=[_service(s) for s in _blocks(g, "service")], tasks=tasks,
                                              shutdown_delay_s=parse_duration_s(g.get("shutdown_delay", "0s")))
                except (ValueError, KeyError, TypeError) as e:
                    raise JobFileError(path, str(e), group=gname) from e
            jobs.append(JobSpec(id=job_id, file=str(path), variables=dict(var), groups=groups,
                                type=str(raw_job.get("type", "service"))))
    if not jobs:
        raise JobFileError(path, "no job block")
    return jobs


def runtime_references(text: str) -> list[str]:
    """The names of the ``${NAME}`` runtime references left in ``text``."""
    return _RUNTIME_REF.findall(text)


def interpolate_runtime(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Replace ``${NAME}`` runtime references with ``env[NAME]`` (Nomad's client-side interpolation of driver
    config: https://developer.hashicorp.com/nomad/docs/runtime/interpolation). Returns the text and the names
    it could not resolve (left as they were)."""
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name.startswith('env["') and name.endswith('"]'):
            name = name[5:-2]
        if name in env:
            return env[name]
        missing.append(name)
        return m.group(0)

    return _RUNTIME_REF.sub(sub, text), missing
