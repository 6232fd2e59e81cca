"""A sweep cell on an lmms-eval task (`datasets: [{lmms_eval: TASK, limit: N, include_path: DIR}]`):
the task run through `simple_evaluate` with the twigbench model built on the cell (and the model
the sweep already loaded), its requests measured as a native cell's samples, each record scored by
the task's own per-sample metric. The cell logs the task's metrics by lmms-eval's names
(`lmms/<task>/<metric>`) beside the harness's, and lmms-eval's per-sample log as an artifact.

Also the checks an experiment runs before anything is created (`check_task`).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from harness.data import DatasetError

PREFIX = "lmms_eval:"


def is_lmms(dataset: dict) -> bool:
    return "lmms_eval" in dataset


def task_manager(include_path: str | None):
    from lmms_eval.tasks import TaskManager

    return TaskManager("ERROR", include_path=include_path)


def _dataset_path(yaml_path: str) -> str:
    import yaml

    class Loose(yaml.SafeLoader):  # the task files' !function tags are not needed here
        pass

    Loose.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        return str(yaml.load(Path(yaml_path).read_text(), Loader=Loose).get("dataset_path", "?"))
    except Exception:
        return "?"


def check_task(task: str, include_path: str | None = None) -> None:
    """lmms-eval is installed, knows `task` and can load its data offline; else DatasetError with
    one line saying what to do."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        raise DatasetError(f"dataset lmms_eval: {task!r} needs lmms-eval; allowed after `make setup` (the lmms "
                           "extra and lmms-eval --no-deps, see README)") from None
    from loguru import logger

    logger.disable("lmms_eval")  # its task index logs pages of DEBUG lines; the check says one line
    try:
        _check_task(task, include_path)
    finally:
        logger.enable("lmms_eval")


GENERATION = ("generate_until",)  # what a sweep cell times (the CLI also scores loglikelihood tasks)


def _check_task(task: str, include_path: str | None) -> None:
    try:
        tm = task_manager(include_path)
    except Exception as e:  # a missing dependency of lmms-eval, an unreadable task folder
        raise DatasetError(f"lmms-eval cannot index its tasks{' under ' + include_path if include_path else ''} "
                           f"({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); "
                           "allowed: lmms-eval installed by `make setup` and folders of valid task YAMLs") from None
    if task not in tm.all_tasks:
        raise DatasetError(f"lmms-eval task {task!r} not found; allowed: a task lmms-eval lists (lmms-eval --tasks "
                           "list) or one under include_path (e.g. twigbench export-shapes DIR writes shapes_test)")
    try:
        config = tm._get_config(task)
    except Exception:
        config = {}
    source = str(config.get("dataset_path") or _dataset_path(tm.task_index.get(task, {}).get("yaml_path", "")))
    kind = config.get("output_type", "generate_until")
    if kind not in GENERATION:
        raise DatasetError(f"lmms-eval task {task!r} is scored by {kind}; allowed as an experiment dataset: "
                           f"{', '.join(GENERATION)} tasks (run it through the lmms-eval CLI with --model twigbench)")
    from lmms_eval.tasks import get_task_dict

    try:
        get_task_dict([task], tm)
    except Exception as e:  # the dataset is not on this machine (offline) or cannot be read
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DatasetError(f"lmms-eval task {task!r}: its data ({source}) cannot be loaded here ({first}); get it "
                           f"once with network access (HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 lmms-eval --model "
                           f"twigbench --tasks {task} --limit 1) or `huggingface-cli download --repo-type dataset "
                           f"{source}`, then run offline (gated datasets need `huggingface-cli login` first)") from None


def _main_metric(sample: dict, metrics: list[str]) -> float:
    for m in metrics:
        v = sample.get(m)
        if isinstance(v, bool) or isinstance(v, (int, float)):
            return float(v)
    return math.nan


def run_lmms_cell(adapter, cell, baseline=None):
    """The cell on its lmms-eval task; returns a CellResult as harness.cell.run_cell does."""
    from lmms_eval.evaluator import simple_evaluate

    from harness.lmms.model import TwigbenchLMM

    start_ms = int(time.time() * 1000)
    d = cell.dataset
    task = d["lmms_eval"]
    model = TwigbenchLMM(adapter=adapter, cell=cell)
    res = simple_evaluate(model=model, tasks=[task], limit=d.get("limit"), log_samples=True,
                          task_manager=task_manager(d.get("include_path")), bootstrap_iters=0)
    logged = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    metric_names = [m["metric"] for m in res["configs"][task].get("metric_list", [])]
    by_doc = {s["doc_id"]: s for s in logged}
    records = model.records
    for r in records:  # each record scored by the task's first metric (its own per-sample value)
        r.score = _main_metric(by_doc.get(int(r.uid.rsplit("-", 1)[1]), {}), metric_names)
        r.answer = str(by_doc.get(int(r.uid.rsplit("-", 1)[1]), {}).get("target", ""))
    if not records:
        raise ValueError(f"lmms-eval task {task!r} made no generation request (loglikelihood-only tasks are not "
                         "timed as cells yet; run them through the lmms-eval CLI)")
    lmms_metrics = {f"lmms/{task}/{k.split(',')[0]}": v for k, v in res["results"][task].items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}
    artifacts = {f"lmms_samples_{task}.jsonl": "".join(json.dumps(s, default=str) + "\n" for s in logged)}
    extra = {"lmms_task": task, "lmms_limit": d.get("limit"), "lmms_metric": metric_names[0] if metric_names else "",
             # the task's generation_kwargs decide (they override generation.max_new_tokens)
             "max_new_tokens": ",".join(map(str, sorted(model.max_new_used)))}
    return model.runner.result(records, cell.timing["warmup"], start_ms, baseline, extra, lmms_metrics, artifacts)
