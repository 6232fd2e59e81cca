"""The embedded benchmark as an lmms-eval task: `twigbench export-shapes DIR` writes a folder that
`lmms-eval --include_path DIR` (or `TaskManager(include_path=DIR)`) reads, offline:

    DIR/shapes_<split>/shapes_<split>.yaml   the task (generate_until, greedy, scored by the project's scorer)
    DIR/shapes_<split>/utils.py              doc_to_visual, doc_to_text, process_results
    DIR/shapes_<split>/data.jsonl            one doc per sample: uid, qtype, question, answer, image
    DIR/shapes_<split>/images/<uid>.png      the sample's image (lossless: the same pixels as the harness's)

The samples are the ones a native cell of the same split and samples_per_type evaluates, in the same
order, so lmms-eval's doc_id i is the native sweep's i-th sample.
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.data import load_samples

UTILS = '''"""lmms-eval hooks of the embedded benchmark (written by `twigbench export-shapes`)."""
from pathlib import Path

from PIL import Image

from harness.data.synthetic import score

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    """The project's scorer (harness.data.synthetic.score): exact match, or F1 for descriptions."""
    return {"accuracy": score(doc["qtype"], results[0], doc["answer"])}
'''


def task_yaml(task: str, max_new_tokens: int) -> str:
    return f"""# the embedded benchmark (written by `twigbench export-shapes`); run with --include_path on this folder's parent
task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {{test: data.jsonl}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
  temperature: 0
  until: ["\\n\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def export_shapes(out: str | Path, split: str = "test", samples_per_type: int = 40, max_new_tokens: int = 48) -> Path:
    """Write the task folder of one split (see the module docstring); returns it."""
    samples = load_samples("shapes", split, samples_per_type)
    task = f"shapes_{split}"
    d = Path(out) / task
    (d / "images").mkdir(parents=True, exist_ok=True)
    with open(d / "data.jsonl", "w") as f:
        for s in samples:
            s.image.save(d / "images" / f"{s.uid}.png")
            f.write(json.dumps({"uid": s.uid, "qtype": s.qtype, "question": s.question, "answer": s.answer,
                                "image": f"images/{s.uid}.png"}) + "\n")
    (d / "utils.py").write_text(UTILS)
    (d / f"{task}.yaml").write_text(task_yaml(task, max_new_tokens))
    return d
