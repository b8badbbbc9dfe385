"""The ``ppl-notes`` command: list, run, compare (a report), calibrate, predict, show."""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

__all__ = ["main"]


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"ppl-notes: --set takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return options


def _list(_args) -> int:
    from ppl_notes.models import STORIES

    width = max(len(name) for name in STORIES)
    for name, entry in STORIES.items():
        story = entry.load_model().story.splitlines()[0]
        print(f"{name:{width}s}  {story}")
    return 0


def _methods(_args) -> int:
    from ppl_notes.inference.backends import BACKENDS

    width = max(len(name) for name in BACKENDS)
    for name, backend in BACKENDS.items():
        traits = [t for t, held in (("takes a guide", backend.takes_guide),
                                    ("draws", backend.draws), ("a point", not backend.draws))
                  if held]
        print(f"{name:{width}s}  {backend.summary} ({', '.join(traits)})")
    return 0


def _run(args) -> int:
    from ppl_notes import infer
    from ppl_notes.errors import DiagnosticWarning, OptionError
    from ppl_notes.inference.backends import BACKENDS
    from ppl_notes.models import get_story
    from ppl_notes.vi.data_parallel import launched_by_torchrun

    entry = get_story(args.story)
    if args.method not in BACKENDS:
        raise OptionError(f"--method {args.method!r}: the methods are {sorted(BACKENDS)} "
                          "(ppl-notes methods)")
    options = _parse_options(args.set)
    if args.distributed:
        if args.method != "svi":
            raise OptionError("--distributed K splits the data of an SVI run (--method svi)")
        if not launched_by_torchrun():  # start K copies of this command under torchrun
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", str(args.distributed), "-m", "ppl_notes.cli",
                       *args.argv]
            return subprocess.run(command, check=False).returncode
        options["distributed"] = True
    if args.out:
        _writable_file(Path(args.out), "--out")
    takes_guide = BACKENDS[args.method].takes_guide
    guide = entry.load_guide() if takes_guide and not args.autoguide else None
    speaks = int(os.environ.get("RANK", "0")) == 0  # one process of a data-parallel run
    with warnings.catch_warnings():
        if not speaks:
            warnings.simplefilter("ignore")
        warnings.simplefilter("ignore", DiagnosticWarning)  # printed below, one line each
        fit = infer(entry.load_model(), method=args.method, guide=guide, seed=args.seed,
                    progress=not args.no_progress and speaks, **options)
    if not speaks:
        return 0
    print(f"{args.story} by {args.method} in {fit.seconds:.1f} s"
          + (f" on {args.distributed} processes" if args.distributed else ""))
    print(fit.summary().to_string())
    for key, value in entry.report(fit).items():
        print(f"{key}: {value:.3f}")
    for finding in fit.findings():
        print(f"warning: {finding.message}")
    if args.out:
        print(f"saved to {fit.save(args.out)}")
    return 0


def _check_options(story, method: str, options: dict) -> None:
    """Raise the OptionError a fit with ``options`` would raise, before any fit runs."""
    from ppl_notes.inference._options import validate
    from ppl_notes.inference.backends import BACKENDS

    validate(method, BACKENDS[method].options, {**story.defaults.get(method, {}), **options})


def _writable_folder(folder: Path, option: str) -> None:
    """Make ``folder`` (an OptionError where it cannot hold files), before any fit runs."""
    import tempfile

    from ppl_notes.errors import OptionError

    if folder.exists() and not folder.is_dir():
        raise OptionError(f"{option} {str(folder)!r} is a file; give a folder for the report")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ppl-notes-"):
            pass
    except OSError as error:
        raise OptionError(f"{option} {str(folder)!r} cannot hold files: "
                          f"{error.strerror or error}") from error
    _signing_key_ready()


def _signing_key_ready() -> None:
    """Make the signing key now, where need be: a result is signed when it is saved.

    Asked before any fit, so that a cache folder where no key can be made (read-only)
    is a one-line error up front, not a traceback after the fit, with the fit lost.
    """
    from ppl_notes._signing import signing_key

    signing_key()


#: The lock files this command holds (:func:`_held_for_this_run`), closed as it returns
_HELD: list = []


def _held_for_this_run(folder: Path):
    """An exclusive lock on ``folder`` for this run, or an OptionError naming the holder.

    Two ``compare --out same`` at once both reported success, and only the later run's
    files remained. The lock (``flock`` on ``.ppl-notes.lock`` in the folder) is the
    kernel's: it ends when :func:`main` returns, or with the process however it ends.
    """
    import fcntl

    from ppl_notes.errors import OptionError

    handle = open(folder / ".ppl-notes.lock", "a+")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OptionError(f"--out {str(folder)!r} is being written by another ppl-notes run "
                          f"({holder}); wait for it to end, or give another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def _writable_file(path: Path, option: str) -> None:
    """An OptionError where ``path`` cannot be written as a result file, before any fit."""
    from ppl_notes.errors import OptionError

    if path.is_dir():
        raise OptionError(f"{option} {str(path)!r} is a folder; give a file name (fit.nc)")
    _writable_folder(path.parent if str(path.parent) else Path("."), f"{option}'s folder")


def _compare(args) -> int:
    import warnings

    from ppl_notes import infer
    from ppl_notes._libraries import load_libraries
    from ppl_notes.comparison import compare
    from ppl_notes.errors import DiagnosticWarning
    from ppl_notes.models import get_story

    entry = get_story(args.story)
    story = entry.load_model()
    started = time.perf_counter()
    loading = load_libraries()  # paid once, before either method is timed
    svi_options, nuts_options = _parse_options(args.svi), _parse_options(args.nuts)
    for method, options in (("svi", svi_options), ("nuts", nuts_options)):
        _check_options(story, method, options)  # a typo in --nuts is said before SVI runs
    out = Path(args.out) if args.out else None
    if out is not None:
        _writable_folder(out, "--out")
        _HELD.append(_held_for_this_run(out))  # released when main() returns
    with warnings.catch_warnings():  # printed below, under the table, with the others
        warnings.simplefilter("ignore", DiagnosticWarning)
        fits = {"svi": infer(story, method="svi", guide=entry.load_guide(), seed=args.seed,
                             progress=not args.no_progress, **svi_options)}
        if out is not None:  # kept whatever happens to the NUTS run
            fits["svi"].save(out / "svi.nc")
        if fits["svi"].partial:  # Ctrl-C: the next stage is not run
            kept = f" (saved, marked partial, in {out / 'svi.nc'})" if out is not None else ""
            print(f"ppl-notes: interrupted (Ctrl-C) during SVI: its result is partial{kept}; "
                  "NUTS was not run", file=sys.stderr)
            return 130
        escalation = fits["svi"].info.get("escalation") or {}
        if escalation.get("to_flow") and escalation.get("kept"):
            # default SVI went on to a flow: its Gaussian, fitted again, beside it
            fits["svi_gaussian"] = infer(story, method="svi", guide=escalation[
                "gaussian_family"], seed=args.seed, progress=not args.no_progress,
                **svi_options)
        try:
            fits["nuts"] = infer(story, method="nuts", seed=args.seed,
                                 progress=not args.no_progress, **nuts_options)
            if out is not None:  # kept whatever happens to the report
                fits["nuts"].save(out / "nuts.nc")
        except KeyboardInterrupt:
            kept = f"; the SVI result is in {out / 'svi.nc'}" if out is not None else ""
            print(f"ppl-notes: interrupted before NUTS had any draws{kept}", file=sys.stderr)
            return 130
    labelled = {fit.label: fit for fit in fits.values()}
    table = compare(labelled, reference=fits["nuts"].label)
    beside = f" and {fits['svi_gaussian'].label}" if "svi_gaussian" in fits else ""
    print(f"\n{args.story}: {fits['svi'].label}{beside} ({fits['svi'].info['elbo']}) vs NUTS "
          f"({fits['nuts'].options['chains']} chains x {fits['nuts'].options['draws']} draws)")
    if "svi_gaussian" in fits:
        escalation = fits["svi"].info["escalation"]
        print(f"default SVI went on to a flow: {escalation['reason']}; {escalation['why']}")
    shown = table.drop(columns=["wasserstein", "ks"])
    print(shown.to_string(float_format=lambda value: f"{value:.4g}", na_rep=""))
    for label, fit in labelled.items():
        extra = "".join(f"; {k}: {v:.3f}" for k, v in entry.report(fit).items())
        print(f"{label}: {fit.seconds:.1f} s{extra}")
    for label, messages in table.attrs["findings"].items():
        for message in messages:
            print(f"warning ({label}): {message}")
    if out is not None:
        from ppl_notes.report import write_report

        # svi.nc and nuts.nc were saved as soon as each fit ended
        written = write_report(labelled, out=out, reference=fits["nuts"].label, table=table)
        print(f"wrote {written['report']} with {len(written) - 1} tables and figures, "
              f"and svi.nc, nuts.nc in {out}")
    print(f"libraries loaded once, before both methods: {loading:.1f} s")
    print(f"total: {time.perf_counter() - started:.1f} s")
    cut = [label for label, fit in labelled.items() if fit.partial]
    if cut:
        print(f"ppl-notes: interrupted (Ctrl-C): {', '.join(cut)} partial; the table, the "
              "report and the files say so", file=sys.stderr)
        return 130
    return 0


def _loaded(args):
    """The result file, with the story the user names (``--model module:attr``)."""
    from ppl_notes import load

    model = _user_reference(args.model) if getattr(args, "model", None) else None
    return load(args.file, model=model, trusted=args.trusted)


def _user_reference(reference: str):
    """The object a ``module:attr`` typed on the command line names (never a file's)."""
    import importlib

    from ppl_notes.errors import OptionError

    module, _, attribute = reference.partition(":")
    if not module or not attribute:
        raise OptionError(f"--model takes module:attribute (e.g. stories:my_story), got "
                          f"{reference!r}")
    from ppl_notes.story import Model

    sys.path.insert(0, os.getcwd())  # a stories.py beside the user, as python -m finds it
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise OptionError(f"--model {reference!r}: {error}") from error
    finally:
        sys.path.remove(os.getcwd())
    if not isinstance(found, Model):
        raise OptionError(f"--model {reference!r} names a {type(found).__name__}, not a story "
                          "made with @ppl_notes.model (the story the result was fitted "
                          "with)")
    return found


def _show(args) -> int:
    fit = _loaded(args)
    attrs = fit.tree.attrs
    print(f"{attrs.get('model')} by {fit.method} ({fit.seconds:.1f} s), options {fit.options}")
    # four significant digits for every number: ArviZ's 'auto' rounding printed the
    # interval [161.03, 165.40] as "160 170"
    print(fit.summary(round_to="none").to_string(float_format=lambda value: f"{value:.4g}"))
    return 0


def _predict(args) -> int:
    import numpy as np

    fit = _loaded(args)
    arrays = {name for group in ("observed_data", "constant_data")
              if group in fit.tree.children for name in fit.tree[group].data_vars}
    arrays |= {argument for argument in getattr(fit.model, "observed_arguments", {}).values()
               if argument}
    new_data = {}
    for key, value in _parse_options(args.set).items():
        value = _numbers(key, value)
        if key in arrays:  # one new unit of an array argument: an array of one
            value = np.atleast_1d(value)
        new_data[key] = value
    predictions = fit.predict(new_data, num_draws=args.draws, seed=args.seed)
    dims = list(fit.sample_dims)
    print(f"predictions of {fit.tree.attrs.get('model')} ({fit.method}) for "
          + ", ".join(f"{k}={np.asarray(v).tolist()}" for k, v in new_data.items()))
    for name, values in predictions.data_vars.items():
        stacked = values.stack(_draw=dims).transpose("_draw", ...).values
        flat = stacked.reshape(stacked.shape[0], -1)
        for column in range(flat.shape[1]):
            label = name if flat.shape[1] == 1 else f"{name}[{column}]"
            draws = flat[:, column]
            if np.issubdtype(draws.dtype, np.integer):
                share = {int(v): float((draws == v).mean()) for v in np.unique(draws)}
                print(f"  {label}: " + ", ".join(f"P({v}) = {p:.3f}" for v, p in share.items()))
            else:
                low, high = np.quantile(draws, [0.03, 0.97])
                print(f"  {label}: mean {draws.mean():.4g}, sd {draws.std():.3g}, "
                      f"94% interval [{low:.4g}, {high:.4g}]")
    return 0


def _numbers(key: str, value):
    """A ``--set`` value of ``predict`` as numbers, or an error naming it."""
    import numpy as np

    from ppl_notes.errors import DataError

    if isinstance(value, str):  # not a Python literal: numbers with 'nan' or 'inf' in them
        parts = [part.strip() for part in value.split(",")]
        try:
            value = [float(part) for part in parts] if len(parts) > 1 else float(parts[0])
        except ValueError:
            raise DataError(f"--set {key}={value!r}: not a number or a comma-separated list "
                            f"of numbers (e.g. --set {key}=150,180)") from None
    try:
        array = np.asarray(value, dtype=float)
    except (ValueError, TypeError):
        raise DataError(f"--set {key}={value!r}: not a number or a list of numbers") from None
    if not np.isfinite(array).all():
        raise DataError(f"--set {key}={value!r}: holds NaN or infinite values; give finite "
                        "numbers")
    return array


def _calibrate(args) -> int:
    from ppl_notes.calibration import calibrate
    from ppl_notes.models import get_story

    entry = get_story(args.story)
    store = False if args.store == "none" else args.store
    result = calibrate(entry.load_model(), method=args.method, replicates=args.replicates,
                       seed=args.seed, store=store, processes=args.processes,
                       scheduler=args.scheduler, trusted=args.trusted,
                       progress=not args.no_progress, **_parse_options(args.set))
    print(result)
    try:
        if args.out:
            import matplotlib

            matplotlib.use("Agg")
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            result.ranks.to_dataframe().to_csv(out / "ranks.csv")
            result.plot().savefig(out / "calibration.png")
            print(f"wrote ranks.csv and calibration.png in {out}")
    except KeyboardInterrupt:
        print("ppl-notes: interrupted (Ctrl-C) after the calibration: its result is printed "
              "above; ranks.csv and calibration.png were not all written", file=sys.stderr)
        return 130
    if result.partial:
        print(f"ppl-notes: interrupted (Ctrl-C): the calibration above is partial, "
              f"{result.ranks.sizes['replicate']} of {args.replicates} replicates (the store "
              "keeps them: run the same command again to continue)", file=sys.stderr)
        return 130
    return 0 if result.calibrated else 1


def _story_command(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text)
    command.add_argument("story")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--no-progress", action="store_true")
    return command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ppl-notes``."""
    parser = argparse.ArgumentParser(prog="ppl-notes", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the stories, one line each").set_defaults(func=_list)
    commands.add_parser("methods", help="the inference methods, one line each"
                        ).set_defaults(func=_methods)

    run = _story_command(commands, "run", "run one method on a story's default data")
    run.add_argument("--method", default="svi", help="an inference method (ppl-notes methods "
                     "lists them)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="an option of the method, e.g. --set steps=3000")
    run.add_argument("--autoguide", action="store_true", help="SVI with AutoNormal")
    run.add_argument("--out", help="save the result (netCDF)")
    run.add_argument("--distributed", type=int, metavar="K", help="data-parallel SVI on K "
                     "processes (torchrun; each fits 1/K of the data plate)")
    run.set_defaults(func=_run)

    compare = _story_command(commands, "compare", "fit SVI and NUTS, compare them, write a "
                             "report (tables, figures, HTML)")
    compare.add_argument("--out", help="a folder for the report: CSV tables, PNG figures, "
                         "report.html, and both results (netCDF)")
    compare.add_argument("--svi", action="append", default=[], metavar="KEY=VALUE",
                         help="an SVI option, e.g. --svi steps=3000")
    compare.add_argument("--nuts", action="append", default=[], metavar="KEY=VALUE",
                         help="a NUTS option, e.g. --nuts chains=2")
    compare.set_defaults(func=_compare)

    calibration = _story_command(commands, "calibrate", "simulation-based calibration: "
                                 "simulate from the story, fit, rank the truth")
    calibration.add_argument("--method", default="nuts", help="a method that gives draws "
                             "(ppl-notes methods lists them)")
    calibration.add_argument("--replicates", type=int, default=200)
    calibration.add_argument("--processes", type=int, help="worker processes (default: cores)")
    calibration.add_argument("--scheduler", help="a Dask scheduler's address, tcp://HOST:PORT "
                             "(default: this machine's processes)")
    calibration.add_argument("--store", help="the file that keeps finished replicates "
                             "(default: one under ~/.cache/ppl_notes; 'none': no file)")
    calibration.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                             help="an option of the method, e.g. --set steps=1500")
    calibration.add_argument("--out", help="a folder for ranks.csv and calibration.png")
    calibration.add_argument("--trusted", action="store_true",
                             help="continue a store not signed with your key")
    calibration.set_defaults(func=_calibrate)

    prediction = commands.add_parser("predict", help="predictions of a saved result for "
                                     "new data, e.g. --set height=180")
    prediction.add_argument("file")
    prediction.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="a new value of a story argument; a list for several units, "
                            "e.g. --set height=150,180,200")
    prediction.add_argument("--draws", type=int, default=1000,
                            help="posterior draws to use (default 1000)")
    prediction.add_argument("--seed", type=int, default=0)
    prediction.add_argument("--model", metavar="MODULE:ATTR",
                            help="the story, for a story of your own (a shipped story is "
                            "found by name); nothing named in the file is imported")
    prediction.add_argument("--trusted", action="store_true",
                            help="read a result not signed with your key (a colleague's)")
    prediction.set_defaults(func=_predict)

    show = commands.add_parser("show", help="summary of a saved result")
    show.add_argument("file")
    show.add_argument("--trusted", action="store_true",
                      help="read a result not signed with your key (a colleague's)")
    show.set_defaults(func=_show)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, without the source line that raised them."""
    print(f"ppl-notes: {category.__name__}: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ppl-notes``; user mistakes and Ctrl-C print one line, not a traceback.

    A Ctrl-C during a run keeps what the run has (a partial result, saved with ``--out``);
    one before anything exists (while compiling) exits with 130 and says so.
    """
    import warnings

    from ppl_notes.errors import PPLNotesError

    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    previous = _terminate_as_interrupt()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return args.func(args)
    except PPLNotesError as error:
        print(f"ppl-notes: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        why = str(interrupt) or "before the run had anything to keep"
        signal_name = "SIGTERM" if _TERMINATED else "Ctrl-C"
        print(f"ppl-notes: interrupted ({signal_name}) {why.removeprefix('interrupted ')}",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (ppl-notes show fit.nc | head -2): not an error
        _quiet_broken_pipe()
        return 0
    finally:
        while _HELD:  # the folders this command locked
            _HELD.pop().close()
        if previous is not None:  # main() called in a process with its own handler
            import signal

            signal.signal(signal.SIGTERM, previous)


#: Set when SIGTERM arrived: the interruption's line names it
_TERMINATED: list[bool] = []


def _terminate_as_interrupt():
    """SIGTERM ends a command as Ctrl-C does: what was saved is kept, and one line says so.

    The first SIGTERM raises ``KeyboardInterrupt`` in the main thread, so every path
    that keeps a partial result on Ctrl-C keeps it here too; a second one ends the
    process at once. Only in the main thread (a library caller's threads are theirs).
    Returns the handler it replaced, for :func:`main` to put back.
    """
    import signal
    import threading

    _TERMINATED.clear()
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum, frame):
        _TERMINATED.append(True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, terminated)


def _quiet_broken_pipe() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second error."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file descriptor (a test's capture)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
