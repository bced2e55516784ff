"""The layering check of `make lint` finds what it is there to find, and the tree passes it."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
check_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_layers)


def tree(tmp_path: Path, files: dict[str, str]) -> Path:
    rust = tmp_path / "rust"
    for name, text in files.items():
        (rust / name).parent.mkdir(parents=True, exist_ok=True)
        (rust / name).write_text(text)
    return rust


def test_the_engine_is_layered():
    assert check_layers.problems(ROOT / "rust") == []


def test_a_use_that_climbs_a_floor_is_refused(tmp_path):
    rust = tree(
        tmp_path,
        {
            "lib.rs": "mod kernel; mod cache;",
            "kernel/mod.rs": "use crate::cache::{decode::Call, KvCache};",
            "cache/mod.rs": "use crate::kernel::KernelElement;",
        },
    )
    found = check_layers.problems(rust)
    assert any("`kernel` (floor 4) uses `cache` (floor 6)" in line for line in found)
    assert any("circle: cache -> kernel -> cache" in line for line in found)


def test_root_re_exports_are_for_lib_and_the_bindings_only(tmp_path):
    rust = tree(
        tmp_path,
        {
            "lib.rs": "pub use attention::Mask; use crate::attention::Mask as M;",
            "python/mod.rs": "use crate::{Mask, AttnError};",
            "layer/mod.rs": "use crate::{attention::Attention, Mask};",
        },
    )
    assert check_layers.problems(rust) == [
        "rust/layer/mod.rs: `crate::Mask` uses a crate-root re-export; "
        "import it from the module that defines it"
    ]


def test_paths_in_comments_are_not_uses(tmp_path):
    rust = tree(tmp_path, {"kernel/mod.rs": "/// See [`crate::cache::KvCache`].\nfn f() {}"})
    assert check_layers.problems(rust) == []


def test_a_module_without_a_floor_is_named(tmp_path):
    rust = tree(tmp_path, {"gadgets/mod.rs": "fn f() {}"})
    assert "has no floor" in check_layers.problems(rust)[0]
