"""Errors that say where in the network a problem is, what was expected and how to fix it."""

from __future__ import annotations

from typing import Sequence, Tuple

#: A location in a (possibly nested) network: one (index, name) pair per level of nesting.
Path = Tuple[Tuple[int, str], ...]


def format_path(path: Path) -> str:
    """``((1, "chain"), (0, "dense(4)"))`` -> ``"layer 1 (chain) > layer 0 (dense(4))"``."""
    return " > ".join(f"layer {index} ({name})" for index, name in path)


class LayerError(ValueError):
    """A bad input found at a public entry point, naming the layer it concerns.

    Attributes:
      path: the layer's location, outermost first, as (index, name) pairs; empty when the
        problem is not tied to one layer (the input array, the targets, an argument).
      problem: what is wrong, with expected and actual values and the fix.
    """

    def __init__(self, problem: str, path: Path = ()):
        self.path = tuple(path)
        self.problem = problem
        where = format_path(self.path)
        super().__init__(f"{where}: {problem}" if where else problem)

    def inside(self, index: int, name: str) -> "LayerError":
        """The same error, located one level further out (used by containers)."""
        return LayerError(self.problem, ((index, name),) + self.path)


class ArgumentError(ValueError, TypeError):
    """A plain argument mistake at a public entry point (a wrong type or value of an
    argument such as ``batch_size``, ``loss`` or ``x``), naming the argument, what was
    expected, what came, and the fix.

    Both a ``ValueError`` and a ``TypeError``, so either ``except`` clause catches it.
    Mistakes about the network itself (a layer's params or shapes) raise
    :class:`LayerError` instead.

    Attributes:
      argument: the argument's name, e.g. ``"batch_size"`` or ``"eval_data"``.
      problem: what is wrong, with expected and actual values and the fix.
    """

    def __init__(self, argument: str, problem: str):
        self.argument = argument
        self.problem = problem
        super().__init__(f"{argument}: {problem}")

    def __reduce__(self):
        return type(self), (self.argument, self.problem)


def shape_str(shape: Sequence[int]) -> str:
    return str(tuple(int(d) for d in shape))
