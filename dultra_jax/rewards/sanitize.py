"""The code sanitiser of the official HumanEval evaluation (Dream's `sanitize`, as described there),
written here as an AST walk: keep the imports and what the entry point needs, drop the rest.

    sanitize(prompt + "\\n" + body, entry_point="add")

1. Normalise the text (tabs as 4 spaces, `\\r\\n` as `\\n`, stripped) and keep its longest run of
   consecutive lines (among the first `MAX_LINES`) that parses, by non-blank line count, the
   earliest on a tie: prose before or after the code falls away.
2. Of its top-level statements keep every `import` / `from ... import`, every class, every
   function that has a `return` somewhere inside (a function without one is dropped, as the
   original does), and every assignment whose first target is a name; a later definition of a
   name replaces the earlier one in the earlier one's place.
3. With an entry point, keep only the definitions it reaches: a definition uses the names and
   attribute names it mentions (`math.sqrt` counts as `sqrt`), followed transitively from the entry
   point. Top-level calls, prints, asserts, `if __name__ == ...` blocks and tests are dropped.
4. Emit the imports, then the kept definitions, each as `ast.unparse` writes it, one per line.
"""

from __future__ import annotations

import ast

MAX_LINES = 100


def _normalise(text: str) -> str:
    return text.replace("\t", "    ").replace("\r\n", "\n").replace("\r", "\n").strip() + "\n"


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def longest_valid_code(text: str, max_lines: int = MAX_LINES) -> str:
    """The longest run of consecutive lines of `text` (its first `max_lines`) that parses as Python,
    counted in non-blank lines, the earliest such run on a tie ("" when no line parses)."""
    lines = text.splitlines()[:max_lines]
    n = len(lines)
    filled = [0]
    for line in lines:
        filled.append(filled[-1] + bool(line.strip()))
    best, best_span = 0, None
    for i in range(n):
        if filled[n] - filled[i] <= best:
            break  # no later start can hold more non-blank lines
        # The longest parsing run from `i`: the largest parsing end, then the earliest end with
        # the same count (trailing blank lines add nothing).
        for j in range(n - 1, i - 1, -1):
            count = filled[j + 1] - filled[i]
            if count <= best:
                break
            if _parses("\n".join(lines[i:j + 1])):
                while j > i and filled[j] - filled[i] == count:
                    j -= 1
                best, best_span = count, (i, j)
                break
    if best_span is None:
        return ""
    i, j = best_span
    return "\n".join(lines[i:j + 1])


def _definition_name(node: ast.stmt) -> str | None:
    if isinstance(node, ast.ClassDef):
        return node.name
    if isinstance(node, ast.FunctionDef):
        return node.name if any(isinstance(n, ast.Return) for n in ast.walk(node)) else None
    if isinstance(node, ast.Assign) and node.targets and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


def _used_names(node: ast.AST) -> set[str]:
    """Names and attribute names mentioned under `node` (an attribute's object is not followed:
    `a.b` uses `b`)."""
    used, stack = set(), [node]
    while stack:
        for child in ast.iter_child_nodes(stack.pop()):
            if isinstance(child, ast.Name):
                used.add(child.id)
            elif isinstance(child, ast.Attribute):
                used.add(child.attr)
            else:
                stack.append(child)
    return used


def reachable(entry_point: str, uses: dict[str, set[str]]) -> set[str]:
    """`entry_point` and every name it reaches through `uses` (name -> names it mentions)."""
    seen, todo = set(), [entry_point]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(uses.get(name, set()) - seen)
    return seen


def sanitize(text: str, entry_point: str | None = None) -> str:
    """`text` reduced to its imports and the definitions `entry_point` depends on (all definitions
    without one); see the module docstring. "" when no line of `text` parses."""
    tree = ast.parse(longest_valid_code(_normalise(text)))
    imports: list[ast.stmt] = []
    definitions: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
            continue
        name = _definition_name(node)
        if name is not None:
            definitions[name] = node
    if entry_point:
        keep = reachable(entry_point, {name: _used_names(node) for name, node in definitions.items()})
        definitions = {name: node for name, node in definitions.items() if name in keep}
    return "\n".join(ast.unparse(node) for node in [*imports, *definitions.values()])
