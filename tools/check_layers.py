"""Keeps the engine's module tree layered: `python3 tools/check_layers.py` (run by `make lint`).

`rust/` is built in floors. A top-level module may use modules on lower floors (or its own),
never one above it, and no two top-level modules may use each other in a circle. Only
`lib.rs` and the bindings (`python/`) may use the crate root's re-exports: the core names
the module that defines each item, so the root stays a door and never becomes a hub.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Lowest first. A module may use any module whose floor is at most its own.
FLOORS = {
    "error": 0,
    "element": 0,
    "bounds": 1,
    "limits": 1,
    "memory": 1,
    "threads": 1,
    "simd": 2,
    "masks": 3,
    "kernel": 4,
    "attention": 5,
    "cache": 6,
    "layer": 7,
    "python": 8,
}
ROOT_USERS = {"lib", "python"}

CRATE_PATH = re.compile(r"\bcrate::(\{|[A-Za-z_]\w*)")


def top_module(path: Path, rust: Path) -> str:
    parts = path.relative_to(rust).parts
    return parts[0] if len(parts) > 1 else path.stem


def braced_names(text: str, start: int) -> list[str]:
    """The first name of each item in `crate::{a::b, c, ...}` whose `{` is at `start`."""
    depth, item, names = 0, "", []
    for char in text[start:]:
        if char == "{":
            depth += 1
            if depth == 1:
                continue
        elif char == "}":
            depth -= 1
            if depth == 0:
                break
        if depth == 1 and char == ",":
            names.append(item)
            item = ""
        else:
            item += char
    names.append(item)
    return [re.split(r"\W", name.strip(), maxsplit=1)[0] for name in names if name.strip()]


def uses(text: str) -> list[str]:
    # Comments may name paths (doc links) without depending on them.
    code = "\n".join(line.split("//", 1)[0] for line in text.splitlines())
    found = []
    for match in CRATE_PATH.finditer(code):
        if match.group(1) == "{":
            found.extend(braced_names(code, match.start(1)))
        else:
            found.append(match.group(1))
    return found


def problems(rust: Path) -> list[str]:
    errors: list[str] = []
    graph: dict[str, set[str]] = {}
    for path in sorted(rust.rglob("*.rs")):
        source = top_module(path, rust)
        shown = path.relative_to(rust.parent)
        if source not in FLOORS and source != "lib":
            errors.append(f"{shown}: top-level module {source!r} has no floor in FLOORS")
            continue
        for name in uses(path.read_text()):
            if name not in FLOORS:
                if source not in ROOT_USERS:
                    errors.append(
                        f"{shown}: `crate::{name}` uses a crate-root re-export; "
                        "import it from the module that defines it"
                    )
                continue
            if source == "lib" or name == source:
                continue
            graph.setdefault(source, set()).add(name)
            if FLOORS[name] > FLOORS[source]:
                errors.append(
                    f"{shown}: `{source}` (floor {FLOORS[source]}) uses `{name}` "
                    f"(floor {FLOORS[name]}), a floor above it"
                )
    errors.extend(circles(graph))
    return errors


def circles(graph: dict[str, set[str]]) -> list[str]:
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycle = trail[trail.index(target) :] + [target]
                found.append("modules use each other in a circle: " + " -> ".join(cycle))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def main() -> int:
    rust = Path(__file__).resolve().parent.parent / "rust"
    errors = problems(rust)
    for error in errors:
        print(error, file=sys.stderr)
    if not errors:
        print(f"layering: {len(list(rust.rglob('*.rs')))} files, no upward use, no circle")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
