"""Code bundles: canonical digest (test vector), compile under the module's name, inert decorators."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ray_confidential.bundle import Bundle, compile_module, find_entry, from_callable, load_entry
from tests.executor import conf_funcs

VECTOR = Bundle(
    module="pkg.mod", entry="f", files=(("pkg/mod.py", b"def f():\n    return 1\n"), ("pkg/a.py", b""))
)
VECTOR_DIGEST = "d9382b9ded3678e6688c4bdfb8f81220639bd3d4f35d2a5fbb66f5d963a2fec6"


def test_digest_vector_matches_docs() -> None:
    assert VECTOR.digest.hex() == VECTOR_DIGEST
    assert VECTOR_DIGEST in (Path(__file__).resolve().parents[2] / "docs" / "executor.md").read_text()


def test_digest_is_order_independent_and_covers_everything() -> None:
    flipped = Bundle(module="pkg.mod", entry="f", files=tuple(reversed(VECTOR.files)))
    assert flipped.digest == VECTOR.digest
    variants = [
        Bundle(
            module="pkg.mod",
            entry="f",
            files=(("pkg/mod.py", b"def f():\n    return 2\n"), ("pkg/a.py", b"")),
        ),
        Bundle(module="pkg.mod", entry="g", files=VECTOR.files),
        Bundle(
            module="pkg.mod2",
            entry="f",
            files=(("pkg/mod2.py", b"def f():\n    return 1\n"), ("pkg/a.py", b"")),
        ),
        Bundle(
            module="pkg.mod",
            entry="f",
            files=(("pkg/mod.py", b"def f():\n    return 1\n"), ("pkg/b.py", b"")),
        ),
        Bundle(module="pkg.mod", entry="f", files=(("pkg/mod.py", b"def f():\n    return 1\n"),)),
    ]
    assert len({v.digest for v in variants} | {VECTOR.digest}) == len(variants) + 1


def test_pack_round_trips_without_pickle_and_checks_the_named_digest() -> None:
    """``Bundle.pack`` is what decorated calls hand Ray (str, bytes and lists only); ``unpack``
    rebuilds the bundle and refuses files that do not hash to the digest the packed form names."""
    packed = VECTOR.pack()

    def plain(value: object) -> bool:
        return isinstance(value, str | bytes) or (isinstance(value, list) and all(plain(v) for v in value))

    assert plain(packed) and packed[0] == VECTOR_DIGEST
    assert Bundle.unpack(packed) == VECTOR and Bundle.unpack(packed).digest.hex() == VECTOR_DIGEST
    swapped = [packed[0], packed[1], packed[2], [[p, d + b"#"] for p, d in packed[3]]]
    with pytest.raises(ValueError, match="does not match the digest"):
        Bundle.unpack(swapped)
    for malformed in (
        None,
        [],
        [VECTOR_DIGEST, "pkg.mod", "f"],
        [VECTOR_DIGEST, "pkg.mod", "f", [["../x.py", b""]]],
    ):
        with pytest.raises(ValueError):
            Bundle.unpack(malformed)


def test_shim_reuses_an_unpacked_bundle_only_for_its_own_digest() -> None:
    from enclave_actors.remote import shim_bundle

    assert shim_bundle(VECTOR) is VECTOR
    first = shim_bundle(VECTOR.pack())
    assert first == VECTOR and shim_bundle(VECTOR.pack()) is first
    other = Bundle(module="pkg.mod", entry="f", files=(("pkg/mod.py", b"def f():\n    return 3\n"),))
    assert shim_bundle(other.pack()).digest == other.digest != VECTOR.digest
    for malformed in ([["not", "a digest"], "pkg.mod", "f", []], [], "text"):
        with pytest.raises(ValueError, match="malformed packed bundle"):
            shim_bundle(malformed)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"module": "a b", "entry": "f", "files": (("a.py", b""),)}, "dotted Python identifier"),
        ({"module": "a", "entry": "__import__", "files": (("a.py", b""),)}, "dunder"),
        ({"module": "a", "entry": "f", "files": (("../a.py", b""),)}, "relative POSIX path"),
        ({"module": "a", "entry": "f", "files": (("/etc/a.py", b""),)}, "relative POSIX path"),
        ({"module": "a", "entry": "f", "files": ()}, "1..256 files"),
        ({"module": "a", "entry": "f", "files": (("b.py", b""), ("c.py", b""))}, "no bundle file holds"),
    ],
)
def test_bundle_rejects_bad_shapes(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Bundle(**kwargs)


def test_from_callable_reads_module_source_and_unwraps_decorator() -> None:
    bundle = from_callable(conf_funcs.total)
    assert bundle.module == "tests.executor.conf_funcs"
    assert bundle.entry == "total"
    assert bundle.files == (("tests/executor/conf_funcs.py", Path(conf_funcs.__file__).read_bytes()),)
    assert conf_funcs.total.bundle == bundle


def test_entry_point_found_behind_inert_decorator() -> None:
    module = compile_module(from_callable(conf_funcs.total))
    fn = find_entry(module, from_callable(conf_funcs.total))
    assert fn(__import__("numpy").arange(4.0), 2) == {"sum": 12.0}
    assert fn.__module__ == "tests.executor.conf_funcs"


def test_entry_point_must_be_defined_in_the_bundle() -> None:
    bundle = Bundle(module="m1", entry="system", files=(("m1.py", b"from os import system\n"),))
    with pytest.raises(ValueError, match="not a function or class defined in the bundle"):
        load_entry(bundle)


def test_main_script_is_imported_under_its_stem_and_main_block_never_runs(tmp_path: Path) -> None:
    script = tmp_path / "job_script.py"
    script.write_text(
        textwrap.dedent("""
        import json, sys
        from ray_confidential.bundle import from_callable, load_entry

        def double(x):
            return 2 * x

        if __name__ == "__main__":
            b = from_callable(double)
            f = load_entry(b)
            print(json.dumps([b.module, b.entry, b.files[0][0], f(4), f.__module__]))
    """)
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    # Had the __main__ block run again on import, it would have printed twice.
    assert out.stdout.strip().splitlines() == ['["job_script", "double", "job_script.py", 8, "job_script"]']


def test_nested_function_is_refused() -> None:
    def inner() -> None:
        pass

    with pytest.raises(ValueError, match="module level"):
        from_callable(inner)
