"""`slimfx fmt`: the canonical form printed, checked or written in place, atomically, keeping
what the file is (its permissions, a link to it, its line endings and byte-order mark), and a
file it cannot parse or write left as it was."""
import pytest

from slimfx.cli import main
from test_cli import TYPO, write


def test_fmt_prints_check_and_write(tmp_path, capsys):
    f = write(tmp_path, "policy p{\n  quantize head int8   # keep it\n}")
    assert main(["fmt", str(f)]) == 0
    assert capsys.readouterr().out == "policy p {\n    quantize head int8  # keep it\n}\n"
    assert main(["fmt", "--check", str(f)]) == 1
    assert "not in canonical form" in capsys.readouterr().err
    assert main(["fmt", "--write", str(f)]) == 0
    assert f.read_text() == "policy p {\n    quantize head int8  # keep it\n}\n"
    assert main(["fmt", "--check", str(f)]) == 0


@pytest.mark.parametrize("bom, newline", [(b"", b"\r\n"), (b"\xef\xbb\xbf", b"\n"), (b"\xef\xbb\xbf", b"\r\n")])
def test_fmt_keeps_a_files_line_endings_and_byte_order_mark(tmp_path, capsys, bom, newline):
    """--write turned them into LF without a mark, so --check failed on every Windows checkout."""
    f = tmp_path / "p.slim"
    f.write_bytes(bom + b"policy p{\n  quantize head int8\n}\n".replace(b"\n", newline))
    assert main(["fmt", "--check", str(f)]) == 1
    assert main(["fmt", "--write", str(f)]) == 0
    assert f.read_bytes() == bom + b"policy p {\n    quantize head int8\n}\n".replace(b"\n", newline)
    assert main(["fmt", "--check", str(f)]) == 0
    capsys.readouterr()
    assert main(["fmt", str(f)]) == 0 and capsys.readouterr().out == "policy p {\n    quantize head int8\n}\n"


def test_fmt_refuses_an_invalid_file_and_leaves_it_alone(tmp_path, capsys):
    f = write(tmp_path, TYPO)
    assert main(["fmt", "--write", str(f)]) == 1
    assert f.read_text() == TYPO


def test_fmt_write_keeps_the_files_permissions(tmp_path):
    f = write(tmp_path, "policy p {\n  keep   head\n}\n")
    f.chmod(0o644)
    assert main(["fmt", "--write", str(f)]) == 0
    assert f.read_text() == "policy p {\n    keep head\n}\n" and (f.stat().st_mode & 0o777) == 0o644


def test_fmt_write_through_a_symlink_rewrites_the_file_it_names(tmp_path):
    real = write(tmp_path, "policy p {\n  keep   head\n}\n", "real.slim")
    link = tmp_path / "link.slim"
    link.symlink_to(real)
    assert main(["fmt", "--write", str(link)]) == 0
    assert link.is_symlink() and real.read_text() == "policy p {\n    keep head\n}\n"


def test_fmt_write_that_cannot_write_says_so_and_leaves_the_file(tmp_path, capsys, monkeypatch):
    from slimfx import cli

    original = "policy p {\n  keep   head\n}\n"
    f = write(tmp_path, original)

    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkstemp", refused)
    assert main(["fmt", "--write", str(f)]) == 1
    assert f"{f}: cannot rewrite it: Permission denied; it is left as it was" in capsys.readouterr().err
    assert f.read_text() == original


def test_fmt_check_on_stdin_says_how_to_print_the_canonical_form(monkeypatch, capsys):
    """It said "run `slimfx fmt --write -`", which prints, as `fmt -` does."""
    import io
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"policy p{\n  quantize head int8\n}\n")))
    assert main(["fmt", "--check", "-"]) == 1
    err = capsys.readouterr().err
    assert "run `slimfx fmt -` to print it" in err and "--write" not in err
