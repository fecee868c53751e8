"""What Triton's frontend carries through loops, which the interpreter cannot see: :func:`watch_loop_carries`.

Triton decides which variables a ``for`` loop carries from one dry run of its body: a variable is carried if the
body leaves it holding another value object than on entry. A window rotated by copies (``a, b = b, new``) whose
variables start from one shared value (``a = b = zero``) fails that test: after one dry run ``a`` holds ``b``'s
entry value, the same object as its own, so ``a`` is not carried and the compiled loop reads the entry value in
every iteration, while the interpreter (plain Python) reads the rotated one. That was the conv backward's bug on
the GPU (2026-11-27: every gradient wrong, every interpreter test passing).
"""
from __future__ import annotations

import ast
import contextlib
from collections.abc import Iterator

__all__ = ['watch_loop_carries']


def _copies(body: list[ast.stmt]) -> list[tuple[str, str]]:
    """(target, source) of every plain copy between names in ``body``: ``a = b`` and ``a, c = b, f(x)`` (the pair
    a <- b), nested statements included."""
    pairs = []
    for stmt in body:
        for node in ast.walk(stmt):
            if not isinstance(node, ast.Assign) or len(node.targets) != 1:
                continue
            target, value = node.targets[0], node.value
            if isinstance(target, ast.Name) and isinstance(value, ast.Name):
                pairs.append((target.id, value.id))
            elif isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
                pairs += [(t.id, v.id) for t, v in zip(target.elts, value.elts)
                          if isinstance(t, ast.Name) and isinstance(v, ast.Name)]
    return pairs


@contextlib.contextmanager
def watch_loop_carries(lost: list[str]) -> Iterator[None]:
    """While active, every loop that Triton compiles appends to ``lost`` each variable it should carry but does not:
    defined before the loop, copied in the body from a variable that the loop carries (or that should be carried,
    to a fixed point), yet not carried. Entries read ``'function:line: name'``."""
    from triton.compiler import code_generator

    cls = code_generator.CodeGenerator
    original = cls._find_carries

    def find_carries(self, node, liveins, ignore=frozenset()):
        names, handles, types = original(self, node, liveins, ignore)
        should, grew = set(names), True
        copies = [(t, s) for t, s in _copies(node.body) if t in liveins and t not in ignore]
        while grew:
            grew = False
            for target, source in copies:
                if source in should and target not in should:
                    should.add(target)
                    grew = True
        lost.extend(f'{self.function_name}:{node.lineno}: {name}' for name in sorted(should - set(names)))
        return names, handles, types

    cls._find_carries = find_carries
    try:
        yield
    finally:
        cls._find_carries = original
