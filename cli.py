"""The `slimfx` command. `check` and `fmt` answer in well under a second: they never import torch.

    slimfx check specs/*.slim                      exit 0 when every file is valid, 1 otherwise
    slimfx fmt FILE [--check|--write]              print the canonical form (or check, or rewrite)
    slimfx plan SPEC --model M [--policy NAME]     what each rule would touch, before any change
    slimfx compile SPEC --model M --out DIR        compile and save an artifact
    slimfx train --model M --compiled DIR          train its adapters (--steps N), save DIR-trained
    slimfx eval --model M [--compiled DIR]         perplexity / embedding or logit cosine, bytes, latency
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .dsl import SpecError, format_spec, parse
from .command_checks import non_empty
from .dsl.parser import unreadable

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if not argv:  # "the following arguments are required: COMMAND" names none of them
        parser.print_help(sys.stderr)
        return 2
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):  # it would say COMMAND is missing
        parser.error(f"unrecognized option {argv[0]}: the command comes first "
                     "(`slimfx COMMAND --help` lists a command's options)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage, not the top level's "slimfx [-h] COMMAND ..."
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "files", None) and args.files.count("-") > 1:  # the second read was empty: "holds no policy"
        args.command_parser.error("`-` (standard input) is given more than once; it can be read once, so give it once")
    _tolerate_narrow_encodings()
    try:
        status = args.run(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe met then is "Exception ignored", exit 120
        return status
    except KeyboardInterrupt as e:
        # with what the work said as it stopped ("slimfx.train stopped after 3 of 10 steps; the
        # adapters are restored …"): the bare word left a user guessing what was kept
        print("\n".join(["interrupted", *(f"  {note}" for note in getattr(e, "__notes__", ()))]), file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`slimfx … | head -1`): nothing more to say
        _silence_stdout()
        return 1


def _tolerate_narrow_encodings() -> None:
    """A stream that cannot encode every character (cp1252 when Windows redirects to a file, a
    Latin-1 locale) prints what it cannot hold as `?`: the tables' `→` and box lines raised
    UnicodeEncodeError after the work was done, and the command said it failed."""
    for stream in (sys.stdout, sys.stderr):
        if not _utf8(stream) and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="replace")
            except (ValueError, OSError):  # a stream that cannot be reconfigured keeps its errors
                pass


def _utf8(stream) -> bool:
    return (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "") in ("utf8", "utf8sig")


def _write_policy(text: str) -> None:
    """`fmt`'s output is a policy file: UTF-8 like every policy file, whatever the locale (a
    non-ASCII comment or name raised a raw UnicodeEncodeError on a cp1252 stdout)."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None or _utf8(sys.stdout):
        sys.stdout.write(text)
        return
    sys.stdout.flush()
    buffer.write(text.encode("utf-8"))
    buffer.flush()


def _silence_stdout() -> None:
    # Python flushes stdout at exit and would report the closed pipe once more.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stand-in stdout has no file descriptor
        pass


def _parser() -> argparse.ArgumentParser:
    from .runtime.version import __version__

    parser = argparse.ArgumentParser(prog="slimfx", description="Compress PyTorch models from a policy file.")
    parser.add_argument("--version", action="version", version=f"slimfx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="validate policy files")
    check.add_argument("files", nargs="+", metavar="FILE", type=non_empty, help="policy files (`-` for standard input)")
    check.set_defaults(run=_check)

    fmt = sub.add_parser("fmt", help="print policy files in canonical form")
    fmt.add_argument("files", nargs="+", metavar="FILE", type=non_empty, help="policy files (`-` for standard input)")
    mode = fmt.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if a file is not in canonical form")
    mode.add_argument("--write", action="store_true", help="rewrite files in place")
    fmt.set_defaults(run=_fmt)

    from .commands import add_model_commands  # torch-free until one of them runs

    add_model_commands(sub)
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)
    return parser


def _read(name: str) -> tuple[bytes, str]:
    if name == "-":
        return sys.stdin.buffer.read(), "<stdin>"
    return Path(name).read_bytes(), name


def _load(name: str):
    """(source bytes, Spec) or None after printing why not."""
    try:
        data, label = _read(name)
    except OSError as e:
        _error(str(unreadable(name, e)))  # as plan and compile say it: a kind and what to do
        return None
    try:
        return data, parse(data, filename=label)
    except SpecError as e:
        _error(str(e))
        return None


def _check(args) -> int:
    failed = 0
    for name in args.files:
        loaded = _load(name)
        if loaded is None:
            failed += 1
            continue
        spec = loaded[1]
        if not spec.policies:  # valid syntax, but compile would change nothing: not "ok"
            _error(f"{spec.filename}: holds no policy (it is empty or only comments)")
            failed += 1
            continue
        rules = sum(len(p.rules) for p in spec.policies)
        _info(f"{spec.filename}: ok ({_count(len(spec.policies), 'policy', 'policies')}, {_count(rules, 'rule', 'rules')})")
        empty = [p.name for p in spec.policies if not p.rules]
        if empty:  # valid, and `plan`/`compile` refuse it: said here rather than there
            _info(f"{spec.filename}: note: {', '.join(f'`{n}`' for n in empty)} "
                  f"{'has' if len(empty) == 1 else 'have'} no rules; plan and compile refuse "
                  f"{'it' if len(empty) == 1 else 'them'} (the model would be left unchanged)")
    return 1 if failed else 0


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _fmt(args) -> int:
    status = 0
    for name in args.files:
        loaded = _load(name)
        if loaded is None:
            status = 1
            continue
        data, spec = loaded
        text = format_spec(spec)
        kept = _in_style_of(data, text)
        if args.check:
            if kept != data:
                # stdin has no file to rewrite: `fmt -` prints the canonical form
                fix = "`slimfx fmt -` to print it" if name == "-" else f"`slimfx fmt --write {name}`"
                _error(f"{spec.filename}: not in canonical form (run {fix})")
                status = 1
        elif args.write and name != "-":
            if kept != data:
                try:
                    _write_atomically(Path(name), kept)
                except OSError as e:  # a read-only folder or disk: this file is left as it was
                    _error(f"{name}: cannot rewrite it: {e.strerror or e}; it is left as it was")
                    status = 1
                    continue
                _info(f"{name}: reformatted")
        else:
            _write_policy(text)
    return status


def _in_style_of(data: bytes, text: str) -> bytes:
    """`text` with the file's line endings (CRLF from a Windows checkout) and byte-order mark: a
    file fmt --write just wrote failed fmt --check on every checkout that turns LF into CRLF."""
    crlf = b"\r\n" in data and data.count(b"\r\n") == data.count(b"\n")
    out = text.replace("\n", "\r\n") if crlf else text
    return (b"\xef\xbb\xbf" if data.startswith(b"\xef\xbb\xbf") else b"") + out.encode()


def _write_atomically(path: Path, data: bytes) -> None:
    # A crash mid-write must never leave half a policy behind.
    # mkstemp makes the file 0600; the rewritten policy keeps the original's permissions.
    path = path.resolve()  # through a symlink: the file it names is rewritten, the link stays a link
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _error(text: str) -> None:
    _console(sys.stderr).print(text, style="red", markup=False, highlight=False, soft_wrap=True)


def _info(text: str) -> None:
    _console(sys.stderr).print(text, style="green", markup=False, highlight=False, soft_wrap=True)


def _console(stream):
    # rich only when it can colour something; plain text otherwise (pipes, CI logs, tests).
    if not stream.isatty():
        return _Plain(stream)
    from rich.console import Console

    return Console(file=stream)


class _Plain:
    def __init__(self, stream):
        self.stream = stream

    def print(self, text: str, **_):
        print(text, file=self.stream)


if __name__ == "__main__":
    sys.exit(main())
