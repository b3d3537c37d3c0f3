"""Our launcher: torchrun's options and torch's elastic launch, with the trainers' own words when workers fail.

    python -m rf_megatron.launch --nproc-per-node 2 pretrain/pretrain_resformer.py --config tiny_cpu ...
    rf-pretrain --nproc-per-node 2 pretrain/pretrain_resformer.py --config tiny_cpu ...   # the same (pip install -e .)

torchrun ends a failed job with its ~30-line ChildFailedError report, which buries the one `error:` line the failing
rank printed, and exits 1 whatever the rank said (also after SIGTERM, when every rank saved and exited 0). This
launcher prints nothing of its own when a rank failed with its own message: it exits with the first failing rank's
exit code (2: a config error, said in one line). A stop signal (Ctrl-C, SIGTERM) is passed to every rank, which
finishes its step and saves (rf_megatron/signals.py); the launcher exits 0 when every rank did, and waits for the
save up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default here: 600). A second Ctrl-C ends the ranks at once.
Plain torchrun and srun keep working: the trainers do not depend on this launcher.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import List, NoReturn, Optional

from .errors import first_line

EXIT_DIR = "RF_LAUNCH_EXIT_DIR"  # where each worker leaves its exit code (report_exit) for the launcher
SAVE_SECONDS = "600"  # how long a stop signal waits for the ranks to save before they are killed


def report_exit(code: int) -> None:
    """In a worker: tell our launcher how this rank ended (a stop signal hides that from torch's elastic agent)."""
    folder = os.environ.get(EXIT_DIR)
    if folder:
        try:
            Path(folder, f"rank{os.environ.get('RANK', '0')}").write_text(str(code))
        except OSError:
            pass


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _quiet_torchrun() -> None:
    """torchrun's log lines (rendezvous, "Received 2 death signal", "failed (exitcode: 2)") are not the user's
    business: the ranks say what happened. Each of its modules has a logger with its own level: set them all."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parse(argv: List[str]):
    """torchrun's options, with a mistake said in one line instead of argparse's 19-line usage block."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.error = lambda message: _fail(f"{message} (--help lists the options)")
    args = parser.parse_args(argv)
    if not (args.module or args.no_python or os.path.isfile(args.training_script)):
        _fail(f"{args.training_script}: no such file")  # else every rank says it, after the rendezvous
    return args


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.run import config_from_args

    _quiet_torchrun()
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.standalone or (args.rdzv_backend == "static" and not args.rdzv_endpoint and args.master_port is None
                           and args.nnodes in ("1", "1:1")):
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SAVE_SECONDS)
    try:
        config, cmd, cmd_args = config_from_args(args)
    except (ValueError, AssertionError, RuntimeError) as exc:  # a value torchrun refuses (--nproc-per-node two)
        _fail(first_line(exc, None))
    with tempfile.TemporaryDirectory(prefix="rf-launch-") as exits:
        os.environ[EXIT_DIR] = exits
        return _launch(config, cmd, cmd_args, Path(exits))


def _launch(config, cmd, cmd_args, exits: Path) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    _quiet_torchrun()  # again: the imports above made more of its loggers
    _pass_a_second_interrupt_on()
    try:
        elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:  # killed: the rank could not say anything itself
            print(f"error: rank {rank} was killed by {_signal_name(failure.exitcode)}", file=sys.stderr, flush=True)
            return 128 - failure.exitcode
        return failure.exitcode  # the rank printed its own error line(s) above
    except SignalException as exc:
        return _stopped(int(exc.sigval), exits, config.nproc_per_node)
    return 0


def _pass_a_second_interrupt_on() -> None:
    """The ranks run in sessions of their own: only this launcher gets the terminal's Ctrl-C. torch's agent answers
    a stop signal by passing it to the ranks and waiting for them (they save); a second Ctrl-C raises inside that
    wait, and the agent then sends SIGTERM, which a rank takes for a first stop request: it goes on and saves. So
    from the second SIGINT on, pass SIGINT itself to the ranks, which then exit at once (rf_megatron/signals.py)."""
    from torch.distributed.elastic.multiprocessing import api

    agents_handler = getattr(api, "_terminate_process_handler", None)  # the agent's, for SIGINT / SIGTERM
    if agents_handler is None:  # another torch: its own behaviour
        return
    stopping = []

    def handler(signum, frame):
        if stopping and signum == signal.SIGINT:
            _signal_workers(signal.SIGINT)
            return
        stopping.append(signum)
        agents_handler(signum, frame)

    api._terminate_process_handler = handler


def _signal_workers(signum: int) -> list:
    import psutil

    workers = psutil.Process().children()
    for worker in workers:
        try:
            worker.send_signal(signum)
        except psutil.Error:
            pass
    return workers


def _stopped(signum: int, exits: Path, nproc: int) -> int:
    """The launcher got a stop signal: the elastic agent passed it on and waited for the ranks. 0 when every local
    rank saved and exited 0; a second signal while they still run (a second Ctrl-C) goes to them at once."""
    import psutil

    psutil.wait_procs(_signal_workers(signum), timeout=30)
    codes = [path.read_text() for path in exits.glob("rank*")]
    return 0 if len(codes) == nproc and set(codes) == {"0"} else 128 + signum


if __name__ == "__main__":
    sys.exit(main())
