"""twigbench command line: `twigbench sweep FILE`, `twigbench report EXPERIMENT`,
`twigbench export-shapes DIR` (the embedded benchmark as an lmms-eval task)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _report_dir(args):
    from reports.build import default_out_dir

    return Path(args.report_dir) if args.report_dir else default_out_dir()


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from harness.tracking import DEFAULT_TRACKING_URI

    ap = argparse.ArgumentParser(prog="twigbench", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    sw = sub.add_parser("sweep", help="run an experiment file, log to MLflow, write the report")
    sw.add_argument("experiment_file")
    sw.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    sw.add_argument("--dry-run", action="store_true", help="validate and list the cells, run nothing")
    sw.add_argument("--no-report", action="store_true")
    sw.add_argument("--report-dir", default=None, help="default: reports/out/ in the current folder")
    sw.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="local: cells in this process; ray: each cell a Ray task")
    sw.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start one here)")
    sw.add_argument("--gpus-per-cell", type=float, default=None,
                    help="Ray executor: GPUs per cell (default 1 where this machine has a GPU, else 0)")
    sw.add_argument("--no-progress", action="store_true", help="no progress bars")
    sw.add_argument("--fresh", action="store_true",
                    help="run every cell again under a new parent run (default: resume the last one)")
    rp = sub.add_parser("report", help="write the report of an experiment's latest sweep from MLflow")
    rp.add_argument("experiment")
    rp.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    rp.add_argument("--run-id", default=None, help="parent (sweep) run id; default: the latest")
    rp.add_argument("--report-dir", default=None, help="default: reports/out/ in the current folder")
    ex = sub.add_parser("export-shapes", help="write the embedded benchmark as an lmms-eval task folder "
                                              "(then: lmms-eval --include_path DIR --tasks shapes_<split>)")
    ex.add_argument("out_dir")
    ex.add_argument("--split", default="test")
    ex.add_argument("--samples-per-type", type=int, default=40)
    ex.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    if args.command == "export-shapes":
        from harness.data import DatasetError
        from harness.lmms.tasks import export_shapes
        from harness.preflight import PreflightError, check_output_dir

        try:
            check_output_dir(Path(args.out_dir), "task folder", "twigbench export-shapes DIR")
            d = export_shapes(args.out_dir, args.split, args.samples_per_type, args.max_new_tokens)
        except (DatasetError, PreflightError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"task shapes_{args.split} in {d}: lmms-eval --model twigbench --model_args pretrained=embedded "
              f"--tasks shapes_{args.split} --include_path {Path(args.out_dir).resolve()}")
        return 0

    from harness.experiment import ExperimentError, load_experiment

    if args.command == "sweep":
        try:
            exp = load_experiment(args.experiment_file)
        except ExperimentError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not args.dry_run:
            from harness.preflight import PreflightError, check_output_dir, check_ray_address, check_tracking_uri

            try:
                if not args.no_report:
                    check_output_dir(_report_dir(args) / exp.name)
                check_tracking_uri(args.tracking_uri)
                if args.executor == "ray":
                    check_ray_address(args.ray_address)
            except PreflightError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        models = ", ".join(m["path"] for m in exp.models)
        datasets = ", ".join(f"{d['name']}:{d['split']}" for d in exp.datasets)
        print(f"experiment {exp.name!r}: {len(exp.cells)} cells on {models} / {datasets}")
        if args.dry_run:
            for c in exp.cells:
                print(f"  {c.hash}  {c.label}")
            return 0
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        from harness.sweep import run_experiment, summary_table
        from reports.build import build_report

        t0 = time.perf_counter()
        options = {}
        if args.executor == "ray":
            options = {"address": args.ray_address, "gpus_per_cell": args.gpus_per_cell}
        outcome = run_experiment(exp, args.tracking_uri, args.executor, progress=not args.no_progress,
                                 fresh=args.fresh, **options)
        print(summary_table(exp, outcome))
        print(f"sweep {'finished' if outcome.ok else 'ended with failures'} in {time.perf_counter() - t0:.0f} s: "
              f"{len(outcome.ran)} cell(s) run, {len(outcome.skipped)} already finished, "
              f"{len(outcome.failed)} failed; MLflow parent run {outcome.parent_id} in {args.tracking_uri} "
              f"(experiment {exp.name!r})")
        if not args.no_report and (outcome.ok or outcome.metrics):  # the finished cells, even if some failed
            path = build_report(exp.name, args.tracking_uri, outcome.parent_id, _report_dir(args))
            print(f"report: {path}" + ("" if outcome.ok else " (the finished cells only)"))
        if not outcome.ok:
            print(f"error: {len(outcome.failed)} cell(s) failed: {', '.join(outcome.failed)}; run the same "
                  f"command again to retry them", file=sys.stderr)
            return 1
        from harness.tracking import ui_hint

        print(f"browse: {ui_hint(args.tracking_uri, outcome.experiment_id, outcome.parent_id)}"
              + ("  (or: make ui)" if args.tracking_uri == "sqlite:///mlflow.db" else "")
              + "\n  (that page: a curve per method against visual tokens; clear the search box for every run)")
        return 0
    if args.command == "report":
        from harness.preflight import check_output_dir
        from harness.tracking import ui_hint
        from reports.build import build

        try:
            check_output_dir(_report_dir(args) / args.experiment)
            path, sweep = build(args.experiment, args.tracking_uri, args.run_id, _report_dir(args))
            print(f"report: {path}\nbrowse: {ui_hint(args.tracking_uri, sweep.experiment_id, sweep.parent_id)}")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
