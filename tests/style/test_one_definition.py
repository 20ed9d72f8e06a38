"""Each number of ``confmig.common.x86`` (MSRs, ports, vectors, KVM's paravirtual interface)
is defined there and nowhere else in ``src`` or ``tests``: every user imports it (guest code
through the ABI, which re-exports it). Copies drift: ``KVM_FEATURE_HC_MAP_GPA_RANGE`` was once
a bit number in one module and a mask in another."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

from confmig.common import x86

ROOT = Path(__file__).resolve().parents[2]
HOME = ROOT / "src" / "confmig" / "common" / "x86.py"
DISTINCTIVE = ("KVM_CPUID_SIGNATURE", "KVM_CPUID_FEATURES", "KVM_SIGNATURE", "MSR_KVM_MIGRATION_CONTROL")
"""Values too particular to be anything else: they may not even be written out as literals."""


@functools.cache
def sources() -> list[tuple[Path, ast.Module]]:
    """Every module of ``src`` and ``tests`` but the home of the numbers, parsed."""
    paths = sorted(p for top in ("src", "tests") for p in (ROOT / top).rglob("*.py") if p != HOME)
    return [(path, ast.parse(path.read_text(), str(path))) for path in paths]


def bindings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, name) of every name an assignment binds, at any depth (``x[NAME] = ...`` binds none)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        else:
            continue
        while targets:
            target = targets.pop()
            if isinstance(target, ast.Name):
                yield node.lineno, target.id
            elif isinstance(target, ast.Tuple | ast.List):
                targets.extend(target.elts)
            elif isinstance(target, ast.Starred):
                targets.append(target.value)


def home_values() -> dict[str, object]:
    return {name: value for name, value in vars(x86).items() if name.isupper()}


def test_the_names_are_defined_only_in_common_x86() -> None:
    names = set(home_values())
    assert {"KVM_FEATURE_HC_MAP_GPA_RANGE", "KVM_HC_MAP_GPA_RANGE", "KVM_ENOSYS"} <= names
    copies = [f"{path.relative_to(ROOT)}:{line}: {name}"
              for path, tree in sources() for line, name in bindings(tree) if name in names]
    assert not copies, "defined again; import it from confmig.common.x86 instead:\n" + "\n".join(copies)


def test_the_distinctive_kvm_numbers_are_not_written_out_elsewhere() -> None:
    values = home_values()
    wanted = {values[name]: name for name in DISTINCTIVE}
    copies = [f"{path.relative_to(ROOT)}:{node.lineno}: {wanted[node.value]}"
              for path, tree in sources() for node in ast.walk(tree)
              if isinstance(node, ast.Constant) and type(node.value) in (int, bytes)
              and node.value in wanted]
    assert not copies, "a KVM number written out; use its name:\n" + "\n".join(copies)


def test_kvm_features_are_bit_numbers_as_in_linux() -> None:
    values = home_values()
    features = {name: value for name, value in values.items() if name.startswith("KVM_FEATURE_")}
    assert features == {"KVM_FEATURE_HC_MAP_GPA_RANGE": 16, "KVM_FEATURE_MIGRATION_CONTROL": 17}
