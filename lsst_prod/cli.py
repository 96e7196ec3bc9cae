"""``lsst-prod``: the command line.  The only place that prints to the user or picks exit codes.

Exit codes: 0 success; 1 the run finished with failed (or blocked) quanta, or
validation bounds were not met; 2 bad input (configuration, planning, missing
repository or run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import ConfigError, LsstProdError, PlanningError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 100)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- progress
class RichProgress:
    """Per-stage progress bars driven by the executor (start/advance/stop)."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description:<14}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}
        self._counts: dict[str, Counter] = {}

    def start(self, counts_by_stage: Counter) -> None:
        self._progress.start()
        for stage, n in counts_by_stage.items():
            self._tasks[stage] = self._progress.add_task(stage, total=n, detail="")
            self._counts[stage] = Counter()

    def advance(self, stage: str, status: str) -> None:
        self._counts[stage][status] += 1
        c = self._counts[stage]
        detail = " ".join(f"{k}={v}" for k, v in sorted(c.items()) if k != "succeeded")
        self._progress.update(self._tasks[stage], advance=1, detail=detail)

    def stop(self) -> None:
        self._progress.stop()


def _setup_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    handler = RichHandler(console=err_console, show_path=False, markup=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("lsst_prod").setLevel(level)


def _repo_arg(args: argparse.Namespace, campaign=None, must_exist: bool = True):
    from .repo import Repository

    root = args.repo or os.environ.get("LSST_PROD_REPO")
    if root is None and campaign is not None:
        root = campaign.repo_path()
    if root is None:
        raise ConfigError("no repository given: pass --repo DIR (or set LSST_PROD_REPO)")
    if must_exist:
        try:
            return Repository.open(root)
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
    return Repository.create(root)


def _run_arg(args: argparse.Namespace, repo) -> str:
    """The RUN argument (checked: a safe name of a run that exists), else the newest run."""
    import difflib

    from .execution.runs import newest_run
    from .names import check_run_name

    if not args.run:
        return newest_run(repo)
    run = check_run_name(args.run, "RUN")
    names = [r["name"] for r in repo.registry.list_runs()]
    if run not in names:
        close = difflib.get_close_matches(run, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        shown = ", ".join(names[-5:]) or "none"
        raise PlanningError(f"no run {run!r} in {repo.root}{hint} (newest runs: {shown})")
    return run


# ----------------------------------------------------------------------------- commands
def cmd_simulate(args: argparse.Namespace) -> int:
    from .config.campaign import load_campaign

    campaign = load_campaign(args.campaign)
    from .sim.writer import simulate_to_repo

    sim = campaign.config.simulation
    if sim is None:
        raise ConfigError(f"{campaign.doc.where(())}: the campaign has no 'simulation' block to simulate from")
    repo = _repo_arg(args, campaign, must_exist=False)
    with Progress(TextColumn("[bold]simulate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("simulate", total=None)

        def cb(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        summary = simulate_to_repo(sim, repo.root, progress=cb)
    console.print(f"simulated into [bold]{repo.root}[/bold]: " + ", ".join(f"{k}={v}" for k, v in summary.items()
                                                                          if not isinstance(v, (dict, list))))
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from .config.campaign import load_campaign
    from .graph.planner import plan

    campaign = load_campaign(args.campaign, site_override=args.site)
    repo = _repo_arg(args, campaign)
    graph = plan(repo, campaign, run=f"{campaign.config.release}/plan-preview")
    table = Table(title=f"plan for {campaign.config.release} ({repo.root})")
    table.add_column("stage")
    table.add_column("quanta", justify="right")
    table.add_column("dimensions")
    from .stages import STAGES

    for stage, n in graph.counts_by_stage().items():
        table.add_row(stage, str(n), ", ".join(STAGES[stage].dimensions))
    table.add_row("[bold]total", f"[bold]{len(graph)}", "")
    console.print(table)
    edges = sum(len(q.depends_on) for q in graph)
    prereq = len({r.path for q in graph for r in q.prerequisites})
    console.print(f"{edges} dependency edges, {prereq} pre-existing input datasets; nothing was run or written")
    return EXIT_OK


def _finish_run(repo, run: str, result, as_json: bool = False) -> int:
    from .provenance.report import build_report

    report = build_report(repo, run, with_quanta=False)
    _print_report(report)
    console.print(run)
    return EXIT_OK if report["complete"] else EXIT_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    from .config.campaign import load_campaign
    from .execution.runs import submit
    from .names import check_run_name

    campaign = load_campaign(args.campaign, site_override=args.site)
    repo = _repo_arg(args, campaign)
    repo.require_writable("submit a run")
    if args.run is not None:
        check_run_name(args.run, "--run")

    def announce(run: str) -> None:
        console.print(f"run [bold]{escape(run)}[/bold] on site [bold]{campaign.site.name}[/bold] "
                      f"({campaign.site.executor}, {campaign.site.workers()} workers)")

    result = submit(repo, campaign, args.run, progress=None if args.no_progress else RichProgress(),
                    announce=announce)
    return _finish_run(repo, result.run, result)


def cmd_restart(args: argparse.Namespace) -> int:
    from .execution.runs import restart

    repo = _repo_arg(args)
    run = _run_arg(args, repo)
    repo.require_writable("restart a run")
    console.print(f"restarting run [bold]{run}[/bold]")
    result = restart(repo, run, progress=None if args.no_progress else RichProgress(), site_override=args.site,
                     verify=args.verify)
    if sum(result.counts.values()) == 0:
        console.print("nothing to re-run: every quantum succeeded and its outputs are in place"
                      + (" (inputs and outputs match their checksums)" if args.verify else ""))
    return _finish_run(repo, run, result)


def cmd_status(args: argparse.Namespace) -> int:
    from .execution.driver import DriverLock, plan_dir
    from .provenance.report import status_counts

    repo = _repo_arg(args)
    run = _run_arg(args, repo)
    counts = status_counts(repo, run)
    holder = DriverLock(plan_dir(repo, run) / "driver.lock").holder()
    if args.json:
        console.print_json(json.dumps({"run": run, "driver": holder, "stages": counts}))
        return EXIT_OK
    state = f"running (driver pid {holder['pid']} on {holder['host']})" if holder else "not running"
    table = Table(title=f"{run}: {state}")
    cols = ("succeeded", "nowork", "running", "submitted", "planned", "failed", "blocked")
    table.add_column("stage")
    for c in cols:
        table.add_column(c, justify="right")
    for stage, c in counts.items():
        table.add_row(stage, *(str(c.get(k, 0)) for k in cols))
    console.print(table)
    return EXIT_OK


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}{unit}"
    return f"{v}{unit}"


def _print_report(report: dict[str, Any]) -> None:
    t = report["totals"]
    head = "[green]complete[/green]" if report["complete"] else "[red]incomplete[/red]"
    console.print(f"\n[bold]Report for {report['run']}[/bold]: {head}; {t['quanta']} quanta, "
                  f"{t['succeeded']} succeeded ({t.get('partial', 0)} on partial inputs), {t['nowork']} no work, "
                  f"{t['failed']} failed, {t['blocked']} blocked, "
                  f"{t['attempts']} attempts; hosts {', '.join(report['hosts']) or '-'}")
    table = Table(title="stages", title_justify="left")
    table.add_column("stage", no_wrap=True)
    for col in ("quanta", "ok", "fail", "blocked", "partial", "retries", "wall s med/max", "cpu s", "RSS MiB"):
        table.add_column(col, justify="right")
    for stage, s in report["stages"].items():
        tm = s.get("timing", {})
        table.add_row(stage, str(s["quanta"]), str(s["succeeded"] + s["nowork"]), str(s["failed"]), str(s["blocked"]),
                      str(s.get("partial", 0)), str(s.get("retries", 0)),
                      f"{_fmt(tm.get('wall_s_median'))}/{_fmt(tm.get('wall_s_max'))}",
                      _fmt(tm.get("cpu_s_total")), _fmt(tm.get("peak_rss_mib_max")))
    console.print(table)
    for stage, s in report["stages"].items():
        if s.get("summary"):
            console.print(f"[bold]{stage}[/bold] summary: " +
                          ", ".join(f"{k}={_fmt(v)}" for k, v in s["summary"].items()))
    if report.get("partial"):
        pt = Table(title="ran on partial inputs (their producers failed; `restart` re-runs them)")
        for col in ("quantum", "left out", "what and why"):
            pt.add_column(col)
        for p in report["partial"][:50]:
            pt.add_row(escape(p["quantum_id"]), str(p["n_left_out"]), escape(p["why"][:200]))
        console.print(pt)
        if len(report["partial"]) > 50:
            console.print(f"... and {len(report['partial']) - 50} more (see --json)")
    if report.get("excluded"):
        et = Table(title="inputs set aside by the quantum itself (what they hold; `restart` keeps them out)")
        for col in ("quantum", "set aside", "what and why"):
            et.add_column(col)
        for e in report["excluded"][:50]:
            et.add_row(escape(e["quantum_id"]), str(e["n_excluded"]), escape(e["why"][:200]))
        console.print(et)
    failed = [f for f in report["failures"] if f["status"] == "failed"]
    blocked = [f for f in report["failures"] if f["status"] != "failed"]
    if failed:
        ft = Table(title="failed quanta (the causes)")
        for col in ("quantum", "attempts", "error", "reason"):
            ft.add_column(col)
        for f in failed[:50]:
            ft.add_row(escape(f["quantum_id"]), str(f["attempts"]), f["error_class"] or "",
                       escape((f["error_message"] or "")[:160]))
        console.print(ft)
        if len(failed) > 50:
            console.print(f"... and {len(failed) - 50} more failed (see --json)")
    if blocked:
        # one row per cause, not per blocked quantum: 50 blocked rows must not hide 2 failures
        groups: dict[tuple[str, str], list[str]] = {}
        for f in blocked:
            groups.setdefault((f["error_class"] or "Blocked", f["error_message"] or ""), []).append(f["quantum_id"])
        bt = Table(title=f"blocked quanta ({len(blocked)}), by cause")
        for col in ("cause", "blocked", "stages", "e.g."):
            bt.add_column(col)
        for (cls, msg), ids in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:30]:
            stages = Counter(i.split(":", 1)[0] for i in ids)
            bt.add_row(escape(f"{cls}: {msg[:140]}"), str(len(ids)),
                       ", ".join(f"{s} {n}" for s, n in stages.most_common()), escape(ids[0]))
        console.print(bt)
        if len(groups) > 30:
            console.print(f"... and {len(groups) - 30} more causes (see --json)")


def cmd_report(args: argparse.Namespace) -> int:
    from .provenance.report import build_report

    repo = _repo_arg(args)
    run = _run_arg(args, repo)
    try:
        report = build_report(repo, run, with_quanta=args.json)
    except KeyError as exc:
        raise PlanningError(str(exc.args[0])) from None
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        _print_report(report)
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from .validate.single_frame import validate_run

    repo = _repo_arg(args)
    run = _run_arg(args, repo)
    metrics = validate_run(repo, run)
    if args.json:
        sys.stdout.write(json.dumps(metrics, indent=2, default=float) + "\n")
    else:
        table = Table(title=f"validation of {run} against simulator truth")
        for col in ("metric", "value", "bound", "status", "note"):
            table.add_column(col)
        colour = {"pass": "green", "fail": "red", "missing": "red", "insufficient": "yellow"}
        for name, m in metrics.get("checks", {}).items():
            table.add_row(name, _fmt(m["value"]), m["bound"], f"[{colour[m['status']]}]{m['status']}",
                          m.get("note", ""))
        console.print(table)
        for stage, n in metrics.get("left_out", {}).items():
            console.print(f"[yellow]left out[/yellow] {stage}: {n['failed']} failed, {n['blocked']} blocked of "
                          f"{n['quanta']} quanta; {n.get('partial', 0)} ran without {n.get('inputs_left_out', 0)} "
                          f"of their inputs" + (f", {n['inputs_excluded']} inputs set aside by the stage"
                                                if n.get("inputs_excluded") else "") + " (metrics cover what exists)")
    if not args.strict:
        return EXIT_OK
    known = _known_failures(args.known_failures) if args.known_failures else set()
    bad = {name for name, c in metrics.get("checks", {}).items() if c["status"] in ("fail", "missing")}
    unknown_names = known - set(metrics.get("checks", {}))
    if unknown_names:
        raise ConfigError(f"{args.known_failures}: {', '.join(sorted(unknown_names))}: not a metric of this run "
                          f"(metrics: {', '.join(sorted(metrics.get('checks', {})))})")
    notes = [f"known failure: {name} (listed in {args.known_failures})" for name in sorted(bad & known)]
    notes += [f"{name} now passes: remove it from {args.known_failures}" for name in sorted(known - bad)]
    for note in notes:
        if args.json:  # stdout stays one JSON document
            print(note, file=sys.stderr)
        else:
            console.print(escape(note))
    return EXIT_OK if not (bad - known) else EXIT_FAILED


def _known_failures(path: str) -> set[str]:
    """Metric names listed in ``path`` (one per line; blank lines and '#' comments ignored)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the known-failures file: {exc}") from None
    return {line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()}


def cmd_trace(args: argparse.Namespace) -> int:
    from .provenance.trace import trace_source

    repo = _repo_arg(args)
    run = _run_arg(args, repo)
    tree = trace_source(repo, run, args.source_id)
    sys.stdout.write(json.dumps(tree, indent=2, default=str) + "\n")
    return EXIT_OK


def cmd_site_check(args: argparse.Namespace) -> int:
    from .config.site import load_site
    from .execution.site_check import mpi_selftest, probe_slurm

    site = load_site(args.site)
    out: dict[str, Any] = {"site": site.name, "file": str(args.site), "valid": True, "scheduler": site.scheduler,
                           "memory_classes": [m.model_dump() for m in site.classes()]}
    if site.scheduler == "slurm":
        out["slurm"] = probe_slurm(site)
    if args.mpi:
        out["mpi"] = mpi_selftest(site, args.ranks)
    if args.json:
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        console.print(f"site [bold]{site.name}[/bold] ({args.site}): valid, scheduler {site.scheduler}, "
                      f"memory classes " + ", ".join(f"{m.name}={m.memory_gib:g} GiB" for m in site.memory_classes)
                      if site.memory_classes else f"site [bold]{site.name}[/bold] ({args.site}): valid, "
                      f"scheduler {site.scheduler}")
        for p in out.get("slurm", {}).get("partitions", []):
            console.print(f"  partition {p['partition']}{' (default)' if p['default'] else ''}: {p['available']}, "
                          f"{p['nodes']} node(s) {p['state']}, {p['cpus_per_node']} cpus, {p['memory_mb']} MB")
        if "mpi" in out:
            m = out["mpi"]
            console.print(f"  MPI: {m['ranks']} ranks on {', '.join(sorted(set(m['hosts'])))} via "
                          f"{' '.join(m['mpi_command'])}; Allreduce vs serial: max rel diff {m['max_rel_diff']:.1e} "
                          f"({'ok' if m['ok'] else 'WRONG'}); Slurm job {m.get('worker_slurm_job_id') or '-'}")
    return EXIT_OK if not args.mpi or out["mpi"]["ok"] else EXIT_FAILED


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lsst-prod",
        description="Run data-release productions: simulate a survey, plan a campaign into a quantum graph, "
                    "execute it with Parsl, and inspect provenance, failures and validation against truth.",
        epilog="Exit codes: 0 success, 1 some quanta failed (or validation failed with --strict), 2 bad input.",
    )
    p.add_argument("--version", action="version", version=f"lsst-prod {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO messages (with quantum data IDs)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def repo_opt(sp, help_extra=""):
        sp.add_argument("--repo", metavar="DIR", help="data repository (default: $LSST_PROD_REPO" + help_extra + ")")

    def run_opt(sp):
        sp.add_argument("run", nargs="?", metavar="RUN", help="run name (default: the newest run in the repository)")

    s = sub.add_parser("simulate", help="write a campaign's simulated survey (raw, calibs, refcat, truth)",
                       description="Simulate the survey described by the campaign's 'simulation' block into a data "
                                   "repository: raw FITS images with instrument headers, bias/flat/defects, a "
                                   "Gaia-like reference catalogue and Parquet truth tables. Deterministic (seeded); "
                                   "re-running overwrites the same files.")
    s.add_argument("campaign", metavar="CAMPAIGN", help="campaign YAML file")
    repo_opt(s, ", else the campaign's 'repo'")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("plan", help="show the quantum graph a campaign would run, without running anything",
                       description="Expand the campaign into quanta (stage x data ID) against the repository's "
                                   "registry and print the counts per stage. Writes nothing.")
    s.add_argument("campaign", metavar="CAMPAIGN")
    repo_opt(s, ", else the campaign's 'repo'")
    s.add_argument("--site", metavar="SITE.yaml", help="override the campaign's site file")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("submit", help="plan and execute a campaign as a new run",
                       description="Plan the campaign, execute every quantum with Parsl on the site, record "
                                   "provenance, print the report. The run's name is the last line of output. "
                                   "Exit 0 when every quantum succeeded, 1 when some failed, 2 for bad input.")
    s.add_argument("campaign", metavar="CAMPAIGN")
    repo_opt(s, ", else the campaign's 'repo'")
    s.add_argument("--site", metavar="SITE.yaml", help="override the campaign's site file")
    s.add_argument("--run", metavar="NAME", help="run name (default: RELEASE/UTC-timestamp)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("restart", help="re-run exactly what failed or never finished in a run (and its dependents)",
                       description="Re-run the quanta of RUN that failed, were blocked, never finished (e.g. the "
                                   "driver was killed), ran on partial inputs, or whose outputs are missing or "
                                   "changed size (--verify: or checksum, inputs included), plus "
                                   "everything downstream of them; nothing else. Attempts are numbered on from the "
                                   "previous ones, so the report shows them all.")
    run_opt(s)
    repo_opt(s)
    s.add_argument("--site", metavar="SITE.yaml", help="run on another site than the run's own")
    s.add_argument("--verify", action="store_true",
                   help="also hash every output and every pre-existing input (raw, calibrations, refcat) "
                        "against its recorded checksum, and re-run what read or wrote a changed file")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_restart)

    s = sub.add_parser("status", help="progress of a (running) run per stage",
                       description="Per-stage counts of quanta by state, and whether a driver is running the run.")
    run_opt(s)
    repo_opt(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("report", help="per-stage counts, failures with reasons, timings",
                       description="Report a run from provenance: quanta per stage and state, failures and "
                                   "blocked quanta with their error class and message, retries, timings, peak "
                                   "memory, stage summaries. --json adds every quantum with all its attempts.")
    run_opt(s)
    repo_opt(s)
    s.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("validate", help="compare a run's outputs with the simulator's truth",
                       description="Match outputs to the simulator's truth tables and print metrics (astrometric "
                                   "rms, zero-point errors, completeness, flux pulls) with their bounds.")
    run_opt(s)
    repo_opt(s)
    s.add_argument("--json", action="store_true")
    s.add_argument("--strict", action="store_true",
                   help="exit 1 if any bound is not met or any metric of an enabled stage is missing")
    s.add_argument("--known-failures", metavar="FILE",
                   help="with --strict: a file listing metrics known to fail (one per line, '#' comments); "
                        "they are still shown as failing but do not fail the command; a listed metric "
                        "that passes is reported so the list only shrinks")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("trace", help="trace a Source row back to the raw pixels and calibrations that made it",
                       description="Unpack a sourceId, find the Source table that holds it and walk provenance "
                                   "back to datasets no quantum produced (raw, calibrations, reference catalogue), "
                                   "with checksums, code versions and parameters.")
    run_opt(s)
    repo_opt(s)
    s.add_argument("--source-id", type=int, required=True, metavar="ID")
    s.set_defaults(func=cmd_trace)

    s = sub.add_parser("site", help="site utilities (check)", description="Site utilities.")
    site_sub = s.add_subparsers(dest="site_command", required=True, metavar="SUBCOMMAND")
    c = site_sub.add_parser("check", help="validate a site file and probe its scheduler",
                            description="Validate SITE.yaml (errors name file:line and key), probe the scheduler "
                                        "(sinfo: does the partition exist, nodes and their state) and, with --mpi, "
                                        "run an MPI Allreduce through the site's MPI executor and compare it with "
                                        "the serial answer.")
    c.add_argument("site", metavar="SITE.yaml")
    c.add_argument("--mpi", action="store_true", help="also run an MPI job of --ranks ranks through the site")
    c.add_argument("--ranks", type=int, default=2, help="ranks for --mpi (default 2)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_site_check)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except (ConfigError, PlanningError) as exc:
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)))
        return EXIT_BAD_INPUT
    except LsstProdError as exc:
        err_console.print(Text.assemble((f"{exc.error_class}: ", "bold red"), str(exc)))
        return EXIT_FAILED
    except OSError as exc:
        from .execution.worker import storage_problem

        problem = storage_problem(exc, str(getattr(args, "repo", None) or "."))
        if problem is None:
            raise
        err_console.print(Text.assemble(("StorageFull: ", "bold red"), problem))
        return EXIT_FAILED
    except Exception as exc:
        # the database said it: "database or disk is full", "attempt to write a readonly database"
        text = str(exc).lower()
        if type(exc).__name__ == "OperationalError" and ("disk is full" in text or "readonly" in text):
            err_console.print(Text.assemble(("StorageFull: ", "bold red"),
                                            f"the registry database cannot be written ({str(exc).splitlines()[0]}); "
                                            f"free space (or make it writable), then `lsst-prod restart`"))
            return EXIT_FAILED
        raise
    except KeyboardInterrupt:
        err_console.print("interrupted; `lsst-prod restart` finishes the run")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
