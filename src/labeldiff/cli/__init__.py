"""The command line: ``labeldiff pretrain | finetune | evaluate | predict | sample | evaluate-samples |
select | split | study | compare | family | demo`` (and, for developers, ``bench``).

:mod:`labeldiff.cli.parser` builds the parser: the options of ``pretrain`` and ``finetune`` are generated
from the settings declared in :mod:`labeldiff.settings`; :mod:`labeldiff.cli.commands` runs each command.
Heavy libraries (torch, MONAI, matplotlib) are imported inside the commands, so ``--help`` is fast.

Errors: an input the user can fix (:class:`labeldiff.errors.LabeldiffError` and its kin) ends with one
``error:`` line and its exit code (2; 3 for non-finite training; 4 for a write the disk refused). Any other
exception is a bug in labeldiff: it is reported as one, with its traceback, and exit code 1.
"""
from __future__ import annotations

import os
import sys

from labeldiff.cli.parser import VOCABULARY, build_parser  # noqa: F401  (the public parts)

BUG = ("labeldiff: this is a bug in labeldiff, not a problem with your input or settings; please report it "
       "with the command and the traceback below")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: a command's next step may repeat it
    from labeldiff.cli.commands import write_error
    from labeldiff.errors import LabeldiffError

    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 speaks for all; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    try:
        args.func(args)
    except LabeldiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # a full disk or a read-only folder: one line, not a traceback
        line = write_error(e)
        if line is None:
            _bug()
            return 1
        print(f"error: {line}", file=sys.stderr)
        return 4
    except Exception:  # noqa: BLE001  (everything else is ours to fix)
        _bug()
        return 1
    finally:
        if "labeldiff.distributed" in sys.modules:  # torchrun: leave the process group cleanly
            sys.modules["labeldiff.distributed"].teardown()
    return 0


def _bug() -> None:
    import traceback

    print(BUG, file=sys.stderr)
    traceback.print_exc()
