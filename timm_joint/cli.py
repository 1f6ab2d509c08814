"""What the command lines share: how each one is named, path checks that fail before any work, and
the CPU threads a run uses.

Every command (train, evaluate, hub, benchmark, sweep, data, restore, sample) names itself in
``--help`` and in its errors the way it was started: its console script (``timm-joint-evaluate``),
``python -m timm_joint.evaluate``, or ``train_joint.py`` from a source checkout.
"""
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, TypeVar, Union

__all__ = ['CONSOLE_SCRIPTS', 'BAD_INPUT', 'program_name', 'error_line', 'command_line', 'run_or_exit',
           'add_output_args', 'parse_command', 'check_out_dir', 'check_in_dir', 'check_out_file',
           'choose_cpu_threads', 'set_cpu_threads']

PathLike = Union[str, os.PathLike]
T = TypeVar('T')

# What a command raises for input it cannot use; its console entry turns these into one line and status 2.
BAD_INPUT = (ValueError, TypeError, FileExistsError)

# The console scripts of pyproject.toml, by module.
CONSOLE_SCRIPTS = {
    'timm_joint.train': 'timm-joint-train',
    'timm_joint.evaluate': 'timm-joint-evaluate',
    'timm_joint.hub': 'timm-joint-hub',
    'timm_joint.benchmark': 'timm-joint-benchmark',
    'timm_joint.restore': 'timm-joint-restore',
    'timm_joint.sample': 'timm-joint-sample',
}


def program_name(module: str) -> str:
    """How the user started ``module``'s command, as they would type it again.

    Its console script when ``sys.argv[0]`` is that script, ``train_joint.py`` for the training
    entry of a source checkout, otherwise ``python -m MODULE`` (also when ``main`` is called from
    Python, where ``sys.argv[0]`` names another program).
    """
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ''
    script = CONSOLE_SCRIPTS.get(module)
    if script and argv0 in (script, f'{script}.exe', f'{script}-script.py'):
        return script
    if module == 'timm_joint.train' and argv0 == 'train_joint.py':
        return argv0
    return f'python -m {module}'


def error_line(module: str, error: Union[BaseException, str]) -> str:
    """``PROGRAM: error: MESSAGE`` on one line, as argparse words its own errors."""
    message = ' '.join(str(error).split('\n')) or type(error).__name__
    return f'{program_name(module)}: error: {message}'


def command_line(module: str, argv: Sequence[str]) -> str:
    """``python -m MODULE ARGS`` as results.json records it, each argument quoted for a POSIX shell where it
    needs to be (``shlex.quote``), so that the line can be run again."""
    return ' '.join([f'python -m {module}', *map(shlex.quote, argv)])


def run_or_exit(module: str, work: Callable[[], T]) -> T:
    """``work()``; on bad input (``BAD_INPUT``), the error on one line (``error_line``) and exit status 2."""
    try:
        return work()
    except BAD_INPUT as e:
        print(error_line(module, e), file=sys.stderr)
        sys.exit(2)


def add_output_args(parser, out_default: str) -> None:
    """The options every command that writes a results folder shares: ``--out``, ``--overwrite``,
    ``--seed``, ``--device`` and ``--no-progress``."""
    import torch
    parser.add_argument('--out', default=out_default)
    parser.add_argument('--overwrite', action='store_true', help='replace an existing results.json')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--no-progress', dest='progress', action='store_false')


def parse_command(parser, module: str, argv: Optional[Sequence[str]] = None):
    """``parser.parse_args(argv)`` (default: the command line) with ``args.command``, the line that reruns
    it (``command_line``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command = command_line(module, argv)
    return args


def _file_above(path: Path) -> Optional[Path]:
    """The nearest existing ancestor of ``path`` when it is a file (no folder can be made under it)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_out_dir(path: PathLike, flag: str) -> None:
    """Refuse an output folder that is a file, or lies under one, before any work.

    Raises:
        ValueError: ``{flag} 'PATH' is a file: expected a folder to write into``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f'{flag} {str(path)!r} is a file: expected a folder to write into')
    blocker = _file_above(path)
    if blocker is not None:
        raise ValueError(f'{flag} {str(path)!r} lies under {str(blocker)!r}, which is a file: expected a folder '
                         f'to write into')


def check_out_file(path: PathLike, flag: str) -> None:
    """Refuse an output file that is a folder, or lies under a file, before any work.

    Raises:
        ValueError: ``{flag} 'PATH' is a folder: expected a file name``.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f'{flag} {str(path)!r} is a folder: expected a file name (e.g. {path / "out.json"})')
    blocker = _file_above(path)
    if blocker is not None:
        raise ValueError(f'{flag} {str(path)!r} lies under {str(blocker)!r}, which is a file: expected a file '
                         f'name in a folder')


def check_in_dir(path: PathLike, flag: str, expected: str) -> None:
    """Refuse an input folder that is missing or a file, saying what was expected.

    Raises:
        ValueError: ``{flag} 'PATH' does not exist: expected {expected}`` or ``... is a file: ...``.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f'{flag} {str(path)!r} does not exist: expected {expected}')
    if not path.is_dir():
        raise ValueError(f'{flag} {str(path)!r} is a file: expected {expected}')


# -- CPU threads -------------------------------------------------------------------------------------

def choose_cpu_threads(
        requested: Optional[int] = None,
        *,
        env: Optional[str] = None,
        cores: Optional[int] = None,
        load: Optional[float] = None,
        default: Optional[int] = None,
) -> Tuple[int, str]:
    """How many threads a CPU run should use, and why, in words.

    An explicit ``requested`` (``--threads``) or ``OMP_NUM_THREADS`` wins. Otherwise as many as there
    are idle cores (cores minus the 1-minute load average), at least 1 and at most torch's default:
    OpenMP threads wait for each other at every operation, so one thread on a busy core stalls them
    all (on a shared 2-core machine, 2 threads made the quickstart's steps 10 times slower than 1).

    Args:
        requested: ``--threads`` (None or 0: choose).
        env: ``OMP_NUM_THREADS`` (default: read from the environment).
        cores: Cores this process may run on (default: its CPU affinity).
        load: The 1-minute load average (default: ``os.getloadavg``; 0 where there is none).
        default: torch's default thread count (default: ``torch.get_num_threads()``).

    Returns:
        (threads, reason): e.g. ``(1, '2 cores, load average 1.9: threads on busy cores stall each other')``.
    """
    env = os.environ.get('OMP_NUM_THREADS') if env is None else env
    if requested:
        return int(requested), '--threads'
    if env and env.strip().isdigit() and int(env) > 0:
        return int(env), 'OMP_NUM_THREADS'
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows has no load average
            load = 0.
    if default is None:
        import torch
        default = torch.get_num_threads()
    idle = max(1, math.floor(cores - load + 0.5))
    threads = max(1, min(default, idle))
    if threads < default:
        return threads, (f'{cores} cores, load average {load:.1f}: threads on busy cores stall each other; '
                         f'--threads or OMP_NUM_THREADS sets more')
    return threads, f'{cores} cores, idle; --threads or OMP_NUM_THREADS sets another count'


def set_cpu_threads(requested: Optional[int] = None) -> Tuple[int, str]:
    """Set torch's intra-op threads by ``choose_cpu_threads``; returns (threads, reason)."""
    import torch
    threads, reason = choose_cpu_threads(requested)
    torch.set_num_threads(threads)
    return threads, reason
