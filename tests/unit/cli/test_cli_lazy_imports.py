"""The VMM's process never loads cryptography (nor guest or platform code): not through the
command line's module, not while `confmig vm` runs. A fresh interpreter shows what loads."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("cryptography", "confmig.owner", "confmig.platform", "confmig.guest")


def loaded_after(code: str) -> set[str]:
    """Top modules of ``FORBIDDEN`` that ``code`` leaves in ``sys.modules`` of a new interpreter."""
    probe = (f"{code}\nimport sys\n"
             f"print(' '.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         check=True)
    return set(out.stdout.split())


def test_importing_the_command_line_loads_none_of_it() -> None:
    assert loaded_after("import confmig.cli.main") == set()


def test_the_vm_command_loads_none_of_it() -> None:
    # no host at that socket: the VMM gets as far as connecting, with all its modules loaded
    code = ("from confmig.cli.main import cli\n"
            "try:\n"
            "    cli(['vm', '--host', '/nonexistent/host.sock', '-m', '64M', '-bios', '/dev/null'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "import sys\n"
            "assert 'confmig.vmm.main' in sys.modules")
    assert loaded_after(code) == set()


def test_the_owner_command_still_loads_when_asked_for() -> None:
    assert "cryptography" in loaded_after(
        "from click.testing import CliRunner\nfrom confmig.cli.main import cli\n"
        "assert CliRunner().invoke(cli, ['owner', '--help']).exit_code == 0")
