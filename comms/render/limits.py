"""Resource limits for template rendering: a hostile or careless template fails with its name
instead of hanging a run or exhausting memory.

Templates run in Jinja's sandbox, which blocks unsafe attributes but not work: nested
``range(100000)`` loops, ``'x' * 300000000`` or a self-recursive macro run for ever or take all
memory. The limits are enforced at the points where a template can make work or data:

- sizes are checked *before* the work: ``*``, ``+``, ``**`` and ``%`` are intercepted by the
  sandbox, ``~`` concatenations and the padding/joining filters and ``str`` methods are guarded,
  ``range()`` is capped;
- a wall-clock budget per template render is checked at safe points: every ``{% for %}``
  iteration (the template's AST is rewritten so each loop iterates through ``loop_budget``),
  every call (macros included, so recursion is covered) and every output chunk;
- the output of one render is capped.

Pure Python: no signals or threads, so it works in worker threads too. The budget is a
``ContextVar``, so concurrent renders in several threads each have their own.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from typing import Any, Final

from jinja2 import nodes, pass_context
from jinja2.environment import Environment
from jinja2.exceptions import SecurityError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.visitor import NodeTransformer

MAX_RANGE: Final = 10_000  # items in one range()
MAX_SIZE: Final = 1_000_000  # characters (or items) in any one value a template makes
MAX_OUTPUT: Final = 2_000_000  # characters one template render may produce
TIME_BUDGET: Final = 5.0  # seconds of template code per render (a normal one takes ~1 ms)
MAX_POWER_BITS: Final = 64 * 1024

LOOP_FILTER: Final = "_comms_loop_budget"
CONCAT_FILTER: Final = "_comms_size_cap"

# A %-style or format-spec width of seven digits or more (a million characters of padding).
_HUGE_WIDTH_RE: Final = re.compile(r"%[^a-zA-Z%]*?\d{7,}|\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")
_PADDING_METHODS: Final = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_FORMAT_METHODS: Final = frozenset({"format", "format_map"})


class RenderLimitExceeded(SecurityError):
    """A template went past a size or time limit (the message says which)."""


@dataclass(frozen=True)
class Budget:
    deadline: float
    seconds: float


_budget: ContextVar[Budget | None] = ContextVar("comms_render_budget", default=None)


class budget:  # lower case: used as ``with limits.budget(seconds):``, like a function
    """Renders inside this block share one wall-clock budget of ``seconds``. A class rather
    than a generator: it is entered three times for every message rendered."""

    __slots__ = ("_seconds", "_token")

    def __init__(self, seconds: float = TIME_BUDGET) -> None:
        self._seconds = seconds

    def __enter__(self) -> Budget:
        b = Budget(time.monotonic() + self._seconds, self._seconds)
        self._token = _budget.set(b)
        return b

    def __exit__(self, *exc: object) -> None:
        _budget.reset(self._token)


def check_time() -> None:
    b = _budget.get()
    if b is not None and time.monotonic() > b.deadline:
        raise RenderLimitExceeded(
            f"the template ran past its time budget of {b.seconds:g} s (a loop or recursion "
            "that does too much work)"
        )


def check_size(size: int, what: str) -> None:
    if size > MAX_SIZE:
        raise RenderLimitExceeded(
            f"{what} would be {size:,} long, over the limit of {MAX_SIZE:,}"
        )


def check_output(size: int) -> None:
    if size > MAX_OUTPUT:
        raise RenderLimitExceeded(
            f"the template's output is over the limit of {MAX_OUTPUT:,} characters"
        )


def check_format(fmt: str) -> None:
    if _HUGE_WIDTH_RE.search(fmt):
        raise RenderLimitExceeded(
            f"a format width of a million characters or more ({fmt[:40]!r})"
        )


def capped_range(*args: int) -> range:
    """``range()`` for templates: at most ``MAX_RANGE`` items."""
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise RenderLimitExceeded(f"range() of {len(rng):,} items, over the limit of {MAX_RANGE:,}")
    return rng


def _join_size(items: Iterable[Any], sep: str = "") -> int:
    if not isinstance(items, (list, tuple)):
        return 0  # a generator: its items are checked where they were made
    return sum(len(str(x)) for x in items) + len(sep) * len(items)


def check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse an intercepted ``*``, ``+``, ``**`` or ``%`` whose result would be too big."""
    check_time()
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                check_size(len(seq) * n, f"{type(seq).__name__} repeated {n:,} times")
    elif operator == "+":
        if isinstance(left, Sized) and isinstance(right, Sized):
            check_size(len(left) + len(right), "the sum")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                and right * abs(left).bit_length() > MAX_POWER_BITS:
            raise RenderLimitExceeded(f"{left} ** {right} is too large a number")
    elif operator == "%" and isinstance(left, str):
        check_format(left)
        values = right if isinstance(right, tuple) else (right,)
        if "*" in left and any(isinstance(v, int) and v > MAX_SIZE for v in values):
            raise RenderLimitExceeded("a '*' format width of a million characters or more")


def check_call(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse a ``str`` method call that would make a huge string (padding, format, join,
    replace); every call is also a safe point for the time budget."""
    check_time()
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner = getattr(target, "__self__", None)
    if not isinstance(owner, str):
        return
    name = getattr(target, "__name__", "")
    if name in _PADDING_METHODS:
        if any(isinstance(v, int) and v > MAX_SIZE for v in (*args, *kwargs.values())):
            raise RenderLimitExceeded(f"str.{name}() to a million characters or more")
    elif name in _FORMAT_METHODS:
        check_format(owner)
    elif name == "join" and args:
        check_size(_join_size(args[0], owner), "the joined string")
    elif name == "replace" and len(args) >= 2 and isinstance(args[1], str):
        hits = owner.count(args[0]) if args[0] else len(owner) + 1
        check_size(len(owner) + hits * len(args[1]), "the replaced string")


def guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """A built-in filter with the size checks its arguments need."""

    @wraps(func)  # keeps jinja_pass_arg (pass_context & co.)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        check_time()
        values = [a for a in args if not isinstance(a, (Context, EvalContext, Environment))]
        if name in ("center", "indent"):
            if any(isinstance(v, int) and v > MAX_SIZE for v in (*values, *kwargs.values())):
                raise RenderLimitExceeded(f"|{name} to a width of a million or more")
        elif name == "format" and values and isinstance(values[0], str):
            check_format(values[0])
        elif name == "join" and values:
            sep = values[1] if len(values) > 1 and isinstance(values[1], str) else ""
            check_size(_join_size(values[0], sep), "the joined string")
        return func(*args, **kwargs)

    return guarded


@pass_context
def loop_budget(context: Context, iterable: Iterable[Any]) -> Iterator[Any]:
    """What every ``{% for %}`` iterates through: the time budget is checked per item."""
    for item in iterable:
        check_time()
        yield item


@pass_context
def size_cap(context: Context, value: Any) -> Any:
    """Wrapped around every ``~`` concatenation: doubling a string in a loop stops early."""
    if isinstance(value, str):
        check_size(len(value), "the joined string")
    return value


class _Instrument(NodeTransformer):
    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, LOOP_FILTER, [], [], None, None,
                                 lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(node, CONCAT_FILTER, [], [], None, None, lineno=node.lineno)


def instrument(tree: nodes.Template) -> nodes.Template:
    """Rewrite a parsed template so its loops and concatenations go through the limits."""
    out = _Instrument().visit(tree)
    assert isinstance(out, nodes.Template)
    return out
